"""Feature accumulators that work the same on one process and across the ranks of a DDP job.

Both are torchmetrics ``Metric`` objects, so ``compute()`` synchronises them over the ranks:
``FeatureStatistics`` all-reduces float64 sums (FID needs only the mean and covariance, so no rank
ever holds all the features), ``FeatureBank`` gathers the feature vectors that KID, IS and
precision/recall need, ordered by sample index so that the result does not depend on which rank
computed which sample.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


class FeatureStatistics(Metric):
    """Running sum, sum of outer products and count of feature vectors, in float64."""

    full_state_update = False
    # the states add_state registers (declared so a type checker knows them)
    feature_sum: torch.Tensor
    outer_sum: torch.Tensor
    count: torch.Tensor

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

    def compute(self) -> dict[str, Any]:
        """Mean and unbiased covariance (as ``np.cov``), the statistics torch-fidelity's FID takes."""
        n = int(self.count)
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {n}")
        mu = self.feature_sum / n
        sigma = (self.outer_sum - n * torch.outer(mu, mu)) / (n - 1)
        return {"mu": mu.cpu().numpy(), "sigma": sigma.cpu().numpy(), "count": n}

    def compute_or_none(self) -> Optional[dict[str, Any]]:
        """Like ``compute`` (and as collective), but None for fewer than 2 vectors: a class seen once."""
        with warnings.catch_warnings():  # a rank that saw no vector of a class is normal here
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            try:
                return self.compute()
            except ValueError:
                return None


class FeatureBank(Metric):
    """Every feature vector with its global sample index; ``compute()`` returns them in index order.

    Args:
        row_shape, dtype: of one row, so that a rank that saw no rows still joins the gather (with none).
    """

    full_state_update = False
    features: list[torch.Tensor] | torch.Tensor  # a list while updating, one tensor after a DDP sync
    index: list[torch.Tensor] | torch.Tensor

    def __init__(self, row_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.row_shape, self.row_dtype = tuple(row_shape), dtype
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def join_if_empty(self) -> None:
        """torchmetrics gathers a list state only on the ranks where it has an element: a rank that saw no
        rows would skip the collective the others wait in. It joins with zero rows instead."""
        if isinstance(self.features, list) and not self.features:
            self.update(torch.empty((0, *self.row_shape), dtype=self.row_dtype, device=self.device),
                        torch.empty(0, dtype=torch.long, device=self.device))

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        if len(features) != len(index):
            raise ValueError(f"{len(features)} feature rows but {len(index)} indices")
        assert isinstance(self.features, list) and isinstance(self.index, list), "update after compute"
        self.features.append(features.detach())
        self.index.append(index.to(torch.long))

    def compute(self) -> torch.Tensor:
        if isinstance(self.features, list) and not self.features:  # after a DDP sync the states are tensors
            raise ValueError("no features were added")
        features, index = dim_zero_cat(self.features), dim_zero_cat(self.index)
        return features[torch.argsort(index, stable=True)]
