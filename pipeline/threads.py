"""How many intra-op threads torch uses, and how its OpenMP threads wait: decided here, once per process.

Torch's defaults (one thread per physical core, OpenMP threads that spin while they wait) assume a machine of
its own. Beside other busy processes (a shared workstation, a cluster node without CPU binding, DDP ranks and
loader workers on the same cores) spinning threads wait for cores other processes hold, and every CPU step slows
by up to ten times (issue 34; ``benchmarks/contention.py`` measures it). genbench therefore

- counts the cores this process may use: its CPU affinity mask, ``SLURM_CPUS_PER_TASK``, and the cgroup CPU
  quota (a container's ``--cpus``), whichever is least;
- gives torch that many intra-op threads, less one per loader worker of each local rank, divided among the local
  ranks (at least one);
- makes OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, set before torch is imported: the OpenMP
  runtime reads it once, when it loads);

unless the user chose: an ``OMP_NUM_THREADS`` or ``OMP_WAIT_POLICY`` of their own is left as it is
(``GENBENCH_THREAD_POLICY=torch`` leaves torch's defaults altogether). The choice is
exported (``OMP_NUM_THREADS``, and ``GENBENCH_THREADS`` to mark it as genbench's), so DDP ranks, which Lightning
starts with ``OMP_NUM_THREADS`` unless it is set (``lightning_fabric.utilities.distributed
._set_num_threads_if_needed``: cores // ranks, workers not counted), and subprocesses inherit this decision.
run.json and every result record say what was used (``describe``).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

MARK = "GENBENCH_THREADS"  # set beside OMP_NUM_THREADS when genbench chose it (so not taken for the user's)
POLICY = "GENBENCH_THREAD_POLICY"  # "torch": leave torch's defaults alone (benchmarks/contention.py's baseline)
PASSIVE = "PASSIVE"
CGROUP = Path("/sys/fs/cgroup")

# the user's own settings, as the process started (before set_wait_policy writes any)
_USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY") or None


@dataclass(frozen=True)
class ThreadPlan:
    cores: int  # cores this process may use
    limited_by: str  # what bounds them: affinity, slurm or cgroup
    intra_op: int  # torch's intra-op threads
    wait_policy: str  # OMP_WAIT_POLICY
    chosen_by: str  # genbench, user (their OMP_NUM_THREADS), or torch (GENBENCH_THREAD_POLICY=torch)
    workers: int  # loader workers per rank it allowed for
    local_ranks: int


def cgroup_cpus(root: Path = CGROUP) -> Optional[float]:
    """The cgroup's CPU quota in cores (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``);
    None when there is no limit."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        per = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if us <= 0 else us / per
    except (OSError, ValueError):
        return None


def usable_cores(env: Mapping[str, str] = os.environ, cgroup_root: Path = CGROUP) -> tuple[int, str]:
    """(cores this process may use, what limits them)."""
    cores, limited_by = len(os.sched_getaffinity(0)), "affinity"
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < cores:
        cores, limited_by = int(slurm), "slurm"
    quota = cgroup_cpus(cgroup_root)
    if quota is not None and math.ceil(quota) < cores:
        cores, limited_by = max(1, math.ceil(quota)), "cgroup"
    return cores, limited_by


def local_ranks(env: Mapping[str, str] = os.environ) -> int:
    """Ranks of this job on this node (torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node), 1 alone."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(var, "").split("(")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def plan(workers: int = 0, ranks: Optional[int] = None, env: Mapping[str, str] = os.environ,
         cgroup_root: Path = CGROUP) -> ThreadPlan:
    """The threads for a process with ``workers`` loader workers, one of ``ranks`` local ranks."""
    ranks = ranks or local_ranks(env)
    cores, limited_by = usable_cores(env, cgroup_root)
    if env.get(POLICY) == "torch":
        return ThreadPlan(cores, limited_by, 0, env.get("OMP_WAIT_POLICY", "torch default"), "torch", workers, ranks)
    user = env.get("OMP_NUM_THREADS", "")
    wait = env.get("OMP_WAIT_POLICY") or PASSIVE
    if user and env.get(MARK) != user and user.isdigit():
        return ThreadPlan(cores, limited_by, int(user), wait, "user", workers, ranks)
    intra = max(1, cores // ranks - max(0, workers))
    return ThreadPlan(cores, limited_by, intra, wait, "genbench", workers, ranks)


def set_wait_policy() -> None:
    """Passive OpenMP waits unless the user chose a policy; to be called before torch is imported (the runtime
    reads it once, when it loads)."""
    if _USER_WAIT_POLICY is None and os.environ.get(POLICY) != "torch":
        os.environ["OMP_WAIT_POLICY"] = PASSIVE


def apply(chosen: ThreadPlan) -> ThreadPlan:
    """Give torch the plan's intra-op threads and export them for the processes this one starts."""
    import torch

    if chosen.chosen_by == "genbench":
        torch.set_num_threads(chosen.intra_op)
        os.environ["OMP_NUM_THREADS"] = os.environ[MARK] = str(chosen.intra_op)
    global _applied
    _applied = chosen
    return chosen


_applied: Optional[ThreadPlan] = None


def describe() -> dict[str, Any]:
    """What this process uses, for run.json and result records."""
    import torch

    chosen = _applied or plan()
    return {**asdict(chosen), "intra_op": torch.get_num_threads(),
            "wait_policy": os.environ.get("OMP_WAIT_POLICY", "torch default (active)")}
