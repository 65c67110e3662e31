"""The memorisation audit: does a generator copy its training images?

Three views of the same nearest-neighbour search (generated -> training), in each feature space:

* ``copy_rate`` (Carlini et al. 2023, "Extracting training data from diffusion models", sec. 4): a
  generated image is a near-copy when its nearest training image is much closer than its other
  neighbours: ``d_1 / (alpha * mean(d_1..d_n)) < threshold``. Normalising by the local neighbourhood is
  what makes one threshold work in dense and sparse regions alike. Defaults and their calibration are in
  docs/benchmark.md.
* ``authpct`` (Alaa et al. 2022, as dgm-eval computes it): the percentage of generated images farther
  from their nearest training image than that image is from its own nearest training neighbour.
* ``ct_score`` (Meehan et al. 2020, the C_T data-copying test, as dgm-eval runs it): per cell of a
  k-means partition of the training set, a z-scored Mann-Whitney U test of the generated images'
  distances to the training set against those of held-out images; the cells' weighted mean.
  Strongly negative: generated images sit closer to the training set than fresh data does (copying);
  near 0: as close as fresh data; positive: farther (underfitting).

FID-style metrics cannot see copying: a model that returns its training set scores a perfect FID.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch

from pipeline.metrics.neighbours import nearest_neighbours


@dataclass(frozen=True)
class MemorizationSettings:
    """Every setting that changes a memorisation figure; recorded in the protocol."""

    alpha: float = 0.5  # Carlini's alpha
    neighbours: int = 50  # Carlini's n: the neighbourhood the nearest distance is normalised by
    threshold: float = 0.6  # near-copy below this normalised distance (calibrated on digits: docs/benchmark.md)
    max_shift: int = 1  # pixel space: the distance is the smallest over shifts of up to this many pixels
    ct_cells: int = 3  # dgm-eval's k-means cells for C_T
    ct_min_generated: int = 20  # a cell enters C_T with more than this many generated images (dgm-eval: tau = 20/m)
    ct_pca_components: int = 64  # dgm-eval projects features to 64 PCA components before C_T
    closest_pairs: int = 8  # closest generated/training pairs kept in the record and shown as a grid
    seed: int = 0  # k-means and PCA initialisation

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


QUANTILES = (0.01, 0.05, 0.5, 0.95)


def copy_scores(distances: torch.Tensor, alpha: float, neighbours: int) -> torch.Tensor:
    """Carlini's normalised distance per row of ascending neighbour distances (N x >= n): the nearest over
    alpha times the mean of the n nearest. A row whose n nearest are all at distance 0 (a copy of an image
    the training set holds n times) scores 0."""
    mean = distances[:, :neighbours].double().mean(1)
    nearest = distances[:, 0].double()
    return torch.where(mean > 0, nearest / (alpha * mean.clamp_min(1e-300)), torch.zeros_like(mean))


def quantiles(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {f"p{round(p * 100):02d}": float(v) for p, v in zip(QUANTILES, q)}


def authpct(nearest: torch.Tensor, nearest_index: torch.Tensor, train_nearest: torch.Tensor) -> float:
    """dgm-eval's AuthPct: 100 x the fraction of generated images whose nearest training image ``j`` has
    its own nearest training neighbour closer than the generated image is (``train_nearest[j] < nearest``)."""
    return float(100.0 * (train_nearest[nearest_index] < nearest).double().mean())


def mann_whitney_z(generated: np.ndarray, held_out: np.ndarray) -> float:
    """Meehan's Z_U: the Mann-Whitney U of the generated distances against the held-out ones (the count of
    pairs where the generated distance is the larger, ties half), z-scored under H0 with dgm-eval's
    continuity correction."""
    from scipy.stats import mannwhitneyu

    m, n = len(generated), len(held_out)
    u = mannwhitneyu(generated, held_out, alternative="less").statistic
    return float((u - (n * m / 2 - 0.5)) / np.sqrt(n * m * (n + m + 1) / 12))


def ct_score(train: torch.Tensor, held_out: torch.Tensor, generated: torch.Tensor,
             settings: MemorizationSettings) -> dict[str, Any]:
    """Meehan's C_T as dgm-eval runs it: PCA to 64 components when the space is larger, k-means cells on
    the training set, in each cell the distances of held-out and generated images to the cell's training
    images, and the Z_U of each cell with more than ``ct_min_generated`` generated images, weighted by
    the cell's share of held-out images. Raises ValueError when no cell qualifies or a cell has no
    held-out image (too few images for the test: the reason is recorded instead of a number)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    t, p, q = (as_numpy(x) for x in (train, held_out, generated))
    if t.shape[1] > settings.ct_pca_components:
        pca = PCA(n_components=settings.ct_pca_components, random_state=settings.seed).fit(t)
        t, p, q = pca.transform(t), pca.transform(p), pca.transform(q)
    kmeans = KMeans(n_clusters=settings.ct_cells, n_init=10, random_state=settings.seed).fit(t)
    t_cells, p_cells, q_cells = kmeans.labels_, kmeans.predict(p), kmeans.predict(q)
    cells = []
    for c in range(settings.ct_cells):
        tc, pc, qc = (torch.from_numpy(np.ascontiguousarray(x[cells_of == c], dtype=np.float32))
                      for x, cells_of in ((t, t_cells), (p, p_cells), (q, q_cells)))
        if len(pc) == 0:
            raise ValueError(f"C_T cell {c} holds no held-out image ({len(p)} in all); C_T needs more held-out "
                             "images or fewer cells")
        cell: dict[str, Any] = {"train": len(tc), "held_out": len(pc), "generated": len(qc), "z_u": None,
                                "included": len(qc) > settings.ct_min_generated}
        if cell["included"]:
            lq = nearest_neighbours(qc, tc, 1)[0][:, 0].numpy()
            lp = nearest_neighbours(pc, tc, 1)[0][:, 0].numpy()
            cell["z_u"] = mann_whitney_z(lq, lp)
        cells.append(cell)
    used = [c for c in cells if c["included"]]
    if not used:
        raise ValueError(f"no C_T cell holds more than {settings.ct_min_generated} of the {len(q)} generated "
                         "images; score more images")
    weights = np.array([c["held_out"] for c in used], dtype=np.float64)
    score = float(weights @ np.array([c["z_u"] for c in used]) / weights.sum())
    return {"ct_score": score, "ct_cells": cells}


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.float().div(255).numpy() if x.dtype == torch.uint8 else x.double().numpy()


