"""Data-parallel efficiency of `genbench fit`: 1 process against N, same per-process batch, in the same run.

Each configuration is a real `torchrun --nproc_per_node=P -m pipeline.cli fit` (gloo on CPU, NCCL on
GPUs) over the same shards; a StepTimer callback (given through the config) times the batches after a
warm-up and rank 0 writes the figure. Efficiency = images/s with P processes / (P x images/s with 1).
On a CPU each process gets one thread (OMP_NUM_THREADS=1), so 2 processes use 2 cores against 1; on a
GPU machine P goes up to the number of GPUs.

    PYTHONPATH=. .venv/bin/python benchmarks/scaling.py --family ddpm --batch-size 128    # every GPU
    PYTHONPATH=. .venv/bin/python benchmarks/scaling.py --small                           # CI: CPU, 1 vs 2

Results are merged into benchmarks/results/<device>.json under "scaling" (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks.common import merge_results, results_path, torchrun
from benchmarks.train_throughput import fit_args, make_shards


def run(processes: int, family: str, batch: int, warmup: int, steps: int, small: bool, work: Path,
        timeout: float) -> float:
    out = work / f"timer-{family}-{processes}.json"
    timer = work / f"timer-{family}-{processes}.yaml"
    timer.write_text(yaml.safe_dump({"trainer": {"callbacks": [{"class_path": "benchmarks.common.StepTimer",
                                                                 "init_args": {"warmup": warmup, "steps": steps,
                                                                               "out": str(out)}}]}}))
    args = fit_args(family, work / "shards", work / f"runs-{processes}", batch, 10 * (warmup + steps), small)
    args = [a for a in args if not a.startswith("--trainer.devices=")] + [f"--trainer.devices={processes}",
                                                                           "--config", str(timer)]
    env = {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    torchrun(processes, ["-m", "pipeline.cli", "fit", *args], env, work, timeout)
    return json.loads(out.read_text())["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="ddpm", choices=("ddpm", "vae", "gan", "ar"))
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--processes", help="comma-separated process counts (default 1,2 on a CPU; 1..GPUs in powers of 2)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--small", action="store_true", help="tiny networks, 16x16 images, a few steps (CI)")
    p.add_argument("--out", help="results file (default benchmarks/results/<device>.json)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one torchrun may take before it is stopped")
    args = p.parse_args()
    if args.small:
        args.batch_size, args.warmup, args.steps = min(args.batch_size, 8), 2, 6
    gpus = torch.cuda.device_count()
    counts = [int(c) for c in args.processes.split(",")] if args.processes else \
        ([1, 2] if not gpus else [c for c in (1, 2, 4, 8) if c <= gpus])
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_shards(work, 400 if args.small else 20000, 16 if args.small else 32)
        for c in counts:
            rates[c] = run(c, args.family, args.batch_size, args.warmup, args.steps, args.small, work, args.timeout)
            print(f"{c} process(es): {rates[c]:.1f} img/s", flush=True)
    row = {"batch_size_per_process": args.batch_size, "small": args.small, "backend": "nccl" if gpus else "gloo",
           "images_per_s": {str(c): round(r, 2) for c, r in rates.items()},
           "efficiency": {str(c): round(r / (c * rates[counts[0]] / counts[0]), 4) for c, r in rates.items()}}
    out = results_path(args.out)
    merge_results(out, "scaling", {args.family: row})
    print(f"efficiency {row['efficiency']}; wrote {out}")


if __name__ == "__main__":
    main()
