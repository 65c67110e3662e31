"""Files: atomic writes (a reader sees the old file or the new one, never half of one), immutable records,
file hashes and genbench's cache directory. The bottom of the house: it imports nothing of genbench."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which would
    briefly give other threads' files the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(path: str | os.PathLike) -> None:
    """Give a file the mode a plain ``open`` would (0666 less the umask). Temporary files are created 0600,
    which would hide results, configs and checkpoints from colleagues in a shared project directory."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it into place. ``durable=False``
    skips the fsync: still atomic for readers and against a killed process, not against a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    shared_mode(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_new_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write a record that must never replace another: fails with FileExistsError if ``path`` exists.

    The content goes to a temporary file first and is then hard-linked to ``path``; ``link`` refuses an
    existing target atomically, so concurrent writers can never overwrite one another's records.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    shared_mode(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def cache_dir() -> Path:
    """genbench's cache (auditors, reference statistics, palettes): $GENBENCH_CACHE or ~/.cache/genbench."""
    return Path(os.environ.get("GENBENCH_CACHE", Path.home() / ".cache" / "genbench"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
