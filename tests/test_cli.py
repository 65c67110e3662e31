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


def test_inception_weights_help_and_skip_message_name_the_same_file(tmp_path, monkeypatch):
    """The help is built without importing torch, so it carries the file name as a constant: it must be the
    one torch-fidelity downloads, which the skip message (and genbench fetch-weights) use."""
    from pipeline import cli
    from pipeline.metrics.features import INCEPTION_FILE, WeightsUnavailable, resolve_inception_weights

    assert cli.INCEPTION_FILE == INCEPTION_FILE
    help_text = " ".join(genbench("benchmark", "--help").stdout.split())
    assert INCEPTION_FILE in help_text and "genbench fetch-weights" in help_text
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache, whatever this machine holds
    with pytest.raises(WeightsUnavailable, match=INCEPTION_FILE):
        resolve_inception_weights(None, download=False)


def test_ctrl_c_during_fit_prints_the_one_command_that_resumes(tmp_path, digits_shards):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    args = ["fit", "--config", str(REPO / "experiments" / "digits" / "vae.yaml"), f"--run.root={tmp_path}",
            f"--data.init_args.shards={digits_shards}", "--data.init_args.num_workers=0",
            "--trainer.max_steps=100000", "--run.checkpoint_every_n_steps=10", "--tracking.wandb=false"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/checkpoints/last.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert list(tmp_path.glob("*/checkpoints/last.ckpt")), "no checkpoint within 2 minutes"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    hint = [line for line in err.splitlines() if line.startswith("genbench fit: interrupted;")]
    assert len(hint) == 1, err[-3000:]
    (run_dir,) = [p.parent.parent for p in tmp_path.glob("*/checkpoints/last.ckpt")]
    assert f"resumes from {run_dir / 'checkpoints' / 'last.ckpt'}" in hint[0]
    assert "`genbench fit --config " in hint[0] and "--trainer.max_steps=100000" in hint[0]
    # --help exits too, cleanly: no resume hint there
    help_ = genbench("fit", "--help")
    assert help_.returncode == 0 and "--trainer.max_steps" in help_.stdout and "genbench fit:" not in help_.stderr


def test_fit_is_quiet_unless_asked_for_everything(tmp_path, digits_shards):
    from conftest import REPO

    args = ["fit", "--config", str(REPO / "experiments" / "digits" / "vae.yaml"), f"--run.root={tmp_path}",
            f"--data.init_args.shards={digits_shards}", "--data.init_args.num_workers=0", "--trainer.max_steps=3",
            "--tracking.wandb=false"]
    quiet = genbench(*args)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "GPU available" not in quiet.stderr and "Seed set" not in quiet.stderr
    assert "[fit " in quiet.stderr and "step: 3/3" in quiet.stderr and "run directory:" in quiet.stdout
    loud = genbench(*args, "--verbose")
    assert loud.returncode == 0 and "GPU available" in loud.stderr + loud.stdout
    env_loud = genbench(*args, env={"GENBENCH_VERBOSE": "1"})
    assert "GPU available" in env_loud.stderr + env_loud.stdout
