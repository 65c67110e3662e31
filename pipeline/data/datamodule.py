"""ShardDataModule: streams WebDataset shards to every DDP rank and every loader worker.

How the data is split (the "consumers" are all loader workers of all ranks, ``world * workers``):

* at least as many (evenly filled) shards as consumers: each consumer reads its own shards
  (``order[c::consumers]``);
* fewer shards than consumers (small data, many workers), or shards too uneven to share out: every
  consumer reads all shards and keeps every ``consumers``-th sample, so none is left short of data.

Either way the consumers see disjoint samples within a pass over the data; split by sample, a sample's
consumer follows from its place in the unshuffled order, so each owns the same samples in every epoch.
Training streams are endless — each new pass reshuffles the shard order from (seed, epoch, pass) — and every worker
yields an exact quota of batches, so every rank gets the same number of batches per epoch and DDP
never waits on a rank that ran dry (the resampled-shards + ``with_epoch`` recipe of WebDataset).
By default the quota is what every worker is sure to get from one pass, so an epoch repeats no
sample; shard sizes that divide evenly over ``world * workers`` lose nothing to that rounding.

Batches leave the workers as uint8 (4x less inter-process traffic than float) and become floats in
[-1, 1] after the transfer to the device.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from pytorch_lightning import LightningDataModule

from pipeline.data.imagefile import MAX_PIXELS
from pipeline.data.imageops import RESIZE_MODES
from pipeline.data.labels import parse_label_key
from pipeline.data.loaders import EpochDataLoader, ignore_job_signals, loader_context
from pipeline.data.manifest import VERIFY_MODES, ShardError, check_shards, load_manifest, manifest_hash, shard_paths
from pipeline.data.remote import public_url
from pipeline.data.shard_cache import ShardCache
from pipeline.data.shards import parse_bytes
from pipeline.data.stream import NO_LABEL, ShardStream, guaranteed_pass_samples

__all__ = ["NO_LABEL", "ShardDataModule", "reference_batches"]


class ShardDataModule(LightningDataModule):
    """Streams the train/val shards that ``genbench prepare`` wrote (or WebDataset tars from other tools).

    Args:
        shards: directory holding the shards and their manifest.json; or a URL prefix holding manifest.json
            (``https://host/data/``, ``s3://bucket/prefix/``); or a brace pattern of shard URLs
            (``https://host/train-{000000..000099}.tar``), which has no counts: give ``samples_per_epoch``.
        val_shards: with a pattern, the val split's pattern.
        batch_size: images per batch on each rank.
        num_workers: loader worker processes per rank (0 reads in the training process).
        shuffle_buffer: samples held by each worker's shuffle buffer.
        hflip: flip half of the training images horizontally (not for digits or text).
        seed: seeds the shard order, shuffle buffers and flips; set from the experiment seed.
        samples_per_epoch: training samples per epoch over all ranks. Default: one pass over the train
            split, as many batches as every worker is sure to fill from its share of a pass (so no sample
            repeats within an epoch). Larger values resample: the streams are endless.
        val_batch_size: batch size for the validation split (default: batch_size).
        pin_memory: pin host memory for faster copies to a GPU.
        image_size: train and evaluate at this square size; images of another size are fitted with ``resize``.
            Default: the manifest's size (for other tools' shards: the first image's).
        channels: 1 (grayscale) or 3 (RGB); default: the manifest's. Any mode decodes (RGBA, CMYK, L, ...).
        resize: how an image of another size is fitted, on the loader workers: ``center-crop`` (shorter side to
            the size with antialias, then the central square), ``random-crop`` (a random square while training,
            the central one for validation) or ``stretch`` (both sides, proportions change).
        label_key: where a sample's class is: ``cls`` (default), ``json:ATTRIBUTE``, or ``txt`` (matched against
            the manifest's class names).
        cache_dir: a local directory that keeps remote shards as they stream, so later epochs read them from
            disk (``pipeline.data.shard_cache``); one per node is enough, its workers and ranks share it.
        cache_size: the most the cache directory holds (``50GB``, ``500MiB`` or bytes); the least recently used
            shards make room.
        verify: when local shards are checked against the manifest's sha256 before any sample is read:
            ``first`` (default: hashed once, then trusted while size, mtime and inode stay the same), ``always``
            (hashed every run) or ``never`` (sizes only). A mismatch stops before the run records the data's
            identity (``pipeline.data.manifest.check_shards``).
        max_pixels: a larger image is skipped and counted, never decoded (default 64 megapixels).
    """

    def __init__(self, shards: str, batch_size: int = 128, num_workers: int = 2, shuffle_buffer: int = 2000,
                 hflip: bool = False, seed: int = 0, samples_per_epoch: Optional[int] = None,
                 val_batch_size: Optional[int] = None, pin_memory: bool = True, image_size: Optional[int] = None,
                 channels: Optional[int] = None, resize: str = "center-crop", label_key: str = "cls",
                 val_shards: Optional[str] = None, cache_dir: Optional[str] = None,
                 cache_size: str | int = "50GB", verify: str = "first", max_pixels: Optional[int] = MAX_PIXELS) -> None:
        super().__init__()
        if verify not in VERIFY_MODES:
            raise ValueError(f"data.verify={verify!r}: use one of {', '.join(VERIFY_MODES)}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"data.max_pixels={max_pixels} must be a positive number of pixels (or null: no limit)")
        self.verify, self.max_pixels, self._verified = verify, max_pixels, False
        self.cache = ShardCache(cache_dir, parse_bytes(cache_size, "data.cache_size")) if cache_dir else None
        if resize not in RESIZE_MODES:
            raise ValueError(f"data.resize={resize!r}: use one of {', '.join(RESIZE_MODES)}")
        if channels not in (None, 1, 3):
            raise ValueError(f"data.channels={channels}: use 1 (grayscale) or 3 (RGB)")
        if image_size is not None and image_size < 1:
            raise ValueError(f"data.image_size={image_size} must be a positive number of pixels")
        parse_label_key(label_key)  # a malformed key fails here, not in a worker
        self.image_size, self.channels, self.resize, self.label_key = image_size, channels, resize, label_key
        self.val_shards = val_shards
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be at least 1")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be 0 or more")
        self.shards = str(shards)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.hflip = hflip
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self.val_batch_size = val_batch_size or batch_size
        self.pin_memory = pin_memory
        self._manifest: Optional[dict] = None

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = load_manifest(self.shards, self.val_shards)
        return self._manifest

    @property
    def manifest_hash(self) -> str:
        return manifest_hash(self.manifest)

    def split_info(self, split: str = "train") -> dict:
        if split not in self.manifest["splits"]:
            raise ShardError(f"{self.shards} has no {split!r} split (it has {sorted(self.manifest['splits'])})")
        return self.manifest["splits"][split]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the training images."""
        info = self.split_info("train")
        height, width = (self.image_size, self.image_size) if self.image_size else info["image_size"]
        return self.channels or info["channels"], height, width

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"]) or len(self.split_info("train")["label_histogram"])

    def _placement(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: Optional[str] = None) -> None:
        # read and checked now: a missing or changed shard fails before any worker starts or run.json is written
        self.check()

    def check(self) -> None:
        """The manifest read, and the shards' bytes checked against it (``verify``), once per data module."""
        if not self._verified:
            check_shards(self.shards, self.manifest, self.verify)
            self._verified = True

    def stream(self, split: str, train: bool, batch_size: int, rank: int = 0, world_size: int = 1) -> ShardStream:
        self.check()
        info = self.split_info(split)
        batches = None
        if train:
            workers = max(1, self.num_workers)
            if self.samples_per_epoch:
                batches = max(1, self.samples_per_epoch // (batch_size * world_size))
            elif any(s["num_samples"] is None for s in info["shards"]):
                raise ShardError(f"the shards of {public_url(self.shards)} come without a manifest to count their "
                                 "samples: set data.init_args.samples_per_epoch (the epoch length over all ranks)")
            else:
                # One pass: every worker's quota fits in the samples it is sure to get in a pass.
                per_worker = guaranteed_pass_samples([s["num_samples"] for s in info["shards"]],
                                                     world_size * workers) // batch_size
                batches = max(1, per_worker * workers)
        paths = shard_paths(self.shards, self.manifest, split)
        counts = {p: s["num_samples"] for p, s in zip(paths, info["shards"]) if s["num_samples"] is not None}
        identities = dict(zip(paths, info["shards"])) if self.cache is not None else None
        channels, height, width = self.image_shape
        return ShardStream(paths, batch_size, channels, (height, width), rank=rank,
                           world_size=world_size, seed=self.seed, train=train, batches_per_rank=batches,
                           shuffle_buffer=self.shuffle_buffer, hflip=self.hflip and train, expected_counts=counts,
                           resize=self.resize, label_key=self.label_key,
                           class_names=list(self.manifest.get("class_names") or []), cache=self.cache,
                           identities=identities, max_pixels=self.max_pixels)

    def _loader(self, stream: ShardStream, epoch_fn=None) -> EpochDataLoader:
        workers = {"multiprocessing_context": loader_context(), "worker_init_fn": ignore_job_signals} \
            if self.num_workers else {}
        return EpochDataLoader(stream, epoch_fn=epoch_fn, num_workers=self.num_workers,
                               pin_memory=self.pin_memory and torch.cuda.is_available(), **workers)

    def train_dataloader(self) -> EpochDataLoader:
        rank, world = self._placement()
        trainer = getattr(self, "trainer", None)
        epoch_fn = (lambda: epoch_to_load(trainer)) if trainer is not None else None
        return self._loader(self.stream("train", True, self.batch_size, rank, world), epoch_fn)

    def val_dataloader(self) -> EpochDataLoader | list:
        if "val" not in self.manifest["splits"]:
            return []
        rank, world = self._placement()
        return self._loader(self.stream("val", False, self.val_batch_size, rank, world))

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # uint8 [0, 255] -> float [-1, 1], on the device (cheap there, and 4x less data moved)
        batch["image"] = batch["image"].float().div_(127.5).sub_(1.0)
        return batch


def epoch_to_load(trainer: Any) -> int:
    """The epoch whose order a train iterator created now must draw.

    A run resumed from a checkpoint written after an epoch's last batch has that epoch restored as current:
    Lightning closes it without drawing, then runs the next epoch on the iterator it creates at the start
    (it makes no new one for the first epoch of a resumed run). That iterator must hold the next epoch's
    order, or the resumed run replays the finished epoch's.
    """
    loop = trainer.fit_loop
    if loop.restarting and loop.epoch_loop.batch_progress.is_last_batch:
        return trainer.current_epoch + 1
    return trainer.current_epoch


def reference_batches(shards: str, split: str = "train", batch_size: int = 256, rank: int = 0,
                      world_size: int = 1, **fit: Any) -> Iterator[dict[str, Any]]:
    """One pass over a split as uint8 batches (no shuffle, no flip), split over ranks: for metrics. ``fit``: the
    run's ``image_size``, ``channels``, ``resize`` and ``label_key``, so the reference is what the model saw."""
    dm = ShardDataModule(shards, batch_size=batch_size, num_workers=0, shuffle_buffer=0, **fit)
    yield from dm.stream(split, False, batch_size, rank, world_size)

