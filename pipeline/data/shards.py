"""Writing WebDataset shards and their manifest (the reading half, the manifest itself, is ``pipeline.data.manifest``).

Layout of a shard directory::

    train-000000.tar ...  val-000000.tar ...  manifest.json

Inside a shard, sample ``000123`` is ``000123.png`` (lossless), ``000123.cls`` (class index, ASCII)
and ``000123.json`` (attributes and source id): the WebDataset convention, so shards written by
other tools load too. The key is the sample's index in its source, stable across re-sharding.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.console import track
from pipeline.data import remote
from pipeline.data.imagefile import ImageError
from pipeline.data.imageops import fit_to_size
from pipeline.data.manifest import MANIFEST, MANIFEST_FORMAT, ShardError
from pipeline.data.sources import Sample, Source
from pipeline.io import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

def parse_bytes(text: str | int, what: str) -> int:
    """``"64MB"``/``"1GiB"``/``"500kB"``/``4096`` -> bytes; ``what`` names the setting in the error."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]|[bB])\s*", str(text))
    if not m:
        raise ValueError(f"{what} {text!r} is not a size in bytes (64MB, 1GiB, 500kB, or a number of bytes)")
    number, unit = float(m.group(1)), m.group(2)
    powers = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}
    base = 1024 if "i" in unit.lower() else 1000
    return int(number * base ** powers[unit[0].lower()])


def parse_shard_size(text: str | int) -> tuple[int, int]:
    """``"5000"`` -> at most 5000 samples; ``"64MB"``/``"1GiB"`` -> at most that many bytes. Returns (count, bytes)."""
    if isinstance(text, int):
        return text, 1 << 62
    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", str(text)):
        number = float(text)
        if number < 1 or number != int(number):
            raise ValueError(f"--shard-size {text!r}: a sample count must be a positive integer")
        return int(number), 1 << 62
    try:
        size = parse_bytes(text, "--shard-size")
    except ValueError:
        raise ValueError(f"--shard-size {text!r} is neither a sample count (5000) nor a size (64MB, 1GiB)") from None
    if size < 1024:
        raise ValueError(f"--shard-size {text!r} is smaller than one tar block; use at least 1kB")
    return 1 << 62, size


def encode_png(image: np.ndarray, compress_level: int = 0) -> bytes:
    """Lossless PNG. Level 0 (stored, no deflate) decodes about 2.8x faster than levels 1-9 at 32x32 (PNG
    decoding is what bounds a training stream there) for 10-40% more bytes; any level reads back the same."""
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG",
                                                                         compress_level=compress_level)
    return buf.getvalue()


