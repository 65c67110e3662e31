"""The command line explains itself."""

from __future__ import annotations

import pytest

from conftest import genbench


def test_top_level_help_lists_every_command():
    proc = genbench("--help")
    assert proc.returncode == 0
    for command in ("prepare", "fit", "benchmark", "leaderboard", "run", "submit", "train-auditor", "fetch-weights"):
        assert command in proc.stdout


@pytest.mark.parametrize("command,options", [
    ("prepare", ["--out", "--verify", "--val-fraction", "--shard-size", "--image-size", "--download"]),
    ("benchmark", ["--run", "--images", "--reference", "--labels", "--reference-rows", "--num-samples", "--seed",
                   "--repeats", "--metrics", "--inception-weights", "--auditor", "--allow-tf32", "--results"]),
    ("leaderboard", ["--results", "--out", "--wandb"]),
    ("leaderboard", ["--results", "--out"]),
    ("run", ["--runs", "--results", "--leaderboard"]),
    ("submit", ["--dry-run", "--sweeps"]),
    ("fit", ["--config", "--model", "--data", "--trainer.max_steps", "--benchmark.num_samples", "--run.name",
             "--dry-run", "--tracking.wandb"]),
])
def test_command_help_explains_options(command, options):
    proc = genbench(command, "--help")
    assert proc.returncode == 0, proc.stderr
    for option in options:
        assert option in proc.stdout, f"{option} missing from genbench {command} --help"


def test_prepare_and_verify_from_the_command_line(tmp_path):
    proc = genbench("prepare", "digits", "--out", str(tmp_path / "d"), "--shard-size", "1000", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train: 1617 images in 2 shard(s), 8x8x1" in proc.stdout
    assert genbench("prepare", "--verify", str(tmp_path / "d")).returncode == 0
    (tmp_path / "d" / "val-000000.tar").write_bytes(b"garbage")
    proc = genbench("prepare", "--verify", str(tmp_path / "d"))
    assert proc.returncode == 1 and "val-000000.tar" in proc.stdout
    proc = genbench("prepare", "digits", "--out", str(tmp_path / "d"))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
