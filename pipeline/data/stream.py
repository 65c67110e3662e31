"""ShardStream: the sample stream of one consumer (a loader worker of one rank): which shards or samples it
reads, the shuffle buffer, decoding, batching, and the exact per-epoch quota of batches.

See ``pipeline.data.datamodule`` for how the consumers split the data.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from typing import Any, Iterator, Optional

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.imagefile import MAX_PIXELS, decode_tensor
from pipeline.data.imageops import RESIZE_MODES, fit_to_size
from pipeline.data.labels import parse_label_key, read_label
from pipeline.data.manifest import ShardError
from pipeline.data.remote import RemoteShardError, is_remote, iter_remote_members, public_url
from pipeline.data.shard_cache import ShardCache
from pipeline.data.tarstream import TarFormatError, group_samples, iter_samples
from pipeline.seeds import stable_seed

log = logging.getLogger(__name__)
NO_LABEL = -1

# The entries a training sample needs; the .json attributes are not even copied out of the shard unless the
# label comes from them.
SAMPLE_ENTRIES = frozenset({"png", "jpg", "jpeg", "webp", "cls"})


class ShardStream(IterableDataset):
    """The per-consumer sample stream: shard assignment, shuffle buffer, decode, batch."""

    def __init__(self, paths: list[str], batch_size: int, channels: int, image_size: tuple[int, int],
                 rank: int = 0, world_size: int = 1, seed: int = 0, train: bool = True,
                 batches_per_rank: Optional[int] = None, shuffle_buffer: int = 2000, hflip: bool = False,
                 expected_counts: Optional[dict[str, int]] = None, resize: str = "center-crop",
                 label_key: str = "cls", class_names: Optional[list[str]] = None,
                 cache: Optional[ShardCache] = None, identities: Optional[dict[str, dict]] = None,
                 max_pixels: Optional[int] = MAX_PIXELS) -> None:
        super().__init__()
        if not paths:
            raise ShardError("no shards to read")
        if resize not in RESIZE_MODES:
            raise ValueError(f"data.resize={resize!r}: use one of {', '.join(RESIZE_MODES)}")
        self.resize = resize if train or resize != "random-crop" else "center-crop"  # evaluation never crops at random
        self.label_entry, self.label_attribute = parse_label_key(label_key)
        self.class_index = {name: i for i, name in enumerate(class_names or [])}
        self.entries = SAMPLE_ENTRIES | {self.label_entry}
        self._crop_rng = random.Random(0)
        self.paths = list(paths)
        self.batch_size = batch_size
        self.channels = channels
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.rank, self.world_size = rank, world_size
        self.seed, self.train = seed, train
        self.batches_per_rank = batches_per_rank
        self.shuffle_buffer = shuffle_buffer
        self.hflip = hflip
        self.expected_counts = expected_counts or {}  # samples per shard path, from the manifest
        self.cache = cache  # remote shards kept on local disk for later epochs
        self.identities = identities or {}  # per shard path: its manifest entry (sha256, or ETag/size)
        self.epoch = 0  # set by EpochDataLoader before each epoch's workers start
        self.skipped: Counter = Counter()  # corrupt samples per shard, in this process
        self._reported = 0  # of them, those already counted in a batch's "skipped"
        self.max_pixels = max_pixels  # larger images are skipped and counted, never decoded

    # -- who am I ---------------------------------------------------------------------------------
    def _consumer(self) -> tuple[int, int, int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers, worker, workers

    def _rng(self, *salt: int) -> random.Random:
        return random.Random(stable_seed(self.seed, *salt))

    # -- raw samples ------------------------------------------------------------------------------
    def _pass(self, pass_index: int, consumer: int, consumers: int) -> Iterator[dict]:
        order = list(self.paths)
        if self.train:
            # Same permutation on every consumer: shard assignment stays disjoint.
            self._rng(self.epoch, pass_index).shuffle(order)
        counts = [self.expected_counts.get(p) or 1 for p in self.paths]  # unknown (no manifest): whole shards
        if split_by_shard(counts, consumers):
            mine, stride = order[consumer::consumers], 1
        else:
            mine, stride = order, consumers
        # Split by sample: a sample's place in the unshuffled order (shard offset + position) picks its consumer,
        # not its place in this epoch's shard order, so every consumer owns the same samples in every epoch and
        # ranks stay disjoint over a whole run, not only within a pass.
        offsets = dict(zip(self.paths, itertools.accumulate([0, *counts[:-1]])))
        for path in mine:
            i = offsets[path]
            n = 0
            samples = self._samples(path)
            try:
                for sample in samples:
                    if stride == 1 or i % stride == consumer:
                        yield sample
                    i += 1
                    n += 1
            except RemoteShardError as e:  # retried already: the message names the URL and the endpoint
                raise ShardError(str(e)) from None
            except (TarFormatError, OSError) as e:
                raise ShardError(f"shard {path} is unreadable or truncated ({e}); check it with genbench prepare "
                                 "--verify, or recreate it with genbench prepare") from e
            expected = self.expected_counts.get(path)
            if expected is not None and n != expected:
                # tarfile reads a truncated archive as a shorter one, without an error
                raise ShardError(f"shard {path} ended after {n} of its {expected} samples: truncated or replaced; "
                                 "check it with genbench prepare --verify, or recreate it with genbench prepare")

    def _samples(self, path: str) -> Iterator[dict]:
        if not is_remote(path):
            return iter_samples(path, self.entries)
        members = self.cache.members(path, self.identities.get(path)) if self.cache is not None \
            else iter_remote_members(path)
        return group_samples(members, public_url(path), self.entries)

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
                label = self._label(sample)
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
        data = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        if data is None:
            raise ValueError(f"no image entry (has {sorted(k for k in sample if not k.startswith('__'))})")
        # a damaged PNG raises here instead of crashing the worker in libpng (pipeline.data.imagefile)
        image = decode_tensor(data, self.channels, self.max_pixels)
        # other tools' corpora hold every size: fitted here, on the loader workers
        return fit_to_size(image, self.image_size, self.resize, self._crop_rng)

    def _label(self, sample: dict) -> int:
        value = read_label(sample, self.label_entry, self.label_attribute)
        if value is None:
            return NO_LABEL
        if isinstance(value, int):
            return value
        if value in self.class_index:
            return self.class_index[value]
        raise ValueError(f"label {value!r} ({self.label_entry}) is neither a class index nor one of the class names "
                         f"{sorted(self.class_index)}")

    def _collate(self, items: list[tuple[torch.Tensor, int, str]], rng: torch.Generator) -> dict[str, Any]:
        images = torch.stack([it[0] for it in items])
        if self.hflip:
            flip = torch.rand(len(items), generator=rng) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        # the corrupt samples this worker skipped since its last batch: the run adds them up (run.json)
        skipped = sum(self.skipped.values())
        new, self._reported = skipped - self._reported, skipped
        return {"image": images, "label": torch.tensor([it[1] for it in items], dtype=torch.long),
                "key": [it[2] for it in items], "skipped": new}

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
        self._crop_rng = self._rng(self.epoch, consumer, 2)
        batches = self._batches(self._decode(samples), generator)
        quota = self.quota(worker, workers)
        if quota is None:
            yield from batches
        else:
            for _, batch in zip(range(quota), batches):
                yield batch


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
