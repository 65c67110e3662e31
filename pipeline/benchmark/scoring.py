"""Score a set of images against a reference: Inception metrics (FID, IS, KID, precision/recall) and
the auditor metrics (fd_auditor, bias audit), from one pass over the images.

Each rank extracts features of its share of the images; the accumulators in
``pipeline.metrics.accumulators`` combine the shares exactly, so one process and N processes give
the same numbers. The reference pass is cached under the reference's content hash, the extractor,
its weights and the precision, so a changed shard or setting never reuses a stale cache.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.benchmark.distributed import Placement, barrier, broadcast
from pipeline.benchmark.images import ImageSource, Reference, ShardImages
from pipeline.console import progress
from pipeline.io import atomic_write_bytes, cache_dir
from pipeline.metrics import (
    AUDIT,
    AUDITOR_METRICS,
    FD_AUDITOR,
    FID,
    INCEPTION_METRICS,
    IS,
    KEY_AUDIT,
    KEY_FD_AUDITOR,
    KEY_FID,
    KID,
    PR,
    SELECTABLE,
)
from pipeline.metrics.accumulators import FeatureBank, FeatureStatistics
from pipeline.metrics.auditor import auditor_path, train_auditor
from pipeline.metrics.bias import audit, histogram, per_class_fd
from pipeline.metrics.extractors import EXTRACTORS, AuditorExtractor, FeatureExtractor
from pipeline.metrics.features import WeightsUnavailable, resolve_inception_weights
from pipeline.metrics.fidelity import (
    RNG_SEED,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


class BenchmarkError(RuntimeError):
    """A run or input that cannot be benchmarked, with the reason and the fix."""


@dataclass
class ScoreOptions:
    """How images are scored; every setting that changes a number is recorded in the protocol."""

    metrics: tuple[str, ...] = SELECTABLE
    batch_size: int = 250
    inception_weights: Optional[str] = None
    auditor: Optional[str] = None
    auditor_epochs: int = 10
    allow_tf32: bool = False
    is_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_neighborhood: int = 3
    progress: bool = True
    device: Optional[str] = None  # default: the placement's device (cuda:LOCAL_RANK, else cpu)


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in SELECTABLE]
    if unknown or not names:
        raise BenchmarkError(f"--metrics {text!r}: unknown {unknown}; choose from {','.join(SELECTABLE)}")
    return names


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class FeatureSet:
    """What one image set leaves in one extractor's feature space, accumulated across ranks."""

    def __init__(self, num_features: int, device: str, keep_features: bool = False, num_logits: int = 0,
                 num_classes: int = 0, keep_requested: bool = False) -> None:
        self.stats = FeatureStatistics(num_features).to(device)
        self.features = FeatureBank((num_features,)).to(device) if keep_features else None
        self.logits = FeatureBank((num_logits,)).to(device) if num_logits else None
        self.per_class = [FeatureStatistics(num_features).to(device) for _ in range(num_classes)]
        self.classes = FeatureBank(dtype=torch.long).to(device) if num_classes else None
        self.requested = FeatureBank(dtype=torch.long).to(device) if keep_requested else None

    def update(self, index: torch.Tensor, features: torch.Tensor, logits: Optional[torch.Tensor] = None,
               classes: Optional[torch.Tensor] = None, requested: Optional[torch.Tensor] = None) -> None:
        index = index.to(features.device)
        self.stats.update(features)
        if self.features is not None:
            self.features.update(features, index)
        if self.logits is not None:
            assert logits is not None, "this feature set keeps logits: pass them"
            self.logits.update(logits, index)
        if self.classes is not None:
            assert classes is not None, "this feature set keeps classes: pass them"
            classes = classes.to(features.device)
            self.classes.update(classes, index)
            for c in classes.unique().tolist():
                if 0 <= c < len(self.per_class):
                    self.per_class[c].update(features[classes == c])
        if self.requested is not None and requested is not None:
            self.requested.update(requested.to(features.device), index)

    def finalize(self) -> dict[str, Any]:
        """Synchronise over the ranks (collective: every rank calls it) and return plain tensors."""
        out: dict[str, Any] = {"stats": _as_tensors(self.stats.compute())}
        for name in ("features", "logits", "classes", "requested"):
            bank = getattr(self, name)
            if bank is None or not _any_rank_has(bank):
                out[name] = None
                continue
            bank.join_if_empty()
            out[name] = bank.compute().cpu()
        out["per_class"] = [_as_tensors(s.compute_or_none()) for s in self.per_class]
        return out


