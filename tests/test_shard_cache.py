"""The bounded local cache of remote shards (later epochs from disk, least recently used out, nothing half-written
kept, a replaced shard not cached) and ``pipe:`` shards (a command's output, its failures and stalls named
without the credentials on its command line)."""

from __future__ import annotations

import gc
import hashlib
import logging
import shutil
import time
from pathlib import Path

import pytest
from shard_server import ShardServer
from test_foreign_images import _bands, _encode, _write_tar

from pipeline.data.datamodule import ShardDataModule
from pipeline.data.manifest import ShardError, load_manifest


def _keys(stream) -> list[str]:
    return [k for b in stream for k in b["key"]]


def _gets(server: ShardServer, name: str) -> int:
    return sum(1 for method, path, _ in server.log if method == "GET" and path == "/" + name)


@pytest.fixture
def served(digits_shards, tmp_path):
    root = tmp_path / "served"
    shutil.copytree(digits_shards, root)  # a copy: one test edits a served shard
    with ShardServer(root) as server:
        yield server


def test_later_epochs_read_the_cached_copy(digits_shards, served, tmp_path):
    cache_dir = tmp_path / "cache"
    dm = ShardDataModule(served.url + "/", num_workers=0, cache_dir=str(cache_dir))
    expected = _keys(ShardDataModule(str(digits_shards), num_workers=0).stream("val", False, 64))
    val = dm.manifest["splits"]["val"]["shards"][0]["file"]
    for _ in range(3):
        assert _keys(dm.stream("val", False, 64)) == expected
    assert _gets(served, val) == 1  # streamed once, then read from disk
    assert dm.cache.hits == 2 and dm.cache.misses == 1
    copies = list(cache_dir.glob("*.tar"))
    assert len(copies) == 1 and copies[0].read_bytes() == (digits_shards / val).read_bytes()
    # training epochs too: each train shard is fetched in the first epoch only
    local = ShardDataModule(str(digits_shards), num_workers=0)
    for epoch in range(2):
        stream, reference = dm.stream("train", True, 32), local.stream("train", True, 32)
        stream.epoch = reference.epoch = epoch
        assert _keys(stream) == _keys(reference)
    train = [s["file"] for s in dm.manifest["splits"]["train"]["shards"]]
    assert [_gets(served, f) for f in train] == [1] * len(train)
    assert not list(cache_dir.glob("*.partial"))
    copies[0].write_bytes(b"damaged" * 100)  # a damaged copy is dropped and the shard streamed again
    assert _keys(dm.stream("val", False, 64)) == expected
    assert _gets(served, val) == 2 and copies[0].read_bytes() == (digits_shards / val).read_bytes()


def test_the_cache_stays_within_its_bound_least_recently_used_out(served, tmp_path):
    probe = ShardDataModule(served.url + "/", num_workers=0)
    entries = probe.manifest["splits"]["train"]["shards"]  # 400, 400, 400, 400 and 17 samples
    bound = sum(e["bytes"] for e in entries[-3:]) + 1000  # room for the last three, not for two full ones more
    dm = ShardDataModule(served.url + "/", num_workers=0, cache_dir=str(tmp_path / "cache"), cache_size=bound,
                         shuffle_buffer=0)
    stream = dm.stream("train", True, 32)
    paths, copies = stream.paths, [dm.cache.path(p, e) for p, e in zip(stream.paths, entries)]
    for path in paths:
        list(stream._samples(path))
        assert dm.cache.cached_bytes() <= bound
    assert sorted((tmp_path / "cache").glob("*.tar")) == sorted(copies[-3:])
    list(stream._samples(paths[2]))  # a hit: now the most recently used, though copied before the others
    list(stream._samples(paths[0]))  # needs room: the least recently used, shard 3, goes
    assert sorted((tmp_path / "cache").glob("*.tar")) == sorted([copies[0], copies[2], copies[4]])
    assert sum(_gets(served, e["file"]) for e in entries) == len(entries) + 1
    tiny = ShardDataModule(served.url + "/", num_workers=0, cache_dir=str(tmp_path / "tiny"), cache_size="1kB")
    assert len(_keys(tiny.stream("val", False, 64))) == 180 and tiny.cache.cached_bytes() == 0  # too big: streamed
    with pytest.raises(ValueError, match="data.cache_size '50 apples' is not a size in bytes"):
        ShardDataModule(served.url + "/", cache_dir=str(tmp_path / "c"), cache_size="50 apples")


