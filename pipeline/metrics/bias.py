"""Bias audit: how generated images distribute over the reference classes, from auditor predictions.

Pure functions of predicted and reference class counts and of per-class feature statistics;
classes that were never generated count as zero, never dropped.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from pipeline.metrics.fidelity import frechet_distance
from pipeline.metrics.frechet import fd_infinity

EPS = 1e-12
MIN_PER_CLASS = 50  # images per class, on each side, below which a per-class FD is left empty
Counts = Union[Sequence[int], np.ndarray]  # class counts or labels, as a list or an array


def histogram(predictions: Counts, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(predictions, dtype=np.int64), minlength=num_classes)[:num_classes]


def fairness_discrepancy(predicted_counts: Counts) -> float:
    """L2 distance of the predicted class distribution to uniform (Choi et al. 2020, "Fair generative
    modeling via weak supervision"): 0 when every class is generated equally often."""
    p = np.asarray(predicted_counts, dtype=np.float64)
    return float(np.linalg.norm(p / p.sum() - 1.0 / p.size))


def audit(predicted_counts: Counts, reference_counts: Optional[Counts] = None,
          requested: Optional[Counts] = None, predictions: Optional[Counts] = None,
          class_names: Optional[Sequence[str]] = None) -> dict:
    """Distribution of generated classes, against the reference one when it is known.

    ``kl_to_reference`` is KL(generated || reference) in nats, ``tv_to_reference`` the total variation,
    ``fairness_discrepancy`` the L2 distance to uniform, ``coverage`` the fraction of classes holding
    at least 1/(10 K) of the samples. With ``requested`` labels (conditional models),
    ``conditional_accuracy`` is the fraction generated as requested, overall and per requested class.
    """
    p = np.asarray(predicted_counts, dtype=np.float64)
    k = p.size
    names = list(class_names) if class_names else [str(c) for c in range(k)]
    p_n = p / p.sum()
    out: dict = {"class_names": names, "class_histogram": p.astype(int).tolist(),
                 "fairness_discrepancy": fairness_discrepancy(p),
                 "coverage": float(np.mean(p_n >= 1.0 / (10 * k)))}
    if reference_counts is not None:
        q = np.asarray(reference_counts, dtype=np.float64)
        if q.shape != p.shape:
            raise ValueError(f"predicted histogram has {p.size} classes, the reference {q.size}")
        q_n = q / q.sum()
        out["reference_histogram"] = q.astype(int).tolist()
        out["kl_to_reference"] = float(np.sum(np.where(p_n > 0, p_n * np.log((p_n + EPS) / (q_n + EPS)), 0.0)))
        out["tv_to_reference"] = float(0.5 * np.abs(p_n - q_n).sum())
    if requested is not None and predictions is not None:
        req, pred = np.asarray(requested), np.asarray(predictions)
        out["conditional_accuracy"] = float(np.mean(req == pred))
        out["conditional_accuracy_per_class"] = {
            names[c]: (float(np.mean(pred[req == c] == c)) if np.any(req == c) else None) for c in range(k)}
    return out


def per_class_fd(generated: Sequence[Optional[dict]], reference: Sequence[Optional[dict]],
                 class_names: Sequence[str], generated_features: Optional[torch.Tensor] = None,
                 predicted: Optional[torch.Tensor] = None, min_count: int = MIN_PER_CLASS) -> dict:
    """Fréchet distance per class between generated samples *predicted* as the class and reference
    samples *labelled* as it ({mu, sigma, count} each; None where a class has fewer than 2 samples).

    A class with fewer than ``min_count`` images on either side gets no number, with the reason: an FD
    from a handful of images measures their count more than their quality. With the generated feature
    vectors and their predicted classes, each class also gets FD-infinity (``per_class_inf``) where it has
    enough images for one, and ``worst_to_best`` (the quality disparity between classes, over the classes
    scored) is taken from FD-infinity when every scored class has it; otherwise from the plain FDs."""
    per_class: dict[str, Optional[float]] = {}
    per_class_inf: dict[str, Optional[float]] = {}
    counts: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for c, (name, g, r) in enumerate(zip(class_names, generated, reference)):
        n_g, n_r = (0 if s is None else int(s["count"]) for s in (g, r))
        counts[name] = n_g
        per_class[name] = per_class_inf[name] = None
        if g is None or r is None or min(n_g, n_r) < min_count:
            skipped[name] = (f"{n_g} generated and {n_r} reference images; a class needs {min_count} of each "
                             "for an FD that is not mostly noise")
            continue
        per_class[name] = frechet_distance(g, r)
        if generated_features is not None and predicted is not None:
            try:
                per_class_inf[name] = fd_infinity(generated_features[predicted == c], r)
            except ValueError as e:  # too few images of the class to extrapolate (N >= 10 x the dimension)
                skipped[name] = f"FD-infinity: {e}"
    # the disparity from FD-infinity when every scored class has one, else from the plain FDs (then biased by
    # the classes' different counts: a row's worst_to_best is not ranked across sample counts either way)
    from_inf = generated_features is not None and all(
        per_class_inf[n] is not None for n, v in per_class.items() if v is not None)
    fair = per_class_inf if from_inf else per_class
    scored = {name: v for name, v in fair.items() if v is not None}
    values = list(scored.values())
    ratio = max(values) / min(values) if len(values) >= 2 and min(values) > 0 else None
    return {"per_class": per_class, "per_class_inf": per_class_inf if generated_features is not None else None,
            "counts": counts, "min_count": min_count, "skipped": skipped, "worst_to_best": ratio,
            "worst_to_best_from": "fd_infinity" if from_inf else "fd",
            "worst_class": max(scored, key=lambda c: scored[c]) if len(values) >= 2 else None}
