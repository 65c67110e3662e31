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

import itertools
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from jsonargparse import ArgumentParser

from pipeline.fit.provenance import now
from pipeline.fit.train import check_model_fits_data, ensure_shards, resolve
from pipeline.io import atomic_write_json, atomic_write_text

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"


@dataclass
class TrainJobs:
    """SLURM resources of every training task.

    Args:
        nodes: nodes per training run.
        ntasks_per_node: processes per node, one per device (default: the experiment's ``trainer.devices``).
        gpus_per_node: GPUs per node (0 on CPU clusters); must not exceed the devices trained on.
        cpus_per_task: CPUs per process (data-loading workers run on these).
        time: time limit per run (``HH:MM:SS``); a run that hits it checkpoints and requeues itself.
        partition: SLURM partition (default: the cluster's default).
        max_parallel: most training tasks running at once (``--array=...%N``).
        sbatch_args: further sbatch options, e.g. ``["--account=abc", "--qos=high"]``.
    """

    nodes: int = 1
    ntasks_per_node: Optional[int] = None
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    time: str = "24:00:00"
    partition: Optional[str] = None
    max_parallel: Optional[int] = None
    sbatch_args: list[str] = field(default_factory=list)


@dataclass
class BenchmarkJobs:
    """The benchmark stage of the sweep.

    Args:
        nodes: nodes per benchmark.
        ntasks_per_node: processes per node (each samples and extracts its share), one per GPU.
        gpus_per_node: GPUs per node (0 on CPU clusters).
        cpus_per_task: CPUs per benchmark process.
        time: time limit per benchmark.
        partition: SLURM partition (default: the training partition).
        num_samples: generated images per evaluation (default: each experiment's benchmark.num_samples).
        repeats: sample sets per run (mean and std in the record).
        metrics: subset of fid,is,kid,pr,fd_auditor,audit (default: each experiment's benchmark.metrics).
        reference_rows: also score the floor (val split) and ceiling (noise) rows of every data set.
        args: further ``genbench benchmark`` options, e.g. ``["--inception-weights", "/shared/pt_inception.pth"]``.
        sbatch_args: further sbatch options.
    """

    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    time: str = "04:00:00"
    partition: Optional[str] = None
    num_samples: Optional[int] = None
    repeats: int = 1
    metrics: Optional[str] = None
    reference_rows: bool = True
    args: list[str] = field(default_factory=list)
    sbatch_args: list[str] = field(default_factory=list)


@dataclass
class Sweep:
    """A sweep: every family x seed x grid point is one training run, benchmarked and ranked together.

    Args:
        name: sweep name: task lists and logs in ``sweeps/<name>``, results in ``results/<name>``.
        families: model families (vae, gan, ddpm, ar), each trained from ``<experiments_dir>/<family>.yaml``.
        experiments_dir: directory of the families' experiment files, relative to the sweep file.
        experiments: experiment files (relative to the sweep file), in addition to ``families``.
        seeds: ``seed_everything`` values; each is a separate run.
        overrides: dotted overrides for every run, e.g. ``["--trainer.max_steps=100000"]``.
        grid: dotted key -> list of values; every combination is a separate run.
        runs: directory of the run directories.
        results: directory of the result records (default ``results/<name>``).
        leaderboard: leaderboard directory (default ``leaderboard/<name>``).
        train: SLURM resources of the training runs.
        benchmark: the benchmark stage.
    """

    name: str
    families: list[str] = field(default_factory=list)
    experiments_dir: str = "."
    experiments: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: str = "runs"
    results: Optional[str] = None
    leaderboard: Optional[str] = None
    train: TrainJobs = field(default_factory=TrainJobs)
    benchmark: BenchmarkJobs = field(default_factory=BenchmarkJobs)


@dataclass
class Task:
    """One training run of the sweep, as resolved on the login node."""

    index: int
    experiment: str
    family: str
    seed: int
    grid: dict[str, Any]
    fit_args: list[str]  # the arguments slurm/train.sbatch receives (experiment first)
    ntasks_per_node: int
    run_dir: str
    shards: str
    num_samples: int
    benchmark_seed: int


