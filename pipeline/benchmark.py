"""``genbench benchmark``: sample a trained run, score it against its reference shards, write one record.

A record is immutable: it is written once under a fresh name (atomically, refusing to replace any
file) and never edited. A metric that cannot be computed is absent from ``metrics`` and listed in
``skipped`` with the reason; no number in a record is made up.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import yaml
from tqdm import tqdm

from pipeline.data.datamodule import reference_batches
from pipeline.data.shards import load_manifest, manifest_hash
from pipeline.io import sha256_file, write_new_json
from pipeline.metrics import KEY_AUDIT, KEY_FD_AUDITOR, KEY_FID
from pipeline.metrics.auditor import auditor_path, cache_dir, load_auditor, train_auditor
from pipeline.metrics.bias import audit, histogram
from pipeline.metrics.features import (INCEPTION_RESIZE, InceptionFeatures, WeightsUnavailable,
                                       resolve_inception_weights, strict_fp32)
from pipeline.metrics.fidelity import FeatureStatistics, frechet_distance
from pipeline.models.grids import save_png
from pipeline.provenance import describe_environment, now

ALL_METRICS = (KEY_FID, KEY_FD_AUDITOR, KEY_AUDIT)
RECORD_VERSION = 1


class BenchmarkError(RuntimeError):
    """A run or input that cannot be benchmarked, with the reason and the fix."""


@dataclass
class ScoreOptions:
    metrics: tuple[str, ...] = ALL_METRICS
    batch_size: int = 250
    inception_weights: Optional[str] = None
    auditor: Optional[str] = None
    auditor_epochs: int = 10
    reference_split: str = "train"
    progress: bool = True
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown or not names:
        raise BenchmarkError(f"--metrics {text!r}: unknown {unknown}; choose from {','.join(ALL_METRICS)}")
    return names


def _batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def _cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def reference_statistics(extractor: torch.nn.Module, shards: str, split: str, key: str, opts: ScoreOptions,
                         labels_out: Optional[list] = None) -> FeatureStatistics:
    """Feature statistics of the reference split, cached under ``key`` (manifest + extractor + weights)."""
    path = cache_dir() / "reference-stats" / f"{key}.pt"
    cached = FeatureStatistics.load(path, extractor.num_features)
    if cached is not None:
        return cached
    stats = FeatureStatistics(extractor.num_features)
    manifest = load_manifest(shards)
    total = manifest["splits"][split]["num_samples"]
    bar = tqdm(total=total, desc=f"reference features ({type(extractor).__name__})", unit="img", disable=not opts.progress)
    for batch in reference_batches(shards, split, opts.batch_size):
        stats.update(_features(extractor, batch["image"], opts.device))
        bar.update(len(batch["image"]))
    bar.close()
    stats.save(path)
    return stats


def _features(extractor: torch.nn.Module, images: torch.Tensor, device: str) -> torch.Tensor:
    with torch.no_grad(), strict_fp32():
        out = extractor(images.to(device))
    return (out[0] if isinstance(out, tuple) else out).float().cpu()


def score(images: torch.Tensor, shards: str, opts: ScoreOptions,
          requested_labels: Optional[torch.Tensor] = None) -> tuple[dict, dict, dict]:
    """Score uint8 N x C x H x W images against a shard directory. Returns (metrics, skipped, protocol)."""
    manifest = load_manifest(shards)
    mhash = manifest_hash(manifest)
    split = opts.reference_split
    info = manifest["splits"][split]
    if tuple(images.shape[1:]) != (info["channels"], *info["image_size"]):
        raise BenchmarkError(f"generated images are {tuple(images.shape[1:])} (C, H, W) but the reference {shards} "
                             f"holds {(info['channels'], *info['image_size'])}; score against matching data")
    metrics: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    protocol: dict[str, Any] = {"num_samples": len(images), "precision": "fp32 (TF32 off)",
                                "reference": {"shards": str(shards), "split": split, "manifest_hash": mhash,
                                              "num_images": info["num_samples"]},
                                "extractors": {}}

    wanted_auditor = [m for m in (KEY_FD_AUDITOR, KEY_AUDIT) if m in opts.metrics]
    if wanted_auditor:
        if not info["label_histogram"]:
            for m in wanted_auditor:
                skipped[m] = f"the reference {shards} has no labels, so there is no auditor classifier"
        else:
            path = Path(opts.auditor) if opts.auditor else auditor_path(mhash)
            if not opts.auditor and not path.exists():
                train_auditor(shards, epochs=opts.auditor_epochs, progress=opts.progress)
            auditor, auditor_info = load_auditor(path)
            auditor.to(opts.device)
            protocol["extractors"]["auditor"] = {"sha256": sha256_file(path),
                                                 "val_accuracy": auditor_info.get("val_accuracy"),
                                                 "trained_on": auditor_info.get("manifest_hash")}
            gen = FeatureStatistics(auditor.num_features)
            predictions = []
            for batch in tqdm(list(_batches(images, opts.batch_size)), desc="auditor features", unit="batch",
                              disable=not opts.progress):
                with torch.no_grad():
                    feats, logits = auditor(batch.to(opts.device))
                gen.update(feats.float().cpu())
                predictions.append(logits.argmax(1).cpu())
            preds = torch.cat(predictions).numpy()
            if KEY_FD_AUDITOR in opts.metrics:
                key = _cache_key(manifest=mhash, split=split, extractor="auditor",
                                 weights=protocol["extractors"]["auditor"]["sha256"])
                ref = reference_statistics(auditor, shards, split, key, opts)
                metrics[KEY_FD_AUDITOR] = frechet_distance(gen.compute(), ref.compute())
            if KEY_AUDIT in opts.metrics:
                k = auditor.num_classes
                ref_hist = np.zeros(k, dtype=np.int64)
                ref_hist[:len(info["label_histogram"])] = info["label_histogram"]
                metrics[KEY_AUDIT] = audit(histogram(preds, k), ref_hist,
                                           requested=None if requested_labels is None else requested_labels.numpy(),
                                           predictions=preds)

    if KEY_FID in opts.metrics:
        try:
            weights = resolve_inception_weights(opts.inception_weights)
        except WeightsUnavailable as e:
            skipped[KEY_FID] = str(e)
        else:
            inception = InceptionFeatures(weights).to(opts.device)
            protocol["extractors"]["inception"] = {"name": inception.name, "weights_sha256": inception.weights_sha256,
                                                   "resize": INCEPTION_RESIZE}
            gen = FeatureStatistics(inception.num_features)
            for batch in tqdm(list(_batches(images, opts.batch_size)), desc="inception features", unit="batch",
                              disable=not opts.progress):
                gen.update(_features(inception, batch, opts.device))
            key = _cache_key(manifest=mhash, split=split, extractor=inception.name, weights=inception.weights_sha256,
                             resize=INCEPTION_RESIZE)
            ref = reference_statistics(inception, shards, split, key, opts)
            metrics[KEY_FID] = frechet_distance(gen.compute(), ref.compute())
    return metrics, skipped, protocol


def load_run_model(run_dir: Path, device: str = "cpu"):
    """The run's model class from its resolved config, with the EMA weights of ``last.ckpt``."""
    config_path, ckpt = run_dir / "config.yaml", run_dir / "checkpoints" / "last.ckpt"
    if not config_path.exists():
        raise BenchmarkError(f"{run_dir} has no config.yaml: not a genbench run directory (genbench fit writes one)")
    if not ckpt.exists():
        raise BenchmarkError(f"{ckpt} does not exist: the run has no checkpoint yet; train it with "
                             f"genbench fit --config {config_path}")
    config = yaml.safe_load(config_path.read_text())
    module, _, name = config["model"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    model = cls.load_from_checkpoint(str(ckpt), map_location=device)
    model.eval()
    return model, config


def benchmark_run(run_dir: str | os.PathLike, num_samples: Optional[int] = None, seed: Optional[int] = None,
                  results: Optional[str] = None, opts: Optional[ScoreOptions] = None,
                  metrics: Optional[str] = None) -> Path:
    """Sample ``num_samples`` images from the run's EMA weights, score them, write the record; returns its path."""
    run_dir = Path(run_dir)
    opts = opts or ScoreOptions()
    model, config = load_run_model(run_dir, opts.device)
    bench = config.get("benchmark", {})
    num_samples = num_samples or bench.get("num_samples", 50000)
    seed = bench.get("seed", 0) if seed is None else seed
    results = Path(results or bench.get("results", "results"))
    if metrics or bench.get("metrics"):
        opts.metrics = parse_metrics(metrics or bench["metrics"])
    if opts.inception_weights is None:
        opts.inception_weights = bench.get("inception_weights")
    opts.auditor_epochs = bench.get("auditor_epochs", opts.auditor_epochs)
    _check_writable(results)

    t0 = time.time()
    images = []
    for start in tqdm(range(0, num_samples, opts.batch_size), desc=f"sampling {run_dir.name}", unit="batch",
                      disable=not opts.progress):
        n = min(opts.batch_size, num_samples - start)
        images.append(model.sample(n, seed=seed, first_index=start))
    images = torch.cat(images)
    sampling_s = time.time() - t0
    requested = model.default_labels(num_samples) if model.conditional else None
    shards = config["data"]["init_args"]["shards"]
    scores, skipped, protocol = score(images, shards, opts, requested)
    protocol["seed"] = seed

    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    name = f"{run_dir.name}-n{num_samples}-s{seed}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    grid = save_png(_grid(images), results / "grids" / f"{name}.png", scale=max(1, 128 // images.shape[-1]))
    cost = model.cost()
    record = {
        "record_version": RECORD_VERSION,
        "name": name,
        "created": now(),
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "family": model.family,
        "conditional": model.conditional,
        "metrics": scores,
        "skipped": skipped,
        "protocol": {**protocol, "protocol_id": _cache_key(**{k: v for k, v in protocol.items()})},
        "provenance": {k: run_info.get(k) for k in ("config_hash", "git", "packages", "data", "seed", "hardware",
                                                    "world_size", "status")},
        "benchmark_environment": describe_environment(),
        "cost": {"parameters": cost["parameters"], "nfe": cost["nfe"], "bits_per_dim": cost["bits_per_dim"],
                 "sampling_images_per_s": round(num_samples / sampling_s, 2),
                 "device_hours": run_info.get("device_hours"), "images_seen": run_info.get("images_seen"),
                 "global_step": run_info.get("global_step")},
        "sample_grid": str(grid.relative_to(results)),
    }
    return write_new_json(results / f"{name}.json", record)


def _grid(images: torch.Tensor, n: int = 64) -> torch.Tensor:
    from torchvision.utils import make_grid

    return make_grid(images[:n], nrow=8, padding=1)


def _check_writable(results: Path) -> None:
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BenchmarkError(f"results directory {results} is not writable ({e}); pass --results DIR") from e
