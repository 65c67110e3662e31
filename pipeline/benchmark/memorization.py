"""The memorisation audit inside the benchmark: the searches over the ranks, their caches, and the evidence.

In each feature space the scorer has (always pixels; the auditor's features; Inception pool3 and DINOv2
when their weights are present), every generated image is compared with every training image
(``pipeline.metrics.neighbours``, chunked, split over the ranks). What depends only on the reference, its
features in each space, each training image's nearest other training image (AuthPct) and each held-out
image's neighbours (the "no copying" baseline), is computed once and cached under the reference's
content hash, like the reference statistics.

The headline ``copy_rate`` is the pixel space's, with a one-pixel shift tolerance: it is defined for
every row of a leaderboard whatever weights are installed, and it is the space where the threshold was
calibrated (docs/benchmark.md). Every space's figures are in the record under ``spaces``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch

from pipeline.benchmark.distributed import Placement
from pipeline.benchmark.images import ImageSource
from pipeline.benchmark.passes import cache_key, cached_collective, reference_features
from pipeline.metrics.extractors import FeatureExtractor, PixelExtractor
from pipeline.metrics.memorization import MemorizationSettings, memorization_metrics
from pipeline.metrics.neighbours import search, shift_tolerant_search

HEADLINE_SPACE = "pixels"


class MemorizationAudit:
    """Built once per reference (collective: every rank builds it), then ``score`` once per generated set."""

    def __init__(self, spaces: dict[str, FeatureExtractor], train: dict[str, torch.Tensor],
                 reference_hash: str, held_out: Optional[ImageSource], settings: MemorizationSettings,
                 batch_size: int, placement: Placement, device: str, show: bool = True) -> None:
        self.spaces, self.train, self.settings = spaces, train, settings
        self.placement, self.device = placement, device
        self.held_out_images = held_out
        self.held: dict[str, torch.Tensor] = {}
        self.held_found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.train_nearest: dict[str, torch.Tensor] = {}
        held_hash = None
        if held_out is not None:
            held_hash = getattr(held_out, "content_hash", None) or held_out.describe().get("hash")
            for name, extractor in spaces.items():
                self.held[name] = reference_features(held_out, str(held_hash), extractor, batch_size, placement, device,
                                                     keep_features=True, everywhere=True, show=show)["features"]
        for name, extractor in spaces.items():
            key = cache_key(neighbours_of=reference_hash, held_out=held_hash, extractor=name, k=settings.neighbours,
                            max_shift=settings.max_shift, **extractor.identity)
            cached = cached_collective(key, partial(self._reference_neighbours, name), placement)
            if placement.is_main:
                self.train_nearest[name] = cached["train_nearest"]
                if held_out is not None:
                    self.held_found[name] = (cached["held_distances"], cached["held_indices"])

    def describe(self) -> dict[str, Any]:
        """The audit's settings and spaces, for the record's protocol."""
        spaces = {name: self._distance(name) for name in self.spaces}
        held_out = None if self.held_out_images is None else self.held_out_images.describe()
        return {**self.settings.as_dict(), "headline_space": HEADLINE_SPACE, "spaces": spaces, "held_out": held_out}

    def _distance(self, name: str) -> str:
        if name == HEADLINE_SPACE and self.settings.max_shift:
            return f"l2 on pixels in [0, 1], the smallest over shifts of up to {self.settings.max_shift} px"
        return f"l2 on {name} features"

    def _search(self, name: str, queries: torch.Tensor, k: int, exclude_self: bool = False):
        p = self.placement
        extractor = self.spaces[name]
        if isinstance(extractor, PixelExtractor) and self.settings.max_shift:
            return shift_tolerant_search(queries, self.train[name], extractor.shape, k, self.settings.max_shift,
                                         exclude_self, p.rank, p.world_size, self.device)
        return search(queries, self.train[name], k, exclude_self, p.rank, p.world_size, self.device)

    def _reference_neighbours(self, name: str) -> dict[str, torch.Tensor]:
        out = {"train_nearest": self._search(name, self.train[name], 1, exclude_self=True)[0][:, 0]}
        if name in self.held:
            out["held_distances"], out["held_indices"] = self._search(name, self.held[name], self.settings.neighbours)
        return out

    def score(self, generated: dict[str, dict], evidence: Optional[dict] = None) -> dict[str, Any]:
        """The record's ``memorization`` entry on rank 0 (an empty dict elsewhere); collective. ``evidence``
        receives the closest generated/training pairs of the headline space as images, for the grid."""
        results: dict[str, Any] = {}
        for name in self.spaces:
            g = generated[name]["features"]
            found = self._search(name, g, self.settings.neighbours)
            if not self.placement.is_main:
                continue
            held = self.held_found.get(name)
            features = {"train": self.train[name], "generated": g}
            if held is not None:
                features["held_out"] = self.held[name]
            results[name] = {"distance": self._distance(name), **memorization_metrics(
                found, self.train_nearest[name], held, features, self.settings)}
        if not self.placement.is_main:
            return {}
        headline = results[HEADLINE_SPACE]
        if evidence is not None:
            shape = self.spaces[HEADLINE_SPACE].shape  # type: ignore[attr-defined]
            pairs = headline["closest_pairs"]
            images = [row.view(*shape) for p in pairs
                      for row in (generated[HEADLINE_SPACE]["features"][p["generated"]],
                                  self.train[HEADLINE_SPACE][p["train"]])]
            evidence.update(images=torch.stack(images) if images else None, pairs=pairs)
        return {"copy_rate": headline["copy_rate"], "authpct": headline["authpct"],
                "ct_score": headline.get("ct_score"), "space": HEADLINE_SPACE, "spaces": results}
