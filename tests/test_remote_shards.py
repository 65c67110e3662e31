"""Shards streamed over real HTTP from a server on 127.0.0.1 (range requests, logged) and from an S3-compatible
server (moto) started by the test: a manifest at a URL prefix, a brace pattern of foreign tars without one, the
network's faults (a cut connection, 503s, a stall, a 404), and two DDP ranks reading disjoint samples."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from shard_server import ShardServer, start_moto
from test_foreign_images import _bands, _encode, _write_tar

from conftest import REPO
from pipeline.data.datamodule import ShardDataModule
from pipeline.data.manifest import ShardError, load_manifest, manifest_hash


def _keys(dm: ShardDataModule, split: str) -> list[str]:
    return [k for b in dm.stream(split, False, 64) for k in b["key"]]


@pytest.fixture
def served_digits(digits_shards):
    with ShardServer(digits_shards) as server:
        yield server


def test_a_manifest_at_a_url_prefix_reads_like_the_directory(digits_shards, served_digits):
    local = ShardDataModule(str(digits_shards), num_workers=0)
    remote = ShardDataModule(served_digits.url + "/", num_workers=0)
    assert manifest_hash(remote.manifest) == manifest_hash(local.manifest)
    assert _keys(remote, "val") == _keys(local, "val")
    first = next(iter(remote.stream("val", False, 16)))["image"]
    torch.testing.assert_close(first, next(iter(local.stream("val", False, 16)))["image"])
    assert any(method == "GET" for method, _, _ in served_digits.log)


def test_shards_are_read_with_gets_alone(digits_shards, served_digits):
    """Each shard is one GET: no HEAD first (fsspec asks for the size before opening a file), which a presigned
    URL, signed for GET only, would refuse with 403 (fsspec then tried a second GET)."""
    served_digits.head_status = 403
    remote = ShardDataModule(served_digits.url + "/", num_workers=0)
    local = ShardDataModule(str(digits_shards), num_workers=0)
    assert _keys(remote, "train") == _keys(local, "train")
    assert [m for m, _, _ in served_digits.log if m != "GET"] == []
    shards = [s["file"] for s in local.manifest["splits"]["train"]["shards"]]
    assert sorted(p for _, p, _ in served_digits.log if p != "/manifest.json") == sorted(f"/{f}" for f in shards)


def test_a_run_over_http_resumes_where_it_stopped(tmp_path, digits_shards, served_digits):
    """10 steps from a URL, then the same run to 20: the weights of 20 steps in one go from the local copy (the data
    order resumes per epoch, remote or not)."""
    from test_checkpoints import _fit, _state

    common = ["--trainer.limit_train_batches=5", "--model.init_args.dropout=0.0", "--run.checkpoint_every_n_steps=4"]
    url = served_digits.url + "/"
    first = _fit(tmp_path, url, "ar", "--run.name=http", "--trainer.max_steps=10", *common)
    resumed = _fit(tmp_path, url, "ar", "--run.name=http", "--trainer.max_steps=20", *common)
    assert resumed == first
    straight = _fit(tmp_path, digits_shards, "ar", "--run.name=local", "--trainer.max_steps=20", *common)
    a, b = _state(resumed / "checkpoints" / "last.ckpt"), _state(straight / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 20
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    info = json.loads((resumed / "run.json").read_text())
    assert info["attempts"] == 2 and info["data"]["shards"] == url
    assert info["data"]["manifest_hash"] == manifest_hash(load_manifest(digits_shards))


def test_faults_are_retried_then_named(digits_shards, served_digits, monkeypatch):
    import pipeline.data.remote as remote

    dm = ShardDataModule(served_digits.url + "/", num_workers=0)
    expected = _keys(ShardDataModule(str(digits_shards), num_workers=0), "val")
    val = "/" + dm.manifest["splits"]["val"]["shards"][0]["file"]
    served_digits.cut_once.add(val)
    served_digits.unavailable[val] = 2
    assert _keys(dm, "val") == expected  # a cut connection and two 503s: retried, nothing lost or repeated
    resumed = [rng for method, path, rng in served_digits.log if method == "GET" and path == val and rng]
    assert resumed and resumed[0].startswith("bytes=") and resumed[0] != "bytes=0-"  # from the byte reached
    served_digits.ranges = False  # a server that ignores Range: the whole file again, the bytes read skipped
    served_digits.cut_once.add(val)
    assert _keys(dm, "val") == expected
    served_digits.ranges = True
    served_digits.stall.add(val)
    monkeypatch.setattr(remote, "TIMEOUT", 0.5)
    monkeypatch.setattr(remote, "RETRIES", 1)
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=rf"{served_digits.url}{val}: reading at byte 0 failed 2 times"):
        _keys(ShardDataModule(served_digits.url + "/", num_workers=0), "val")
    assert time.monotonic() - t0 < 15  # bounded by the timeout, not by the 30 s stall
    with pytest.raises(ShardError, match=r"/nowhere/manifest.json does not exist \(404 from server 127.0.0.1\)"):
        load_manifest(served_digits.url + "/nowhere/")


def test_pythons_http_server_without_range_support(tmp_path):
    """`python -m http.server`, as the issue's simplest server: no Range support, one streamed GET per shard."""
    for s in range(2):
        _write_tar(tmp_path / f"train-{s:04d}.tar", [{"jpg": _encode(_bands(24 + i, 20), "JPEG"),
                                                      "cls": str(i % 3).encode()} for i in range(10)], prefix=f"s{s}-")
    from pipeline.benchmark.distributed import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory",
                               str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        pattern = f"http://127.0.0.1:{port}/train-{{0000..0001}}.tar"
        for _ in range(50):
            try:
                dm = ShardDataModule(pattern, num_workers=0, image_size=16, channels=3, samples_per_epoch=20)
                dm.manifest  # noqa: B018 -- the server may still be starting
                break
            except ShardError:
                time.sleep(0.1)
        keys = sorted(k for b in dm.stream("train", True, 5) for k in b["key"])
        assert keys == sorted(f"s{s}-{i:05d}" for s in range(2) for i in range(10))
    finally:
        server.terminate()
        log = server.communicate(timeout=10)[1]
    assert '"GET /train-0000.tar HTTP/1.1" 200' in log