PREPARE_RESIZE = ("center-crop", "stretch")  # a random crop fixed at prepare time would only lose data


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """HWC uint8 of any size -> size x size: shorter side to ``size`` (antialiased), then the central square; the
    same operation the loader applies to foreign images (``fit_to_size``)."""
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return fit_to_size(chw, (size, size), "center-crop").permute(1, 2, 0).numpy()


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize with an antialiasing filter (Lanczos), keeping the channel count."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    out = np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS))
    return out[:, :, None] if out.ndim == 2 else out


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HWC uint8 with 1 or 3 channels -> the same image with ``channels`` (ITU-R 601 luma for grayscale)."""
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    return np.asarray(Image.fromarray(image).convert("L"))[:, :, None]


def split_indices(n: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Deterministic train/val split: the same (n, fraction, seed) always gives the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return {"train": order[n_val:], "val": order[:n_val]}


def write_shards(source: Source, out: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0,
                 shard_size: str | int = 10000, image_size: Optional[int] = None, png_compression: int = 0,
                 overwrite: bool = False, progress: bool = True, channels: Optional[int] = None,
                 resize_mode: str = "center-crop") -> dict:
    """Write ``source`` as train/val WebDataset shards + manifest.json into ``out``; returns the manifest.

    An image the source cannot use (damaged, or above its pixel limit) is skipped and listed with the reason
    under the manifest's ``skipped_images``.

    Everything is written into a temporary sibling directory that is renamed to ``out`` at the end, so an
    interrupted prepare never leaves a half-written dataset behind. ``image_size`` resizes every image to a
    square of that size (``resize_mode``: ``center-crop``, the default, or ``stretch``), ``channels`` converts
    every image to grayscale (1) or RGB (3).
    """
    check_prepare_options(out, overwrite, png_compression, channels, resize_mode)
    manifest: dict = {
        "format": MANIFEST_FORMAT,
        "source": source.name,
        "prepare": {"val_fraction": val_fraction, "seed": seed, "shard_size": str(shard_size), "image_size": image_size,
                    "png_compression": png_compression,
                    # only when set: data prepared without it keeps the identity (manifest hash) it had
                    **({"channels": channels} if channels else {}),
                    **({"resize": resize_mode} if image_size else {})},
        "class_names": list(source.class_names),
        "attribute_names": list(source.attribute_names),
        "splits": {},
    }

    skipped: dict[str, str] = {}

    def fill(directory: Path) -> None:
        for split, indices in split_indices(len(source), val_fraction, seed).items():
            if len(indices) == 0:
                continue
            writer = SplitWriter(directory, split, shard_size, image_size, png_compression, channels, resize_mode)
            for index in track(indices, f"prepare {split}", "img", enabled=progress):
                try:
                    sample = source[int(index)]
                except ImageError as e:
                    skipped[source.describe(int(index))] = str(e)
                    continue
                writer.add(int(index), sample, _sample_name(source, int(index), sample.attributes))
            if writer.counts:  # (a split of only skipped images has no shard open)
                manifest["splits"][split] = writer.finish()
            elif split == "train":
                raise ValueError(f"{source.name}: no usable image for the train split ({len(skipped)} skipped, "
                                 f"first {next(iter(skipped))}: {next(iter(skipped.values()))})")
        if skipped:  # only when there are: data without any keeps the identity it had
            manifest["skipped_images"] = dict(sorted(skipped.items()))

    return write_dataset(out, manifest, fill, overwrite)


def check_prepare_options(out: str | os.PathLike, overwrite: bool, png_compression: int, channels: Optional[int],
                          resize_mode: str) -> None:
    if resize_mode not in PREPARE_RESIZE:
        raise ValueError(f"--resize {resize_mode!r}: use one of {', '.join(PREPARE_RESIZE)}")
    if channels not in (None, 1, 3):
        raise ValueError(f"--channels {channels}: use 1 (grayscale) or 3 (RGB)")
    if not 0 <= png_compression <= 9:
        raise ValueError(f"--png-compression {png_compression} must be a zlib level from 0 (fastest to read) to 9")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")


def write_dataset(out: str | os.PathLike, manifest: dict, fill: Callable[[Path], None], overwrite: bool) -> dict:
    """Run ``fill(directory)`` (which writes the shards and completes ``manifest['splits']``) into a temporary
    sibling of ``out``, write the manifest, and rename it to ``out``: an interrupted prepare leaves nothing."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
        if out.exists() and overwrite:
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _sample_name(source: Source, index: int, attributes: dict) -> str:
    """The file an image came from when the source knows it (an image folder), else its index."""
    if "source_id" in attributes:
        return f"{source.name}/{attributes['source_id']}"
    return f"sample {index} of {source.name}"