def _any_rank_has(bank: FeatureBank) -> bool:
    count = torch.tensor([len(bank.features)], device=bank.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
    return bool(count.item())


def _as_tensors(stats: Optional[dict]) -> Optional[dict]:
    if stats is None:
        return None
    return {"mu": torch.as_tensor(stats["mu"]), "sigma": torch.as_tensor(stats["sigma"]), "count": stats["count"]}


def _pass(source, extract, sink, opts: ScoreOptions, placement: Placement, device: str, desc: str) -> None:
    # counted in images, which every source knows exactly (a count of batches does not survive a source that
    # hands its network batches over in pieces); other ranks are assumed to keep pace with rank 0
    bar = progress(source.num_images, desc, "img", enabled=opts.progress and placement.is_main)
    for batch in source.batches(opts.batch_size, placement.rank, placement.world_size):
        sink(batch, extract(batch.images.to(device, non_blocking=True)))
        bar.update(min(len(batch.index) * placement.world_size, source.num_images - bar.n))
    bar.close()


def _reference_features(reference: Reference, extractor: FeatureExtractor, key: str, opts: ScoreOptions,
                        placement: Placement, device: str, with_classes: bool) -> dict:
    """The reference's finalized FeatureSet for one extractor, from the cache or from one pass split over
    the ranks. Only rank 0 computes metrics, so only rank 0 reads the cache; the decision to recompute
    is its too (broadcast), so that every rank joins the same collective pass. ``with_classes``: keep
    per-class statistics under the reference's own labels."""
    path = cache_dir() / "reference-stats" / f"{key}.pt"
    cached = None
    if placement.is_main:
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):
            cached = None  # absent or damaged cache: recompute
    if broadcast(cached is not None, placement):
        return cached if cached is not None else {}  # only rank 0 reads the cache and computes metrics
    fs = FeatureSet(extractor.num_features, device, keep_features=extractor.keep_features,
                    num_classes=extractor.num_classes if with_classes else 0)

    def sink(batch, out):
        fs.update(batch.index, out[0], classes=batch.labels if with_classes else None)

    _pass(reference, extractor, sink, opts, placement, device, f"reference features ({extractor.name})")
    result = fs.finalize()
    if placement.is_main:
        buf = io.BytesIO()
        torch.save(result, buf)
        atomic_write_bytes(path, buf.getvalue())
    barrier(placement)
    return result


class Scorer:
    """Scores image sets against one reference. The extractors are loaded and the reference features
    computed (or read from the cache) once, here; each ``score`` call is then one pass over a
    generated set, so ``--repeats`` and the reference rows do not redo that work. Every rank builds
    it and calls ``score`` (both are collective)."""

    def __init__(self, reference: Reference, opts: ScoreOptions, placement: Placement,
                 image_shape: tuple[int, ...]) -> None:
        self.reference, self.opts, self.placement = reference, opts, placement
        self.device = opts.device or placement.device
        self.wanted = set(opts.metrics)
        self.skipped: dict[str, str] = {}
        self.inception = None
        if self.wanted & set(INCEPTION_METRICS):
            try:
                self.inception = EXTRACTORS["inception"](resolve_inception_weights(opts.inception_weights),
                                                         self.device, opts.allow_tf32)
            except WeightsUnavailable as e:
                self.skipped.update({m: str(e) for m in INCEPTION_METRICS if m in self.wanted})
        self.auditor = None
        if self.wanted & set(AUDITOR_METRICS):
            self.auditor, reason = _auditor(image_shape, reference, opts, placement, self.device)
            if reason:
                self.skipped.update({m: reason for m in AUDITOR_METRICS if m in self.wanted})
        self.labelled_reference = reference.label_histogram is not None
        self.ref_sets: dict[str, dict] = {}
        for extractor in (self.inception, self.auditor):
            if extractor is None:
                continue
            key = cache_key(reference=reference.content_hash, extractor=extractor.name, **extractor.identity)
            self.ref_sets[extractor.name] = _reference_features(
                reference, extractor, key, opts, placement, self.device,
                with_classes=bool(extractor.num_classes) and self.labelled_reference)

    def score(self, generated: ImageSource, preview: Optional[list] = None) -> tuple[dict, dict, dict]:
        """(metrics, skipped, protocol) of one image source on rank 0 (other ranks get empty metrics).
        ``preview`` collects the first 64 generated images this rank sees, for the sample grid."""
        opts, placement, wanted = self.opts, self.placement, self.wanted
        inception, auditor = self.inception, self.auditor
        metrics: dict[str, Any] = {}
        skipped = dict(self.skipped)
        protocol: dict[str, Any] = {"num_samples": generated.num_images, "reference": self.reference.describe(),
                                    "extractors": {}, "world_size": placement.world_size}
        if inception is not None:
            protocol["extractors"]["inception"] = inception.identity
            protocol["settings"] = {
                "is_splits": opts.is_splits, "kid_subsets": opts.kid_subsets,
                "kid_subset_size": min(opts.kid_subset_size, generated.num_images, self.reference.num_images),
                "pr_neighborhood": opts.pr_neighborhood, "rng_seed": RNG_SEED}
        if auditor is not None:
            protocol["extractors"]["auditor"] = auditor.identity

        # one pass over the generated images through every extractor
        gen_inception = None if inception is None else FeatureSet(
            inception.num_features, self.device, keep_features=bool(wanted & {KID, PR}),
            num_logits=inception.num_logits if IS in wanted else 0)
        gen_auditor = None if auditor is None else FeatureSet(
            auditor.num_features, self.device, num_classes=auditor.num_classes, keep_requested=True)

        def extract(images):
            return (inception(images) if inception else None, auditor(images) if auditor else None)

        def sink(batch, out):
            if preview is not None and sum(len(p) for p in preview) < 64:
                preview.append(batch.images[:64 - sum(len(p) for p in preview)])
            if gen_inception is not None:
                gen_inception.update(batch.index, out[0][0], logits=out[0][1])
            if gen_auditor is not None:
                gen_auditor.update(batch.index, out[1][0], classes=out[1][1], requested=batch.labels)

        if inception is not None or auditor is not None:
            _pass(generated, extract, sink, opts, placement, self.device, "generated images")
        gen_sets = {name: fs.finalize() for name, fs in (("inception", gen_inception), ("auditor", gen_auditor))
                    if fs is not None}
        if not placement.is_main:
            return {}, skipped, protocol

        if inception is not None:
            metrics.update(_inception_metrics(gen_sets["inception"], self.ref_sets["inception"], wanted, opts,
                                              protocol["settings"], skipped))
        if auditor is not None:
            metrics.update(self._auditor_metrics(gen_sets["auditor"], self.ref_sets["auditor"]))
        return metrics, skipped, protocol

    def _auditor_metrics(self, g: dict, r: dict) -> dict:
        out: dict[str, Any] = {}
        auditor, reference = self.auditor, self.reference
        assert auditor is not None
        if FD_AUDITOR in self.wanted:
            out[KEY_FD_AUDITOR] = frechet_distance(g["stats"], r["stats"])
        if AUDIT in self.wanted:
            predictions = g["classes"].numpy()
            requested = None if g["requested"] is None else g["requested"].numpy()
            ref_hist = None
            if reference.label_histogram is not None:
                missing = auditor.num_classes - len(reference.label_histogram)
                ref_hist = list(reference.label_histogram) + [0] * missing
            result = audit(histogram(predictions, auditor.num_classes), ref_hist, requested=requested,
                           predictions=predictions, class_names=auditor.class_names)
            if self.labelled_reference:
                result["per_class_fd"] = per_class_fd(g["per_class"], r["per_class"], auditor.class_names)
            out[KEY_AUDIT] = result
        return out