def test_a_shard_left_mid_way_or_changed_on_the_server_is_not_kept(served, tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    dm = ShardDataModule(served.url + "/", num_workers=0, cache_dir=str(cache_dir), shuffle_buffer=0)
    batches = iter(dm.stream("val", False, 16))
    next(batches)  # the consumer stops after one batch, 16 of the shard's 180 samples
    del batches
    gc.collect()
    assert not list(cache_dir.iterdir()) or not list(cache_dir.glob("*.tar")) and not list(cache_dir.glob("*.partial"))
    val = dm.manifest["splits"]["val"]["shards"][0]["file"]
    data = bytearray((served.root / val).read_bytes())
    data[2000] ^= 0xFF  # inside the first image: same size and count, other bytes
    (served.root / val).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shard_cache"):
        _keys(dm.stream("val", False, 64))
    assert not list(cache_dir.glob("*.tar")) and "not cached (replaced on the server?)" in caplog.text
    assert hashlib.sha256(data).hexdigest()[:12] in caplog.text


@pytest.fixture
def foreign_tars(tmp_path) -> Path:
    for s in range(3):
        samples = [{"jpg": _encode(_bands(24 + 8 * (i % 3), 20), "JPEG"), "cls": str(i % 4).encode()}
                   for i in range(12)]
        _write_tar(tmp_path / f"train-{s:06d}.tar", samples)
    return tmp_path


def test_pipe_shards_stream_a_commands_output(foreign_tars, tmp_path):
    pattern = f"pipe:cat {foreign_tars}/train-{{000000..000002}}.tar"
    dm = ShardDataModule(pattern, num_workers=0, image_size=16, channels=3, samples_per_epoch=36,
                         cache_dir=str(tmp_path / "cache"))
    local = ShardDataModule(str(foreign_tars), num_workers=0, image_size=16, channels=3, samples_per_epoch=36)
    assert [u["url"] for u in dm.manifest["splits"]["train"]["shards"]] == \
        [f"pipe:cat {foreign_tars}/train-{s:06d}.tar" for s in range(3)]
    for epoch in range(2):  # the second epoch from the cache
        stream, reference = dm.stream("train", True, 6), local.stream("train", True, 6)
        stream.epoch = reference.epoch = epoch
        assert _keys(stream) == _keys(reference)
    assert dm.cache.misses == 3 and dm.cache.hits == 3


def test_a_failing_or_stalling_command_is_retried_then_named_without_secrets(foreign_tars, monkeypatch):
    import pipeline.data.remote as remote

    monkeypatch.setattr(remote, "RETRIES", 1)
    monkeypatch.setattr(remote, "TIMEOUT", 0.5)
    command = ("pipe:cat {}/absent-000000.tar || curl -H 'Authorization: Bearer sk-pipe-secret' "
               "http://u:pw@127.0.0.1/x?t=k 2>/dev/null")
    with pytest.raises(ShardError) as failed:
        load_manifest(command.format(foreign_tars))
    text = str(failed.value)
    assert "failed 2 times (ChildProcessError: exited with status" in text and "absent-000000.tar" in text
    assert "sk-pipe-secret" not in text and "u:pw@" not in text and "t=k" not in text
    assert "-H *** http://127.0.0.1/x" in text
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=r"pipe:sleep 30 .*failed 2 times \(TimeoutError: no output for 0.5 s\)"):
        load_manifest("pipe:sleep 30 # {0..1}")
    assert time.monotonic() - t0 < 10  # bounded by the timeout, not by the command
