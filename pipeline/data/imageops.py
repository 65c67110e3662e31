"""Image operations shared by the stages: the fast PNG decode op, float <-> uint8, writing a PNG, fitting an
image of any size to the configured one."""

from __future__ import annotations

import io
import math
import random
import warnings
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from torchvision.io import ImageReadMode

from pipeline.io import atomic_write_bytes


def _decoder_op(name: str):
    """torchvision's decoder op itself (``decode_png``, ``decode_image``): its Python wrapper spends a fifth of a
    32x32 decode on a deprecation warning and argument checks. Falls back to the wrapper if the op moves."""
    try:
        import torchvision  # noqa: F401 -- registers torch.ops.image

        return getattr(torch.ops.image, name)
    except (AttributeError, RuntimeError):
        import torchvision.io

        wrapper = getattr(torchvision.io, name)
        return lambda data, mode, exif: wrapper(data, mode=ImageReadMode(mode), apply_exif_orientation=exif)


decode_png = _decoder_op("decode_png")
decode_any = _decoder_op("decode_image")  # PNG, JPEG, WebP, GIF by their magic bytes

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


RESIZE_MODES = ("center-crop", "random-crop", "stretch")


def fit_to_size(image: torch.Tensor, size: tuple[int, int], mode: str = "center-crop",
                rng: Optional[random.Random] = None) -> torch.Tensor:
    """A uint8 C x H x W image of any size at ``size`` (H, W): ``center-crop`` scales the shorter side to the
    target (antialiased) and keeps the central part, ``random-crop`` keeps a random part instead (``rng``),
    ``stretch`` resizes both sides, changing the proportions. An image already at ``size`` is returned as is."""
    h, w = size
    if tuple(image.shape[-2:]) == (h, w):
        return image
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize {mode!r}: use one of {', '.join(RESIZE_MODES)}")
    if mode == "stretch":
        return _resize(image, h, w)
    scale = max(h / image.shape[-2], w / image.shape[-1])
    scaled = _resize(image, max(h, math.ceil(image.shape[-2] * scale - 1e-6)),
                     max(w, math.ceil(image.shape[-1] * scale - 1e-6)))
    if mode == "center-crop" or rng is None:
        # torchvision's center_crop rounds the same way
        top, left = int(round((scaled.shape[-2] - h) / 2.0)), int(round((scaled.shape[-1] - w) / 2.0))
    else:
        top, left = rng.randint(0, scaled.shape[-2] - h), rng.randint(0, scaled.shape[-1] - w)
    return scaled[..., top:top + h, left:left + w]


def _resize(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 C x H x W image (PIL's filter), kept in uint8. Called without
    torchvision's wrapper, and on the decoder's channels-last layout, where torch has a vectorised uint8 kernel
    (2.6x faster at 256 -> 64 than on a contiguous copy)."""
    if image.shape[-2:] == (h, w):
        return image
    return torch.nn.functional.interpolate(image.unsqueeze(0), size=(h, w), mode="bilinear", antialias=True,
                                           align_corners=False)[0]