def load_sweep(path: Path) -> Sweep:
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a sweep is a mapping with at least `name` and `families` or `experiments`")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Sweep)
    try:
        cfg = parser.instantiate_classes(parser.parse_object(data))
    except Exception as e:  # jsonargparse names the bad key
        raise ValueError(f"{path}: {e}") from e
    sweep = Sweep(**{k: v for k, v in vars(cfg).items() if k in Sweep.__dataclass_fields__})
    if not sweep.families and not sweep.experiments:
        raise ValueError(f"{path}: list the `families` (and `experiments_dir`) or the `experiments` to train")
    if not sweep.seeds:
        raise ValueError(f"{path}: `seeds` is empty; give at least one seed")
    return sweep


def _experiments(sweep: Sweep, base: Path) -> list[tuple[str, str]]:
    """(family, experiment file) pairs; an unknown family or a missing file stops the sweep."""
    from pipeline.models import FAMILIES

    pairs = []
    for family in sweep.families:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r} in the sweep; known families: {', '.join(FAMILIES.names())}")
        pairs.append((family, str(base / sweep.experiments_dir / f"{family}.yaml")))
    pairs += [("", str(base / e)) for e in sweep.experiments]
    for _, path in pairs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"experiment file {os.path.normpath(path)} does not exist")
    return [(f, os.path.normpath(p)) for f, p in pairs]


def _grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise ValueError(f"grid.{key} must be a non-empty list of values")
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def _override(key: str, value: Any) -> str:
    return f"--{key}={json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else value}"


def plan(sweep: Sweep, base: Path) -> list[Task]:
    """Resolve every run of the sweep; any problem stops here, before anything is submitted."""
    from pipeline.models import FAMILIES

    logging.getLogger("lightning_fabric.utilities.seed").setLevel(logging.WARNING)  # one "Seed set" per resolve
    results = sweep.results or f"results/{sweep.name}"
    tasks: list[Task] = []
    for (family, experiment), seed, point in itertools.product(_experiments(sweep, base), sweep.seeds,
                                                                _grid_points(sweep.grid)):
        overrides = [*sweep.overrides, f"--seed_everything={seed}", *(_override(k, v) for k, v in point.items()),
                     f"--run.root={sweep.runs}", f"--benchmark.results={results}"]
        devices = resolve(["--config", experiment, *overrides]).config.trainer.devices
        if isinstance(devices, str) and devices.isdigit():
            devices = int(devices)
        per_node = sweep.train.ntasks_per_node or (devices if isinstance(devices, int) else 1)
        if sweep.train.gpus_per_node > per_node:
            raise ValueError(f"train.gpus_per_node={sweep.train.gpus_per_node} but {experiment} trains on {per_node} "
                             f"device(s) per node (trainer.devices={devices}, one task per GPU): set "
                             f"train.ntasks_per_node or trainer.devices to {sweep.train.gpus_per_node}, or ask for "
                             "fewer GPUs")
        # Exactly what slurm/train.sbatch appends: the config hash that names the run directory covers it.
        geometry = [f"--trainer.num_nodes={sweep.train.nodes}", f"--trainer.devices={per_node}"]
        resolved = resolve(["--config", experiment, *overrides, *geometry])
        config = resolved.config
        if family and config.model.class_path != _class_path(FAMILIES[family]):
            raise ValueError(f"{experiment} trains {config.model.class_path}, not the {family!r} family")
        ensure_shards(config.data, config.prepare)  # on the login node, once, not by concurrent array tasks
        check_model_fits_data(config)
        tasks.append(Task(len(tasks), experiment, family or _family_of(config.model.class_path), seed, point,
                          [experiment, *overrides], per_node, str(resolved.run_dir), str(config.data.init_args.shards),
                          sweep.benchmark.num_samples or config.benchmark.num_samples, config.benchmark.seed))
    runs = [t.run_dir for t in tasks]
    duplicates = sorted({r for r in runs if runs.count(r) > 1})
    if duplicates:
        raise ValueError(f"several runs of the sweep resolve to the same run directory ({', '.join(duplicates)}): "
                         "they train the same config; remove the repeated family, seed or grid value")
    if len({t.ntasks_per_node for t in tasks}) > 1:
        raise ValueError(f"the experiments train on different devices per node "
                         f"({sorted({t.ntasks_per_node for t in tasks})}); one training array has one geometry: "
                         "set train.ntasks_per_node")
    return tasks


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _family_of(class_path: str) -> str:
    from pipeline.models import FAMILIES

    for name in FAMILIES.names():
        if class_path == _class_path(FAMILIES[name]):
            return name
    return class_path.rsplit(".", 1)[-1]


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


