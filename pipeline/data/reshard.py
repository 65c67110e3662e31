"""``genbench prepare --from PATTERN``: another tool's WebDataset corpus (img2dataset output, a ``-wds`` copy of
ImageNet, a LAION subset; local, ``http(s)://``, ``s3://`` or ``pipe:``) re-sharded into genbench shards with a
manifest, in one streaming pass.

A streamed corpus has no random access, so the train/val split cannot be a permutation of indices as for the
other sources: a sample goes to val when a hash of (seed, its shard's public URL, its key) falls below
``val_fraction``, a fixed rule that needs no second pass and gives the same split on every run (the val share is
``val_fraction`` up to sampling noise). Samples keep their order; each gets a new running key, and its
``.json`` records where it came from (``source_shard``, ``source_key``) beside the attributes it had.
Class labels come from ``label_key`` as in the data module; names (``txt``, or a ``.json`` attribute holding
strings) get indices in the order they first appear. A sample that does not decode is skipped and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np

from pipeline.console import track
from pipeline.data import remote
from pipeline.data.imagefile import MAX_PIXELS, load_image
from pipeline.data.labels import parse_label_key, read_label
from pipeline.data.manifest import MANIFEST_FORMAT, SPLITS, ShardError
from pipeline.data.shards import SplitWriter, check_prepare_options, write_dataset
from pipeline.data.sources import Sample
from pipeline.data.tarstream import TarFormatError, group_samples, iter_members

log = logging.getLogger(__name__)
IMAGE_ENTRIES = ("png", "jpg", "jpeg", "webp")
SHARD_GLOBS = ("*.tar", "*.tar.gz", "*.tgz")


def local_path(pattern: str) -> str:
    """``file:///data/x-{000..009}.tar`` -> ``/data/x-{000..009}.tar`` (percent-escapes decoded); else as is."""
    if pattern.startswith("file://"):
        parts = urlsplit(pattern)
        if parts.netloc not in ("", "localhost"):
            raise ShardError(f"--from {pattern}: a file:// URL names a file on this machine (file:///path); "
                             f"{parts.netloc} is another host")
        return url2pathname(parts.path)
    return pattern


def expand_shards(pattern: str) -> list[str]:
    """A brace pattern (remote or local), a ``pipe:`` pattern, a ``file://`` URL, or a local directory of
    ``*.tar`` / ``*.tar.gz`` / ``*.tgz`` -> shard list."""
    pattern = local_path(pattern)
    if not remote.is_remote(pattern) and "{" not in pattern:
        path = Path(pattern)
        shards = sorted(str(p) for ext in SHARD_GLOBS for p in path.glob(ext)) if path.is_dir() else [pattern]
    else:
        shards = remote.expand(pattern)
    if not shards:
        raise ShardError(f"--from: {pattern} holds no .tar, .tar.gz or .tgz shard")
    for shard in shards:
        if not remote.is_remote(shard) and not Path(shard).is_file():
            raise ShardError(f"--from: {shard} does not exist; give a directory of .tar shards, a brace pattern "
                             "(data/train-{000000..000099}.tar) or a URL pattern (https://, s3://, pipe:)")
    return shards


def in_val(seed: int, shard: str, key: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}/{shard}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2 ** 64 < val_fraction


