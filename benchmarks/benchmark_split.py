"""Wall time of a whole `genbench benchmark --run` on 1 process against N, in the same run.

Each configuration is a real `torchrun --nproc_per_node=P -m pipeline.cli benchmark --run-dir RUN` (gloo on
CPU, NCCL on GPUs): every rank samples and extracts features for its share of the draw and rank 0 writes
the record. The time is the command's wall time, start-up included, as a user waits for it. The target of
the GPU issue: N processes take at most 1/N of one process's time plus 10%, i.e.
split_ratio = t_N / (t_1 / N) <= 1.1.

The run is trained here for a few steps (its quality does not change the cost of scoring it). A first,
untimed benchmark of one network batch fills the caches every later one reuses: the reference statistics,
the auditor, and (for compiled experiments) inductor's kernels.

    PYTHONPATH=. .venv/bin/python benchmarks/benchmark_split.py --family ddpm               # every GPU, cifar10
    PYTHONPATH=. .venv/bin/python benchmarks/benchmark_split.py --small                     # CI: CPU, 1 vs 2

Without --inception-weights (or torch-fidelity's weights in the torch cache) the Inception metrics are
left out and the auditor's are timed. Results are merged into benchmarks/results/<device>.json under
"benchmark_split" (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import REPO, merge_results, results_path, torchrun
from benchmarks.train_throughput import fit_args, make_shards
from pipeline.metrics.features import WeightsUnavailable, resolve_inception_weights

AUDITOR_METRICS = "fd_auditor,audit"


def train_run(family: str, work: Path, small: bool, env: dict[str, str]) -> Path:
    args = fit_args(family, work / "shards", work / "runs", 16 if small else 128, 10, small)
    args += ["--tracking.wandb=false"]
    if small:  # a CPU: 10 DDIM steps, a one-epoch auditor
        args += ["--benchmark.auditor_epochs=1"] + (["--model.init_args.sampling_steps=10"] if family == "ddpm" else [])
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "fit", *args], cwd=work, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    if done.returncode != 0:
        raise SystemExit(f"training the run to benchmark failed:\n{done.stderr[-3000:]}")
    (run,) = (work / "runs").iterdir()
    return run


def benchmark_seconds(processes: int, run: Path, num_samples: int, metrics: str, weights: str | None,
                      results: Path, env: dict[str, str], work: Path, timeout: float) -> float:
    args = ["-m", "pipeline.cli", "benchmark", "--run-dir", str(run), "--num-samples", str(num_samples), "--metrics",
            metrics, "--results", str(results)] + (["--inception-weights", weights] if weights else [])
    t0 = time.perf_counter()
    torchrun(processes, args, env, work, timeout)
    seconds = time.perf_counter() - t0
    (record,) = [json.loads(p.read_text()) for p in results.glob("*.json")]
    if record["protocol"]["world_size"] != processes:
        raise SystemExit(f"the {processes}-process benchmark ran on {record['protocol']['world_size']} rank(s)")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="ddpm", choices=("ddpm", "vae", "gan", "ar"))
    p.add_argument("--num-samples", type=int, default=50000)
    p.add_argument("--processes", help="comma-separated process counts (default 1,2 on a CPU; 1 and every GPU)")
    p.add_argument("--inception-weights", help="torch-fidelity's InceptionV3 weights (default: the torch cache)")
    p.add_argument("--small", action="store_true", help="the digits experiment on 16x16 RGB, 1,000 samples (CI)")
    p.add_argument("--out", help="results file (default benchmarks/results/<device>.json)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one torchrun may take before it is stopped")
    args = p.parse_args()
    if args.small:
        args.num_samples = min(args.num_samples, 1000)
    gpus = torch.cuda.device_count()
    counts = [int(c) for c in args.processes.split(",")] if args.processes else ([1, 2] if not gpus else
                                                                               sorted({1, gpus}))
    try:
        weights = str(resolve_inception_weights(args.inception_weights))
        metrics = f"fid,is,kid,pr,{AUDITOR_METRICS}"
    except WeightsUnavailable:
        weights, metrics = None, AUDITOR_METRICS
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {"GENBENCH_CACHE": str(work / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
        make_shards(work, 400 if args.small else 20000, 16 if args.small else 32)
        run = train_run(args.family, work, args.small, env)
        warm = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["sample_batch_size"]
        benchmark_seconds(1, run, warm, metrics, weights, work / "warm-up", env, work, args.timeout)
        for c in counts:
            seconds[c] = benchmark_seconds(c, run, args.num_samples, metrics, weights, work / f"results-{c}", env,
                                           work, args.timeout)
            print(f"{c} process(es): {seconds[c]:.1f} s", flush=True)
    row = {"num_samples": args.num_samples, "metrics": metrics, "small": args.small,
           "backend": "nccl" if gpus else "gloo", "seconds": {str(c): round(s, 2) for c, s in seconds.items()},
           # t_N over the ideal t_1 / N: 1.0 is a perfect split, the target is at most 1.1
           "split_ratio": {str(c): round(s / (seconds[counts[0]] * counts[0] / c), 4) for c, s in seconds.items()},
           "target_split_ratio": 1.1}
    out = results_path(args.out)
    merge_results(out, "benchmark_split", {args.family: row})
    print(f"split ratio {row['split_ratio']} (target <= 1.1); wrote {out}")


if __name__ == "__main__":
    main()
