"""Bias audit: how generated images distribute over the reference classes, from auditor predictions.

Pure functions of predicted and reference class counts; classes that were never generated count as
zero, never dropped.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

EPS = 1e-12


def histogram(predictions: Sequence[int], num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(predictions, dtype=np.int64), minlength=num_classes)[:num_classes]


def audit(predicted_counts: Sequence[int], reference_counts: Sequence[int],
          requested: Optional[Sequence[int]] = None, predictions: Optional[Sequence[int]] = None) -> dict:
    """Distribution of generated classes against the reference one.

    ``kl_to_reference`` is KL(generated || reference) in nats, ``tv_to_reference`` the total variation,
    ``coverage`` the fraction of classes holding at least 1/(10 K) of the samples. With ``requested``
    labels (conditional models), ``conditional_accuracy`` is the fraction generated as requested.
    """
    p = np.asarray(predicted_counts, dtype=np.float64)
    q = np.asarray(reference_counts, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"predicted histogram has {p.size} classes, the reference {q.size}")
    k = p.size
    p_n, q_n = p / p.sum(), q / q.sum()
    out = {
        "class_histogram": p.astype(int).tolist(),
        "reference_histogram": q.astype(int).tolist(),
        "kl_to_reference": float(np.sum(np.where(p_n > 0, p_n * np.log((p_n + EPS) / (q_n + EPS)), 0.0))),
        "tv_to_reference": float(0.5 * np.abs(p_n - q_n).sum()),
        "coverage": float(np.mean(p_n >= 1.0 / (10 * k))),
    }
    if requested is not None and predictions is not None:
        req, pred = np.asarray(requested), np.asarray(predictions)
        out["conditional_accuracy"] = float(np.mean(req == pred))
    return out
