"""The README's main job, end to end through the real console script, shrunk to a few steps."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import REPO, genbench


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    args = ["run", str(REPO / "experiments" / "quickstart.yaml"), "--trainer.max_steps=30",
            "--benchmark.num_samples=200", "--benchmark.auditor_epochs=2"]
    proc = genbench(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    board = tmp_path / "leaderboard" / "quickstart" / "leaderboard.md"
    assert f"leaderboard: {board.relative_to(tmp_path)}" in proc.stdout
    # A quiet console: a ranked table naming the best model, progress as lines (no carriage returns in a log),
    # none of Lightning's or W&B's chatter, a few kilobytes for the whole run
    console = proc.stdout + proc.stderr
    assert "best: digits-" in proc.stdout and "\r" not in console and len(console) < 30_000, len(console)
    for noise in ("litlogger", "LeafSpec", "srun", "Seed set", "anonymous setting", "saved_models", "FLOPs"):
        assert noise not in console, noise
    assert (tmp_path / "shards" / "digits" / "manifest.json").exists()

    runs = {json.loads((d / "run.json").read_text())["family"]: d for d in (tmp_path / "runs").iterdir()}
    assert sorted(runs) == ["ar", "ddpm", "gan", "vae"]
    records, frame = {}, {}
    for path in (tmp_path / "results" / "quickstart").glob("*.json"):
        record = json.loads(path.read_text())
        if record.get("reference_row"):
            frame[record["reference_row"]] = record
        else:
            records[record["family"]] = record
    assert sorted(records) == sorted(runs)
    # the floor (held-out digits) and ceiling (noise) rows; after 30 steps a model may still be as far as noise
    assert sorted(frame) == ["ceiling", "floor"]
    for record in records.values():
        assert frame["floor"]["metrics"]["fd_auditor"] < record["metrics"]["fd_auditor"]
    html = (board.parent / "leaderboard.html").read_text()
    assert html.count("<tr class=") == 6 and "<svg" in html
    for family, run_dir in runs.items():
        info = json.loads((run_dir / "run.json").read_text())
        assert info["status"] == "finished" and info["global_step"] == 30, family
        assert len(info["config_hash"]) == 64 and len(info["data"]["manifest_hash"]) == 64
        assert info["packages"]["torch"] and "commit" in info["git"] and info["images_seen"] > 0
        assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "config.yaml").exists()
        assert list((run_dir / "samples").glob("*.png")) and (run_dir / "logs" / "metrics.csv").exists()
        with Image.open(sorted((run_dir / "samples").glob("*.png"))[-1]) as grid:
            assert grid.width >= 400, grid.size  # readable: 8x8 digits drawn 7x larger
        assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"
        assert info["tracking"]["wandb_mode"] == "offline" and info["tracking"]["wandb_sync"].startswith("wandb sync ")

        record = records[family]
        assert record["run_id"] == run_dir.name and record["protocol"]["num_samples"] == 200
        assert record["metrics"]["fd_auditor"] > 0
        assert sum(record["metrics"]["audit"]["class_histogram"]) == 200
        assert "fid" not in record["metrics"] and "genbench fetch-weights" in record["skipped"]["fid"]
        assert record["provenance"]["config_hash"] == info["config_hash"]
        assert 0 < record["protocol"]["extractors"]["auditor"]["val_accuracy"] <= 1
        row = [line for line in board.read_text().splitlines() if line.startswith("| ") and run_dir.name in line]
        assert len(row) == 1 and f"| {family} |" in row[0]
    assert records["ddpm"]["cost"]["nfe"] == 50 and records["ar"]["cost"]["nfe"] == 64

    # Running it again trains nothing (the run finished with the same config) and adds no duplicate record;
    # --force scores again
    count = len(list((tmp_path / "results" / "quickstart").glob("*.json")))
    again = genbench(*args, cwd=tmp_path)
    assert again.returncode == 0 and "already finished; not training again" in again.stdout
    assert again.stdout.count("already scored") == 4
    assert len(list((tmp_path / "results" / "quickstart").glob("*.json"))) == count
    forced = genbench(*args, "--force", cwd=tmp_path)
    assert forced.returncode == 0 and "already scored" not in forced.stdout
    assert len(list((tmp_path / "results" / "quickstart").glob("*.json"))) == count + 4
