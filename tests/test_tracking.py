"""W&B tracking cannot end a training run: when W&B's service process dies (as SLURM's SIGTERM to a job step
makes it do), the run trains on and its curve goes on in the CSV log."""

from __future__ import annotations

import csv
import json

import yaml

from conftest import REPO, genbench


def test_training_outlives_the_wandb_service(tmp_path, digits_shards):
    killer = tmp_path / "killer.yaml"
    killer.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "wandb_service_killer.KillWandbService", "init_args": {"at_step": 12}}]}}))
    steps = 30
    done = genbench("fit", "--config", str(REPO / "experiments" / "digits" / "vae.yaml"), "--config", str(killer),
                    f"--data.init_args.shards={digits_shards}", f"--run.root={tmp_path / 'runs'}",
                    f"--trainer.max_steps={steps}", "--trainer.log_every_n_steps=5",
                    "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
                    "--model.init_args.base_channels=8", "--model.init_args.sample_every_n_steps=20",
                    env={"PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "offline"})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "killed wandb-core" in out, out[-4000:]
    # W&B calls after the kill (metrics every 5 steps, validation at each epoch's end, the sample grid at step 20)
    # are skipped, with one warning; nothing raises
    assert out.count("W&B's service process is gone") == 1, out[-4000:]
    assert "Traceback" not in out.split("killed wandb-core")[1], out[-4000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["global_step"] == steps
    logged = sorted({int(r["step"]) for r in csv.DictReader((run_dir / "logs" / "metrics.csv").open()) if r["step"]})
    assert logged[0] < 12 and logged[-1] >= steps - 5, logged
    # the sample grid after the kill is still written to the run directory
    assert (run_dir / "samples" / "step-0000020.png").exists()
    # what W&B wrote before its service died stays in the offline run
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert any(wandb_run.glob("run-*.wandb"))
