"""A sweep file and its plan: families x seeds x a grid of overrides, each combination resolved on the login
node exactly as its training job will resolve it (see ``pipeline.launch.submit``)."""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from jsonargparse import ArgumentParser

from pipeline.fit.train import ensure_shards, resolve
from pipeline.fit.validate import check_model_fits_data
from pipeline.models import FAMILIES


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
    checkpoints: str = "last"  # "all" when run.evaluate_every keeps checkpoints along the budget


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
                          sweep.benchmark.num_samples or config.benchmark.num_samples, config.benchmark.seed,
                          "all" if config.run.evaluate_every else "last"))
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
    for name in FAMILIES.names():
        if class_path == _class_path(FAMILIES[name]):
            return name
    return class_path.rsplit(".", 1)[-1]