def test_a_brace_pattern_of_foreign_tars_without_manifest(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for s in range(n):
            samples = [{"jpg": _encode(_bands(24 + 8 * (i % 3), 20), "JPEG"), "cls": str(i % 4).encode()}
                       for i in range(12)]
            _write_tar(tmp_path / f"{split}-{s:06d}.tar", samples)
    with ShardServer(tmp_path) as server:
        pattern = server.url + "/train-{000000..000002}.tar"
        with pytest.raises(ShardError, match="set data.init_args.samples_per_epoch"):
            ShardDataModule(pattern, num_workers=0, image_size=16).stream("train", True, 6)
        dm = ShardDataModule(pattern, num_workers=0, image_size=16, channels=3, samples_per_epoch=36,
                             val_shards=server.url + "/val-000000.tar")
        batches = list(dm.stream("train", True, 6))
        assert len(batches) == 6 and all(b["image"].shape == (6, 3, 16, 16) for b in batches)
        assert len({k for b in batches for k in b["key"]}) == 12  # 3 shards of keys sample00000..11 each
        assert sum(len(b["key"]) for b in dm.stream("val", False, 6)) == 12
        shards = dm.manifest["splits"]["train"]["shards"]
        assert [s["etag"] for s in shards] == ['"v1"'] * 3 and shards[0]["size"]
        assert dm.manifest["source"] == f"urls:{server.url}/train-{{000000..000002}}.tar"


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_stream_disjoint_samples_over_http(tmp_path):
    """Foreign tars (mixed-size JPEGs, no manifest) from a brace pattern: a 2-rank DDP fit over HTTP."""
    served = tmp_path / "served"
    served.mkdir()
    for s in range(4):
        _write_tar(served / f"train-{s:04d}.tar", [{"jpg": _encode(_bands(20 + 4 * (i % 4), 16 + 2 * (i % 3)), "JPEG"),
                                                    "cls": str(i % 5).encode()} for i in range(48)], prefix=f"s{s}-")
    out = tmp_path / "probe"
    out.mkdir()
    with ShardServer(served) as server:
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_probe.py"),
                               server.url + "/train-{0000..0003}.tar", str(out), "0", "128", "16"],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for epoch in (0, 1):
        records = [json.loads(p.read_text()) for p in sorted(out.glob(f"rank*-epoch{epoch}.json"))]
        assert len(records) == 2 and records[0]["batches"] == records[1]["batches"] == 2  # 128 / (32 x 2)
        assert not set(records[0]["keys"]) & set(records[1]["keys"])
    assert sum(1 for m, _, _ in server.log if m == "GET") >= 4


