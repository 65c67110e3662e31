"""ShardDataModule: streams WebDataset shards to every DDP rank and every loader worker.

How the data is split (the "consumers" are all loader workers of all ranks, ``world * workers``):

* at least as many (evenly filled) shards as consumers: each consumer reads its own shards
  (``order[c::consumers]``);
* fewer shards than consumers (small data, many workers), or shards too uneven to share out: every
  consumer reads all shards and keeps every ``consumers``-th sample, so none is left short of data.

Either way the consumers see disjoint samples within a pass over the data. Training streams are
endless — each new pass reshuffles the shard order from (seed, epoch, pass) — and every worker
yields an exact quota of batches, so every rank gets the same number of batches per epoch and DDP
never waits on a rank that ran dry (the resampled-shards + ``with_epoch`` recipe of WebDataset).
By default the quota is what every worker is sure to get from one pass, so an epoch repeats no
sample; shard sizes that divide evenly over ``world * workers`` lose nothing to that rounding.

Batches leave the workers as uint8 (4x less inter-process traffic than float) and become floats in
[-1, 1] after the transfer to the device.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import signal
import warnings
from collections import Counter
from typing import Any, Iterator, Optional

import torch
import webdataset as wds
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from pipeline.data.shards import ShardError, load_manifest, manifest_hash, shard_paths
from pipeline.data.tarstream import TarFormatError, iter_samples

log = logging.getLogger(__name__)
NO_LABEL = -1


# The entries a training sample needs; the .json attributes are not even copied out of the shard.
SAMPLE_ENTRIES = frozenset({"png", "jpg", "jpeg", "webp", "cls"})


def _png_op():
    """torchvision's PNG decoder op itself: its Python wrapper spends a fifth of a 32x32 decode on a
    deprecation warning and argument checks. Falls back to the wrapper if the op moves."""
    try:
        import torchvision  # noqa: F401 -- registers torch.ops.image

        return torch.ops.image.decode_png
    except (AttributeError, RuntimeError):
        from torchvision.io import decode_png

        return lambda data, mode, exif: decode_png(data, mode=ImageReadMode(mode), apply_exif_orientation=exif)


_decode_png = _png_op()

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; with torchvision pinned they
# remain, and decode PNGs twice as fast as PIL here. The warning would otherwise fire for every image.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class ShardStream(IterableDataset):
    """The per-consumer sample stream: shard assignment, shuffle buffer, decode, batch."""

    def __init__(self, paths: list[str], batch_size: int, channels: int, image_size: tuple[int, int],
                 rank: int = 0, world_size: int = 1, seed: int = 0, train: bool = True,
                 batches_per_rank: Optional[int] = None, shuffle_buffer: int = 2000, hflip: bool = False,
                 expected_counts: Optional[dict[str, int]] = None) -> None:
        super().__init__()
        if not paths:
            raise ShardError("no shards to read")
        self.paths = list(paths)
        self.batch_size = batch_size
        self.channels = channels
        self.image_size = tuple(image_size)
        self.rank, self.world_size = rank, world_size
        self.seed, self.train = seed, train
        self.batches_per_rank = batches_per_rank
        self.shuffle_buffer = shuffle_buffer
        self.hflip = hflip
        self.expected_counts = expected_counts or {}  # samples per shard path, from the manifest
        self.epoch = 0  # set by EpochDataLoader before each epoch's workers start
        self.skipped: Counter = Counter()  # corrupt samples per shard, in this process

    # -- who am I ---------------------------------------------------------------------------------
    def _consumer(self) -> tuple[int, int, int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers, worker, workers

    def _rng(self, *salt: int) -> random.Random:
        return random.Random(hash((self.seed, *salt)) & 0xFFFFFFFF)

    # -- raw samples ------------------------------------------------------------------------------
    def _pass(self, pass_index: int, consumer: int, consumers: int) -> Iterator[dict]:
        order = list(self.paths)
        if self.train:
            # Same permutation on every consumer: shard assignment stays disjoint.
            self._rng(self.epoch, pass_index).shuffle(order)
        counts = [self.expected_counts.get(p, 1) for p in self.paths]
        if split_by_shard(counts, consumers):
            mine, stride = order[consumer::consumers], 1
        else:
            mine, stride = order, consumers
        i = 0
        for path in mine:
            n = 0
            try:
                for sample in iter_samples(path, SAMPLE_ENTRIES):
                    if stride == 1 or i % stride == consumer:
                        yield sample
                    i += 1
                    n += 1
            except (TarFormatError, OSError) as e:
                raise ShardError(f"shard {path} is unreadable or truncated ({e}); check it with genbench prepare "
                                 "--verify, or recreate it with genbench prepare") from e
            expected = self.expected_counts.get(path)
            if expected is not None and n != expected:
                # tarfile reads a truncated archive as a shorter one, without an error
                raise ShardError(f"shard {path} ended after {n} of its {expected} samples: truncated or replaced; "
                                 "check it with genbench prepare --verify, or recreate it with genbench prepare")

    def _raw(self, consumer: int, consumers: int) -> Iterator[dict]:
        if not self.train:
            yield from self._pass(0, consumer, consumers)
            return
        pass_index = 0
        while True:
            n = 0
            samples = self._pass(pass_index, consumer, consumers)
            if self.shuffle_buffer > 1:
                # Shuffled within the pass: the buffer drains at the pass's end, so it never mixes two
                # passes and an epoch that fits in one pass holds no sample twice.
                samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer),
                                      rng=self._rng(self.epoch, pass_index, consumer, 1))(samples)
            for sample in samples:
                n += 1
                yield sample
            if n == 0:
                raise ShardError(f"consumer {consumer} of {consumers} read no sample from {len(self.paths)} shard(s) "
                                 f"({self.paths[0]} ...); the shards are empty")
            pass_index += 1

    # -- decoding ---------------------------------------------------------------------------------
    def _decode(self, samples: Iterator[dict]) -> Iterator[tuple[torch.Tensor, int, str]]:
        decoded_any = False
        for sample in samples:
            try:
                image = self._decode_image(sample)
                label = int(sample["cls"]) if "cls" in sample else NO_LABEL
            except Exception as e:  # a corrupt sample is skipped and counted, never fatal
                shard = sample.get("__url__", "?")
                if self.skipped[shard] == 0:
                    log.warning("skipping corrupt sample %s in %s (%s); further ones in this shard are only counted",
                                sample.get("__key__"), shard, e)
                self.skipped[shard] += 1
                if not decoded_any and sum(self.skipped.values()) >= 1000:
                    raise ShardError(f"the first 1000 samples read were all corrupt (last in {shard}); "
                                     "check the shards with genbench prepare --verify") from e
                continue
            decoded_any = True
            yield image, label, sample["__key__"]

    def _decode_image(self, sample: dict) -> torch.Tensor:
        mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
        if "png" in sample:
            image = _decode_png(torch.frombuffer(bytearray(sample["png"]), dtype=torch.uint8), mode.value, False)
        else:
            data = next((sample[k] for k in ("jpg", "jpeg", "webp") if k in sample), None)
            if data is None:
                raise ValueError(f"no image entry (has {sorted(k for k in sample if not k.startswith('__'))})")
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
        if tuple(image.shape[1:]) != self.image_size:
            raise ValueError(f"image is {image.shape[2]}x{image.shape[1]}, the split's images are "
                             f"{self.image_size[1]}x{self.image_size[0]}")
        return image

    def _collate(self, items: list[tuple[torch.Tensor, int, str]], rng: torch.Generator) -> dict[str, Any]:
        images = torch.stack([it[0] for it in items])
        if self.hflip:
            flip = torch.rand(len(items), generator=rng) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return {"image": images, "label": torch.tensor([it[1] for it in items], dtype=torch.long),
                "key": [it[2] for it in items]}

    def _batches(self, items: Iterator, rng: torch.Generator) -> Iterator[dict[str, Any]]:
        batch = []
        for item in items:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._collate(batch, rng)
                batch = []
        if batch and not self.train:
            yield self._collate(batch, rng)

    def quota(self, worker: int, workers: int) -> Optional[int]:
        """Batches this worker yields per epoch: the rank's batches split as evenly as possible."""
        if self.batches_per_rank is None:
            return None
        return self.batches_per_rank // workers + (1 if worker < self.batches_per_rank % workers else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers, worker, workers = self._consumer()
        samples = self._raw(consumer, consumers)
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, consumer)) & 0xFFFFFFFF)
        batches = self._batches(self._decode(samples), generator)
        quota = self.quota(worker, workers)
        if quota is None:
            yield from batches
        else:
            for _, batch in zip(range(quota), batches):
                yield batch


