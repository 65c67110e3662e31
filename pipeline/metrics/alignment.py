"""Prompt alignment: CLIPScore (Hessel et al. 2021), per image and per prompt.

CLIPScore(image, text) = w * max(cos(E_image, E_text), 0) with w = 2.5, per image, as the paper defines it.
torchmetrics' ``CLIPScore`` differs: it reports 100 * cos and clamps the *mean* at 0 rather than each image,
so a set with some negative cosines scores lower there; 100 / 2.5 = 40 converts the scale, not the clamp.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

CLIPSCORE_W = 2.5


def clip_scores(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, w: float = CLIPSCORE_W) -> torch.Tensor:
    """Per-row CLIPScore of matching rows of unit-norm image and text embeddings."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"{tuple(image_embeddings.shape)} image vs {tuple(text_embeddings.shape)} text embeddings: "
                         "one text row per image")
    cos = (image_embeddings.double() * text_embeddings.double()).sum(1)
    return w * cos.clamp(min=0)


def alignment_report(scores: torch.Tensor, prompt_ids: Sequence[str], prompts: dict[str, str]) -> dict[str, Any]:
    """The set's mean CLIPScore and, per prompt, the mean and max over its images (max: does the generator
    manage the prompt at all in K tries; mean: how reliably)."""
    by_prompt: dict[str, list[float]] = {}
    for pid, s in zip(prompt_ids, scores.tolist()):
        by_prompt.setdefault(pid, []).append(s)
    per_prompt: list[dict[str, Any]] = [
        {"id": pid, "prompt": prompts[pid], "n": len(v), "mean": sum(v) / len(v), "max": max(v)}
        for pid, v in sorted(by_prompt.items())]
    prompt_max = [max(v) for _, v in sorted(by_prompt.items())]
    return {"mean": float(scores.mean()), "per_image_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "mean_of_prompt_max": sum(prompt_max) / len(prompt_max), "per_prompt": per_prompt,
            "definition": f"{CLIPSCORE_W} * max(cos, 0) per image (Hessel et al. 2021)"}
