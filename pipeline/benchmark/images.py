"""Sources of images to score (``ImageSource``): a trained run's samples, shards, an image folder, uniform noise;
and what a reference is on top (``Reference``): shards or a folder.

Every source yields uint8 N x C x H x W batches with the global index of each image, and splits its
batches over DDP ranks (batch b goes to rank b mod world size). The index makes the gathered result
independent of the split: features are put back in index order, and a model's sample i depends only
on (seed, i), so two processes score exactly the images one process would.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from pipeline.data.datamodule import reference_batches
from pipeline.data.generated import IMAGES, generated_images, is_generated_set, labels_of
from pipeline.data.imagefile import MAX_PIXELS, ImageError, load_image
from pipeline.data.imageops import to_uint8
from pipeline.data.manifest import load_manifest, manifest_hash
from pipeline.data.prompts import Prompt, PromptSuiteError
from pipeline.data.remote import public_url
from pipeline.data.sources import IMAGE_EXTENSIONS


class ImageSourceError(ValueError):
    """Images that cannot be scored, with the reason and the fix."""


@dataclass
class Batch:
    index: torch.Tensor  # global position of each image in the source
    images: torch.Tensor  # uint8 N x C x H x W
    labels: Optional[torch.Tensor] = None  # requested class (generated images) or true class (references)


@runtime_checkable
class ImageSource(Protocol):
    """What the benchmark scores. A new kind of generator (an API, a folder of another tool's output) is one
    class with these members; the scorer calls nothing else.

    Attributes:
        num_images: how many images the source yields over all ranks.
        shape: (C, H, W) of every image.
    """

    @property
    def num_images(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def describe(self) -> dict[str, Any]:
        """What the record's protocol says about the images: kind, path or seed, count."""
        ...

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """This rank's share, as uint8 batches of at most ``batch_size`` images with their global index."""
        ...


@runtime_checkable
class Reference(ImageSource, Protocol):
    """An image source generated images are compared with: it also has a content hash (the key of every
    cache built from it) and, when labelled, a class histogram and class names."""

    @property
    def content_hash(self) -> str: ...

    @property
    def label_histogram(self) -> Optional[list[int]]: ...

    @property
    def class_names(self) -> Optional[list[str]]: ...


def batch_ranges(num_images: int, batch_size: int, rank: int, world_size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of this rank's batches: batch b goes to rank b mod world size."""
    for b, start in enumerate(range(0, num_images, batch_size)):
        if b % world_size == rank:
            yield start, min(start + batch_size, num_images)


def is_shard_directory(path: str | Path) -> bool:
    path = Path(path)
    return (path / "manifest.json").is_file() or any(path.glob("*.tar"))


def _key_index(key: str) -> int:
    """genbench keys are the sample's index in its source; other tools' keys get a stable number."""
    return int(key) if key.isdigit() else int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


FIT_DEFAULTS = {"resize": "center-crop", "label_key": "cls"}


class ShardImages:
    """One split of a shard directory, in the data module's evaluation order (no shuffle, no flip)."""

    def __init__(self, shards: str | Path, split: str = "train", fit: Optional[dict[str, Any]] = None) -> None:
        """``fit``: the data module's ``image_size``/``channels``/``resize``/``label_key`` of the run being scored
        (what its model saw), when they are set."""
        self.shards = str(shards)
        self.manifest = load_manifest(shards, (fit or {}).get("val_shards"))
        if split not in self.manifest["splits"]:
            raise ImageSourceError(f"{shards} has no {split!r} split (it has {sorted(self.manifest['splits'])})")
        self.split = split
        # only what differs from the defaults: the plain case keeps its content hash (and every cache and protocol
        # id built on it)
        self.fit = {k: v for k, v in (fit or {}).items() if v is not None and FIT_DEFAULTS.get(k) != v}
        info = self.manifest["splits"][split]
        if info["num_samples"] is None:
            raise ImageSourceError(f"the {split} shards of {public_url(self.shards)} have no manifest to count them, "
                                   "and a reference must be counted (its statistics are per image); score against "
                                   "shards with a manifest: a directory or URL prefix genbench prepare wrote")
        self.num_images = info["num_samples"]
        size = self.fit.get("image_size")
        self.shape = (self.fit.get("channels") or info["channels"], *((size, size) if size else info["image_size"]))
        self.label_histogram = info["label_histogram"] or None
        self.class_names = self.manifest.get("class_names")
        fitted = f":{json.dumps(self.fit, sort_keys=True)}" if self.fit else ""
        self.content_hash = f"{manifest_hash(self.manifest)}:{split}{fitted}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "shards", "path": self.shards, "split": self.split, "hash": self.content_hash,
                "num_images": self.num_images, **({"fit": self.fit} if self.fit else {})}

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        for batch in reference_batches(self.shards, self.split, batch_size, rank, world_size, **self.fit):
            index = torch.tensor([_key_index(k) for k in batch["key"]], dtype=torch.long)
            labels = batch["label"] if self.label_histogram else None
            yield Batch(index, batch["image"], labels)


class FolderImages:
    """Every PNG/JPEG/... file under a folder (recursively, sorted by path), all of one size.

    ``channels`` converts on load (1: grayscale, 3: RGB) so that images from elsewhere meet the
    reference's format; ``labels`` is a CSV of ``file,label`` rows giving each image's class
    (an index or a class name) for the conditional part of the audit. Images are read as
    ``pipeline.data.imagefile.load_image`` reads them (16-bit scaled, EXIF orientation applied); a damaged one,
    or one above ``max_pixels``, stops the benchmark naming the file: a score of the images that happened to
    decode would not be the score of the set.
    """

    def __init__(self, folder: str | Path, channels: Optional[int] = None, labels: Optional[str | Path] = None,
                 class_names: Optional[Sequence[str]] = None, max_pixels: Optional[int] = MAX_PIXELS) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ImageSourceError(f"image folder {folder} does not exist")
        self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ImageSourceError(f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                                   "pass a folder of images or a shard directory from genbench prepare")
        self.num_images, self.max_pixels = len(self.files), max_pixels
        first = self._read(self.files[0], channels)
        self.size = (first.shape[1], first.shape[0])
        self.channels = channels or first.shape[2]
        self.shape = (self.channels, self.size[1], self.size[0])
        self.label_histogram = None
        self.class_names = list(class_names) if class_names else None
        self.labels = self._read_labels(Path(labels)) if labels else None
        self._hash: Optional[str] = None

    def _read_labels(self, path: Path) -> torch.Tensor:
        if not path.is_file():
            raise ImageSourceError(f"--labels {path} does not exist")
        names = {n: i for i, n in enumerate(self.class_names or [])}
        by_file: dict[str, int] = {}
        with path.open(newline="") as f:
            for row_number, row in enumerate(csv.reader(f), 1):
                if not row or (row_number == 1 and row[:2] == ["file", "label"]):
                    continue
                if len(row) != 2:
                    raise ImageSourceError(f"{path}:{row_number}: expected `file,label`, got {row}")
                file, label = row[0].strip(), row[1].strip()
                if label.lstrip("-").isdigit():
                    by_file[file] = int(label)
                elif label in names:
                    by_file[file] = names[label]
                else:
                    raise ImageSourceError(f"{path}:{row_number}: label {label!r} is neither a class index nor one "
                                           f"of the reference's class names {sorted(names)}")
        labels: list[int] = []
        missing: list[str] = []
        for p in self.files:
            rel = p.relative_to(self.folder).as_posix()
            index = by_file.get(rel, by_file.get(p.name))
            if index is None:
                missing.append(rel)
            labels.append(-1 if index is None else index)
        if missing:
            raise ImageSourceError(f"{path} gives no label for {len(missing)} image(s), e.g. {missing[:3]}; "
                                   "give every image a `file,label` row (file relative to the image folder)")
        return torch.tensor(labels, dtype=torch.long)

    @property
    def content_hash(self) -> str:
        """Names and bytes of every file: any changed image gives a new reference-statistics cache key."""
        if self._hash is None:
            h = hashlib.sha256()
            for p in self.files:
                name = p.relative_to(self.folder).as_posix().encode()
                h.update(name + b"\0" + hashlib.sha256(p.read_bytes()).digest())
            self._hash = h.hexdigest()
        return self._hash

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "path": str(self.folder), "hash": self.content_hash, "num_images": self.num_images}

    def _read(self, path: Path, channels: Optional[int]) -> np.ndarray:
        try:
            return load_image(path, channels, self.max_pixels)
        except ImageError as e:
            raise ImageSourceError(f"cannot use {path}: {e}; remove or replace the file") from None

    def _load(self, path: Path) -> torch.Tensor:
        array = self._read(path, self.channels)
        if (array.shape[1], array.shape[0]) != self.size:
            raise ImageSourceError(f"{path} is {array.shape[1]}x{array.shape[0]} but {self.files[0]} is "
                                   f"{self.size[0]}x{self.size[1]}; every image of a folder must have one size")
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (a copy: PIL's arrays are read-only)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        for start, stop in batch_ranges(self.num_images, batch_size, rank, world_size):
            images = torch.stack([self._load(p) for p in self.files[start:stop]])
            labels = None if self.labels is None else self.labels[start:stop]
            yield Batch(torch.arange(start, stop), images, labels)


class GeneratedSet(FolderImages):
    """A set ``genbench generate`` wrote: its done images (refused and failed ones have no file), the prompt
    entry of each (``prompts``, by index: CLIPScore and the demographic audit read them), the class each prompt
    asked for as labels, and what made the set (``generation``: service, model, suite, totals)."""

    def __init__(self, directory: str | Path, channels: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None) -> None:
        self.directory = Path(directory)
        self.generation, done = generated_images(directory)
        if not done:
            raise ImageSourceError(f"{directory} holds no generated image yet (see {directory}/meta/ for refusals "
                                   "and failures); run genbench generate again")
        super().__init__(self.directory / IMAGES, channels=channels, class_names=class_names)
        by_file = {g.file: g for g in done}
        self.files = [p for p in self.files if p.name in by_file]
        self.num_images = len(self.files)
        self.images = [by_file[p.name] for p in self.files]
        try:
            labels = labels_of(self.images, self.class_names)
        except PromptSuiteError as e:
            raise ImageSourceError(f"{directory}: {e}; the suite's labels must be the reference's classes") from e
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.long)

    @property
    def prompts(self) -> list[Prompt]:
        return [g.prompt for g in self.images]

    def describe(self) -> dict[str, Any]:
        return {"kind": "generated", "path": str(self.directory), "hash": self.content_hash,
                "num_images": self.num_images, "model": self.generation.get("model"),
                "provider": self.generation.get("provider", "openai"), "api_base": self.generation.get("api_base"),
                "prompt_suite": self.generation.get("prompt_suite")}