def _resources(nodes: int, ntasks_per_node: int, gpus_per_node: int, cpus_per_task: Optional[int], time: str,
               partition: Optional[str]) -> list[str]:
    # Tasks per node, never a bare --ntasks: Lightning's SLURM environment refuses the latter.
    opts = [f"--nodes={nodes}", f"--ntasks-per-node={ntasks_per_node}"]
    opts += [f"--gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    opts += [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    opts += [f"--time={time}"]
    return opts + ([f"--partition={partition}"] if partition else [])


def render(sweep: Sweep, tasks: list[Task], sweeps_root: Path = Path("sweeps")) -> Submission:
    from pipeline.launch.runner import has_reference_rows

    directory = sweeps_root / sweep.name
    results = sweep.results or f"results/{sweep.name}"
    board = sweep.leaderboard or f"leaderboard/{sweep.name}"
    logs = directory / "logs"
    exe = Path(sys.executable).parent / "genbench"
    env = f"--export=ALL,GENBENCH={exe if exe.exists() else 'genbench'}"
    cwd = f"--chdir={Path.cwd()}"
    last = len(tasks) - 1
    throttle = f"%{sweep.train.max_parallel}" if sweep.train.max_parallel else ""
    t = sweep.train
    train_cmd = ["sbatch", "--parsable", f"--array=0-{last}{throttle}", f"--job-name=genbench-train-{sweep.name}",
                 *_resources(t.nodes, tasks[0].ntasks_per_node, t.gpus_per_node, t.cpus_per_task, t.time, t.partition),
                 f"--output={logs}/train-%A_%a.out", cwd,
                 f"{env},GENBENCH_TASKS={(directory / 'train-tasks.txt').resolve()}", *t.sbatch_args,
                 str(SLURM_DIR / "train.sbatch")]

    b = sweep.benchmark
    bench_args = [*(["--num-samples", str(b.num_samples)] if b.num_samples else []),
                  *(["--repeats", str(b.repeats)] if b.repeats != 1 else []),
                  *(["--metrics", b.metrics] if b.metrics else []), *b.args]
    bench_lines = [shlex.join(["--run", task.run_dir, "--results", results, *bench_args]) for task in tasks]
    bench_resources = _resources(b.nodes, b.ntasks_per_node, b.gpus_per_node, b.cpus_per_task, b.time,
                                 b.partition or t.partition)
    commands = [("TRAIN_JOB", train_cmd),
                ("BENCHMARK_JOB", ["sbatch", "--parsable", f"--array=0-{last}", "--dependency=aftercorr:$TRAIN_JOB",
                                   f"--job-name=genbench-benchmark-{sweep.name}", *bench_resources,
                                   "--kill-on-invalid-dep=yes", cwd,
                                   f"--output={logs}/benchmark-%A_%a.out",
                                   f"{env},GENBENCH_TASKS={(directory / 'benchmark-tasks.txt').resolve()}",
                                   *b.sbatch_args, str(SLURM_DIR / "benchmark.sbatch")])]
    after = ["$BENCHMARK_JOB"]
    if b.reference_rows:
        seen = set()
        for task in tasks:
            if task.shards in seen or has_reference_rows(Path(results), task.shards):
                continue
            seen.add(task.shards)
            var = f"REFERENCE_JOB_{len(seen)}"
            commands.append((var, ["sbatch", "--parsable", f"--job-name=genbench-reference-{sweep.name}",
                                   *bench_resources, cwd, f"--output={logs}/reference-%j.out", env,
                                   *b.sbatch_args, str(SLURM_DIR / "benchmark.sbatch"), "--reference-rows",
                                   "--reference", task.shards, "--num-samples", str(task.num_samples),
                                   "--seed", str(task.benchmark_seed), "--results", results,
                                   *(["--metrics", b.metrics] if b.metrics else []), *b.args]))
            after.append(f"${var}")
    commands.append(("LEADERBOARD_JOB", ["sbatch", "--parsable", f"--dependency=afterany:{':'.join(after)}",
                                         f"--job-name=genbench-leaderboard-{sweep.name}", "--kill-on-invalid-dep=yes",
                                         cwd, f"--output={logs}/leaderboard-%j.out", env,
                                         *([f"--partition={t.partition}"] if t.partition else []),
                                         str(SLURM_DIR / "leaderboard.sbatch"), "--results", results, "--out", board]))
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
