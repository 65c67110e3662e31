"""The run's final checkpoint is written at the step training ended, and the benchmark scores (and records)
exactly the weights it loaded."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from pipeline.benchmark import BenchmarkError, ScoreOptions, benchmark_run
from pipeline.fit.train import fit

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
