"""Bias audit: how generated images distribute over the reference classes, from auditor predictions.

Pure functions of predicted and reference class counts and of per-class feature statistics;
classes that were never generated count as zero, never dropped.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from pipeline.metrics.fidelity import frechet_distance

EPS = 1e-12
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
                 class_names: Sequence[str]) -> dict:
    """Fréchet distance per class between generated samples *predicted* as the class and reference
    samples *labelled* as it ({mu, sigma} each; None where a class has fewer than 2 samples, which
    gives None rather than a number). ``worst_to_best`` is the quality disparity between classes."""
    per_class: dict[str, Optional[float]] = {}
    for name, g, r in zip(class_names, generated, reference):
        per_class[name] = None if g is None or r is None else frechet_distance(g, r)
    scored = {name: v for name, v in per_class.items() if v is not None}
    values = list(scored.values())
    ratio = max(values) / min(values) if values and min(values) > 0 else None
    return {"per_class": per_class, "worst_to_best": ratio,
            "worst_class": max(scored, key=lambda c: scored[c]) if scored else None}