class ModelSamples:
    """``num_samples`` images drawn from a model (its EMA weights); conditional models are asked for
    balanced classes (sample i requests class i mod K). ``sampling_seconds`` is the time spent in
    ``sample`` alone (the record's sampling images/s), not in scoring.

    Ranks split the draw in whole network batches (``model.sample_batch_size`` rows; ``sample`` pads any
    shorter call to that many), or in equal shares when the draw is smaller than one batch per rank; each
    is handed to scoring in pieces of the scoring batch size.
    ``precision="bf16"`` samples under bf16 autocast.
    """

    PRECISIONS = ("fp32", "bf16")

    def __init__(self, model, num_samples: int, seed: int, precision: str = "fp32") -> None:
        if precision not in self.PRECISIONS:
            raise ValueError(f"sample precision {precision!r}: use one of {', '.join(self.PRECISIONS)}")
        self.model, self.num_images, self.seed, self.precision = model, num_samples, seed, precision
        self.shape = (model.channels, model.image_size, model.image_size)
        self.sampling_seconds = 0.0

    def describe(self) -> dict[str, Any]:
        return {"kind": "model", "family": self.model.family, "num_images": self.num_images, "seed": self.seed,
                "precision": self.precision, "compiled": self.model.compile_network}

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        autocast = torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        # at most one network batch per call; fewer rows when the draw is too small to give every rank one
        chunk = max(1, min(self.model.sample_batch_size, -(-self.num_images // world_size)))
        for first, last in batch_ranges(self.num_images, chunk, rank, world_size):
            t0 = time.perf_counter()
            with autocast:
                images = self.model.sample(last - first, seed=self.seed, first_index=first)
            self.sampling_seconds += time.perf_counter() - t0
            for start in range(first, last, batch_size):
                stop = min(start + batch_size, last)
                yield Batch(torch.arange(start, stop), images[start - first:stop - first].cpu(),
                            self.model.default_labels(stop - start, start))


class Reconstructions:
    """A split of shards through an autoencoder and back (its posterior mean decoded): the first stage's reference
    row, the floor every latent model on it can reach. Labels are the images' own."""

    def __init__(self, model, images: ShardImages) -> None:
        self.model, self.images = model, images
        self.num_images, self.shape = images.num_images, images.shape
        self.sampling_seconds = 0.0

    def describe(self) -> dict[str, Any]:
        return {"kind": "reconstructions", "family": self.model.family, "num_images": self.num_images,
                "of": self.images.describe()}

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        for batch in self.images.batches(batch_size, rank, world_size):
            t0 = time.perf_counter()
            x = batch.images.to(self.model.device).float().div_(127.5).sub_(1.0)
            images = to_uint8(self.model.reconstruct(x)).cpu()
            self.sampling_seconds += time.perf_counter() - t0
            yield Batch(batch.index, images, batch.labels)


class UniformNoise:
    """Uniform random pixels: the leaderboard's ceiling row (what no learning at all scores)."""

    def __init__(self, num_images: int, shape: Sequence[int], seed: int = 0) -> None:
        self.num_images, self.shape, self.seed = num_images, tuple(shape), seed

    def describe(self) -> dict[str, Any]:
        return {"kind": "uniform-noise", "num_images": self.num_images, "seed": self.seed}

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        for start, stop in batch_ranges(self.num_images, batch_size, rank, world_size):
            n = stop - start
            rng = np.random.default_rng([self.seed, start])  # depends on the batch's position, not on the rank
            yield Batch(torch.arange(start, start + n),
                        torch.from_numpy(rng.integers(0, 256, (n, *self.shape), dtype=np.uint8)))


def open_images(path: str | Path, channels: Optional[int] = None, labels: Optional[str] = None,
                class_names: Optional[Sequence[str]] = None, split: str = "train") -> Reference:
    """A shard directory (from genbench prepare or other WebDataset tools), a set genbench generate wrote, or a
    folder of image files."""
    if not Path(path).exists():
        raise ImageSourceError(f"{path} does not exist; pass a folder of images or a shard directory")
    if is_generated_set(path):
        if labels:
            raise ImageSourceError(f"{path} is a set genbench generate wrote: its prompts give the labels; drop "
                                   "--labels")
        return GeneratedSet(path, channels=channels, class_names=class_names)
    if is_shard_directory(path):
        if labels:
            raise ImageSourceError(f"--labels applies to an image folder; the shards in {path} carry their own labels")
        return ShardImages(path, split)
    return FolderImages(path, channels=channels, labels=labels, class_names=class_names)
