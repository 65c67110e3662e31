"""The memorisation audit's cost and its calibration, written to ``benchmarks/results/memorization-<device>.json``.

Cost: wall time of the audit (neighbour searches, copy scores, AuthPct, C_T) for N generated vs N training
32x32 RGB images, in the pixel space (with the one-pixel shift tolerance: 9 searches) and in a 2048-d feature
space (Inception pool3's size), at a reduced N and extrapolated to 50,000 x 50,000 (the search is N x M; C_T
and the rest are smaller). The baselines, in the same run:

* the Inception feature extraction of the same images (the rest of a benchmark's time: 50,000 generated plus,
  once, 50,000 reference images), from which the audit's share of a whole benchmark follows (target on a GPU:
  under 10%);
* ``torch.cdist`` on the full matrix, where it fits: what the chunked search costs against the obvious call,
  and the memory the full matrix would need at 50,000 x 50,000.

Calibration: on the embedded digits, the fraction of held-out images and of lightly perturbed training images
(noise, one-pixel moves) the copy test flags at several thresholds, in the pixel space and the auditor's
(the table in docs/benchmark.md).

    .venv/bin/python benchmarks/memorization.py                   # CPU: N = 4,000, extrapolated
    .venv/bin/python benchmarks/memorization.py --num-images 50000  # on a GPU: the issue's setting
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import device, device_name, merge_results, results_path, sync
from pipeline.metrics.extractors import InceptionExtractor
from pipeline.metrics.features import architecture_only_inception_weights
from pipeline.metrics.memorization import MemorizationSettings, copy_scores, memorization_metrics
from pipeline.metrics.neighbours import search, shift_tolerant_search

FULL = 50_000
SHAPE = (3, 32, 32)
THRESHOLDS = (0.5, 0.6, 0.7, 0.8)


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """CIFAR-sized images with structure at a few scales (uniform noise would make every distance alike)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    fine = torch.rand(n, 3, 32, 32, generator=g) * 0.2
    images = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear") * 0.8 + fine
    return (images * 255).to(torch.uint8)


def audit_seconds(gen: torch.Tensor, train: torch.Tensor, held: torch.Tensor, pixels: bool,
                  settings: MemorizationSettings) -> float:
    start = time.perf_counter()
    k, dev = settings.neighbours, device()
    if pixels:
        find = lambda q, k, self_=False: shift_tolerant_search(q, train, SHAPE, k, settings.max_shift, self_,  # noqa: E731
                                                               device=dev)
    else:
        find = lambda q, k, self_=False: search(q, train, k, self_, device=dev)  # noqa: E731
    train_nearest = find(train, 1, True)[0][:, 0]
    held_found = find(held, k)
    found = find(gen, k)
    memorization_metrics(found, train_nearest, held_found, {"train": train, "generated": gen, "held_out": held},
                         settings)
    sync()
    return time.perf_counter() - start