@pytest.fixture
def moto_s3(tmp_path, monkeypatch):
    """moto's S3 server on 127.0.0.1 (the S3 wire protocol), with test credentials in the environment."""
    proc, endpoint = start_moto()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-never-shown")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


def test_s3_prefix_through_an_s3_compatible_server(digits_shards, moto_s3):
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": moto_s3}, skip_instance_cache=True)
    fs.mkdir("genbench-test")
    fs.put(str(digits_shards) + "/", "genbench-test/digits/", recursive=True)
    dm = ShardDataModule("s3://genbench-test/digits/", num_workers=0)
    assert _keys(dm, "val") == _keys(ShardDataModule(str(digits_shards), num_workers=0), "val")
    # a retry re-opens the object at the byte reached: one streamed GetObject with a Range from there
    import pipeline.data.remote as remote

    shard = dm.manifest["splits"]["val"]["shards"][0]["file"]
    reader = remote.RetryingReader(f"s3://genbench-test/digits/{shard}")
    reader.position = 5000
    with io.BufferedReader(reader) as resumed:
        assert resumed.read() == (digits_shards / shard).read_bytes()[5000:]
    with pytest.raises(ShardError) as missing:
        load_manifest("s3://genbench-test/absent/")
    text = str(missing.value)
    assert "s3://genbench-test/absent/manifest.json does not exist" in text and moto_s3 in text
    assert "AWS_ACCESS_KEY_ID" in text and "testing-secret-never-shown" not in text


def test_prepare_writes_straight_to_s3_and_training_reads_it(digits_shards, moto_s3):
    import fsspec

    from conftest import genbench

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": moto_s3}, skip_instance_cache=True)
    fs.mkdir("genbench-prep")
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    prep = genbench("prepare", "digits", "--out", "s3://genbench-prep/digits/", "--shard-size", "400", env=env)
    assert prep.returncode == 0, prep.stderr[-2000:]
    assert "wrote s3://genbench-prep/digits/manifest.json" in prep.stdout
    uploaded = ShardDataModule("s3://genbench-prep/digits/", num_workers=0)
    assert manifest_hash(uploaded.manifest) == manifest_hash(load_manifest(digits_shards))  # same data, same id
    again = genbench("prepare", "digits", "--out", "s3://genbench-prep/digits/", env=env)
    assert again.returncode == 2 and "already holds a manifest.json" in again.stderr


def test_prepare_from_s3_tars_to_s3(moto_s3, tmp_path):
    import fsspec

    from conftest import genbench

    for s in range(2):
        _write_tar(tmp_path / f"train-{s:04d}.tar", [{"jpg": _encode(_bands(30 + i, 24), "JPEG"),
                                                       "cls": str(i % 3).encode()} for i in range(10)])
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": moto_s3}, skip_instance_cache=True)
    fs.mkdir("genbench-foreign")
    for s in range(2):
        fs.put_file(str(tmp_path / f"train-{s:04d}.tar"), f"genbench-foreign/wds/train-{s:04d}.tar")
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    prep = genbench("prepare", "--from", "s3://genbench-foreign/wds/train-{0000..0001}.tar", "--out",
                    "s3://genbench-foreign/prepared/", "--image-size", "16", "--val-fraction", "0.2", env=env)
    assert prep.returncode == 0, prep.stderr[-2000:]
    dm = ShardDataModule("s3://genbench-foreign/prepared/", num_workers=0)
    assert dm.manifest["class_names"] == ["0", "1", "2"] and dm.image_shape == (3, 16, 16)
    assert sum(info["num_samples"] for info in dm.manifest["splits"].values()) == 20
    assert len(_keys(dm, "val")) == dm.manifest["splits"]["val"]["num_samples"]
