"""Training budgets: the same ``run.budget.images`` gives every family the same images (on 1 and 2 ranks, across a
resume), a FLOPs budget matches an independent count, evaluation checkpoints become records placed at their
budget point on the leaderboard, and the budget experiment runs end to end at a shrunk size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_checkpoints import SHRINK

from conftest import REPO, genbench
from pipeline import leaderboard
from pipeline.benchmark.distributed import free_port
from pipeline.fit.budget import BudgetError, parse_budget
from pipeline.fit.train import ConfigError, fit

BATCH = 16


def _args(tmp_path, shards, family, *overrides):
    return ["--config", str(REPO / "experiments" / "digits" / f"{family}.yaml"), f"--run.root={tmp_path / 'runs'}",
            f"--data.init_args.shards={shards}", "--data.init_args.num_workers=0",
            f"--data.init_args.batch_size={BATCH}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--tracking.wandb=false", "--trainer.check_val_every_n_epoch=100",
            "--model.init_args.sample_every_n_steps=0", "--trainer.max_steps=-1", *SHRINK[family], *overrides]


def _spent(run_dir):
    info = json.loads((run_dir / "run.json").read_text())
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return info, state["genbench"]


def test_budget_settings_are_checked():
    assert parse_budget({"images": 2_000_000}, "run.budget") == ("images", 2_000_000.0)
    assert parse_budget(None, "run.budget") is None
    for bad, message in (({"images": 1, "flops": 2}, "exactly one of"), ({"kimg": 5}, "unknown unit"),
                         ({"images": -3}, "must be positive"), ({"flops": "lots"}, "is not a number")):
        with pytest.raises(BudgetError, match=message):
            parse_budget(bad, "run.budget")


def test_a_malformed_budget_fails_before_training(tmp_path, digits_shards):
    with pytest.raises(ConfigError, match="run.budget.steps: unknown unit; use one of images, flops, device_hours"):
        fit(_args(tmp_path, digits_shards, "vae", "--run.budget={steps: 10}"))
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/checkpoints/*.ckpt"))


@pytest.mark.slow
def test_every_family_sees_exactly_the_images_budget(tmp_path, digits_shards):
    """160 images = 10 batches of 16 for every family, although the GAN takes two optimizer steps a batch."""
    for family in ("vae", "gan", "ddpm", "ar"):
        run_dir = fit(_args(tmp_path, digits_shards, family, "--run.budget={images: 160}"))
        info, state = _spent(run_dir)
        assert info["images_seen"] == 160 and state["images_seen"] == 160, family
        assert info["global_step"] == (20 if family == "gan" else 10), family
        assert state["flops_per_image"] > 0 and info["cost"]["training_flops"] == 160 * state["flops_per_image"]


@pytest.mark.slow
def test_an_images_budget_holds_across_a_resume_from_a_mid_run_checkpoint(tmp_path, digits_shards):
    """Stopped at 6 batches (a mid-run checkpoint), then resumed: it ends at the budget, 25 batches, not beyond."""
    common = ["--run.name=resumed", "--run.budget={images: 400}", "--run.checkpoint_every_n_steps=3"]
    run_dir = fit(_args(tmp_path, digits_shards, "vae", *common, "--trainer.max_steps=6"))
    assert _spent(run_dir)[1]["images_seen"] == 6 * BATCH
    seconds = _spent(run_dir)[1]["device_seconds"]
    run_dir = fit(_args(tmp_path, digits_shards, "vae", *common))
    info, state = _spent(run_dir)
    assert state["images_seen"] == 400 and info["global_step"] == 25
    assert state["device_seconds"] > seconds  # device time accumulates over the attempts


@pytest.mark.slow
def test_a_flops_budget_matches_an_independent_count_and_stops_within_a_step(tmp_path, digits_shards):
    """Training FLOPs = images x the FLOPs per image the flop counter measured on the real first batch; an
    independent count (the benchmarks' plain training loop under the flop counter) agrees within 1%."""
    sys.path.insert(0, str(REPO))
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.train_throughput import _optimizers, plain_step
    from pipeline.fit.train import GenbenchCLI

    for family in ("vae", "gan"):
        args = _args(tmp_path, digits_shards, family, f"--run.name={family}-flops")
        model = GenbenchCLI(args + ["--run.budget={images: 16}"]).model.train()
        x = torch.rand(BATCH, model.channels, model.image_size, model.image_size) * 2 - 1
        with FlopCounterMode(display=False) as counter:
            plain_step(family, model, _optimizers(model), x)()
        per_image = counter.get_total_flops() / BATCH
        budget = per_image * BATCH * 12.5  # reached in the 13th batch
        run_dir = fit(args + [f"--run.budget={{flops: {budget}}}"])
        info, state = _spent(run_dir)
        assert info["cost"]["training_flops"] == pytest.approx(per_image * state["images_seen"], rel=0.01), family
        assert state["images_seen"] == 13 * BATCH, family  # the first batch that reaches the budget, no later


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_stop_at_the_same_images_budget(tmp_path, digits_shards):
    """2 gloo ranks x 16 images a batch: 320 images are 10 steps; images_seen counts both ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "pipeline.cli", "fit",
                           *_args(tmp_path, digits_shards, "vae", "--run.budget={images: 320}"),
                           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    info, state = _spent(run_dir)
    assert info["world_size"] == 2 and state["images_seen"] == 320 and info["global_step"] == 10


@pytest.mark.slow
def test_evaluation_checkpoints_become_records_at_their_budget_points(tmp_path, digits_shards):
    """evaluate_every keeps a checkpoint per point; --checkpoints all scores each into a record with the budget
    spent; the leaderboard ranks runs per point and keeps a run without a budget out of those tables."""
    results = tmp_path / "results"
    for family in ("vae", "gan"):
        run_dir = fit(_args(tmp_path, digits_shards, family, "--run.budget={images: 192}",
                            "--run.evaluate_every={images: 96}"))
        names = sorted(p.name for p in (run_dir / "checkpoints").glob("eval-*.ckpt"))
        assert names == ["eval-images-000000000096.ckpt", "eval-images-000000000192.ckpt"]
        proc = genbench("benchmark", "--run", str(run_dir), "--checkpoints", "all", "--num-samples", "60",
                        "--metrics", "fd_auditor", "--results", str(results))
        assert proc.returncode == 0, proc.stderr[-3000:]
    plain = fit(_args(tmp_path, digits_shards, "ar", "--trainer.max_steps=4"))
    assert genbench("benchmark", "--run", str(plain), "--num-samples", "60", "--metrics", "fd_auditor",
                    "--results", str(results)).returncode == 0
    records = [json.loads(p.read_text()) for p in results.glob("*.json")]
    pointed = sorted((r["family"], r["budget"]["point"], r["budget"]["spent"]["images"]) for r in records
                     if r.get("budget"))
    assert pointed == [("gan", 96.0, 96), ("gan", 192.0, 192), ("vae", 96.0, 96), ("vae", 192.0, 192)]
    assert all(r["cost"]["training_flops"] > 0 for r in records if r.get("budget"))
    board = leaderboard.build(results, tmp_path / "board", wandb="off").read_text()
    section = board.split("## At equal training budgets")[1].split("## Skipped metrics")[0]
    assert "### 96 images" in section and "### 192 images" in section and "digits-ar" not in section
    main = board.split("## At equal training budgets")[0]
    rows = [line for line in main.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3  # one per run: the budgeted ones at 192 images, the plain one as it is
    csv_rows = (tmp_path / "board" / "leaderboard.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 5  # the CSV holds every point
    html = (tmp_path / "board" / "leaderboard.html").read_text()
    assert html.count('class="budget-line"') == 4  # two runs, on the FLOPs and the device-hours plots


@pytest.mark.slow
def test_the_budget_experiment_runs_end_to_end_at_a_shrunk_size(tmp_path, digits_shards):
    proc = genbench("run", str(REPO / "experiments" / "budget-digits.yaml"), "--runs", str(tmp_path / "runs"),
                    "--results", str(tmp_path / "results"), "--leaderboard", str(tmp_path / "board"),
                    f"--data.init_args.shards={digits_shards}", "--run.budget={images: 256}",
                    "--run.evaluate_every={images: 128}", "--benchmark.num_samples=64",
                    "--data.init_args.num_workers=0", "--model.init_args.sample_every_n_steps=0",
                    "--benchmark.auditor_epochs=1", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    section = board.split("## At equal training budgets")[1].split("## Skipped metrics")[0]
    for family in ("vae", "gan", "ddpm", "ar"):
        assert section.count(f"| {family} |") == 2, family  # at 128 and at 256 images


@pytest.mark.slow
def test_a_device_hours_budget_stops_at_the_first_batch_past_it(tmp_path, digits_shards):
    run_dir = fit(_args(tmp_path, digits_shards, "vae", "--run.budget={device_hours: 0.001}"))  # 3.6 s
    info, state = _spent(run_dir)
    assert info["status"] == "finished" and info["images_seen"] == state["images_seen"] > 0
    # at the batch that crossed 3.6 s (a batch of this VAE takes milliseconds), not at some later limit
    assert 3.6 <= state["device_seconds"] < 6.0
