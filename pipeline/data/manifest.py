"""Reading shard directories: the manifest (genbench's, one built for other tools' tars, or one for remote
shards), the data's identity (``manifest_hash``), the shard paths of a split, and checking the bytes against the
manifest (``verify_shards`` for ``genbench prepare --verify``, ``check_shards`` before training or scoring).

The writing half is ``pipeline.data.shards``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

from pipeline.console import track
from pipeline.data import remote
from pipeline.data.imagefile import ImageError, load_image
from pipeline.io import cache_dir, sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "genbench-shards/1"
SPLITS = ("train", "val")
# data.verify: when a local shard's bytes are checked against the manifest's sha256 before they are used
VERIFY_MODES = ("first", "always", "never")


class ShardError(RuntimeError):
    """A shard that is missing, unreadable or does not match its manifest."""


def _image_shape(data: bytes) -> tuple[int, int, int] | None:
    """(H, W, C) of an encoded image as the loader reads it, or None if it cannot be used (a corrupt or huge
    sample is not a corrupt tar)."""
    try:
        return load_image(io.BytesIO(data)).shape
    except ImageError:
        return None


class TarSummary(NamedTuple):
    num_samples: int
    image_shape: Optional[tuple[int, int, int]]  # (H, W, C) of the first image, None if none decodes
    sha256: str  # of the whole file: the identity of its bytes


class _HashingReader(io.RawIOBase):
    """A file read once, front to back, hashing every byte on the way."""

    def __init__(self, f) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        return n


def count_tar_samples(path: str | os.PathLike) -> TarSummary:
    """Count the samples (distinct keys) in a WebDataset tar, read the shape of its first image and hash
    its bytes, in one sequential read.

    Raises ShardError naming the path if the tar is unreadable or truncated.
    """
    keys = set()
    shape = None
    try:
        with open(path, "rb") as raw:
            reader = _HashingReader(raw)
            with tarfile.open(fileobj=io.BufferedReader(reader), mode="r|*") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    key, _, ext = Path(member.name).name.partition(".")
                    keys.add(str(Path(member.name).parent / key))
                    data = tar.extractfile(member)
                    if shape is None and data is not None and ext.lower() in ("png", "jpg", "jpeg"):
                        shape = _image_shape(data.read())
            buffer = bytearray(1 << 20)
            while reader.readinto(buffer):  # the end-of-archive padding, which tarfile stops before
                pass
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"shard {path} is unreadable or truncated ({e}); recreate it with genbench prepare") from e
    return TarSummary(len(keys), shape, reader.digest.hexdigest())


def load_remote_manifest(spec: str, val: Optional[str] = None) -> dict:
    """The manifest of remote shards: ``PREFIX/manifest.json`` for a URL prefix (``https://h/data/``,
    ``s3://bucket/prefix/``), or, for a brace pattern of shard URLs (``https://h/train-{000000..000099}.tar``,
    with ``val`` the val split's), one built here: each shard's URL with its size/ETag/Last-Modified as the
    server gives them (the data's identity), the first image's shape, and no sample counts (the data module then
    needs ``samples_per_epoch``)."""
    if not (spec.endswith(".tar") or "{" in spec or spec.startswith("pipe:")):
        prefix = spec if spec.endswith("/") else spec + "/"
        try:
            manifest = json.loads(remote.read_bytes(prefix + MANIFEST))
        except json.JSONDecodeError as e:
            raise ShardError(f"{remote.public_url(prefix + MANIFEST)} is not valid JSON ({e})") from e
        except remote.RemoteShardError as e:
            raise ShardError(f"{e}; a URL prefix must hold the {MANIFEST} genbench prepare writes, or give a brace "
                             "pattern of shard URLs (https://host/train-{000000..000099}.tar)") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ShardError(f"{remote.public_url(prefix + MANIFEST)} has format {manifest.get('format')!r}, expected "
                             f"{MANIFEST_FORMAT!r}")
        manifest["prefix"] = prefix
        return manifest
    splits = {}
    for split, pattern in (("train", spec), ("val", val)):
        if not pattern:
            continue
        urls = remote.expand(pattern)
        shape = None
        try:
            for name, data in remote.iter_remote_members(urls[0]):
                if name.rpartition(".")[2].lower() in ("png", "jpg", "jpeg", "webp"):
                    shape = _image_shape(data)
                    break
        except remote.RemoteShardError as e:
            raise ShardError(str(e)) from None
        if shape is None:
            raise ShardError(f"no image in the first shard {remote.public_url(urls[0])} of {split} split")
        try:
            shards = [{**remote.describe(u), "file": u, "num_samples": None} for u in urls]
        except remote.RemoteShardError as e:
            raise ShardError(str(e)) from None
        splits[split] = {"num_samples": None, "image_size": [shape[0], shape[1]], "channels": shape[2],
                         "label_histogram": [], "shards": shards}
    return {"format": MANIFEST_FORMAT, "source": f"urls:{remote.public_url(spec)}", "prepare": None,
            "class_names": [], "attribute_names": [], "splits": splits}


def load_manifest(directory: str | os.PathLike, val: Optional[str] = None) -> dict:
    """Read ``DIR/manifest.json``; for shards written by other tools (no manifest), index the tars found; for a
    URL or URL pattern, ``load_remote_manifest`` (``val``: the val split's pattern).

    Checks that every shard file the manifest names exists, so a missing shard fails here with its path
    rather than deep inside a worker.
    """
    if remote.is_remote(str(directory)):
        return load_remote_manifest(str(directory), val)
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardError(f"shard directory {directory} does not exist; create it with: "
                         f"genbench prepare digits --out {directory}")
    path = directory / MANIFEST
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{path} is not valid JSON ({e}); recreate the shards with genbench prepare") from e
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ShardError(f"{path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    else:
        manifest = index_foreign_shards(directory)
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            file = directory / shard["file"]
            if not file.is_file():
                raise ShardError(f"shard {file} listed in the manifest is missing; "
                                 f"restore it or recreate the directory with genbench prepare")
            # A truncated tar reads as a shorter archive without any error: compare sizes up front.
            if shard.get("bytes") is not None and file.stat().st_size != shard["bytes"]:
                raise ShardError(f"shard {file} is {file.stat().st_size} bytes but the manifest says {shard['bytes']}: "
                                 f"truncated or replaced; check with genbench prepare --verify {directory}")
    return manifest


def index_foreign_shards(directory: Path) -> dict:
    """Build an in-memory manifest for ``{train,val}-*.tar`` (or any ``*.tar`` as train) written by another tool."""
    splits = {}
    tars = sorted(directory.glob("*.tar"))
    if not tars:
        raise ShardError(f"{directory} has neither {MANIFEST} nor any .tar shard; create shards with genbench prepare")
    for split in SPLITS:
        files = [t for t in tars if t.name.startswith(f"{split}-")]
        if split == "train" and not files:
            files = [t for t in tars if not t.name.startswith("val-")]
        if not files:
            continue
        shards: list[dict] = []
        shape: Optional[tuple[int, int, int]] = None
        for t in files:
            # the bytes' hash too: it names reference caches, so an image edited in place must change it
            summary = count_tar_samples(t)
            shape = shape or summary.image_shape
            shards.append({"file": t.name, "num_samples": summary.num_samples, "sha256": summary.sha256,
                           "bytes": t.stat().st_size})
        if shape is None:
            raise ShardError(f"no PNG or JPEG image found in the shards {[t.name for t in files]} of {directory}")
        splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "image_size": [shape[0], shape[1]],
                         "channels": shape[2], "label_histogram": [], "shards": shards}
    return {"format": MANIFEST_FORMAT, "source": f"foreign:{directory}", "prepare": None, "class_names": [],
            "attribute_names": [], "splits": splits}


def manifest_hash(manifest: dict) -> str:
    """Identity of the data: the shard checksums, counts, classes and prepare settings, not the file's layout."""
    canonical = json.dumps({k: manifest[k] for k in ("source", "prepare", "class_names", "splits")}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class VerifyProblem:
    shard: str
    problem: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.problem}"


def verify_shards(directory: str | os.PathLike, progress: bool = True) -> list[VerifyProblem]:
    """Check every shard of a manifest: present, sha256 as recorded, sample count as recorded."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        return [VerifyProblem(str(path), "no manifest.json: not a directory written by genbench prepare")]
    manifest = json.loads(path.read_text())
    problems = []
    shards = [s for info in manifest["splits"].values() for s in info["shards"]]
    for shard in track(shards, "verify", "shard", enabled=progress):
        file = directory / shard["file"]
        if not file.is_file():
            problems.append(VerifyProblem(str(file), "missing"))
            continue
        try:
            summary = count_tar_samples(file)
        except ShardError as e:
            problems.append(VerifyProblem(str(file), str(e)))
            continue
        if summary.sha256 != shard["sha256"]:
            problems.append(VerifyProblem(str(file), f"sha256 {summary.sha256[:12]}... differs from the manifest's "
                                                     f"{shard['sha256'][:12]}..."))
        if summary.num_samples != shard["num_samples"]:
            problems.append(VerifyProblem(str(file), f"holds {summary.num_samples} samples, the manifest says "
                                                     f"{shard['num_samples']}"))
    return problems


def shard_paths(directory: str | os.PathLike, manifest: dict, split: str) -> list[str]:
    """The path or URL of each shard of a split."""
    if split not in manifest["splits"]:
        raise ShardError(f"{directory} has no {split!r} split (it has {sorted(manifest['splits'])})")
    files = [s["file"] for s in manifest["splits"][split]["shards"]]
    if "prefix" in manifest:  # a manifest read from a URL: its files are relative to it
        return [manifest["prefix"] + f for f in files]
    return [f if remote.is_remote(f) else str(Path(directory) / f) for f in files]



def check_shards(directory: str | os.PathLike, manifest: dict, mode: str = "first") -> None:
    """Raise ``ShardError`` for the first local shard whose bytes are not those the manifest's sha256 names, so
    that nothing trains on, scores or records the identity of data it does not have.

    ``first``: a shard is hashed the first time it is seen, and then trusted while its path, size, modification
    time and inode stay the same (a marker under the cache directory, like git's index): any write to it, a
    copy over it or a new file in its place is caught, bit rot on an untouched file is not. ``always``: every
    shard is hashed every time (at ~1 GB/s). ``never``: sizes only (``load_manifest`` compares them always).
    Shards without a recorded sha256 (remote ones, which carry their ETag) are not hashed here.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"data.verify={mode!r}: use one of {', '.join(VERIFY_MODES)}")
    if mode == "never" or "prefix" in manifest or remote.is_remote(str(directory)):
        return
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            expected = shard.get("sha256")
            if not expected or remote.is_remote(shard["file"]):
                continue
            file = Path(directory) / shard["file"]
            stat = file.stat()
            marker = cache_dir() / "verified-shards" / hashlib.sha256(
                f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{expected}".encode()).hexdigest()
            if mode == "first" and marker.exists():
                continue
            actual = sha256_file(file)
            if actual != expected:
                raise ShardError(f"shard {file} has sha256 {actual[:16]}... but the manifest says {expected[:16]}...: "
                                 "its bytes changed after genbench prepare wrote it. Restore the shard, or recreate "
                                 f"the directory with genbench prepare; genbench prepare --verify {directory} lists "
                                 "every shard that differs")
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
