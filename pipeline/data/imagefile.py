"""Image files that may be damaged, huge or unusual, decoded so that a bad one raises ``ImageError`` (which every
reader skips and counts) and never crashes the process or comes out wrong.

* **Damaged PNGs.** torchvision's ``decode_png`` (and ``decode_image`` on PNG bytes) segfaults the process when
  libpng fails inside the image data (a flipped byte in an IDAT chunk: "libpng error: IDAT: incorrect data
  check", then SIGSEGV, killing a loader worker). ``check_png`` walks the chunks first: every CRC, the header's
  fields, the zlib stream of the image data inflated to exactly the size the header implies, and every row's
  filter byte. What passes is what libpng decodes without error, so the fast op stays on the hot path; anything
  the check does not cover (an unusual layout) goes to PIL, which raises instead of crashing.
* **Huge images.** An image over ``max_pixels`` is refused from its header, before any pixel is decoded (PIL
  only warns up to 179 megapixels and a 13000x13000 PNG takes 2.3 GB).
* **16-bit images** are scaled by their bit depth (PIL's ``convert`` clips them: 1000 and 32768 both become
  255), and **EXIF orientation** is applied, as torchvision's ``decode_image(apply_exif_orientation=True)`` and
  ``ImageOps.exif_transpose`` do.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from typing import BinaryIO, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.data.imageops import decode_any, decode_png

# The largest image any reader accepts by default: 64 megapixels, above every camera sensor of 2026 (61 MP), so
# only a decompression bomb or a scan meant for something else is refused. An option wherever images are read.
MAX_PIXELS = 64_000_000

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> (channels, allowed bit depths), from the PNG specification's IHDR table
_PNG_COLOUR = {0: (1, (1, 2, 4, 8, 16)), 2: (3, (8, 16)), 3: (1, (1, 2, 4, 8)), 4: (2, (8, 16)), 6: (4, (8, 16))}
# Adam7 passes: (x0, y0, dx, dy)
_CHUNK = struct.Struct(">I4s")  # a chunk's length and type
_IHDR = struct.Struct(">IIBBBBB")
_CRC = struct.Struct(">I")
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


class ImageError(ValueError):
    """An image that cannot be used: damaged, too large, or not an image. The message says which and why."""


class ImageTooLarge(ImageError):
    """An image above the pixel limit."""


def too_large(width: int, height: int, max_pixels: Optional[int]) -> Optional[str]:
    if max_pixels is not None and width * height > max_pixels:
        return (f"{width}x{height} is {width * height / 1e6:.1f} megapixels, above the limit of {max_pixels / 1e6:g} "
                "(raise max_pixels if such images are meant to be there)")
    return None


def check_png(data: bytes, max_pixels: Optional[int] = MAX_PIXELS) -> tuple[int, int, int]:
    """Raise ``ImageError`` unless ``data`` is a PNG that libpng decodes without error; returns (width, height,
    bit depth). Costs a CRC and an inflate of the image data (a copy, for the stored PNGs genbench writes): 6 us
    alone and ~12 us in the loader against the decode's 15 us at 32x32 RGB (``benchmarks/dataloader.py`` measures
    the loader with it; docs/performance.md)."""
    if data[:8] != PNG_SIGNATURE:
        raise ImageError("not a PNG (no PNG signature)")
    view = memoryview(data)  # slices of a view are not copies: the CRCs and the inflate read the file in place
    pos, end, seen_plte, last = 8, len(data), False, b""
    header: Optional[tuple[int, int, int, int, int]] = None
    idat: list[memoryview] = []
    while True:
        if pos + 12 > end:
            raise ImageError(f"truncated: the file ends inside a chunk header at byte {pos} (no IEND)")
        length, kind = _CHUNK.unpack_from(data, pos)
        stop = pos + 8 + length
        if stop + 4 > end:
            raise ImageError(f"truncated: chunk {kind!r} at byte {pos} needs {length} bytes, the file ends first")
        if zlib.crc32(view[pos + 4:stop]) != _CRC.unpack_from(data, stop)[0]:
            raise ImageError(f"chunk {kind.decode('latin-1')!r} at byte {pos} fails its CRC: the file is damaged")
        if kind == b"IDAT":
            if idat and last != b"IDAT":
                raise ImageError("IDAT chunks are not consecutive")
            idat.append(view[pos + 8:stop])
        elif header is None:
            if kind != b"IHDR":
                raise ImageError("the first chunk is not IHDR")
            header = _ihdr(data[pos + 8:stop], max_pixels)
        elif kind == b"PLTE":
            seen_plte = True
        elif kind == b"IEND":
            break
        last, pos = kind, stop + 4
    assert header is not None  # the first chunk was IHDR
    width, height, depth, colour, interlace = header
    if colour == 3 and not seen_plte:
        raise ImageError("a palette image without a PLTE chunk")
    if not idat:
        raise ImageError("no image data (IDAT)")
    rows = _rows(width, height, _PNG_COLOUR[colour][0] * depth, interlace)
    expected = sum(n * (1 + row_bytes) for n, row_bytes in rows)
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(idat[0] if len(idat) == 1 else b"".join(idat), expected + 1)
    except zlib.error as e:
        raise ImageError(f"the image data does not inflate ({e}): the file is damaged") from None
    if len(raw) != expected or not inflate.eof:
        raise ImageError(f"the image data inflates to {len(raw)}{'' if inflate.eof else '+ (unterminated)'} bytes, "
                         f"the header implies {expected}: the file is damaged")
    offset = 0
    for n, row_bytes in rows:  # each row starts with its filter type, 0-4
        if max(raw[offset:offset + n * (1 + row_bytes):1 + row_bytes]) > 4:
            raise ImageError("a row has an unknown filter type: the file is damaged")
        offset += n * (1 + row_bytes)
    return width, height, depth


def _ihdr(body: bytes, max_pixels: Optional[int]) -> tuple[int, int, int, int, int]:
    if len(body) != 13:
        raise ImageError(f"IHDR has {len(body)} bytes, not 13")
    width, height, depth, colour, compression, filtering, interlace = _IHDR.unpack(body)
    if not (0 < width < 2 ** 31 and 0 < height < 2 ** 31):
        raise ImageError(f"IHDR says {width}x{height}")
    if colour not in _PNG_COLOUR or depth not in _PNG_COLOUR[colour][1] or compression or filtering or \
            interlace > 1:
        raise ImageError(f"IHDR has an invalid combination (bit depth {depth}, colour type {colour}, "
                         f"compression {compression}, filter {filtering}, interlace {interlace})")
    reason = too_large(width, height, max_pixels)
    if reason:
        raise ImageTooLarge(reason)
    return width, height, depth, colour, interlace


def _rows(width: int, height: int, bits_per_pixel: int, interlace: int) -> list[tuple[int, int]]:
    """(number of rows, bytes per row without the filter byte) of each pass (one pass unless Adam7)."""
    if not interlace:
        return [(height, (width * bits_per_pixel + 7) // 8)]
    out = []
    for x0, y0, dx, dy in _ADAM7:
        cols, rows = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if cols and rows:
            out.append((rows, (cols * bits_per_pixel + 7) // 8))
    return out


# -- the loader's decode: the fast torchvision op where it is safe --------------------------------------------


def decode_tensor(data: bytes, channels: int, max_pixels: Optional[int] = MAX_PIXELS) -> torch.Tensor:
    """Encoded image bytes (PNG, JPEG, WebP, or anything PIL reads) -> uint8 C x H x W with ``channels`` (1 or 3),
    8 bits per channel, EXIF orientation applied. Raises ``ImageError`` for a damaged or too large image."""
    mode = 1 if channels == 1 else 3  # torchvision's ImageReadMode GRAY / RGB
    # EXIF orientation applied (True) as load_image applies it: the same file gives the same pixels everywhere
    if data[:8] == PNG_SIGNATURE:
        check_png(data, max_pixels)
        image = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode, True)
    elif data[:3] == b"\xff\xd8\xff":
        with _open(io.BytesIO(data)) as im:  # the header only: the size, before any pixel is decoded
            reason = too_large(im.width, im.height, max_pixels)
        if reason:
            raise ImageTooLarge(reason)
        try:
            image = decode_any(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode, True)
        except RuntimeError as e:  # libjpeg raises on damage; it does not crash
            raise ImageError(f"does not decode: {str(e).splitlines()[0]}") from None
    else:  # WebP (torchvision ignores its EXIF orientation), and anything else PIL reads
        return torch.from_numpy(np.array(load_image(io.BytesIO(data), channels, max_pixels))).permute(2, 0, 1)
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16: scale by the bit depth, rounding
        image = ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return image


# -- PIL: prepare, image folders, foreign corpora --------------------------------------------------------------


def load_image(file: str | os.PathLike | BinaryIO, channels: Optional[int] = None,
               max_pixels: Optional[int] = MAX_PIXELS) -> np.ndarray:
    """An image file (path or file object) -> uint8 H x W x C, C = 1 (grayscale) or 3 (RGB) unless ``channels``
    asks for one of them; 16-bit images scaled by their bit depth, EXIF orientation applied, alpha dropped.
    Raises ``ImageError`` for a damaged, too large or unreadable image."""
    try:
        with _open(file) as im:
            reason = too_large(im.width, im.height, max_pixels)
            if reason:
                raise ImageTooLarge(reason)
            array = _to_hwc(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
        raise ImageError(f"does not decode ({e})") from None
    if channels == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 1 and array.shape[2] == 3:
        array = np.asarray(Image.fromarray(array).convert("L"))[:, :, None]
    return array


_PIL_LIMIT = threading.Lock()


def _open(file: str | os.PathLike | BinaryIO) -> Image.Image:
    """``Image.open`` (the header only) with PIL's own pixel limit lifted: ``max_pixels`` is the limit, with
    one message, and a user who raises it for gigapixel scans is not stopped by PIL's 179 megapixels."""
    with _PIL_LIMIT:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(file)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _to_hwc(im: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8 H x W x 1 or 3."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale (PNG opens as I;16 or I): values 0..65535 -> 0..255, rounding
        wide = np.asarray(im).astype(np.int64)
        return np.clip((wide * 255 + 32767) // 65535, 0, 255).astype(np.uint8)[:, :, None]
    if im.mode == "F":  # floating-point TIFFs: taken as intensities in [0, 1]
        return np.clip(np.rint(np.asarray(im) * 255.0), 0, 255).astype(np.uint8)[:, :, None]
    if im.mode not in ("L", "RGB"):  # palette, alpha, CMYK, 1-bit, ...: as RGB, alpha dropped
        im = im.convert("RGB")
    array = np.asarray(im, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array

