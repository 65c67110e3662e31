"""Training, sampling and feature extraction images/s beside busy processes: torch's default threads against
genbench's thread policy (pipeline/threads.py), in the same run (issue 34).

Each measurement is a fresh process (the OpenMP wait policy is read once, when torch loads), under one of two
policies: ``torch`` (GENBENCH_THREAD_POLICY=torch: one intra-op thread per core, spinning OpenMP waits) and
``genbench`` (threads = usable cores less loader workers, passive waits), on a quiet machine and beside 2 and
4 busy processes (pure-Python spin loops, one core each: what other users' jobs look like to this one).
Workloads: `genbench fit` of the digits DDPM (GenbenchCLI and a real Trainer, one loader worker), `sample()` of
the same model with 10 DDIM steps, and InceptionV3 features (random weights, 299x299, the FID extractor's
architecture). Goals: never slower when quiet (ratio >= ~1), at least 5x torch's defaults beside 4 busy
processes.

    PYTHONPATH=. .venv/bin/python benchmarks/contention.py            # about 10 minutes on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/contention.py --small    # CI: one workload, quiet and 2 busy

Results: benchmarks/results/contention-<device>.json (or --out).
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

import pipeline  # noqa: F401  (first: sets the wait policy before torch loads, as every genbench entry point)
from benchmarks.common import REPO, merge_results, results_path

POLICIES = ("torch", "genbench")
WORKLOADS = ("fit", "sample", "features")


def _child(workload: str, work: Path) -> float:
    """images/s of one workload in this process (started with the policy's environment)."""
    import time

    import torch

    from pipeline import threads

    if workload == "fit":
        from benchmarks.train_throughput import lightning_rate
        from pipeline.data.shards import write_shards
        from pipeline.data.sources import DigitsSource

        shards = work / "shards"
        write_shards(DigitsSource(), shards, val_fraction=0.1, seed=0, shard_size="10000", progress=False)
        args = ["--config", str(REPO / "experiments" / "digits" / "ddpm.yaml"), f"--data.init_args.shards={shards}",
                f"--run.root={work / 'runs'}", "--trainer.max_steps=30", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", "--trainer.check_val_every_n_epoch=1000",
                "--tracking.wandb=false", "--model.init_args.sample_every_n_steps=-1",
                "--data.init_args.num_workers=1", "--data.init_args.samples_per_epoch=100000000"]
        return lightning_rate(args, warmup=5, steps=20, batch=128)
    threads.apply(threads.plan())  # as the genbench command line does for benchmark/serve/run
    if workload == "sample":
        from jsonargparse.typing import import_object

        from pipeline.fit.train import resolve

        config = resolve(["--config", str(REPO / "experiments" / "digits" / "ddpm.yaml")]).config.model
        model = import_object(config.class_path)(**{**config.init_args.as_dict(), "sampling_steps": 10,
                                                    "sample_batch_size": 100}).eval()
        model.sample(100, seed=0)
        t0 = time.perf_counter()
        model.sample(300, seed=1)
        return 300 / (time.perf_counter() - t0)
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    x = torch.rand(4, 3, 299, 299)
    with torch.inference_mode():
        net(x)
        t0 = time.perf_counter()
        for _ in range(3):
            net(x)
    return 12 / (time.perf_counter() - t0)


def _busy(n: int) -> list[subprocess.Popen]:
    code = "import time\nend = time.time() + 900\nwhile time.time() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def measure(workload: str, policy: str, busy: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GENBENCH_THREADS",
                                                            "GENBENCH_THREAD_POLICY", "MKL_NUM_THREADS")}
    if policy == "torch":
        env["GENBENCH_THREAD_POLICY"] = "torch"
    env["PYTHONPATH"] = str(REPO)
    spinners = _busy(busy)
    try:
        time.sleep(0.5)  # the spinners are running
        with tempfile.TemporaryDirectory() as work:
            out = subprocess.run([sys.executable, __file__, "--child", workload, "--work", work], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=900)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    if out.returncode != 0:
        raise RuntimeError(f"{workload} under {policy} failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="sampling only, quiet and beside 2 busy processes")
    p.add_argument("--busy", default="0,2,4", help="busy processes beside each measurement")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--out", help="results file (default benchmarks/results/contention-<device>.json)")
    p.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(_child(args.child, Path(args.work)))
        return
    workloads = ["sample"] if args.small else args.workloads.split(",")
    loads = [0, 2] if args.small else [int(b) for b in args.busy.split(",")]
    rows: dict = {}
    for workload in workloads:
        rows[workload] = {}
        for busy in loads:
            rates = {policy: measure(workload, policy, busy) for policy in POLICIES}
            rows[workload][f"busy_{busy}"] = {
                "torch_images_per_s": round(rates["torch"], 2), "genbench_images_per_s": round(rates["genbench"], 2),
                "ratio_genbench_vs_torch": round(rates["genbench"] / rates["torch"], 3)}
            print(f"{workload} beside {busy} busy: torch {rates['torch']:.1f} img/s, genbench "
                  f"{rates['genbench']:.1f} img/s, ratio {rates['genbench'] / rates['torch']:.2f}", flush=True)
    path = Path(args.out) if args.out else results_path(None).with_name(
        "contention-" + results_path(None).name)
    merge_results(path, "contention", {"cores": len(os.sched_getaffinity(0)), **rows})
    print(json.dumps(rows, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
