"""``genbench run``: prepare -> fit -> benchmark -> leaderboard for one or many experiments.

Every experiment is parsed and validated first, so a bad key in the third experiment stops the
command before the first one trains. Training runs in a child ``genbench fit`` process (so a
multi-device config can start its DDP workers exactly as ``genbench fit`` does); a run whose run.json
says it finished with the same config is not trained again, and a crashed one resumes from last.ckpt.
A run that already has a record of the same checkpoint, sample count, seed and extractors is not
benchmarked again either (``--force`` does), so rerunning a finished suite adds no duplicate rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import yaml
from jsonargparse import ArgumentParser

from pipeline import leaderboard
from pipeline.benchmark import ScoreOptions, benchmark_reference_rows, benchmark_run
from pipeline.benchmark.images import ShardImages
from pipeline.benchmark.stage import FIT_KEYS, checkpoint_progress, read_run_info, run_checkpoints
from pipeline.fit.budget import parse_budget
from pipeline.fit.checkpoints import LAST
from pipeline.fit.train import DryRun, config_hash, ensure_shards, resolve
from pipeline.fit.validate import check_model_fits_data, check_numbers


@dataclass
class Suite:
    """A suite of experiments run and ranked together.

    Args:
        experiments: experiment YAML files, relative to the suite file.
        overrides: dotted overrides applied to every experiment, e.g. ``--trainer.max_steps=100``.
        first_stages: experiment -> the experiment (earlier in ``experiments``) whose run is its first stage: its
            run directory is passed as ``--model.init_args.first_stage``, so a two-stage suite needs no run ids.
        experiment_overrides: experiment -> dotted overrides of that experiment alone (after ``overrides``).
        runs: directory of the run directories.
        results: directory of the result records.
        leaderboard: directory the leaderboard is written to.
    """

    experiments: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    first_stages: dict[str, str] = field(default_factory=dict)
    experiment_overrides: dict[str, list[str]] = field(default_factory=dict)
    runs: str = "runs"
    results: str = "results"
    leaderboard: str = "leaderboard"


def load_suite(path: Path) -> Suite:
    """A file with a top-level ``experiments`` key is a suite; any other file is a single experiment."""
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    if data is None and not path.exists():
        raise FileNotFoundError(f"experiment file {path} does not exist")
    if not isinstance(data, dict) or "experiments" not in data:
        return Suite(experiments=[str(path)])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Suite)
    cfg = parser.parse_path(str(path))
    experiments = [str((path.parent / e)) for e in cfg.experiments]
    if not experiments:
        raise ValueError(f"{path}: `experiments` is empty; list the experiment files to run")
    first_stages = {}
    for second, first in (cfg.first_stages or {}).items():
        if second not in cfg.experiments or first not in cfg.experiments:
            raise ValueError(f"{path}: first_stages names {second!r}: {first!r}, but both must be listed in "
                             "`experiments`")
        if cfg.experiments.index(first) > cfg.experiments.index(second):
            raise ValueError(f"{path}: the first stage {first!r} must come before {second!r} in `experiments` "
                             "(it is trained first)")
        first_stages[str(path.parent / second)] = str(path.parent / first)
    unknown = sorted(set(cfg.experiment_overrides or {}) - set(cfg.experiments))
    if unknown:
        raise ValueError(f"{path}: experiment_overrides names {unknown}, which `experiments` does not list")
    return Suite(experiments=experiments, overrides=list(cfg.overrides), runs=cfg.runs, results=cfg.results,
                 leaderboard=cfg.leaderboard, first_stages=first_stages,
                 experiment_overrides={str(path.parent / k): list(v) for k, v in
                                       (cfg.experiment_overrides or {}).items()})


class RunError(RuntimeError):
    """An experiment of the suite failed; what finished is kept."""


class Job(NamedTuple):
    experiment: str
    args: list[str]  # the `genbench fit` arguments
    run_dir: Path
    config_hash: str
    results: str
    config: Any  # the resolved jsonargparse Namespace


def _finished(run_dir: Path, chash: str, max_steps: Optional[int], budget: Optional[dict] = None) -> bool:
    """Trained with this config to this schedule (a longer ``max_steps`` or a larger ``run.budget`` continues
    the run)."""
    path = run_dir / "run.json"
    if not path.exists():
        return False
    info = json.loads(path.read_text())
    long_enough = not max_steps or max_steps < 0 or (info.get("global_step") or 0) >= max_steps
    parsed = parse_budget(budget, "run.budget")
    if parsed is not None:
        unit, amount = parsed
        cost = info.get("cost") or {}
        # a two-stage run's FLOPs (cost) include its first stage's; run.json's device-hours are its own
        first_hours = (info.get("first_stage") or {}).get("device_hours") or 0.0
        spent = {"images": info.get("images_seen"), "flops": cost.get("training_flops"),
                 "device_hours": None if info.get("device_hours") is None else info["device_hours"] + first_hours}[unit]
        long_enough = long_enough and spent is not None and spent >= amount
    return info.get("status") == "finished" and info.get("config_hash") == chash and long_enough


def inception_available(explicit: Optional[str]) -> bool:
    """Whether the Inception metrics can be computed here now (explicit weights, or the torch hub cache)."""
    from pipeline.metrics.features import WeightsUnavailable, resolve_inception_weights

    try:
        resolve_inception_weights(explicit, download=False)
        return True
    except WeightsUnavailable:
        return False


def existing_record(job: Job, records: list[dict], ckpt: Optional[Path] = None) -> Optional[dict]:
    """Among ``records``, one of this run that scored the same checkpoint (default last.ckpt) with the same sample
    count, seed and extractors: benchmarking it again would only add a duplicate row."""
    ckpt = ckpt or job.run_dir / "checkpoints" / LAST
    if not records or not ckpt.exists():
        return None
    step = checkpoint_progress(ckpt)["global_step"]
    chash = read_run_info(job.run_dir).get("config_hash")
    bench = job.config.benchmark
    with_inception = inception_available(bench.inception_weights)
    for record in records:
        protocol = record.get("protocol", {})
        if (record.get("run_id") == job.run_dir.name and record.get("provenance", {}).get("config_hash") == chash
                and record.get("cost", {}).get("global_step") == step
                and record.get("checkpoint", LAST) == ckpt.name
                # a first stage's row always reconstructs its whole val split, whatever benchmark.num_samples says
                and (record.get("reference_row") == "reconstruction" or
                     (protocol.get("num_samples") == bench.num_samples and protocol.get("seed") == bench.seed))
                and protocol.get("repeats", 1) == 1
                and ("inception" in protocol.get("extractors", {})) == with_inception):
            return record
    return None


def has_reference_rows(results: Path, shards: str, fit: Optional[dict] = None) -> bool:
    """Whether ``results`` already holds the floor and ceiling rows of this data set (at this size)."""
    if not results.exists():
        return False
    data_hash = ShardImages(shards, "train", fit).content_hash
    rows = {r.get("reference_row") for r in leaderboard.load_records(results)
            if r.get("reference_row") and r["protocol"]["reference"]["hash"] == data_hash}
    return {"floor", "ceiling"} <= rows


def run(paths: list[str], overrides: list[str], runs: Optional[str] = None, results: Optional[str] = None,
        leaderboard_dir: Optional[str] = None, progress: bool = True, force: bool = False) -> Optional[Path]:
    jobs = []
    suite_results: Optional[str] = results
    suite_board: Optional[str] = leaderboard_dir
    for p in paths:
        suite = load_suite(Path(p))
        root = runs or suite.runs
        res = results or suite.results
        suite_results, suite_board = res, leaderboard_dir or suite.leaderboard
        run_dirs: dict[str, Path] = {}
        for exp in suite.experiments:
            args = ["--config", exp, *suite.overrides, *suite.experiment_overrides.get(exp, []), *overrides,
                    f"--run.root={root}", f"--benchmark.results={res}"]
            if exp in suite.first_stages:  # the run directory the first stage's experiment trains into
                args.append(f"--model.init_args.first_stage={run_dirs[suite.first_stages[exp]]}")
            resolved: DryRun = resolve(args)  # validates now: nothing runs if any experiment is malformed
            run_dirs[exp] = resolved.run_dir
            jobs.append(Job(exp, args, resolved.run_dir, config_hash(resolved.config), res, resolved.config))
    for job in jobs:  # shards and weight files first, then every model against its data, still before any training
        check_numbers(job.config)
        ensure_shards(job.config.data, job.config.prepare)
        check_model_fits_data(job.config)
    print(f"genbench run: {len(jobs)} experiment(s) validated", flush=True)

    for i, job in enumerate(jobs):
        if any(a.startswith("--model.init_args.first_stage=") for a in job.args):
            # a second stage's run is named by its first stage's checkpoint, which exists (or changed) only now
            resolved = resolve(job.args)
            job = jobs[i] = job._replace(run_dir=resolved.run_dir, config_hash=config_hash(resolved.config),
                                         config=resolved.config)
        if _finished(job.run_dir, job.config_hash, job.config.trainer.max_steps, job.config.run.budget):
            print(f"[fit] {job.run_dir} already finished; not training again", flush=True)
            continue
        print(f"[fit] {job.experiment} -> {job.run_dir}", flush=True)
        if subprocess.run([sys.executable, "-m", "pipeline.cli", "fit", *job.args]).returncode != 0:
            raise RunError(f"genbench fit of {job.experiment} failed (its message is above); the runs before it are "
                           "kept, and the same genbench run command continues from where it stopped")

    # the records there were before this command: the ones it writes are of runs it has just benchmarked
    before = {res: leaderboard.load_records(res) if Path(res).exists() else [] for res in {j.results for j in jobs}}
    # Every checkpoint is scored after all training, not as soon as it is written: on one machine the two would
    # share its cores, and the sweep on SLURM (genbench submit) benchmarks after its training array too.
    for job in jobs:
        which = "all" if job.config.run.evaluate_every else "last"
        for ckpt in run_checkpoints(job.run_dir, which):
            done = None if force else existing_record(job, before[job.results], ckpt)
            if done is not None:
                print(f"[benchmark] {ckpt} already scored in {done['_file']} (--force scores it again)", flush=True)
                continue
            print(f"[benchmark] {ckpt}", flush=True)
            path = benchmark_run(job.run_dir, results=job.results, opts=ScoreOptions(progress=progress),
                                 checkpoint=ckpt)
            if path is not None:
                print(leaderboard.record_summary(json.loads(path.read_text())), flush=True)
    for job in jobs:  # the floor and ceiling rows, once per results directory, data set and size trained at
        shards = job.config.data.init_args.shards
        fit = {k: job.config.data.init_args.get(k) for k in FIT_KEYS}
        if not has_reference_rows(Path(job.results), shards, fit):
            for record in benchmark_reference_rows(shards, job.config.benchmark.num_samples, job.config.benchmark.seed,
                                                   results=job.results, opts=ScoreOptions(progress=progress),
                                                   fit=fit):
                print(f"[benchmark] wrote reference row {record}", flush=True)

    assert suite_results and suite_board, "a suite names its results and leaderboard directories"
    board = leaderboard.build(suite_results, suite_board)
    print(f"[leaderboard]\n{leaderboard.ranked_summary(suite_results, suite_board)}", flush=True)
    return board