def ignore_sigterm(worker_id: int) -> None:
    """Loader workers outlive a SIGTERM sent to the whole job (SLURM preempting or requeueing it).

    SLURM signals every process of a job step. A worker killed by it makes the main process's loader fail
    (PyTorch checks that its workers live) before the step can be checkpointed (pipeline/preemption.py).
    So the workers, like their fork server, leave the decision to the main process: they stop when it
    shuts the loader down or exits (PyTorch's worker watchdog), or at SLURM's SIGKILL.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader_context() -> multiprocessing.context.BaseContext:
    """Where loader workers come from: a fork server, not the training process.

    Forking the training process, which runs threads (gloo's, NCCL's, W&B's, PyTorch's), copies the locks
    those threads hold at that instant into the worker, which then waits on one forever: CI saw a resumed
    DDP rank's worker stuck inside ``os.fork`` and the whole job hung. The fork server is a fresh,
    single-threaded process that has imported the data code once (``pipeline.data.loader_server``); a
    worker forked from it starts at once, and still sees the stream's current epoch, which is pickled to
    it when the epoch's workers start. As with any fork server, a script that makes a loader with workers
    runs its top-level code under ``if __name__ == "__main__":``.
    """
    context = multiprocessing.get_context("forkserver")
    # "__main__" as multiprocessing's default: workers then do not re-import the main module one by one
    context.set_forkserver_preload(["__main__", "pipeline.data.loader_server"])
    return context


class EpochDataLoader(DataLoader):
    """A DataLoader that tells its stream the epoch before the workers start, and knows its length.

    Workers start at each epoch (non-persistent), so the updated ``epoch`` reaches them and every
    epoch draws a new, still deterministic, order — also after a resume, since the epoch comes from the
    Trainer rather than from a counter that restarts at zero.
    """

    def __init__(self, dataset: ShardStream, epoch_fn=None, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn = epoch_fn

    def __iter__(self):
        if self._epoch_fn is not None:
            self.dataset.epoch = int(self._epoch_fn())
        return super().__iter__()

    def __len__(self) -> int:
        if self.dataset.batches_per_rank is not None:
            return self.dataset.batches_per_rank
        raise TypeError("an evaluation stream has no fixed length")


class ShardDataModule(LightningDataModule):
    """Streams the train/val shards that ``genbench prepare`` wrote (or WebDataset tars from other tools).

    Args:
        shards: directory holding the shards and their manifest.json.
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
    """

    def __init__(self, shards: str, batch_size: int = 128, num_workers: int = 2, shuffle_buffer: int = 2000,
                 hflip: bool = False, seed: int = 0, samples_per_epoch: Optional[int] = None,
                 val_batch_size: Optional[int] = None, pin_memory: bool = True) -> None:
        super().__init__()
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
            self._manifest = load_manifest(self.shards)
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
        return info["channels"], info["image_size"][0], info["image_size"][1]

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
        self.manifest  # noqa: B018 -- read now: a missing shard fails before any worker starts

    def stream(self, split: str, train: bool, batch_size: int, rank: int = 0, world_size: int = 1) -> ShardStream:
        info = self.split_info(split)
        batches = None
        if train:
            workers = max(1, self.num_workers)
            if self.samples_per_epoch:
                batches = max(1, self.samples_per_epoch // (batch_size * world_size))
            else:
                # One pass: every worker's quota fits in the samples it is sure to get in a pass.
                per_worker = guaranteed_pass_samples([s["num_samples"] for s in info["shards"]],
                                                     world_size * workers) // batch_size
                batches = max(1, per_worker * workers)
        paths = shard_paths(self.shards, self.manifest, split)
        counts = {p: s["num_samples"] for p, s in zip(paths, info["shards"])}
        return ShardStream(paths, batch_size, info["channels"], tuple(info["image_size"]), rank=rank,
                           world_size=world_size, seed=self.seed, train=train, batches_per_rank=batches,
                           shuffle_buffer=self.shuffle_buffer, hflip=self.hflip and train, expected_counts=counts)

    def _loader(self, stream: ShardStream, epoch_fn=None) -> EpochDataLoader:
        workers = {"multiprocessing_context": loader_context(), "worker_init_fn": ignore_sigterm} \
            if self.num_workers else {}
        return EpochDataLoader(stream, epoch_fn=epoch_fn, num_workers=self.num_workers,
                               pin_memory=self.pin_memory and torch.cuda.is_available(), **workers)

    def train_dataloader(self) -> EpochDataLoader:
        rank, world = self._placement()
        trainer = getattr(self, "trainer", None)
        epoch_fn = (lambda: trainer.current_epoch) if trainer is not None else None
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


def split_by_shard(shard_counts: list[int], consumers: int) -> bool:
    """Give each consumer whole shards when that is (nearly) even; else split by sample.

    Whole shards keep reads sequential and disjoint; but with fewer shards than consumers, or uneven
    shards (a small last one), some consumer would be short of data, so every consumer then reads all
    shards and keeps every ``consumers``-th sample.
    """
    if len(shard_counts) < consumers:
        return False
    fewest = sum(sorted(shard_counts)[: len(shard_counts) // consumers])
    return fewest >= 0.9 * sum(shard_counts) / consumers


def guaranteed_pass_samples(shard_counts: list[int], consumers: int) -> int:
    """The fewest samples any consumer gets in one pass, whatever the shard order."""
    if split_by_shard(shard_counts, consumers):
        return sum(sorted(shard_counts)[: len(shard_counts) // consumers])
    return sum(shard_counts) // consumers


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8 [0, 255], rounding to the nearest level."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def reference_batches(shards: str, split: str = "train", batch_size: int = 256, rank: int = 0,
                      world_size: int = 1) -> Iterator[dict[str, Any]]:
    """One pass over a split as uint8 batches (no shuffle, no flip), split over ranks: for metrics."""
    dm = ShardDataModule(shards, batch_size=batch_size, num_workers=0, shuffle_buffer=0)
    yield from dm.stream(split, False, batch_size, rank, world_size)

