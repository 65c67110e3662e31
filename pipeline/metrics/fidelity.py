"""Fidelity metrics from feature vectors: FID, Inception Score, KID, precision/recall.

Pure functions of features, nothing here knows about models or images. Each one calls
torch-fidelity's own implementation, so a number here is torch-fidelity's number for the same
features; genbench's part is to feed them features accumulated across ranks and cached reference
statistics. The settings are the published protocols, recorded in every result.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from pipeline.metrics import KEY_IS_MEAN, KEY_IS_STD, KEY_KID_MEAN, KEY_KID_STD, KEY_PRECISION, KEY_RECALL

RNG_SEED = 2020  # torch-fidelity's default seed of the IS shuffle and the KID subsets


def frechet_distance(stats_a: dict, stats_b: dict) -> float:
    """Fréchet distance between two Gaussians given as {mu, sigma}, by torch-fidelity's formula."""
    a = {"mu": np.asarray(stats_a["mu"], np.float64), "sigma": np.asarray(stats_a["sigma"], np.float64)}
    b = {"mu": np.asarray(stats_b["mu"], np.float64), "sigma": np.asarray(stats_b["sigma"], np.float64)}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = RNG_SEED) -> dict[str, float]:
    """IS from unbiased logits (Salimans et al.): shuffled, then mean and std over ``splits`` chunks."""
    if len(logits) < splits:
        raise ValueError(f"the Inception Score needs at least {splits} samples (one per split), got {len(logits)}")
    out = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return {KEY_IS_MEAN: out[KEY_METRIC_ISC_MEAN], KEY_IS_STD: out[KEY_METRIC_ISC_STD]}


def kernel_inception_distance(generated: torch.Tensor, reference: torch.Tensor, subsets: int = 100,
                              subset_size: int = 1000, seed: int = RNG_SEED) -> dict[str, float]:
    """KID (Bińkowski et al.): unbiased MMD² with the cubic polynomial kernel, over random subsets.

    Kernels in float64: in float32 the cubed dot products of 2048-d features lose ~1e-6 relative."""
    out = kid_features_to_metric(generated.cpu().double(), reference.cpu().double(), kid_subsets=subsets,
                                 kid_subset_size=subset_size, rng_seed=seed, verbose=False)
    return {KEY_KID_MEAN: out[KEY_METRIC_KID_MEAN], KEY_KID_STD: out[KEY_METRIC_KID_STD]}


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, neighborhood: int = 3,
                     batch_size: int = 10000) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al.) with k-NN balls; distances computed in blocks
    on the features' device, so 50,000 x 50,000 never sits in memory at once."""
    if min(len(generated), len(reference)) <= neighborhood:
        raise ValueError(f"precision/recall with k={neighborhood} needs more than {neighborhood} samples per set")
    out = prc_features_to_metric(generated, reference, prc_neighborhood=neighborhood, prc_batch_size=batch_size,
                                 save_cpu_ram=True, verbose=False)
    return {KEY_PRECISION: out[KEY_METRIC_PRECISION], KEY_RECALL: out[KEY_METRIC_RECALL]}
