"""genbench's thread policy (pipeline/threads.py, issue 34): torch's intra-op threads from the cores a process may
use (its real affinity mask, SLURM's allocation, the cgroup quota) less its loader workers and local ranks, passive
OpenMP waits, a user's own settings left alone, and the choice in run.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, genbench
from pipeline import threads

CORES = len(os.sched_getaffinity(0))


def _in_child(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (thread settings are per process), its environment less any thread
    setting of this one, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", threads.MARK)}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "PYTHONPATH": str(REPO), **env}, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_an_affinity_mask_of_one_core_gives_one_thread_and_passive_waits():
    shown = _in_child("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
                      "from pipeline import threads; import torch\n"
                      "p = threads.apply(threads.plan())\n"
                      "print(p.cores, p.limited_by, p.intra_op, torch.get_num_threads(),\n"
                      "      os.environ['OMP_WAIT_POLICY'])")
    assert shown == "1 affinity 1 1 PASSIVE"


def test_slurm_allocation_cgroup_quota_workers_and_ranks(tmp_path):
    assert threads.plan(env={}, cgroup_root=tmp_path).cores == CORES
    slurm = threads.plan(env={"SLURM_CPUS_PER_TASK": "1"}, cgroup_root=tmp_path)
    assert (slurm.cores, slurm.limited_by if CORES > 1 else "slurm") == (1, "slurm")
    # a container of 1.5 CPUs (cgroup v2) may run 2 threads at most; cgroup v1 the same from its two files
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpus(tmp_path / "v2") == 1.5
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    one = threads.plan(env={}, cgroup_root=tmp_path / "v1")
    assert one.cores == 1 and one.intra_op == 1 and (one.limited_by == "cgroup" or CORES == 1)
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpus(tmp_path / "v2") is None
    # the cores less the loader workers of each rank, shared among the local ranks; never below one
    many = {"SLURM_CPUS_PER_TASK": "16"}
    cores = min(16, CORES)
    assert threads.plan(workers=2, ranks=1, env=many, cgroup_root=tmp_path).intra_op == max(1, cores - 2)
    assert threads.plan(workers=1, ranks=2, env=many, cgroup_root=tmp_path).intra_op == max(1, cores // 2 - 1)
    assert threads.plan(workers=8, ranks=4, env=many, cgroup_root=tmp_path).intra_op == 1
    assert threads.local_ranks({"SLURM_NTASKS_PER_NODE": "4(x2)"}) == 4 and threads.local_ranks({}) == 1


def test_a_users_own_settings_are_left_alone():
    shown = _in_child("from pipeline import threads; import torch, os\n"
                      "p = threads.apply(threads.plan(workers=1))\n"
                      "print(p.chosen_by, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])",
                      OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    assert shown == "user 1 ACTIVE"
    # genbench's own earlier choice (inherited by a child process) is not taken for the user's
    inherited = threads.plan(workers=0, env={"OMP_NUM_THREADS": "7", threads.MARK: "7"})
    assert inherited.chosen_by == "genbench" and inherited.intra_op == CORES
    assert threads.plan(env={threads.POLICY: "torch"}).chosen_by == "torch"


def test_the_choice_is_in_run_json(tmp_path, digits_shards):
    clean = {k: "" for k in ("OMP_NUM_THREADS", threads.MARK)}
    common = ["fit", "--config", str(REPO / "experiments" / "digits" / "vae.yaml"), "--trainer.max_steps=2",
              f"--data.init_args.shards={digits_shards}", "--tracking.wandb=false", "--data.init_args.num_workers=1",
              "--trainer.enable_progress_bar=false", "--model.init_args.sample_every_n_steps=-1"]
    ours = genbench(*common, f"--run.root={tmp_path / 'a'}", env={**clean, "OMP_WAIT_POLICY": ""})
    assert ours.returncode == 0, ours.stderr[-2000:]
    users = genbench(*common, f"--run.root={tmp_path / 'b'}", env={"OMP_NUM_THREADS": "1", threads.MARK: ""})
    assert users.returncode == 0, users.stderr[-2000:]
    (a,), (b,) = ((tmp_path / d).glob("*/run.json") for d in ("a", "b"))
    chosen, kept = (json.loads(p.read_text())["threads"] for p in (a, b))
    assert chosen["chosen_by"] == "genbench" and chosen["workers"] == 1
    assert chosen["intra_op"] == max(1, CORES - 1) and chosen["wait_policy"] == "PASSIVE"
    assert kept["chosen_by"] == "user" and kept["intra_op"] == 1
