"""The two latent regularisers of a first stage: a diagonal Gaussian posterior with a KL term (LDM's "KL-reg")
and a vector quantiser (VQ-VAE / VQGAN's "VQ-reg")."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class DiagonalGaussian(nn.Module):
    """``2 x latent`` channels -> a sample of N(mean, var) and its KL to N(0, I), summed per image (as LDM)."""

    def forward(self, moments: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
        return z, kl


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with the straight-through estimator (van den Oord et al. 2017).

    Against codebook collapse (most codes never chosen, so never updated), codes and encoder outputs are
    l2-normalised before the search, and the codes are low-dimensional, as in LlamaGen (Sun et al. 2024,
    after ViT-VQGAN): on the unit sphere every code is at a comparable distance from the encoder's outputs
    from the first step, and the search is a cosine similarity. ``benchmarks/two_stage.py --only codebook``
    measures usage with and without it on digits (docs/two-stage.md).
    """

    def __init__(self, codebook_size: int, code_dim: int, commitment: float = 0.25, l2_normalize: bool = True) -> None:
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.commitment, self.l2_normalize = commitment, l2_normalize
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def codes(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_normalize else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """N x D x h x w -> N x h x w code indices."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.code_dim)
        if self.l2_normalize:
            flat = F.normalize(flat, dim=1)
        codes = self.codes()
        distance = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        return distance.argmin(1).view(z.shape[0], *z.shape[2:])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """N x h x w indices -> N x D x h x w codes."""
        return self.codes()[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantised z (gradients pass straight through to the encoder), the codebook + commitment loss, indices."""
        indices = self.nearest(z)
        zq = self.lookup(indices)
        if self.l2_normalize:
            z = F.normalize(z, dim=1)
        loss = F.mse_loss(zq, z.detach()) + self.commitment * F.mse_loss(z, zq.detach())
        return z + (zq - z).detach(), loss, indices


def codebook_usage(counts: torch.Tensor) -> tuple[float, float]:
    """Fraction of codes used at least once, and the perplexity exp(H) of the code distribution (the number of
    equally likely codes with the same entropy: K for a uniform codebook, 1 for a collapsed one)."""
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return float((counts > 0).double().mean()), math.exp(entropy)
