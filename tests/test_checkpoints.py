"""The run's final checkpoint is written at the step training ended, and the benchmark scores (and records)
exactly the weights it loaded."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from conftest import REPO
from pipeline.benchmark import BenchmarkError, ScoreOptions, benchmark_run
from pipeline.fit.train import ConfigError, fit

SHRINK = {
    "vae": ["--model.init_args.kl_warmup_steps=0", "--model.init_args.base_channels=8"],
    "gan": ["--model.init_args.g_channels=8", "--model.init_args.d_channels=8"],
    "ddpm": ["--model.init_args.ch=16", "--model.init_args.sampling_steps=3", "--model.init_args.warmup_steps=2"],
    "ar": ["--model.init_args.dim=16", "--model.init_args.depth=1", "--model.init_args.warmup_steps=2"],
}


def _fit(tmp_path, digits_shards, family, *overrides):
    return fit(["--config", str(REPO / "experiments" / "digits" / f"{family}.yaml"), f"--run.root={tmp_path}",
                f"--data.init_args.shards={digits_shards}", "--data.init_args.num_workers=0",
                "--data.init_args.batch_size=16", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", "--tracking.wandb=false",
                "--trainer.check_val_every_n_epoch=100",
                "--benchmark.auditor_epochs=1", "--model.init_args.sample_every_n_steps=0", *SHRINK[family],
                *overrides])


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ckpt(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["global_step"], state["genbench"]["images_seen"]


@pytest.mark.parametrize("family", sorted(SHRINK))
def test_last_checkpoint_is_at_the_final_step_and_the_benchmark_records_its_progress(tmp_path, digits_shards,
                                                                                      family):
    # 7 batches, checkpoints every 5 steps: the GAN's two optimizers count 14 steps, and save at 10
    steps = 14 if family == "gan" else 7
    run_dir = _fit(tmp_path, digits_shards, family, f"--trainer.max_steps={steps}", "--run.checkpoint_every_n_steps=5")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["global_step"] == steps and info["images_seen"] == 7 * 16
    assert _ckpt(run_dir / "checkpoints" / "last.ckpt") == (steps, 7 * 16)
    # the numbered checkpoint is the final one too (the periodic one before it is not kept)
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt")] == [f"step-{steps:07d}.ckpt"]

    opts = ScoreOptions(progress=False, device="cpu")
    record = json.loads(benchmark_run(run_dir, num_samples=20, metrics="fd_auditor", opts=opts,
                                      results=str(tmp_path / "results")).read_text())
    assert record["cost"]["global_step"] == steps and record["cost"]["images_seen"] == 7 * 16
    # every file of the run and the record has the mode the umask gives (pytest runs under 022 here)
    mode = 0o666 & ~_current_umask()
    written = [run_dir / "config.yaml", run_dir / "run.json", run_dir / "checkpoints" / "last.ckpt",
               tmp_path / "results" / record["sample_grid"], *(tmp_path / "results").glob("*.json")]
    assert {p: p.stat().st_mode & 0o777 for p in written} == {p: mode for p in written}

    # A run.json that claims more training than the checkpoint holds (what the old bug left behind) is refused
    info["global_step"] = steps + 3
    (run_dir / "run.json").write_text(json.dumps(info))
    with pytest.raises(BenchmarkError, match=f"holds step {steps} but .* reached step {steps + 3}.* genbench fit"):
        benchmark_run(run_dir, num_samples=20, metrics="fd_auditor", opts=opts, results=str(tmp_path / "results"))


def test_an_early_stop_also_ends_with_last_checkpoint_at_its_step(tmp_path, digits_shards):
    # The trainer's max_time-free early stop: limit the epoch count so training ends before max_steps.
    run_dir = _fit(tmp_path, digits_shards, "vae", "--trainer.max_steps=1000", "--trainer.max_epochs=1",
                   "--run.checkpoint_every_n_steps=40")
    info = json.loads((run_dir / "run.json").read_text())
    batches = info["images_seen"] // 16
    assert 0 < batches < 1000 and batches % 40 != 0
    assert _ckpt(run_dir / "checkpoints" / "last.ckpt") == (batches, info["images_seen"])


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_a_run_resumed_without_slurm_continues_exactly_where_it_stopped(tmp_path, digits_shards):
    """Fit 10 steps, then the same run to 20 (the same command with a longer max_steps): the same weights, EMA,
    optimizer and schedule as 20 steps in one go, the step and image counts continued, and one metrics.csv with
    every step once. Epochs of 5 batches so that the stop falls on an epoch boundary (data order resumes per
    epoch), and the AR family without dropout, whose training step draws no random numbers, so the two runs
    must agree bit for bit."""
    common = ["--trainer.limit_train_batches=5", "--trainer.log_every_n_steps=1", "--model.init_args.dropout=0.0",
              "--run.checkpoint_every_n_steps=4"]
    first = _fit(tmp_path, digits_shards, "ar", "--run.name=resumed", "--trainer.max_steps=10", *common)
    assert _ckpt(first / "checkpoints" / "last.ckpt") == (10, 160)
    # a longer schedule is the same run: max_steps is not part of the config hash that names the directory
    resumed = _fit(tmp_path, digits_shards, "ar", "--run.name=resumed", "--trainer.max_steps=20", *common)
    assert resumed == first
    straight = _fit(tmp_path, digits_shards, "ar", "--run.name=straight", "--trainer.max_steps=20", *common)

    a, b = _state(resumed / "checkpoints" / "last.ckpt"), _state(straight / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 20 and a["genbench"]["images_seen"] == 20 * 16
    for key in ("state_dict", "current_model_state"):  # the EMA weights, and the live ones beside them
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["callbacks"]["EMA"] == b["callbacks"]["EMA"]
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert float(opt_a[0]["step"]) == 20
    assert all(torch.equal(opt_a[i][m], opt_b[i][m]) for i in opt_b for m in ("exp_avg", "exp_avg_sq"))
    assert a["lr_schedulers"] == b["lr_schedulers"]

    info = json.loads((resumed / "run.json").read_text())
    assert info["attempts"] == 2 and info["global_step"] == 20 and info["images_seen"] == 20 * 16
    assert [(r["global_step"], r["max_steps"]) for r in info["resumes"]] == [(10, 20)] and info["max_steps"] == 20
    # a shorter schedule than the run has trained is refused before any work
    with pytest.raises(ConfigError, match="already trained 20 steps, more than trainer.max_steps=15"):
        _fit(tmp_path, digits_shards, "ar", "--run.name=resumed", "--trainer.max_steps=15", *common)
    with open(resumed / "logs" / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps == list(range(20))  # the first attempt's rows kept, none twice
