"""genbench submit without a cluster: the dry run's commands, the checks that stop a bad sweep before any
sbatch, and the allocation check of a training job."""

from __future__ import annotations

import subprocess

import pytest

from conftest import genbench, sweep_file


def test_submit_dry_run_prints_the_commands_and_submits_nothing(tmp_path, digits_shards):
    sweep = sweep_file(tmp_path, digits_shards, train={"max_parallel": 2, "time": "00:30:00"})
    done = genbench("submit", str(sweep), "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "runs").exists()
    assert "--array=0-3%2" in out and "--time=00:30:00" in out and "slurm/train.sbatch" in out
    assert "--dependency=aftercorr:$TRAIN_JOB" in out and "--dependency=afterany:$BENCHMARK_JOB:$REFERENCE_JOB_1" in out
    train_lines = out.split("train-tasks.txt <<'EOF'\n")[1].split("\nEOF")[0].splitlines()
    assert len(train_lines) == 4 and sum("--seed_everything=1" in line for line in train_lines) == 2
    bench_lines = out.split("benchmark-tasks.txt <<'EOF'\n")[1].split("\nEOF")[0].splitlines()
    assert len({line.split()[1] for line in bench_lines}) == 4
    assert all(line.startswith("--run runs/digits-") and "--num-samples 100" in line for line in bench_lines)
    # the printed script is valid bash
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0


@pytest.mark.parametrize("change,message", [
    ({"families": [], "experiments": ["missing.yaml"]}, "experiment file"),
    ({"families": ["vae", "flow"]}, "unknown family 'flow'"),
    ({"train": {"gpus_per_node": 2}}, "gpus_per_node=2"),
    ({"results": "blocker/results"}, "results directory blocker/results is not writable"),
])
def test_submit_stops_on_bad_input_before_submitting_anything(tmp_path, digits_shards, change, message):
    (tmp_path / "blocker").write_text("a file where a directory would have to be")
    done = genbench("submit", str(sweep_file(tmp_path, digits_shards, **change)), cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "sweeps").exists(), "task lists were written for a sweep that was not submitted"


def test_a_job_holding_more_gpus_than_devices_is_refused(monkeypatch):
    from pipeline.fit.preemption import allocation_problem

    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    assert allocation_problem(1) is None
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    assert "--ntasks-per-node=4" in allocation_problem(1)
    assert "--ntasks-per-node=4" in allocation_problem("2")  # as `--trainer.devices=2` parses
    assert allocation_problem(4) is None and allocation_problem("auto") is None
