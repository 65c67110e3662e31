"""`genbench fit` with configs no run can use: one message naming the key and what it may be, before any run
directory is made (before: Lightning, Adam and jsonargparse tracebacks, and a run directory left behind)."""

from __future__ import annotations

import pytest
from shard_server import ShardServer

from conftest import REPO, genbench
from pipeline.fit.train import resolve

VAE = str(REPO / "experiments" / "digits" / "vae.yaml")


def _fit(tmp_path, shards, *overrides: str, env: dict | None = None):
    return genbench("fit", "--config", VAE, f"--run.root={tmp_path / 'runs'}", f"--data.init_args.shards={shards}",
                    "--tracking.wandb=false", "--data.init_args.num_workers=0", *overrides, env=env)


def _one_message_and_no_run(proc, tmp_path) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("genbench: error: "), proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    return lines[0]


@pytest.mark.parametrize("override, says", [
    ("--trainer.max_steps=-5", "trainer.max_steps=-5 must be a positive number of steps (or -1: no limit)"),
    ("--trainer.max_steps=0", "trainer.max_steps=0 must be a positive number of steps"),
    ("--model.init_args.lr=-1", "model.init_args.lr=-1.0 must be a positive learning rate"),
    ("--data.init_args.batch_size=-3", "data.init_args.batch_size=-3 must be positive"),
    ("--data.init_args.num_workers=-1", "data.init_args.num_workers=-1 must be 0 or more"),
    ("--model.init_args.sample_every_n_steps=-2", "sample_every_n_steps=-2 must be a number of steps, 0 (only at"),
    # raised by the data module's own __init__, which jsonargparse wraps in a 70-line union error
    ("--data.init_args.verify=sometimes", "data.verify='sometimes': use one of first, always, never"),
    ("--data.init_args.resize=squash", "data.resize='squash': use one of"),
])
def test_a_number_or_choice_no_run_can_use_is_one_line_before_any_run_directory(digits_shards, tmp_path, override,
                                                                                 says):
    line = _one_message_and_no_run(_fit(tmp_path, digits_shards, override), tmp_path)
    assert says in line


@pytest.mark.parametrize("value", ["0", "-1"])
def test_the_sample_grid_switches_stay_valid(digits_shards, tmp_path, value):
    """sample_every_n_steps 0 (a grid only at the end) and -1 (none) are settings, not bad numbers."""
    resolved = resolve(["--config", VAE, f"--data.init_args.shards={digits_shards}", f"--run.root={tmp_path}",
                        f"--model.init_args.sample_every_n_steps={value}"])
    assert resolved.config.model.init_args.sample_every_n_steps == int(value)


def test_every_bad_number_is_named_at_once(digits_shards, tmp_path):
    line = _one_message_and_no_run(_fit(tmp_path, digits_shards, "--trainer.max_steps=-5",
                                        "--model.init_args.lr=-1", "--data.init_args.batch_size=-3"), tmp_path)
    assert "max_steps=-5" in line and "lr=-1.0" in line and "batch_size=-3" in line


def test_a_gan_names_its_own_learning_rates(digits_shards, tmp_path):
    proc = genbench("fit", "--config", str(REPO / "experiments" / "digits" / "gan.yaml"),
                    f"--run.root={tmp_path / 'runs'}", f"--data.init_args.shards={digits_shards}",
                    "--model.init_args.lr_d=0")
    assert "model.init_args.lr_d=0.0 must be a positive learning rate" in _one_message_and_no_run(proc, tmp_path)


def test_a_url_pattern_without_samples_per_epoch_says_so_first(digits_shards, tmp_path):
    with ShardServer(digits_shards) as server:
        pattern = server.url + "/train-{000000..000004}.tar"
        proc = _fit(tmp_path, pattern, f"--data.init_args.val_shards={server.url}/val-000000.tar")
    line = _one_message_and_no_run(proc, tmp_path)
    assert "come without a manifest to count their samples: set data.init_args.samples_per_epoch" in line


def test_unreachable_shards_are_one_line_naming_the_url(tmp_path):
    proc = _fit(tmp_path, "http://127.0.0.1:9/train-{000000..000001}.tar", "--data.init_args.samples_per_epoch=64",
                env={"GENBENCH_REMOTE_RETRIES": "1"})  # (the retries' backoff is tested in test_remote_shards)
    assert "http://127.0.0.1:9/train-000000.tar" in _one_message_and_no_run(proc, tmp_path)


def test_how_shards_are_verified_does_not_rename_the_run(digits_shards, tmp_path):
    args = ["--config", VAE, f"--data.init_args.shards={digits_shards}", f"--run.root={tmp_path}"]
    default = resolve(args).run_dir
    assert resolve([*args, "--data.init_args.verify=always"]).run_dir == default
    assert resolve([*args, "--data.init_args.max_pixels=64000000"]).run_dir == default
    assert resolve([*args, "--data.init_args.max_pixels=1000"]).run_dir != default  # fewer images may be trained on
