"""Samples/s of each family's `sample()`, the code path `genbench benchmark` draws its images with.

Networks are built from the CIFAR-10 experiments (random weights: the work per sample does not depend on
them), in eval mode under bf16 autocast on a GPU (fp32 on a CPU), with `sample_batch_size` images per
network call. DDPM is timed with 1000 ancestral steps and with 100 DDIM steps, the autoregressive model
with its key/value cache. The DDPM rows also give the time 50,000 samples would take (target on one H100
with 100 DDIM steps: under 5 minutes).

    PYTHONPATH=. .venv/bin/python benchmarks/sample_throughput.py                 # on a GPU
    PYTHONPATH=. .venv/bin/python benchmarks/sample_throughput.py --small         # CI: CPU, tiny

Results are merged into benchmarks/results/<device>.json under "sample_throughput" (or --out).
"""

from __future__ import annotations

import argparse
import time

import torch
from jsonargparse.typing import import_object

from benchmarks.common import REPO, device, merge_results, results_path, sync
from pipeline.fit.train import resolve

VARIANTS = {  # row name -> (family, model overrides)
    "ddpm-ancestral-1000": ("ddpm", {"sampler": "ancestral"}),
    "ddpm-ddim-100": ("ddpm", {"sampler": "ddim", "sampling_steps": 100}),
    "vae": ("vae", {}),
    "gan": ("gan", {}),
    "ar-kv-cache": ("ar", {}),
}


def build(family: str, overrides: dict, small: bool, batch: int):
    experiment = REPO / "experiments" / ("digits" if small else "cifar10") / f"{family}.yaml"
    args = ["--config", str(experiment)]
    if small:
        args += ["--model.init_args.image_size=16", "--model.init_args.channels=3",
                 "--model.init_args.num_classes=null"]
    model_config = resolve(args).config.model  # parsed and validated; no data needed
    init = {**model_config.init_args.as_dict(), **overrides, "sample_batch_size": batch}
    return import_object(model_config.class_path)(**init).to(device()).eval()


def rate(model, n: int, repeats: int) -> float:
    with torch.autocast(device(), dtype=torch.bfloat16, enabled=device() == "cuda"):
        model.sample(model.sample_batch_size, seed=1)  # warm-up: kernels, caches, compilation
        sync()
        t0 = time.perf_counter()
        for r in range(repeats):
            model.sample(n, seed=2 + r)
        sync()
    return n * repeats / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--batch-size", type=int, default=1000, help="images per network call (sample_batch_size)")
    p.add_argument("--num-samples", type=int, default=5000, help="samples timed per variant")
    p.add_argument("--small", action="store_true", help="tiny networks, 16x16 images, a few samples (CI)")
    p.add_argument("--out", help="results file (default benchmarks/results/<device>.json)")
    args = p.parse_args()
    if args.small:
        args.batch_size = args.num_samples = 8
    out, rows = results_path(args.out), {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        family, overrides = VARIANTS[name]
        model = build(family, overrides, args.small, args.batch_size)
        per_s = rate(model, args.num_samples, 1)
        # 4 significant digits: a slow CPU's 0.04 samples/s keeps its precision
        rows[name] = {"samples_per_s": float(f"{per_s:.4g}"), "nfe": model.nfe, "batch_size": args.batch_size,
                      "num_samples": args.num_samples, "seconds_for_50000": round(50000 / per_s, 1),
                      "precision": "bf16-autocast" if device() == "cuda" else "fp32",
                      "compiled": model.compile_network, "small": args.small}
        print(f"{name}: {per_s:.2f} samples/s (NFE {model.nfe}), 50,000 in {50000 / per_s:.0f} s", flush=True)
        del model
    merge_results(out, "sample_throughput", rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
