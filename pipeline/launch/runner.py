"""``genbench run``: prepare -> fit -> benchmark -> leaderboard for one or many experiments.

Every experiment is parsed and validated first, so a bad key in the third experiment stops the
command before the first one trains. Training runs in a child ``genbench fit`` process (so a
multi-device config can start its DDP workers exactly as ``genbench fit`` does); a run whose run.json
says it finished with the same config is not trained again, and a crashed one resumes from last.ckpt.
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
from pipeline.fit.train import DryRun, check_model_fits_data, config_hash, ensure_shards, resolve


@dataclass
class Suite:
    """A suite of experiments run and ranked together.

    Args:
        experiments: experiment YAML files, relative to the suite file.
        overrides: dotted overrides applied to every experiment, e.g. ``--trainer.max_steps=100``.
        runs: directory of the run directories.
        results: directory of the result records.
        leaderboard: directory the leaderboard is written to.
    """

    experiments: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
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
    return Suite(experiments=experiments, overrides=list(cfg.overrides), runs=cfg.runs, results=cfg.results,
                 leaderboard=cfg.leaderboard)


class Job(NamedTuple):
    experiment: str
    args: list[str]  # the `genbench fit` arguments
    run_dir: Path
    config_hash: str
    results: str
    config: Any  # the resolved jsonargparse Namespace


def _finished(run_dir: Path, chash: str) -> bool:
    path = run_dir / "run.json"
    if not path.exists():
        return False
    info = json.loads(path.read_text())
    return info.get("status") == "finished" and info.get("config_hash") == chash


def has_reference_rows(results: Path, shards: str) -> bool:
    """Whether ``results`` already holds the floor and ceiling rows of this data set."""
    if not results.exists():
        return False
    data_hash = ShardImages(shards, "train").content_hash
    rows = {r.get("reference_row") for r in leaderboard.load_records(results)
            if r.get("reference_row") and r["protocol"]["reference"]["hash"] == data_hash}
    return {"floor", "ceiling"} <= rows


def run(paths: list[str], overrides: list[str], runs: Optional[str] = None, results: Optional[str] = None,
        leaderboard_dir: Optional[str] = None, progress: bool = True) -> Optional[Path]:
    jobs = []
    suite_results: Optional[str] = results
    suite_board: Optional[str] = leaderboard_dir
    for p in paths:
        suite = load_suite(Path(p))
        root = runs or suite.runs
        res = results or suite.results
        suite_results, suite_board = res, leaderboard_dir or suite.leaderboard
        for exp in suite.experiments:
            args = ["--config", exp, *suite.overrides, *overrides, f"--run.root={root}", f"--benchmark.results={res}"]
            resolved: DryRun = resolve(args)  # validates now: nothing runs if any experiment is malformed
            jobs.append(Job(exp, args, resolved.run_dir, config_hash(resolved.config), res, resolved.config))
    for job in jobs:  # shards first, then every model against its data, still before any training
        ensure_shards(job.config.data, job.config.prepare)
        check_model_fits_data(job.config)
    print(f"genbench run: {len(jobs)} experiment(s) validated", flush=True)

    for job in jobs:
        if _finished(job.run_dir, job.config_hash):
            print(f"[fit] {job.run_dir} already finished; not training again", flush=True)
            continue
        print(f"[fit] {job.experiment} -> {job.run_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "pipeline.cli", "fit", *job.args], check=True)

    for job in jobs:
        print(f"[benchmark] {job.run_dir}", flush=True)
        record = benchmark_run(job.run_dir, results=job.results, opts=ScoreOptions(progress=progress))
        print(f"[benchmark] wrote {record}", flush=True)
    for job in jobs:  # the floor and ceiling rows, once per results directory and data set
        shards = job.config.data.init_args.shards
        if not has_reference_rows(Path(job.results), shards):
            for record in benchmark_reference_rows(shards, job.config.benchmark.num_samples, job.config.benchmark.seed,
                                                   results=job.results, opts=ScoreOptions(progress=progress)):
                print(f"[benchmark] wrote reference row {record}", flush=True)

    assert suite_results and suite_board, "a suite names its results and leaderboard directories"
    board = leaderboard.build(suite_results, suite_board)
    print(f"[leaderboard] {board}", flush=True)
    return board

