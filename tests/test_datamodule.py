"""ShardDataModule: bad shards, exact epoch lengths, deterministic reshuffling."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from procs import children

from conftest import REPO
from pipeline.data.datamodule import ShardDataModule
from pipeline.data.manifest import ShardError


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path, entries):
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _keys(loader):
    return [k for batch in loader for k in batch["key"]]


def test_corrupt_png_is_skipped_counted_and_logged_once(tmp_path, caplog):
    entries = []
    for i in range(12):
        data = b"\x89PNG not really" if i in (3, 7) else _png(i * 10)
        entries += [(f"{i:06d}.png", data), (f"{i:06d}.cls", b"1")]
    _write_tar(tmp_path / "train-000000.tar", entries)
    dm = ShardDataModule(str(tmp_path), batch_size=4, num_workers=0)
    stream = dm.stream("train", False, 4)
    with caplog.at_level(logging.WARNING):
        keys = [k for b in stream for k in b["key"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(12) if i not in (3, 7)]
    assert sum(stream.skipped.values()) == 2
    warnings = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warnings) == 1 and "000003" in warnings[0] and "train-000000.tar" in warnings[0]


def test_training_stream_of_only_corrupt_samples_stops_instead_of_stalling(tmp_path):
    from pipeline.data.stream import ShardStream

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"train-{i:06d}.tar")
        _write_tar(paths[-1], [(f"{i}{j:05d}.png", b"junk") for j in range(5)] + [(f"{i}99999.png", _png(1))])
    # one good sample in 6: 64 good samples need many passes over the data, but arrive
    stream = ShardStream([str(p) for p in paths], batch_size=64, channels=1, image_size=(8, 8), batches_per_rank=2)
    batches = list(stream)
    assert len(batches) == 2 and all(len(b["key"]) == 64 for b in batches)
    for path in paths:
        _write_tar(path, [(f"{j:06d}.png", b"junk") for j in range(5)])
    stream = ShardStream([str(p) for p in paths], batch_size=4, channels=1, image_size=(8, 8), batches_per_rank=1)
    with pytest.raises(ShardError, match="corrupt"):
        list(stream)


def test_truncated_tar_fails_with_its_path(digits_shards, tmp_path):
    shards = tmp_path / "d"
    shutil.copytree(digits_shards, shards)
    victim = shards / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3 + 100])
    with pytest.raises(ShardError, match="train-000002.tar.*truncated"):
        ShardDataModule(str(shards), batch_size=64, num_workers=1).train_dataloader()


def test_truncation_is_caught_while_streaming_too(digits_shards, tmp_path):
    """Shards that change under a running job (or a size check that passed): the sample count catches it."""
    from pipeline.data.stream import ShardStream

    victim = tmp_path / "train-000000.tar"
    data = (digits_shards / "train-000000.tar").read_bytes()
    victim.write_bytes(data[: 512 * 300])  # cut on a block boundary: tarfile sees a clean, shorter archive
    stream = ShardStream([str(victim)], batch_size=16, channels=1, image_size=(8, 8), train=False,
                         expected_counts={str(victim): 400})
    with pytest.raises(ShardError, match=r"train-000000.tar.*truncated"):
        list(stream)
    # a complete tar that holds fewer samples than the manifest says (replaced under the job)
    short = tmp_path / "train-000001.tar"
    _write_tar(short, [(f"{i:06d}.png", _png(i)) for i in range(3)])
    stream = ShardStream([str(short)], batch_size=16, channels=1, image_size=(8, 8), train=False,
                         expected_counts={str(short): 5})
    with pytest.raises(ShardError, match=r"train-000001.tar ended after 3 of its 5 samples"):
        list(stream)


def test_missing_shard_fails_at_setup_with_its_path(digits_shards, tmp_path):
    shards = tmp_path / "d"
    shutil.copytree(digits_shards, shards)
    (shards / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match="train-000001.tar"):
        ShardDataModule(str(shards)).setup("fit")
    with pytest.raises(ShardError, match="does not exist"):
        ShardDataModule(str(tmp_path / "nowhere")).setup("fit")


# digits_shards: 5 train shards of 400, 400, 400, 400, 17 samples. 1 worker: whole shards, 1617 -> 32 batches of 50.
# 2 workers: whole shards would leave one worker 417 samples, so by sample: 808 each -> 16 + 16.
# 3 workers: by sample, 539 each -> 10 batches per worker.
@pytest.mark.parametrize("workers,batches", [(0, 32), (2, 32), (3, 30)])
def test_every_epoch_has_exactly_len_batches_and_no_repeats(digits_shards, workers, batches):
    dm = ShardDataModule(str(digits_shards), batch_size=50, num_workers=workers)
    loader = dm.train_dataloader()
    got = list(loader)
    assert len(got) == len(loader) == batches
    keys = [k for b in got for k in b["key"]]
    assert len(set(keys)) == len(keys)
    assert all(b["image"].shape == (50, 1, 8, 8) for b in got)


def test_reshuffles_each_epoch_deterministically_from_the_seed(digits_shards):
    def epoch_keys(seed, epoch):
        dm = ShardDataModule(str(digits_shards), batch_size=64, num_workers=2, seed=seed)
        loader = dm.train_dataloader()
        loader._epoch_fn = lambda: epoch
        return _keys(loader)

    a0, a1 = epoch_keys(0, 0), epoch_keys(0, 1)
    assert a0 == epoch_keys(0, 0)  # same seed and epoch: same order, workers included
    assert a0 != a1 and a0 != epoch_keys(1, 0)


def test_data_order_is_pinned_to_a_stable_digest_of_seed_and_epoch(digits_shards):
    """The first keys of two epochs, fixed: the order comes from blake2b of (seed, epoch, pass, ...), not from
    ``hash()`` of a tuple, which is an implementation detail of one Python. A change here changes every run's
    data order, so it must be deliberate."""
    stream = ShardDataModule(str(digits_shards), batch_size=8, num_workers=0, seed=0).stream("train", True, 8)
    first = {}
    for epoch in (0, 1):
        stream.epoch = epoch
        first[epoch] = list(next(iter(stream))["key"])
    assert first[0] == ["001513", "001722", "000354", "001137", "001614", "001247", "000749", "000755"]
    assert first[1] == ["000120", "000468", "000589", "000575", "000767", "000097", "000970", "000056"]


def test_batches_are_uint8_until_the_device_transfer(digits_shards):
    dm = ShardDataModule(str(digits_shards), batch_size=16, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype.is_floating_point is False
    out = dm.on_after_batch_transfer({**batch, "image": batch["image"].clone()}, 0)
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    np.testing.assert_allclose(out["image"].numpy(), batch["image"].numpy() / 127.5 - 1, atol=1e-6)


def test_hflip_flips_about_half_the_training_images_deterministically(digits_shards):
    def first_batch(hflip, seed=0):
        dm = ShardDataModule(str(digits_shards), batch_size=400, num_workers=0, hflip=hflip, seed=seed,
                             shuffle_buffer=0)
        return next(iter(dm.train_dataloader()))

    plain, flipped = first_batch(False), first_batch(True)
    assert plain["key"] == flipped["key"]
    same = (plain["image"] == flipped["image"]).flatten(1).all(1)
    mirrored = (plain["image"].flip(-1) == flipped["image"]).flatten(1).all(1)
    assert bool((same | mirrored).all())
    changed = int((~same).sum())
    assert 150 < changed < 250  # about half of 400 (symmetric digits count as unchanged)
    assert torch.equal(flipped["image"], first_batch(True)["image"])
    dm = ShardDataModule(str(digits_shards), batch_size=400, num_workers=0, hflip=True, shuffle_buffer=0)
    val = next(iter(dm.stream("val", False, 400)))  # never flipped outside training
    assert torch.equal(val["image"], next(iter(ShardDataModule(str(digits_shards)).stream("val", False, 400)))["image"])


def _ignores_sigterm(pid: int, signum: int = signal.SIGTERM) -> bool:
    ignored = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn"))
    return bool(int(ignored.split()[1], 16) >> (signum - 1) & 1)


def test_loader_workers_are_not_forked_from_the_training_process(digits_shards):
    """A fork of the (threaded) training process can inherit a held lock and hang: the workers come from a
    fork server, which, like them, outlives SLURM's SIGTERM to the whole job step."""
    dm = ShardDataModule(str(digits_shards), batch_size=16, num_workers=2)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    next(batches), next(batches)  # one batch from each worker: both have run their init function
    ours = children(os.getpid())
    servers = [pid for pid in ours if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(servers) == 1 and _ignores_sigterm(servers[0])
    workers = children(servers[0])
    assert len(workers) == 2 and not set(workers) & set(ours)
    assert all(_ignores_sigterm(pid) for pid in workers)
    # and the preemption warning (--signal=SIGUSR1@90), whose default action would end them mid-step
    assert _ignores_sigterm(servers[0], signal.SIGUSR1) and all(_ignores_sigterm(p, signal.SIGUSR1) for p in workers)
    del batches


HELPERS_UNDER_JOB_SIGNALS = """
import json, os, signal, sys, time
from multiprocessing import forkserver, resource_tracker
from pipeline.data.datamodule import ShardDataModule


def alive(pid):
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # already reaped: Python relaunched a dead resource tracker
        return False


if __name__ == "__main__":
    dm = ShardDataModule(sys.argv[1], batch_size=64, num_workers=2)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    next(batches)
    helpers = [resource_tracker._resource_tracker._pid, forkserver._forkserver._forkserver_pid]
    for pid in helpers:  # what SLURM sends every process of the job step
        os.kill(pid, signal.SIGUSR1)
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    first = 1 + sum(1 for _ in batches)
    second = sum(1 for _ in dm.train_dataloader())  # the next epoch's workers, from the same fork server
    print(json.dumps({"alive": [alive(pid) for pid in helpers],
                      "batches": [first, second]}))
"""


def test_loader_helper_processes_outlive_the_job_signals(tmp_path, digits_shards):
    """multiprocessing's resource tracker dies of SIGUSR1 (the time-limit warning) unless started with it
    blocked; Python then relaunches it and the new one prints a traceback per semaphore of the old one."""
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS_UNDER_JOB_SIGNALS)
    done = subprocess.run([sys.executable, str(script), str(digits_shards)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["alive"] == [True, True]
    length = len(ShardDataModule(str(digits_shards), batch_size=64).train_dataloader())
    assert result["batches"] == [length, length]
    assert "relaunching" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
