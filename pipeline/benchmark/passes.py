"""Passes of image sets through feature extractors, split over the ranks, and the cache of what a reference
set leaves in each feature space (keyed by its content hash, the extractor and every setting that changes
the features, so a changed shard or setting never reuses a stale cache).

Each rank extracts features of its share of the images; the accumulators in
``pipeline.metrics.accumulators`` combine the shares exactly, so one process and N processes give the
same numbers.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Callable, Optional

import torch

from pipeline.benchmark.distributed import Placement, barrier, broadcast
from pipeline.benchmark.images import ImageSource
from pipeline.console import progress
from pipeline.io import atomic_write_bytes, cache_dir
from pipeline.metrics.accumulators import FeatureBank, FeatureStatistics
from pipeline.metrics.extractors import FeatureExtractor


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class FeatureSet:
    """What one image set leaves in one extractor's feature space, accumulated across ranks: Fréchet
    statistics (when the extractor has them), and as asked every feature vector, the extractor's logits
    or predicted classes (with per-class statistics), and the class each image was requested as."""

    def __init__(self, extractor: FeatureExtractor, device: str, keep_features: bool = False,
                 keep_logits: bool = False, num_classes: int = 0, keep_requested: bool = False) -> None:
        n = extractor.num_features
        self.stats = FeatureStatistics(n).to(device) if extractor.statistics else None
        self.features = FeatureBank((n,), dtype=extractor.feature_dtype).to(device) if keep_features else None
        self.logits = FeatureBank((extractor.num_logits,)).to(device) if keep_logits else None
        self.per_class = [FeatureStatistics(n).to(device) for _ in range(num_classes)]
        self.classes = FeatureBank(dtype=torch.long).to(device) if num_classes else None
        self.requested = FeatureBank(dtype=torch.long).to(device) if keep_requested else None

    def update(self, index: torch.Tensor, features: torch.Tensor, extra: Optional[torch.Tensor] = None,
               requested: Optional[torch.Tensor] = None) -> None:
        """``extra``: the extractor's second output, logits or predicted classes, when this set keeps them."""
        index = index.to(features.device)
        if self.stats is not None:
            self.stats.update(features)
        if self.features is not None:
            self.features.update(features, index)
        if self.logits is not None:
            assert extra is not None, "this feature set keeps logits: pass them"
            self.logits.update(extra, index)
        if self.classes is not None:
            assert extra is not None, "this feature set keeps classes: pass them"
            classes = extra.to(features.device)
            self.classes.update(classes, index)
            for c in classes.unique().tolist():
                if 0 <= c < len(self.per_class):
                    self.per_class[c].update(features[classes == c])
        if self.requested is not None and requested is not None:
            self.requested.update(requested.to(features.device), index)

    def finalize(self) -> dict[str, Any]:
        """Synchronise over the ranks (collective: every rank calls it) and return plain tensors; every rank
        gets the gathered vectors."""
        out: dict[str, Any] = {"stats": None if self.stats is None else _as_tensors(self.stats.compute())}
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


def feature_pass(source: ImageSource, extract: Callable, sink: Callable, batch_size: int, placement: Placement,
                 device: str, desc: str, show: bool = True) -> None:
    """Every batch of this rank's share through ``extract``, then ``sink(batch, extracted)``."""
    # counted in images, which every source knows exactly (a count of batches does not survive a source that
    # hands its network batches over in pieces); other ranks are assumed to keep pace with rank 0
    bar = progress(source.num_images, desc, "img", enabled=show and placement.is_main)
    for batch in source.batches(batch_size, placement.rank, placement.world_size):
        sink(batch, extract(batch.images.to(device, non_blocking=True)))
        bar.update(min(len(batch.index) * placement.world_size, source.num_images - bar.n))
    bar.close()


def cached_collective(key: str, compute: Callable[[], Any], placement: Placement, everywhere: bool = False) -> Any:
    """``compute()`` (collective: every rank runs it) unless rank 0 finds ``key`` in the cache. Only rank 0 reads
    and writes the cache; the decision to recompute is its too (broadcast), so every rank joins the same
    collective computation. ``everywhere``: other ranks need a cached value too (it is broadcast to them);
    otherwise they get None when it came from the cache."""
    path = cache_dir() / "reference-stats" / f"{key}.pt"
    cached = None
    if placement.is_main:
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):
            cached = None  # absent or damaged cache: recompute
    if broadcast(cached is not None, placement):
        return broadcast(cached, placement) if everywhere else cached
    result = compute()
    if placement.is_main:
        buf = io.BytesIO()
        torch.save(result, buf)
        atomic_write_bytes(path, buf.getvalue())
    barrier(placement)
    return result


def reference_features(reference: ImageSource, content_hash: str, extractor: FeatureExtractor, batch_size: int,
                       placement: Placement, device: str, with_classes: bool = False, keep_features: bool = False,
                       everywhere: bool = False, show: bool = True) -> dict:
    """The reference's finalized FeatureSet in one extractor's space, from the cache or from one pass split
    over the ranks. ``with_classes``: per-class statistics under the reference's own labels;
    ``keep_features``: every vector, not only the statistics; ``everywhere``: every rank gets the result
    (the memorisation search runs on all of them), not only rank 0, which computes the metrics."""
    keep_features = keep_features or extractor.keep_features
    key = cache_key(reference=content_hash, extractor=extractor.name, kept=keep_features, classes=with_classes,
                    **extractor.identity)

    def compute() -> dict:
        fs = FeatureSet(extractor, device, keep_features=keep_features,
                        num_classes=extractor.num_classes if with_classes else 0)

        def sink(batch, out):
            fs.update(batch.index, out[0], extra=batch.labels if with_classes else None)

        feature_pass(reference, extractor, sink, batch_size, placement, device,
                     f"reference features ({extractor.name})", show)
        return fs.finalize()

    return cached_collective(key, compute, placement, everywhere) or {}