class ForeignSamples:
    """The samples of a foreign corpus as ``Sample``s, one streaming pass; ``class_names`` and ``skipped`` fill
    in as it goes."""

    def __init__(self, shards: list[str], label_key: str = "cls", max_pixels: Optional[int] = MAX_PIXELS) -> None:
        self.shards, self.max_pixels = shards, max_pixels
        self.label_entry, self.label_attribute = parse_label_key(label_key)
        self.class_names: list[str] = []
        self.skipped: Counter = Counter()  # undecodable samples per shard
        self.links: Counter = Counter()  # link members per shard: not read (their data is another member's)
        self.duplicates: Counter = Counter()  # members or samples per shard whose name was already seen

    def __iter__(self) -> Iterator[tuple[str, str, Sample]]:
        """(public shard URL, key, sample)."""
        entries = frozenset({*IMAGE_ENTRIES, "cls", "json", "txt"})
        for shard in self.shards:
            public = remote.public_url(shard) if remote.is_remote(shard) else shard

            def on_link(name: str, kind: str, public: str = public) -> None:
                if not self.links[public]:
                    log.warning("--from: %s is a %s, which genbench does not follow (its data is another member's); "
                                "further ones in %s are only counted. Re-create the tar with "
                                "tar --dereference --hard-dereference", name, kind, public)
                self.links[public] += 1

            members = remote.iter_remote_members(shard, on_link=on_link) if remote.is_remote(shard) else \
                iter_members(shard, on_link)
            keys: set[str] = set()
            try:
                for raw in group_samples(self._unique(members, public), public, entries):
                    if raw["__key__"] in keys:  # its members were not together: a second sample of one key
                        self._duplicate(public, raw["__key__"])
                    keys.add(raw["__key__"])
                    sample = self._sample(raw, public)
                    if sample is not None:
                        yield public, raw["__key__"], sample
            except remote.RemoteShardError as e:
                raise ShardError(str(e)) from None
            except (TarFormatError, OSError) as e:
                raise ShardError(f"--from: shard {public} is unreadable or truncated ({e})") from e

    def _unique(self, members: Iterator[tuple[str, bytes]], shard: str) -> Iterator[tuple[str, bytes]]:
        """The members, each name counted once: a second member of a name replaces the first in its sample (the
        WebDataset way), and is counted and warned about here."""
        names: set[str] = set()
        for name, data in members:
            if name in names:
                self._duplicate(shard, name)
            names.add(name)
            yield name, data

    def _duplicate(self, shard: str, name: str) -> None:
        if not self.duplicates[shard]:
            log.warning("--from: %s appears more than once in %s (kept as WebDataset groups it); further ones "
                        "there are only counted", name, shard)
        self.duplicates[shard] += 1

    def _sample(self, raw: dict, shard: str) -> Optional[Sample]:
        try:
            data = next(raw[k] for k in IMAGE_ENTRIES if k in raw)
            image = load_image(io.BytesIO(data), max_pixels=self.max_pixels)  # any mode -> L or RGB, or ImageError
            attributes = json.loads(raw["json"]) if "json" in raw else {}
            label = self._label(raw)
        except Exception as e:  # a damaged or imageless sample: skipped and counted, as the data module does
            if not self.skipped[shard]:
                log.warning("--from: skipping sample %s of %s (%s); further ones in this shard are only counted",
                            raw.get("__key__"), shard, e)
            self.skipped[shard] += 1
            return None
        if not isinstance(attributes, dict):
            attributes = {"json": attributes}
        attributes = {**attributes, "source_shard": shard, "source_key": raw["__key__"]}
        return Sample(np.ascontiguousarray(image), label, attributes)

    def _label(self, raw: dict) -> Optional[int]:
        value = read_label(raw, self.label_entry, self.label_attribute)
        if value is None:
            return None
        if isinstance(value, int):
            if self.class_names:
                raise ValueError(f"label {value!r} is a number but earlier labels were names")
            return value
        if value not in self.class_names:
            self.class_names.append(value)
        return self.class_names.index(value)


def reshard(pattern: str, out: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0,
            shard_size: str | int = 10000, image_size: Optional[int] = None, png_compression: int = 0,
            overwrite: bool = False, progress: bool = True, channels: Optional[int] = None,
            resize_mode: str = "center-crop", label_key: str = "cls", max_pixels: Optional[int] = MAX_PIXELS) -> dict:
    """Write the corpus at ``pattern`` as genbench shards + manifest.json into ``out``; returns the manifest."""
    check_prepare_options(out, overwrite, png_compression, channels, resize_mode)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    shards = expand_shards(pattern)
    shown = remote.public_url(pattern) if remote.is_remote(pattern) else pattern
    samples = ForeignSamples(shards, label_key, max_pixels)
    manifest: dict = {
        "format": MANIFEST_FORMAT, "source": f"shards:{shown}",
        "prepare": {"val_fraction": val_fraction, "seed": seed, "shard_size": str(shard_size),
                    "image_size": image_size, "png_compression": png_compression, "from": shown,
                    "label_key": label_key, "split": "hash of (seed, shard URL, key)",
                    **({"channels": channels} if channels else {}),
                    **({"resize": resize_mode} if image_size else {})},
        "class_names": [], "attribute_names": [], "splits": {},
    }

    def fill(directory: Path) -> None:
        writers = {split: SplitWriter(directory, split, shard_size, image_size, png_compression, channels,
                                      resize_mode) for split in SPLITS}
        try:
            for index, (shard, key, sample) in enumerate(track(samples, "prepare --from", "img", enabled=progress)):
                split = "val" if in_val(seed, shard, key, val_fraction) else "train"
                writers[split].add(index, sample, f"{shard} sample {key}")
        finally:
            for writer in writers.values():
                writer.close()
        if not writers["train"].counts:
            raise ShardError(f"--from {shown}: no decodable sample for the train split "
                             f"({sum(samples.skipped.values())} skipped)")
        for split, writer in writers.items():
            if writer.counts:
                manifest["splits"][split] = writer.finish()
        manifest["class_names"] = samples.class_names or \
            [str(c) for c in range(max(len(info["label_histogram"]) for info in manifest["splits"].values()))]
        manifest["skipped_samples"] = dict(samples.skipped)
        for key, counts in (("skipped_links", samples.links), ("duplicate_names", samples.duplicates)):
            if counts:  # only when there are: a corpus without any keeps the identity it had
                manifest[key] = dict(counts)

    return write_dataset(out, manifest, fill, overwrite)
