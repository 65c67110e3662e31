"""Shared fixtures: real shards on disk, an isolated cache, and a test-built InceptionV3 weight file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Every test gets its own cache; nothing reaches the network; W&B runs offline for real."""
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("GENBENCH_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The embedded digits as shards of 400 samples (5 train shards, 1 val shard)."""
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import DigitsSource

    out = tmp_path_factory.mktemp("shards") / "digits"
    write_shards(DigitsSource(), out, val_fraction=0.1, seed=0, shard_size=400, progress=False)
    return out


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A weight file for torch-fidelity's InceptionV3 architecture, built here (no download possible),
    with batch-norm statistics set so that features differ between images."""
    from pipeline.metrics.features import architecture_only_inception_weights

    return architecture_only_inception_weights(tmp_path_factory.mktemp("weights") / "inception-test.pth")


def genbench(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a child process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def sweep_file(tmp_path: Path, shards: Path, **changes) -> Path:
    """A sweep of two families x two seeds on the digits shards; ``changes`` replace its keys."""
    sweep = {"name": "t", "families": ["vae", "gan"], "experiments_dir": str(REPO / "experiments" / "digits"),
             "seeds": [0, 1], "overrides": ["--trainer.max_steps=20", "--trainer.enable_progress_bar=false",
                                            f"--data.init_args.shards={shards}"],
             "runs": "runs", "results": "results", "leaderboard": "board",
             "benchmark": {"num_samples": 100, "metrics": "fd_auditor,audit"}}
    sweep.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path
