"""``genbench submit SWEEP.yaml``: a sweep as SLURM jobs — train array -> benchmark array -> leaderboard.

A sweep is families x seeds x a grid of config overrides. Every combination is resolved here, on the
login node, exactly as the training job will resolve it (same overrides, same ``--trainer.num_nodes``
and ``--trainer.devices`` that ``slurm/train.sbatch`` adds), so its run directory is known before
anything is submitted and a bad experiment, an unknown family, an allocation that does not fit the
config or an unwritable results directory stops the sweep before the first ``sbatch``.

Jobs (``slurm/*.sbatch``, one task list per array in ``sweeps/<name>/``):

1. training array, task i = combination i;
2. benchmark array with ``--dependency=aftercorr:TRAIN``: SLURM's per-task ``afterok`` — benchmark task i
   starts when training task i has succeeded, whatever the others do (a requeued, preempted training
   task is not done yet);
3. the leaderboard's floor/ceiling rows, when the results directory lacks them for the data;
4. one leaderboard job ``afterany`` of 2 and 3, so a failed run leaves a leaderboard of the others.
   Jobs whose dependency can never be met (their training failed) are cancelled
   (``--kill-on-invalid-dep=yes``) instead of blocking the leaderboard forever.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from pipeline.fit.provenance import now
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.launch.sbatch import Submission, render, script
from pipeline.launch.sweep import load_sweep, plan

__all__ = ["check_outputs", "prepare_submission", "script", "submit"]


def _writable(path: Path) -> bool:
    """Whether ``path`` is, or could be created as, a writable directory; creates nothing (a dry run)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def check_outputs(sub: Submission) -> None:
    """Every directory the jobs write to must be writable now, not after hours in the queue."""
    for what, path in (("results", sub.results), ("leaderboard", sub.leaderboard), ("runs", sub.sweep.runs),
                       ("sweep", str(sub.directory))):
        if not _writable(Path(path)):
            fix = "run genbench submit from a writable directory" if what == "sweep" else f"set `{what}` in the sweep"
            raise ValueError(f"the {what} directory {path} is not writable; {fix}")


def submit(sub: Submission) -> dict[str, str]:
    """Write the task lists and submit the jobs in order; on a failed sbatch the jobs already submitted are
    cancelled, so a sweep is submitted whole or not at all. Returns variable -> job id."""
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch not found: run genbench submit on a SLURM login node (genbench submit --dry-run "
                           "prints the commands)")
    (sub.directory / "logs").mkdir(parents=True, exist_ok=True)
    for name, content in sub.task_files.items():
        atomic_write_text(sub.directory / name, "\n".join(content) + "\n")
    ids: dict[str, str] = {}
    for var, cmd in sub.commands:
        cmd = [_substitute(a, ids) for a in cmd]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            if ids:
                subprocess.run(["scancel", *ids.values()], capture_output=True)
            raise RuntimeError(f"sbatch failed ({done.stderr.strip()}): {shlex.join(cmd)}"
                               + (f"; cancelled the jobs already submitted ({', '.join(ids.values())})" if ids else ""))
        ids[var] = done.stdout.strip().split(";")[0]
    atomic_write_json(sub.directory / "sweep.json", {
        "name": sub.sweep.name, "submitted": now(), "jobs": ids, "results": sub.results, "leaderboard": sub.leaderboard,
        "tasks": [{"index": t.index, "family": t.family, "experiment": t.experiment, "seed": t.seed, "grid": t.grid,
                   "run_dir": t.run_dir} for t in sub.tasks],
        "commands": [[_substitute(a, ids) for a in cmd] for _, cmd in sub.commands]})
    return ids


def _substitute(arg: str, ids: dict[str, str]) -> str:
    for var, job in sorted(ids.items(), key=lambda kv: -len(kv[0])):  # REFERENCE_JOB_10 before REFERENCE_JOB_1
        arg = arg.replace(f"${var}", job)
    return arg


def prepare_submission(path: str, sweeps_root: str = "sweeps") -> Submission:
    sweep_file = Path(path)
    sweep = load_sweep(sweep_file)
    tasks = plan(sweep, sweep_file.parent)
    sub = render(sweep, tasks, Path(sweeps_root))
    check_outputs(sub)
    return sub
