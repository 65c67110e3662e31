"""A bounded local cache of remote shards: the first epoch streams a shard and keeps a copy as it goes, later
epochs read the copy from disk with the mmap reader.

Each shard is cached whole or not at all: its bytes go to a partial file of the reading process while the
stream is consumed, and become ``<key>.tar`` by an atomic rename only when the shard was read to its end (and,
with a manifest, matched its sha256). A consumer that stops mid-shard (its epoch quota reached) leaves nothing.
The key hashes the shard's public URL with its identity (the manifest's sha256, or the server's ETag/size), so a
replaced shard is fetched anew. The directory is kept under ``max_bytes`` by removing the least recently used
shards (a hit refreshes the file's mtime); a shard larger than the whole bound is streamed, never cached.

Several loader workers and ranks of one node may share a directory: each writes its own partial file, renames are
atomic, and admission (eviction plus rename) holds an ``flock`` on ``.lock``. Removing a shard another process is
reading does no harm on POSIX: its open map stays valid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from pipeline.data import remote
from pipeline.data.tarstream import TarFormatError, iter_members

log = logging.getLogger(__name__)


def _touch(path: Path) -> None:
    """mtime = now, to the nanosecond (a plain utime takes the kernel's coarse clock, a jiffy; order needs
    better)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


class _HashingSink:
    """A binary file that also hashes what is written to it."""

    def __init__(self, file: Any) -> None:
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)


class ShardCache:
    """``cache_dir`` of the data module: remote shards kept on local disk, at most ``max_bytes`` of them."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"data.cache_size={max_bytes} bytes: give a positive size such as 50GB")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.hits = self.misses = 0

    def path(self, url: str, identity: Optional[dict] = None) -> Path:
        """Where the copy of ``url`` (as the manifest or the server identified it) lives."""
        version = {k: v for k, v in (identity or {}).items() if k not in ("file", "url", "num_samples")}
        key = hashlib.sha256(json.dumps([remote.public_url(url), version], sort_keys=True).encode()).hexdigest()
        return self.directory / f"{key[:40]}.tar"

    def members(self, url: str, identity: Optional[dict] = None) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of each file of the shard: from the copy if there is one, else streamed while copied."""
        cached = self.path(url, identity)
        try:
            _touch(cached)  # a hit: now the most recently used
            members = iter_members(str(cached))
            first = next(members, None)  # opens and maps the copy: another process may evict it from here on
        except FileNotFoundError:  # not cached, or evicted by another process just now
            pass
        except TarFormatError as e:  # a damaged copy (the disk, or a hand edit): dropped and streamed again
            log.warning("dropping the damaged cached copy %s of %s (%s)", cached, remote.public_url(url), e)
            cached.unlink(missing_ok=True)
        else:
            self.hits += 1
            if first is not None:
                yield first
                yield from members
            return
        self.misses += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
        complete = False
        try:
            with open(partial, "wb") as f:
                sink = _HashingSink(f)
                yield from remote.iter_remote_members(url, copy_to=sink)
            complete = True
        finally:
            if not complete:  # stopped mid-shard, or failed: nothing half-written stays
                partial.unlink(missing_ok=True)
        expected = (identity or {}).get("sha256")
        if expected and sink.sha256.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            log.warning("%s read with sha256 %s..., the manifest says %s...: not cached (replaced on the server?)",
                        remote.public_url(url), sink.sha256.hexdigest()[:12], expected[:12])
            return
        self._admit(partial, cached, sink.size)

    def _admit(self, partial: Path, cached: Path, size: int) -> None:
        """Make room (least recently used first) and move the finished copy into place."""
        if size > self.max_bytes:
            partial.unlink(missing_ok=True)
            return
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = []
            for path in self.directory.glob("*.tar"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                entries.append((stat.st_mtime, stat.st_size, path))
            entries.sort()
            total = sum(e[1] for e in entries if e[2] != cached)
            for _, bytes_, path in entries:
                if total + size <= self.max_bytes:
                    break
                if path != cached:
                    path.unlink(missing_ok=True)
                    total -= bytes_
            os.replace(partial, cached)
            _touch(cached)

    def cached_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("*.tar")) if self.directory.is_dir() else 0
