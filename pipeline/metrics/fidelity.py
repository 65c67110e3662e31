"""Fréchet distance from float64 running feature statistics, summed across DDP ranks.

Pure functions of features: nothing here knows about models or images. ``FeatureStatistics`` is a
torchmetrics ``Metric`` so its sums are all-reduced over the ranks of a DDP job (no rank ever holds
all the features), and the distance itself is torch-fidelity's ``fid_statistics_to_metric``, so a
number here is torch-fidelity's number for the same statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torchmetrics import Metric

from pipeline.io import atomic_write_bytes


class FeatureStatistics(Metric):
    """Running sum, sum of outer products and count of feature vectors, in float64."""

    full_state_update = False

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.add_state("feature_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer_sum", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected N x {self.num_features} features, got {tuple(features.shape)}")
        f = features.to(torch.float64)
        self.feature_sum += f.sum(0)
        self.outer_sum += f.T @ f
        self.count += f.shape[0]

    def compute(self) -> dict[str, np.ndarray]:
        """Mean and unbiased covariance (as ``np.cov``), the statistics torch-fidelity's FID takes."""
        n = int(self.count)
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {n}")
        mu = self.feature_sum / n
        sigma = (self.outer_sum - n * torch.outer(mu, mu)) / (n - 1)
        return {"mu": mu.cpu().numpy(), "sigma": sigma.cpu().numpy(), "count": n}

    # -- cache of reference statistics -----------------------------------------------------------
    def save(self, path: Path) -> None:
        import io

        buf = io.BytesIO()
        torch.save({"feature_sum": self.feature_sum.cpu(), "outer_sum": self.outer_sum.cpu(),
                    "count": self.count.cpu()}, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path, num_features: int) -> Optional["FeatureStatistics"]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError):
            return None  # absent or damaged cache: recompute
        stats = cls(num_features)
        if state["feature_sum"].shape != (num_features,):
            return None
        stats.feature_sum, stats.outer_sum, stats.count = state["feature_sum"], state["outer_sum"], state["count"]
        stats._update_count = 1  # restored sums count as updated (torchmetrics warns on compute() otherwise)
        return stats


def frechet_distance(stats_a: dict, stats_b: dict) -> float:
    """Fréchet distance between two Gaussians given as {mu, sigma}, by torch-fidelity's formula."""
    a = {"mu": np.asarray(stats_a["mu"], np.float64), "sigma": np.asarray(stats_a["sigma"], np.float64)}
    b = {"mu": np.asarray(stats_b["mu"], np.float64), "sigma": np.asarray(stats_b["sigma"], np.float64)}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])