def cost(n: int) -> dict:
    settings = MemorizationSettings()
    scale = (FULL / n) ** 2
    images = {name: smooth_images(n, seed) for seed, name in enumerate(("train", "gen", "held"))}
    rows: dict = {"num_images": n, "extrapolated_to": FULL}
    pixel_s = audit_seconds(images["gen"].flatten(1), images["train"].flatten(1), images["held"].flatten(1)[:n // 10],
                            True, settings)
    g = torch.Generator().manual_seed(0)
    feats = {name: torch.randn(n if name != "held" else n // 10, 2048, generator=g) for name in images}
    feature_s = audit_seconds(feats["gen"], feats["train"], feats["held"], False, settings)
    rows["pixels_shift_tolerant_s"] = round(pixel_s, 2)
    rows["features_2048_s"] = round(feature_s, 2)
    rows["pixels_shift_tolerant_s_at_50k"] = round(pixel_s * scale, 1)
    rows["features_2048_s_at_50k"] = round(feature_s * scale, 1)

    # baseline 1: Inception extraction, the rest of a benchmark (sampling aside)
    with tempfile.TemporaryDirectory() as tmp:
        weights = architecture_only_inception_weights(Path(tmp) / "inception.pth")
        extractor = InceptionExtractor(weights, device())
        batch = images["gen"][:min(n, 500)].to(device())
        extractor(batch[:50])  # warm-up
        sync()
        start = time.perf_counter()
        extractor(batch)
        sync()
        rate = len(batch) / (time.perf_counter() - start)
    extraction_50k = 2 * FULL / rate  # generated + reference (cached afterwards)
    audit_50k = (pixel_s + feature_s) * scale
    rows["inception_images_per_s"] = round(rate, 1)
    rows["inception_extraction_s_at_50k"] = round(extraction_50k, 1)
    rows["audit_share_of_benchmark"] = round(audit_50k / (audit_50k + extraction_50k), 3)

    # baseline 2: the full distance matrix of torch.cdist, at a size where it fits
    m = min(n, 4000)
    q, b = images["gen"][:m].flatten(1).float().div(255).to(device()), images["train"][:m].flatten(1).float().div(255)
    b = b.to(device())
    start = time.perf_counter()
    torch.cdist(q, b).topk(settings.neighbours, dim=1, largest=False)
    sync()
    cdist_s = time.perf_counter() - start
    start = time.perf_counter()
    search(q, b, settings.neighbours, device=device())
    sync()
    chunked_s = time.perf_counter() - start
    rows["cdist_vs_chunked_at"] = m
    rows["cdist_topk_s"], rows["chunked_search_s"] = round(cdist_s, 6), round(chunked_s, 6)
    rows["chunked_over_cdist"] = round(chunked_s / cdist_s, 3)
    rows["cdist_matrix_gb_at_50k"] = round(FULL * FULL * 4 / 1e9, 1)
    return rows


def calibration() -> dict:
    from pipeline.benchmark.images import ShardImages
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import DigitsSource
    from pipeline.metrics.auditor import train_auditor
    from pipeline.metrics.extractors import AuditorExtractor

    settings = MemorizationSettings()
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "digits"
        write_shards(DigitsSource(), shards, val_fraction=0.1, seed=0, progress=False)
        train, val = (torch.cat([b.images for b in ShardImages(shards, s).batches(500)]) for s in ("train", "val"))
        # its own file: the cached auditor of a shard directory with the same content stays as it was
        auditor = AuditorExtractor(train_auditor(str(shards), epochs=10, out=Path(tmp) / "auditor.ckpt",
                                                 progress=False), "cpu")
    g = torch.Generator().manual_seed(0)
    noisy = (train.float() + torch.randn(train.shape, generator=g) * 0.05 * 255).clamp(0, 255).round().to(torch.uint8)
    right, left = torch.roll(train, 1, dims=-1), torch.roll(train, -1, dims=-1)
    sets = {"held_out": val, "noise_0.05": noisy, "moved_right": right, "moved_left": left}
    out: dict = {"settings": settings.as_dict(), "train": len(train)}
    for space in ("pixels", "pixels_no_shift", "auditor"):
        rows = {}
        for name, images in sets.items():
            if space == "auditor":
                d = search(auditor(images)[0], auditor(train)[0], settings.neighbours)[0]
            else:
                shift = settings.max_shift if space == "pixels" else 0
                d = shift_tolerant_search(images.flatten(1), train.flatten(1), tuple(train.shape[1:]),
                                          settings.neighbours, shift)[0]
            scores = copy_scores(d, settings.alpha, settings.neighbours)
            q = torch.quantile(scores, torch.tensor([0.01, 0.5, 0.95], dtype=torch.float64)).tolist()
            rows[name] = {"p01_p50_p95": [round(v, 2) for v in q],
                          "flagged": {str(t): round(float((scores < t).double().mean()), 4) for t in THRESHOLDS}}
        out[space] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=4000, help="generated = training images (default 4000)")
    parser.add_argument("--out", help="results file (default benchmarks/results/memorization-<device>.json)")
    args = parser.parse_args()
    path = results_path(args.out) if args.out else results_path(None).with_name(
        f"memorization-{results_path(None).name}")
    rows = cost(args.num_images)
    print(f"{device_name()}: {rows}")
    merge_results(path, "cost", rows)
    cal = calibration()
    print({k: v for k, v in cal.items() if k != "settings"})
    merge_results(path, "calibration", cal)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
