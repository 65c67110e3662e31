"""SLURM for real: a two-node cluster on this machine (slurm/local-cluster.sh; `.ci/run` starts it), the
sbatch templates, preemption and requeue, a sweep from `genbench submit`, and multi-node DDP without
SLURM (torchrun). Skipped where no cluster runs, unless GENBENCH_REQUIRE_SLURM=1 (CI) makes that a failure."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

from conftest import genbench, sweep_file
from pipeline.benchmark.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
GENBENCH_EXE = Path(sys.executable).parent / "genbench"
VAE = REPO / "experiments" / "digits" / "vae.yaml"


def _cluster_problem() -> Optional[str]:
    if shutil.which("sbatch") is None:
        return "sbatch not found"
    info = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        return f"sinfo failed: {info.stderr.strip()}"
    up = [line for line in info.stdout.splitlines()
          if line.split()[1].rstrip("*~#") in ("idle", "mixed", "allocated", "completing")]
    return None if len(up) >= 2 else f"fewer than 2 nodes up: {info.stdout.strip()!r}"


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    problem = _cluster_problem()
    if problem:
        message = f"no usable SLURM cluster ({problem}); start one with slurm/local-cluster.sh"
        if os.environ.get("GENBENCH_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _job_env(cache: Path) -> dict[str, str]:
    """What the jobs inherit (sbatch exports the environment): this venv's genbench, the probe, no network."""
    return {**os.environ, "GENBENCH": str(GENBENCH_EXE), "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1",
            "GENBENCH_CACHE": str(cache), "GENBENCH_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _sbatch(*args: str, env: dict, cwd: Path) -> str:
    done = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _jobs(job: str) -> list[dict[str, str]]:
    """`scontrol show job` as dicts, one per job (or array task)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def _wait(job: str, timeout: float = 600) -> list[dict[str, str]]:
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.time() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"SLURM job {job} did not finish in {timeout} s: {_jobs(job)}")
        time.sleep(1)
    return _jobs(job)


def _probe_config(path: Path, out: Path) -> Path:
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "slurm_probe.TrainingProbe", "init_args": {"out": str(out)}}]}}))
    return path


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_args(shards: Path, runs: Path, probe: Path, steps: int) -> list[str]:
    return [str(VAE), "--config", str(probe), f"--data.init_args.shards={shards}", f"--run.root={runs}",
            f"--trainer.max_steps={steps}", "--trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def two_node_job(slurm_cluster, tmp_path_factory, digits_shards):
    """slurm/train.sbatch on 2 nodes x 1 task: the job record, its run directory and what each rank trained on."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    probe = _probe_config(tmp / "probe.yaml", tmp / "probe")
    job = _sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={tmp}/job-%j.out",
                  str(REPO / "slurm" / "train.sbatch"), *_train_args(digits_shards, tmp / "runs", probe, 20),
                  env=_job_env(tmp / "cache"), cwd=tmp)
    (record,) = _wait(job)
    (run_dir,) = (tmp / "runs").iterdir()
    return {"job": job, "record": record, "run_dir": run_dir, "probe": tmp / "probe", "log": tmp / f"job-{job}.out",
            "tmp": tmp}


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.ddp
def test_train_sbatch_two_nodes_ddp_disjoint_data_and_complete_run_dir(two_node_job):
    record, run_dir = two_node_job["record"], two_node_job["run_dir"]
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", two_node_job["log"].read_text()[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["global_step"] == 20
    assert info["world_size"] == 2 and info["num_nodes"] == 2
    assert info["hardware"]["slurm"]["SLURM_JOB_ID"] == two_node_job["job"]
    assert info["hardware"]["slurm"]["SLURM_NNODES"] == "2"
    assert info["hardware"]["slurm"]["SLURM_JOB_NODELIST"] == record["NodeList"]
    assert info["git"]["commit"] and info["packages"]["torch"] and info["data"]["manifest_hash"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert int(config["trainer"]["num_nodes"]) == 2 and int(config["trainer"]["devices"]) == 1  # sbatch geometry
    assert info["config_hash"].startswith(run_dir.name.rsplit("-", 1)[1])
    wandb_id = (run_dir / "wandb_id").read_text().strip()
    assert info["tracking"]["wandb_id"] == wandb_id and info["tracking"]["wandb_mode"] == "offline"
    assert [p.name.endswith(wandb_id) for p in (run_dir / "wandb").glob("offline-run-*")] == [True]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "logs" / "metrics.csv").is_file()

    ranks = [_events(two_node_job["probe"] / f"rank{r}-attempt0.jsonl") for r in (0, 1)]
    starts = [r[0] for r in ranks]
    assert [s["world_size"] for s in starts] == [2, 2]
    assert starts[0]["node"] != starts[1]["node"], "both ranks ran on the same SLURM node"
    keys = [[k for e in r if e["event"] == "batch" for k in e["keys"]] for r in ranks]
    assert len(keys[0]) == len(keys[1]) == 20 * 64
    assert not set(keys[0]) & set(keys[1]), "the two nodes trained on the same samples"


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.ddp
def test_benchmark_sbatch_over_two_tasks_scores_what_one_process_scores(two_node_job):
    """slurm/benchmark.sbatch on 2 nodes: rank 0 trains the missing auditor while the other waits, both sample
    and extract their share, rank 0 writes the record; a single process then gives the same numbers."""
    tmp, run_dir = two_node_job["tmp"], two_node_job["run_dir"]
    env = _job_env(tmp / "cache")
    common = ["--run", str(run_dir), "--num-samples", "120", "--metrics", "fd_auditor,audit", "--batch-size", "25"]
    job = _sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={tmp}/bench-%j.out",
                  str(REPO / "slurm" / "benchmark.sbatch"), *common, "--results", str(tmp / "r2"), env=env, cwd=tmp)
    (record,) = _wait(job)
    assert record["JobState"] == "COMPLETED", (tmp / f"bench-{job}.out").read_text()[-3000:]
    single = genbench("benchmark", *common, "--results", str(tmp / "r1"), env=env, cwd=tmp)
    assert single.returncode == 0, single.stderr[-3000:]
    (two,), (one,) = ([json.loads(p.read_text()) for p in (tmp / r).glob("*.json")] for r in ("r2", "r1"))
    assert two["protocol"]["world_size"] == 2 and one["protocol"]["world_size"] == 1
    assert two["protocol"]["protocol_id"] == one["protocol"]["protocol_id"]
    assert two["metrics"]["fd_auditor"] == pytest.approx(one["metrics"]["fd_auditor"], rel=1e-6)
    assert two["metrics"]["audit"]["class_histogram"] == one["metrics"]["audit"]["class_histogram"]


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.ddp
def test_torchrun_two_nodes_on_loopback_split_data_as_slurm_does(two_node_job, tmp_path, digits_shards):
    """The same training as two torchrun "nodes" (--nnodes=2, static rendezvous on 127.0.0.1) and no SLURM."""
    probe = _probe_config(tmp_path / "probe.yaml", tmp_path / "probe")
    env = {k: v for k, v in _job_env(tmp_path / "cache").items() if not k.startswith("SLURM")}
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
         "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "pipeline.cli", "fit", "--config",
         *_train_args(digits_shards, tmp_path / "runs", probe, 20), "--trainer.num_nodes=2", "--trainer.devices=1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["num_nodes"] == 2 and info["hardware"]["slurm"] is None
    for rank in (0, 1):
        torchrun = _events(tmp_path / "probe" / f"rank{rank}-attempt0.jsonl")
        slurm = _events(two_node_job["probe"] / f"rank{rank}-attempt0.jsonl")
        assert torchrun[0]["world_size"] == slurm[0]["world_size"] == 2
        # same seed, rank and world size: the same samples in the same order, whatever started the processes
        assert [e["keys"] for e in torchrun[1:]] == [e["keys"] for e in slurm[1:]], f"rank {rank} data differs"
        # same config and seed on the same hardware: the same weights, EMA and optimizer state at every step
        assert [e["state"] for e in torchrun] == [e["state"] for e in slurm], f"rank {rank} trained differently"


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.ddp
@pytest.mark.parametrize("preempt", [
    # what --signal=SIGUSR1@90 does 90 s before the time limit: SIGUSR1 to every task of the job's steps;
    # the job requeues itself
    ["scancel", "--signal=USR1"],
    # what preemption or an admin's requeue does: SIGTERM to every task, SIGKILL KillWait seconds later,
    # and SLURM requeues the job
    ["scontrol", "requeue"],
], ids=["sigusr1-time-limit", "scontrol-requeue"])
def test_preempted_job_checkpoints_requeues_and_resumes_the_same_state_and_wandb_run(slurm_cluster, tmp_path,
                                                                                    digits_shards, preempt):
    probe = _probe_config(tmp_path / "probe.yaml", tmp_path / "probe")
    steps = 150
    # No periodic checkpoint before the end: the resumed state can only come from the preemption checkpoint.
    job = _sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/job-%j.out",
                  str(REPO / "slurm" / "train.sbatch"), *_train_args(digits_shards, tmp_path / "runs", probe, steps),
                  "--run.checkpoint_every_n_steps=100000", env=_job_env(tmp_path / "cache"), cwd=tmp_path)
    first = tmp_path / "probe" / "rank0-attempt0.jsonl"
    deadline = time.time() + 300
    while not (first.exists() and len(first.read_text().splitlines()) > 10):
        assert time.time() < deadline, f"training did not start: {_jobs(job)}"
        time.sleep(0.5)
    subprocess.run([*preempt, job], check=True)
    (record,) = _wait(job)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log[-3000:]
    saved = re.search(r"SIG(?:USR1|TERM): saved \S+ at step (\d+)", log)
    assert saved, log[-6000:]
    # the preempted attempt stops cleanly: W&B's service, which SIGTERM ends too, raises nothing into training,
    # and the requeue's SIGTERM after a SIGUSR1 checkpoint finds no stale Lightning handler to run
    assert "Traceback" not in log.split("(restart 1)")[0], log[-6000:]
    preempted = int(saved.group(1))
    assert 10 <= preempted < steps

    run_dir = next((tmp_path / "runs").iterdir())
    for rank in (0, 1):
        before = [e for e in _events(tmp_path / "probe" / f"rank{rank}-attempt0.jsonl") if e["event"] == "batch"]
        after = _events(tmp_path / "probe" / f"rank{rank}-attempt1.jsonl")
        assert before[-1]["step"] == preempted, "training went on after the checkpoint"
        start = after[0]
        assert start["event"] == "start" and start["step"] == preempted
        assert start["ckpt"] == str(run_dir / "checkpoints" / "last.ckpt")
        # weights, EMA average and optimizer moments exactly as they were when the checkpoint was written
        assert start["state"] == before[-1]["state"]
        assert after[1]["step"] == preempted + 1 and after[-1]["step"] == steps

    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["global_step"] == steps and info["attempts"] == 2
    # the final save went to last.ckpt, which the resumed run did not write first (no last-v1.ckpt)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "global_step"] == steps
    (resume,) = info["resumes"]
    assert resume["global_step"] == preempted and resume["slurm_restart_count"] == "1"
    assert resume["slurm_job_id"] == job
    wandb_id = (run_dir / "wandb_id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith("-" + wandb_id) for p in runs), "W&B run id changed on resume"
    # The run's offline log holds its history (a header alone is 7 bytes). After SIGUSR1 the preempted attempt's
    # too: it is flushed before the job requeues itself. SIGTERM reaches W&B's own service process as well,
    # which exits at once, so that attempt's unflushed W&B history is lost (the CSV log below keeps it).
    sizes = [(p / f"run-{wandb_id}.wandb").stat().st_size for p in runs]
    assert sizes[-1] > 2000 and (preempt[0] != "scancel" or sizes[0] > 2000), sizes
    history = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    logged = sorted({int(r["step"]) for r in history if r.get("step")})
    assert logged[-1] >= steps - 10 and logged[0] < preempted, "the metrics curve does not span both attempts"


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


@pytest.mark.slow
@pytest.mark.slurm
def test_submit_sweep_trains_benchmarks_after_each_run_and_ranks_all_four(slurm_cluster, tmp_path, digits_shards):
    sweep = sweep_file(tmp_path, digits_shards)
    env = _job_env(tmp_path / "cache")
    done = genbench("submit", str(sweep), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((tmp_path / "sweeps" / "t" / "sweep.json").read_text())
    jobs = plan["jobs"]
    assert f"train     job {jobs['TRAIN_JOB']}" in done.stdout and "board/leaderboard.md" in done.stdout
    _wait(jobs["LEADERBOARD_JOB"], timeout=900)

    train = {int(j["ArrayTaskId"]): j for j in _jobs(jobs["TRAIN_JOB"])}
    bench = {int(j["ArrayTaskId"]): j for j in _jobs(jobs["BENCHMARK_JOB"])}
    (board_job,) = _jobs(jobs["LEADERBOARD_JOB"])
    assert sorted(train) == sorted(bench) == [0, 1, 2, 3]
    for i in range(4):
        assert train[i]["JobState"] == bench[i]["JobState"] == "COMPLETED", (train[i], bench[i])
        assert _time(bench[i]["StartTime"]) >= _time(train[i]["EndTime"]), f"benchmark {i} started before its run"
    assert board_job["JobState"] == "COMPLETED"
    assert _time(board_job["StartTime"]) >= max(_time(b["EndTime"]) for b in bench.values())

    # the run directories resolved on the login node are the ones the jobs trained in
    for task in plan["tasks"]:
        info = json.loads((tmp_path / task["run_dir"] / "run.json").read_text())
        assert info["status"] == "finished" and info["seed"] == task["seed"] and info["family"] == task["family"]
        assert info["hardware"]["slurm"]["SLURM_ARRAY_TASK_ID"] == str(task["index"])
    rows = list(csv.DictReader((tmp_path / "board" / "leaderboard.csv").open()))
    models = [r for r in rows if r["rank"] != "ref"]
    assert sorted(r["run"] for r in models) == sorted(Path(t["run_dir"]).name for t in plan["tasks"])
    assert sorted(r["family"] for r in models) == ["gan", "gan", "vae", "vae"]
    assert len(rows) - len(models) == 2  # the floor and ceiling rows


@pytest.mark.slow
@pytest.mark.slurm
def test_a_failed_training_run_cancels_its_benchmark_and_the_leaderboard_ranks_the_rest(slurm_cluster, tmp_path,
                                                                                        digits_shards):
    # lr 1e12 passes validation and diverges in training: genbench stops it on the non-finite loss
    sweep = sweep_file(tmp_path, digits_shards, families=["vae"], seeds=[0],
                        grid={"model.init_args.lr": [0.002, 1.0e12]}, benchmark={
                            "num_samples": 100, "metrics": "fd_auditor,audit", "reference_rows": False})
    done = genbench("submit", str(sweep), cwd=tmp_path, env=_job_env(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((tmp_path / "sweeps" / "t" / "sweep.json").read_text())
    _wait(plan["jobs"]["LEADERBOARD_JOB"], timeout=600)
    train = {int(j["ArrayTaskId"]): j["JobState"] for j in _jobs(plan["jobs"]["TRAIN_JOB"])}
    bench = {int(j["ArrayTaskId"]): j["JobState"] for j in _jobs(plan["jobs"]["BENCHMARK_JOB"])}
    assert train == {0: "COMPLETED", 1: "FAILED"} and bench == {0: "COMPLETED", 1: "CANCELLED"}, (train, bench)
    (board,) = _jobs(plan["jobs"]["LEADERBOARD_JOB"])
    assert board["JobState"] == "COMPLETED"
    rows = list(csv.DictReader((tmp_path / "board" / "leaderboard.csv").open()))
    assert [r["run"] for r in rows] == [Path(plan["tasks"][0]["run_dir"]).name]
    failed = json.loads((tmp_path / plan["tasks"][1]["run_dir"] / "run.json").read_text())
    assert failed["status"] == "failed" and "non-finite" in failed["error"]