class SplitWriter:
    """Writes one split's samples, in the order given, as shards of at most ``shard_size`` samples or bytes, each
    image fitted (``image_size``, ``resize_mode``) and converted (``channels``); ``finish`` gives the split's
    manifest entry."""

    def __init__(self, directory: Path, split: str, shard_size: str | int, image_size: Optional[int],
                 png_compression: int, channels: Optional[int] = None, resize_mode: str = "center-crop") -> None:
        self.directory, self.split = directory, split
        self.max_count, self.max_bytes = parse_shard_size(shard_size)
        self.image_size, self.png_compression = image_size, png_compression
        self.channels, self.resize_mode = channels, resize_mode
        self.counts: Counter = Counter()
        self.reshaped: list[str] = []  # non-square images that the square resize stretched
        self.labels: Counter = Counter()
        self.shape: Optional[tuple[int, ...]] = None
        self.first = ""
        self.writer: Optional[wds.TarWriter] = None
        self.name = ""

    def add(self, index: int, sample: Sample, what: str) -> None:
        """Add ``sample`` under the key ``index`` (``what`` names it in messages)."""
        image = to_channels(sample.image, self.channels) if self.channels else sample.image
        if self.image_size and self.resize_mode == "center-crop":
            image = center_crop(image, self.image_size)
        elif self.image_size:
            if image.shape[0] != image.shape[1]:
                self.reshaped.append(f"{what} ({image.shape[1]}x{image.shape[0]})")
            image = resize(image, self.image_size)
        if self.shape is None:
            self.shape, self.first = image.shape, what
        elif image.shape != self.shape:
            shape = self.shape
            if image.shape[:2] != shape[:2]:
                raise ValueError(f"{what} is {image.shape[1]}x{image.shape[0]} but {self.first} is "
                                 f"{shape[1]}x{shape[0]}; pass --image-size S to resize every image to SxS")
            raise ValueError(f"{what} has {image.shape[2]} channel(s) but {self.first} has {shape[2]}; pass "
                             "--channels 1 (grayscale) or --channels 3 (RGB) to convert every image")
        record = {"__key__": f"{index:06d}", "png": encode_png(image, self.png_compression),
                  "json": json.dumps(sample.attributes, sort_keys=True).encode()}
        if sample.label is not None:
            record["cls"] = str(sample.label).encode()
            self.labels[sample.label] += 1
        # Rotate on the archive's real size (headers and padding included), which ShardWriter's
        # payload-only byte count does not see.
        if self.writer is None or self.counts[self.name] >= self.max_count or \
                self.writer.tarstream.offset + _tar_bytes(record) > self.max_bytes and self.counts[self.name] > 0:
            self.close()
            self.name = f"{self.split}-{len(self.counts):06d}.tar"
            # fixed int mtime: same data, same sha256 (a float adds PAX headers)
            self.writer = wds.TarWriter(str(self.directory / self.name), mtime=0)
        self.writer.write(record)
        self.counts[self.name] += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def finish(self) -> dict:
        self.close()
        if self.reshaped:
            log.warning("%s: resizing to %dx%d changed the aspect ratio of %d of %d images (first: %s); crop them to "
                        "squares before genbench prepare, or use --resize center-crop, to keep their proportions",
                        self.split, self.image_size, self.image_size, len(self.reshaped), sum(self.counts.values()),
                        self.reshaped[0])
        directory, counts, labels = self.directory, self.counts, self.labels
        shards = [{"file": name, "num_samples": counts[name], "sha256": sha256_file(directory / name),
                   "bytes": (directory / name).stat().st_size} for name in sorted(counts)]
        n_classes = max(labels) + 1 if labels else 0
        assert self.shape is not None, f"the {self.split} split is empty"
        return {
            "num_samples": int(sum(counts.values())),
            "image_size": [int(self.shape[0]), int(self.shape[1])],
            "channels": int(self.shape[2]),
            "label_histogram": [labels.get(c, 0) for c in range(n_classes)],
            "shards": shards,
        }


def _tar_bytes(record: dict) -> int:
    """Bytes a sample adds to a tar: a 512-byte header per entry plus its data padded to 512."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in record.items() if not k.startswith("__"))


def upload_shards(local: Path, url: str) -> None:
    """Copy a prepared shard directory to ``url`` (``s3://bucket/prefix/``), the manifest last: a reader that
    finds the manifest finds every shard it names."""
    prefix = url if url.endswith("/") else url + "/"
    fs = remote.filesystem(prefix, remote.TIMEOUT)
    try:
        if fs.exists(prefix + MANIFEST):
            raise FileExistsError(f"{remote.public_url(prefix)} already holds a {MANIFEST}; choose another --out")
        for path in sorted(local.iterdir()):
            if path.name != MANIFEST:
                fs.put_file(str(path), prefix + path.name)
        fs.put_file(str(local / MANIFEST), prefix + MANIFEST)
    except FileExistsError:
        raise
    except Exception as e:
        raise ShardError(f"uploading to {remote.public_url(prefix)} failed ({type(e).__name__}: {e}; "
                         f"{remote.endpoint_description(prefix)}); the manifest is written last, so rerun to finish"
                         ) from None


