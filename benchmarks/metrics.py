"""Wall time of FID + IS + KID for N generated vs N reference 32x32 images: genbench against
torch-fidelity's ``calculate_metrics`` on the same PNG folders with the same weight file, in the same run.

genbench is timed twice: cold (reference features extracted too) and with the reference statistics
cached, which is how a benchmark stage runs after its first evaluation. The target of the benchmark
issue is genbench-cached at most half torch-fidelity's time. Feature extraction images/s is reported
in strict fp32 and, on a GPU, with TF32 allowed. Results go to ``benchmarks/results/metrics-<device>.json``.

Without the real InceptionV3 weights (no internet), a file with the same architecture is built here:
the timing does not depend on the weight values, the metric values do (they are not the point here).

    .venv/bin/python benchmarks/metrics.py --num-images 50000      # on a GPU: the issue's setting
    .venv/bin/python benchmarks/metrics.py --small                 # CPU, a few images: it still works
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.benchmark import ScoreOptions, benchmark_images
from pipeline.io import atomic_write_json
from pipeline.metrics.extractors import InceptionExtractor
from pipeline.metrics.features import WeightsUnavailable, architecture_only_inception_weights, resolve_inception_weights


def make_folder(root: Path, n: int, seed: int) -> Path:
    """Smooth random 32x32 RGB images (CIFAR-sized), as PNG files."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    root.mkdir(parents=True)
    for i in range(n):
        base = (np.sin(xx / rng.uniform(2, 8)) + np.cos(yy / rng.uniform(2, 8))) * 60 + 128
        img = np.clip(base[..., None] + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i:06d}.png")
    return root


def extraction_rate(weights: Path, device: str, batch: int, n: int, allow_tf32: bool) -> float:
    """Images/s of genbench's Inception extractor (channels-last, fp32 unless TF32 is allowed)."""
    extractor = InceptionExtractor(weights, device, allow_tf32)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    extractor(images)  # warm-up: cuDNN autotuning, lazy init
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, done = time.perf_counter(), 0
    while done < n:
        extractor(images)
        done += batch
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="generated and reference images each")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--small", action="store_true", help="48 images each: checks the script still works")
    parser.add_argument("--inception-weights", help="real weights (default: the torch hub cache, else built here)")
    parser.add_argument("--out", help="results file (default benchmarks/results/metrics-<device>.json)")
    args = parser.parse_args()
    n = 48 if args.small else args.num_images
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    import torch_fidelity

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["GENBENCH_CACHE"] = str(tmp / "cache")  # a cold cache: the first genbench run fills it
        try:
            weights, weights_kind = resolve_inception_weights(args.inception_weights), "real"
        except WeightsUnavailable:
            weights = architecture_only_inception_weights(tmp / "inception.pth")
            weights_kind = "architecture only (built here)"
        gen, ref = make_folder(tmp / "gen", n, 1), make_folder(tmp / "ref", n, 2)
        kid_size = min(1000, n)
        opts = ScoreOptions(metrics=("fid", "is", "kid"), batch_size=args.batch_size, inception_weights=str(weights),
                            kid_subset_size=kid_size, progress=False)
        timings = {}
        t0 = time.perf_counter()
        benchmark_images(str(gen), str(ref), results=str(tmp / "results"), opts=opts)
        timings["genbench_cold_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        benchmark_images(str(gen), str(ref), results=str(tmp / "results"), opts=opts)
        timings["genbench_cached_reference_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch_fidelity.calculate_metrics(input1=str(gen), input2=str(ref), fid=True, isc=True, kid=True,
                                         kid_subset_size=kid_size, feature_extractor_weights_path=str(weights),
                                         cuda=device == "cuda", verbose=False, cache=False,
                                         batch_size=args.batch_size)
        timings["torch_fidelity_s"] = time.perf_counter() - t0
        batch = min(args.batch_size, n)
        rates = {"strict_fp32": extraction_rate(weights, device, batch, n, False)}
        if device == "cuda":
            rates["tf32_allowed"] = extraction_rate(weights, device, batch, n, True)

    result = {
        "benchmark": "FID+IS+KID wall time, genbench vs torch-fidelity calculate_metrics on the same PNG folders",
        "date": dt.date.today().isoformat(), "device": device_name, "torch": torch.__version__,
        "torch_fidelity": torch_fidelity.__version__, "num_images_each": n, "batch_size": args.batch_size,
        "weights": weights_kind, **{k: round(v, 3) for k, v in timings.items()},
        "ratio_cached_vs_torch_fidelity": round(timings["genbench_cached_reference_s"] / timings["torch_fidelity_s"],
                                                3),
        "ratio_cold_vs_torch_fidelity": round(timings["genbench_cold_s"] / timings["torch_fidelity_s"], 3),
        "target_ratio_cached": 0.5,
        "feature_extraction_images_per_s": {k: round(v, 1) for k, v in rates.items()},
    }
    tag = "cuda-" + device_name.replace(" ", "_") if device == "cuda" else "cpu"
    out = Path(args.out or Path(__file__).parent / "results" / f"metrics-{tag}.json")
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
