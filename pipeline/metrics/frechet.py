"""FD-infinity (Chong & Forsyth 2020, "Effectively unbiased FID and Inception Score and where to find them"):
the Fréchet distance extrapolated to infinitely many generated images.

A Fréchet distance estimated from N samples is biased upward by a term that falls like 1/N, so rows
scored on different N are not comparable (the 180-image held-out floor against 1,000-sample models). FD at
several subset sizes, fitted linearly in 1/N, gives the intercept at 1/N = 0. The subset sizes, 15 points
from max(N/10, 2) (at most 5,000) to N drawn without replacement, are dgm-eval's; the draws are seeded.

Every subset is compared with the same reference Gaussian, so its covariance's square root is taken once
(a symmetric eigendecomposition) and each subset costs one more symmetric eigenvalue problem:
tr sqrt(S_r S_g) = tr sqrt(S_r^1/2 S_g S_r^1/2), the latter symmetric positive semi-definite.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

FD_INF_POINTS = 15
FD_INF_SEED = 0


class FrechetReference:
    """Fréchet distances from many Gaussians to one reference Gaussian {mu, sigma}."""

    def __init__(self, stats: dict[str, Any]) -> None:
        self.mu = np.asarray(stats["mu"], np.float64)
        sigma = np.asarray(stats["sigma"], np.float64)
        w, v = np.linalg.eigh((sigma + sigma.T) / 2)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        self.trace = float(np.trace(sigma))

    def distance(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        inner = self.root @ sigma @ self.root
        eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
        diff = mu - self.mu
        return float(diff @ diff + np.trace(sigma) + self.trace - 2 * np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def subset_sizes(n: int, num_points: int = FD_INF_POINTS) -> np.ndarray:
    """dgm-eval's subset sizes for FD-infinity: evenly spaced from max(n // 10, 2) (at most 5,000) to n."""
    return np.linspace(min(5000, max(n // 10, 2)), n, num_points).astype(np.int64)


def fd_infinity(features: torch.Tensor, reference: dict[str, Any], num_points: int = FD_INF_POINTS,
                seed: int = FD_INF_SEED) -> float:
    """FD-infinity of generated ``features`` (N x d) against the reference statistics {mu, sigma}."""
    n = len(features)
    if n < 4:
        raise ValueError(f"FD-infinity fits a line through FDs of subsets: it needs at least 4 samples, got {n}")
    x = features.double().cpu().numpy()
    sizes = subset_sizes(n, num_points)
    if sizes[0] < x.shape[1]:
        # below the feature dimension a sample covariance is singular and the FD far from linear in 1/N: the
        # line through such points extrapolates to a number that is off by tens of percent (measured in
        # docs/benchmark.md), so none is given
        raise ValueError(f"FD-infinity extrapolates from subsets of {sizes[0]} to {n} samples, and the smallest "
                         f"is below the {x.shape[1]} feature dimensions; it needs at least {10 * x.shape[1]:,} "
                         "samples in this space")
    ref = FrechetReference(reference)
    rng = np.random.default_rng(seed)
    fds = []
    for size in sizes:
        subset = x[rng.choice(n, int(size), replace=False)]
        fds.append(ref.distance(subset.mean(0), np.atleast_2d(np.cov(subset, rowvar=False))))
    _, intercept = np.polyfit(1.0 / sizes, np.asarray(fds), 1)
    return float(intercept)
