"""Image operations shared by the stages: the fast PNG decode op, float <-> uint8, writing a PNG."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode

from pipeline.io import atomic_write_bytes


def _png_op():
    """torchvision's PNG decoder op itself: its Python wrapper spends a fifth of a 32x32 decode on a
    deprecation warning and argument checks. Falls back to the wrapper if the op moves."""
    try:
        import torchvision  # noqa: F401 -- registers torch.ops.image

        return torch.ops.image.decode_png
    except (AttributeError, RuntimeError):
        from torchvision.io import decode_png

        return lambda data, mode, exif: decode_png(data, mode=ImageReadMode(mode), apply_exif_orientation=exif)


decode_png = _png_op()

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; with torchvision pinned they
# remain, and decode PNGs twice as fast as PIL here. The warning would otherwise fire for every image.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8 [0, 255], rounding to the nearest level."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def png_bytes(image: torch.Tensor, scale: int = 1) -> bytes:
    """A uint8 C x H x W image as PNG file bytes, enlarged ``scale`` times without smoothing."""
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: torch.Tensor, path: Path, scale: int = 1) -> Path:
    """Write a uint8 C x H x W image as a PNG (atomically), enlarged ``scale`` times without smoothing."""
    return atomic_write_bytes(path, png_bytes(image, scale))