def _inception_metrics(g: dict, r: dict, wanted: set, opts: ScoreOptions, settings: dict, skipped: dict) -> dict:
    out: dict[str, float] = {}
    if FID in wanted:
        out[KEY_FID] = frechet_distance(g["stats"], r["stats"])
    try_metrics = []
    if IS in wanted:
        try_metrics.append((IS, lambda: inception_score(g["logits"], opts.is_splits)))
    if KID in wanted:
        try_metrics.append((KID, lambda: kernel_inception_distance(g["features"], r["features"], opts.kid_subsets,
                                                                   settings["kid_subset_size"])))
    if PR in wanted:
        device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try_metrics.append((PR, lambda: precision_recall(g["features"].to(device), r["features"].to(device),
                                                         opts.pr_neighborhood)))
    for name, fn in try_metrics:
        try:
            out.update(fn())
        except ValueError as e:  # too few samples for the protocol: say so, never a made-up number
            skipped[name] = str(e)
    return out


def _auditor(image_shape: tuple[int, ...], reference: Reference, opts: ScoreOptions, placement: Placement, device: str):
    """(AuditorExtractor, None), or (None, the reason the auditor metrics are skipped)."""
    if opts.auditor:
        path = Path(opts.auditor)
    elif reference.label_histogram is None or not isinstance(reference, ShardImages):  # labels come from shards
        return None, (f"the reference {reference.describe()['path']} has no labels to train an auditor on; pass "
                      "--auditor CKPT (genbench train-auditor) or score against a labelled shard directory")
    else:
        manifest_hash = reference.content_hash.split(":")[0]
        path = auditor_path(manifest_hash)
        if not broadcast(path.exists(), placement):
            # One process trains it (a single-process Trainer, whatever the launcher); the others wait for it.
            if placement.is_main:
                train_auditor(reference.shards, epochs=opts.auditor_epochs, progress=opts.progress)
            barrier(placement)
    auditor = EXTRACTORS["auditor"](path, device)
    assert isinstance(auditor, AuditorExtractor)
    for what, shape in (("generated images", image_shape), ("reference", reference.shape)):
        if tuple(shape) != auditor.shape:
            return None, (f"the auditor classifies {auditor.shape} (C, H, W) images but the {what} are "
                          f"{tuple(shape)}; use an auditor trained on data of that size")
    return auditor, None