def memorization_metrics(generated: tuple[torch.Tensor, torch.Tensor], train_nearest: torch.Tensor,
                         held_out: Optional[tuple[torch.Tensor, torch.Tensor]], features: dict[str, torch.Tensor],
                         settings: MemorizationSettings) -> dict[str, Any]:
    """The audit in one feature space, from the searches already done.

    Args:
        generated: (distances, indices) of each generated image's ``settings.neighbours`` nearest training images.
        train_nearest: each training image's distance to its nearest other training image (for AuthPct).
        held_out: the same search for the held-out images, or None when the reference has no held-out split.
        features: "train", "generated" and (with held_out) "held_out" vectors, for C_T.
    """
    g_dist, g_index = generated
    scores = copy_scores(g_dist, settings.alpha, settings.neighbours)
    flagged = scores < settings.threshold
    order = torch.argsort(g_dist[:, 0], stable=True)[:settings.closest_pairs]
    out: dict[str, Any] = {
        "copy_rate": float(flagged.double().mean()),
        "copies": int(flagged.sum()),
        "copy_score": quantiles(scores),
        "nn_distance": {"generated": quantiles(g_dist[:, 0])},
        "authpct": authpct(g_dist[:, 0], g_index[:, 0], train_nearest),
        "closest_pairs": [{"generated": int(i), "train": int(g_index[i, 0]), "distance": float(g_dist[i, 0]),
                           "copy_score": float(scores[i])} for i in order],
    }
    if held_out is None:
        return out
    h_dist = held_out[0]
    out["nn_distance"]["held_out"] = quantiles(h_dist[:, 0])
    # below 1: generated images sit closer to the training set than fresh images of the same distribution do
    out["nn_distance"]["median_ratio"] = out["nn_distance"]["generated"]["p50"] / max(
        out["nn_distance"]["held_out"]["p50"], 1e-12)
    out["held_out_copy_rate"] = float((copy_scores(h_dist, settings.alpha, settings.neighbours)
                                       < settings.threshold).double().mean())
    try:
        out.update(ct_score(features["train"], features["held_out"], features["generated"], settings))
    except ValueError as e:
        out["ct_score"], out["ct_skipped"] = None, str(e)
    return out
