"""Files: atomic writes (a reader sees the old file or the new one, never half of one), immutable records,
file hashes and genbench's cache directory. The bottom of the house: it imports nothing of genbench."""

from __future__ import annotations

import errno
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


def _written_temp(path: Path, data: bytes, durable: bool = True) -> str:
    """``data`` in a new temporary file beside ``path``, fsynced unless not ``durable``, in the mode a plain
    ``open`` gives; removed again when writing it fails. Every write below goes through one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            shared_mode(tmp)
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it into place. ``durable=False``
    skips the fsync: still atomic for readers and against a killed process, not against a power cut."""
    path = Path(path)
    tmp = _written_temp(path, data, durable)
    try:
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
    tmp = _written_temp(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())
    try:
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


class WriteError(RuntimeError):
    """A file that could not be written (a full disk, a quota, no permission): names the path and the cause."""


def _write_error(path: Path, e: OSError) -> WriteError:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    why = "the file system is full (or the quota or file size limit is reached); free space there or write " \
        "elsewhere" if full else (e.strerror or str(e))
    return WriteError(f"cannot write {path}: {why} [{errno.errorcode.get(e.errno or 0, e.errno)}]; nothing of "
                      "this write was left behind")


def write_together(files: dict[Path, bytes], new: frozenset[Path] = frozenset()) -> None:
    """Write several files that belong together (a record and its grids; a leaderboard's md, csv and html): each
    to a temporary name beside it, fsynced, and only when all are written, all put in place. A failure on the
    way (a full disk) leaves none of them and raises ``WriteError`` naming the path. Paths in ``new`` must not
    exist (``FileExistsError``, as ``write_new_json``) and are put in place first, so that a record never loses
    the race to a concurrent writer after its files replaced that writer's."""
    temps: dict[Path, str] = {}
    try:
        for path, data in files.items():
            try:
                temps[path] = _written_temp(path, data)
            except OSError as e:
                raise _write_error(path, e) from None
        for path in sorted(files, key=lambda p: p not in new):
            try:
                if path in new:
                    os.link(temps[path], path)
                else:
                    os.replace(temps.pop(path), path)
            except FileExistsError:
                raise
            except OSError as e:  # a directory that cannot grow by one entry
                raise _write_error(path, e) from None
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)


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
