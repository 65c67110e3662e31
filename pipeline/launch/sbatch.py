"""A planned sweep rendered as sbatch commands (job ids as ``$VAR``), and as the shell script they amount to."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from pipeline.launch.runner import has_reference_rows
from pipeline.launch.sweep import Sweep, Task

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"  # the repository's slurm/ templates


@dataclass
class Submission:
    """The rendered sweep: its directory, task lists and sbatch commands (``$VAR`` stands for a job id)."""

    sweep: Sweep
    directory: Path
    tasks: list[Task]
    task_files: dict[str, list[str]]  # file name -> lines (one shell-quoted argument list per array task)
    commands: list[tuple[str, list[str]]]  # (shell variable of the job id, sbatch command)
    results: str
    leaderboard: str


def sbatch(script: str, *args: str, job_name: str, output: Path, resources: list[str], env: str,
           array: Optional[str] = None, dependency: Optional[str] = None, options: Sequence[str] = ()) -> list[str]:
    """One ``sbatch`` command line: ``--parsable`` (so the job id can be read back), the job's name, array,
    dependency, resources, working directory, log file, environment, further options, then the script and
    its arguments. A job whose dependency can never be met is cancelled, not left pending forever."""
    cmd = ["sbatch", "--parsable", f"--job-name={job_name}"]
    cmd += [f"--array={array}"] if array else []
    cmd += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"] if dependency else []
    return [*cmd, *resources, f"--chdir={Path.cwd()}", f"--output={output}", env, *options, str(SLURM_DIR / script),
            *args]


def _resources(nodes: int, ntasks_per_node: int, gpus_per_node: int, cpus_per_task: Optional[int], time: str,
               partition: Optional[str]) -> list[str]:
    # Tasks per node, never a bare --ntasks: Lightning's SLURM environment refuses the latter.
    opts = [f"--nodes={nodes}", f"--ntasks-per-node={ntasks_per_node}"]
    opts += [f"--gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    opts += [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    opts += [f"--time={time}"]
    return opts + ([f"--partition={partition}"] if partition else [])


def render(sweep: Sweep, tasks: list[Task], sweeps_root: Path = Path("sweeps")) -> Submission:
    directory = sweeps_root / sweep.name
    results = sweep.results or f"results/{sweep.name}"
    board = sweep.leaderboard or f"leaderboard/{sweep.name}"
    logs = directory / "logs"
    exe = Path(sys.executable).parent / "genbench"
    env = f"--export=ALL,GENBENCH={exe if exe.exists() else 'genbench'}"
    last = len(tasks) - 1
    t, b = sweep.train, sweep.benchmark
    throttle = f"%{t.max_parallel}" if t.max_parallel else ""
    train_cmd = sbatch("train.sbatch", job_name=f"genbench-train-{sweep.name}", array=f"0-{last}{throttle}",
                       resources=_resources(t.nodes, tasks[0].ntasks_per_node, t.gpus_per_node, t.cpus_per_task,
                                            t.time, t.partition),
                       output=logs / "train-%A_%a.out",
                       env=f"{env},GENBENCH_TASKS={(directory / 'train-tasks.txt').resolve()}", options=t.sbatch_args)
    metrics = ["--metrics", b.metrics] if b.metrics else []
    bench_args = [*(["--num-samples", str(b.num_samples)] if b.num_samples else []),
                  *(["--repeats", str(b.repeats)] if b.repeats != 1 else []), *metrics, *b.args]
    # each run's evaluation checkpoints are scored after its training task (aftercorr), like last.ckpt
    bench_lines = [shlex.join(["--run", task.run_dir, "--results", results, "--checkpoints", task.checkpoints,
                               *bench_args]) for task in tasks]
    bench_resources = _resources(b.nodes, b.ntasks_per_node, b.gpus_per_node, b.cpus_per_task, b.time,
                                 b.partition or t.partition)
    commands = [("TRAIN_JOB", train_cmd),
                ("BENCHMARK_JOB", sbatch("benchmark.sbatch", job_name=f"genbench-benchmark-{sweep.name}",
                                         array=f"0-{last}", dependency="aftercorr:$TRAIN_JOB",
                                         resources=bench_resources, output=logs / "benchmark-%A_%a.out",
                                         env=f"{env},GENBENCH_TASKS={(directory / 'benchmark-tasks.txt').resolve()}",
                                         options=b.sbatch_args))]
    after = ["$BENCHMARK_JOB"]
    if b.reference_rows:
        seen = set()
        for task in tasks:
            if task.shards in seen or has_reference_rows(Path(results), task.shards):
                continue
            seen.add(task.shards)
            var = f"REFERENCE_JOB_{len(seen)}"
            commands.append((var, sbatch(
                "benchmark.sbatch", "--reference-rows", "--reference", task.shards, "--num-samples",
                str(task.num_samples), "--seed", str(task.benchmark_seed), "--results", results, *metrics, *b.args,
                job_name=f"genbench-reference-{sweep.name}", resources=bench_resources,
                output=logs / "reference-%j.out", env=env, options=b.sbatch_args)))
            after.append(f"${var}")
    commands.append(("LEADERBOARD_JOB", sbatch(
        "leaderboard.sbatch", "--results", results, "--out", board, job_name=f"genbench-leaderboard-{sweep.name}",
        dependency=f"afterany:{':'.join(after)}", resources=[f"--partition={t.partition}"] if t.partition else [],
        output=logs / "leaderboard-%j.out", env=env)))
    task_files = {"train-tasks.txt": [shlex.join(task.fit_args) for task in tasks],
                  "benchmark-tasks.txt": bench_lines}
    return Submission(sweep, directory, tasks, task_files, commands, results, board)


def script(sub: Submission) -> str:
    """The submission as the shell script it amounts to (what ``--dry-run`` prints)."""
    lines = ["#!/bin/bash", f"# genbench submit: sweep {sub.sweep.name!r}, {len(sub.tasks)} run(s)",
             "set -euo pipefail"]
    lines.append(f"mkdir -p {shlex.quote(str(sub.directory / 'logs'))}")
    for name, content in sub.task_files.items():
        lines += [f"cat > {shlex.quote(str(sub.directory / name))} <<'EOF'", *content, "EOF"]
    for var, cmd in sub.commands:
        # $VAR job ids stay unquoted so the shell substitutes them
        rendered = " ".join(a if "$" in a else shlex.quote(a) for a in cmd)
        lines.append(f"{var}=$({rendered})")
    lines.append('echo "jobs: train $TRAIN_JOB, benchmark $BENCHMARK_JOB, leaderboard $LEADERBOARD_JOB"')
    return "\n".join(lines) + "\n"
