"""Convolutional VAE (Kingma & Welling 2014) with a Gaussian posterior and a discretised decoder likelihood.

Reports the negative ELBO in bits per dimension on the validation split: an upper bound on the
model's negative log-likelihood of the 8-bit data. The Bernoulli decoder models binarised pixels, a
different (1-bit) data set: its figure goes under ``binary_bits_per_dim`` and never into the
``bits_per_dim`` the leaderboard compares across families.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric

from pipeline.models.base import FAMILIES, GenerativeModule, PerSampleNoise
from pipeline.models.nets import ConvDecoder, ConvEncoder

BIN_HALF_WIDTH = 1.0 / 255.0  # half of one of the 256 levels in [-1, 1]


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of 8-bit pixels x in [-1, 1] under a logistic discretised to 256 bins (PixelCNN++)."""
    log_scale = log_scale.clamp(min=-7.0)
    centered = x - mean
    inv_scale = torch.exp(-log_scale)
    plus_in = inv_scale * (centered + BIN_HALF_WIDTH)
    min_in = inv_scale * (centered - BIN_HALF_WIDTH)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): mass below the top edge
    log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in)): mass above the bottom edge
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_scale * centered
    log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in)  # fallback when the bin mass underflows
    inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - math.log(127.5))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, inner))


@FAMILIES.register()
class VAE(GenerativeModule):
    """Convolutional VAE.

    Args:
        latent_dim: size of the Gaussian latent vector z.
        base_channels: channels of the first level of encoder and decoder.
        channel_mults: channel multiplier of each level; the resolution halves between levels.
        num_res_blocks: residual blocks per level.
        likelihood: decoder likelihood: ``logistic`` (discretised logistic, 8-bit data) or ``bernoulli``
            (binary data; pixels are thresholded at mid-grey).
        beta: weight of the KL term (1 = the true ELBO).
        kl_warmup_steps: the KL weight ramps linearly from 0 to beta over this many steps (0 = no warm-up).
        class_embed_dim: size of the class embedding of a conditional model.
        lr: Adam learning rate.
    """

    family = "vae"

    def __init__(self, image_size: int = 32, channels: int = 3, num_classes: Optional[int] = None,
                 latent_dim: int = 64, base_channels: int = 64, channel_mults: tuple[int, ...] = (1, 2, 2),
                 num_res_blocks: int = 1, likelihood: Literal["logistic", "bernoulli"] = "logistic",
                 beta: float = 1.0, kl_warmup_steps: int = 0, class_embed_dim: int = 32, lr: float = 1e-3,
                 ema_decay: Optional[float] = 0.999, sample_every_n_steps: int = 500, compile: bool = False,
                 sample_batch_size: int = 256) -> None:
        super().__init__(image_size=image_size, channels=channels, num_classes=num_classes, ema_decay=ema_decay,
                         sample_every_n_steps=sample_every_n_steps, compile=compile,
                         sample_batch_size=sample_batch_size)
        self.lr = lr
        self.save_hyperparameters()
        self.latent_dim, self.likelihood = latent_dim, likelihood
        self.bpd_key = "bits_per_dim" if likelihood == "logistic" else "binary_bits_per_dim"
        self.beta, self.kl_warmup_steps = beta, kl_warmup_steps
        emb = class_embed_dim if num_classes else 0
        self.class_embed = nn.Embedding(num_classes, class_embed_dim) if num_classes else None
        self.encoder = ConvEncoder(channels, image_size, base_channels, channel_mults, num_res_blocks)
        self.to_posterior = nn.Linear(self.encoder.out_features + emb, 2 * latent_dim)
        out_ch = 2 * channels if likelihood == "logistic" else channels
        self.decoder = ConvDecoder(latent_dim + emb, out_ch, image_size, base_channels, channel_mults, num_res_blocks)
        self.val_bits_per_dim, self.val_elbo = MeanMetric(), MeanMetric()
        self.encoder = self.maybe_compile(self.encoder)
        self.decoder = self.maybe_compile(self.decoder)

    def _with_class(self, h: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        if self.class_embed is None:
            return h
        return torch.cat([h, self.class_embed(labels)], dim=1)

    def decode(self, z: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return self.decoder(self._with_class(z, labels))

    def negative_elbo(self, x: torch.Tensor, labels: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image reconstruction NLL and KL, both in nats."""
        mu, logvar = self.to_posterior(self._with_class(self.encoder(x), labels)).chunk(2, dim=1)
        logvar = logvar.clamp(-20.0, 10.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        params = self.decode(z, labels)
        if self.likelihood == "logistic":
            mean, log_scale = params.chunk(2, dim=1)
            nll = -discretized_logistic_log_prob(x, mean, log_scale).flatten(1).sum(1)
        else:
            target = (x > 0).float()
            nll = F.binary_cross_entropy_with_logits(params, target, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return nll, kl

    def _labels(self, batch: dict) -> Optional[torch.Tensor]:
        if not self.conditional:
            return None
        return batch["label"]

    def kl_weight(self) -> float:
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, self.global_step / self.kl_warmup_steps)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        nll, kl = self.negative_elbo(batch["image"], self._labels(batch))
        loss = (nll + self.kl_weight() * kl).mean()
        self.check_finite(loss)
        dims = batch["image"][0].numel()
        self.log_dict({"train/loss": loss, "train/nll_per_dim": nll.mean() / dims, "train/kl": kl.mean()},
                      prog_bar=False, on_step=True, on_epoch=False)
        self.log(f"train/{self.bpd_key}", (nll + kl).mean() / (dims * math.log(2)), prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        nll, kl = self.negative_elbo(batch["image"], self._labels(batch))
        dims = batch["image"][0].numel()
        self.val_bits_per_dim.update((nll + kl) / (dims * math.log(2)))
        self.val_elbo.update(-(nll + kl))

    def on_validation_epoch_end(self) -> None:
        # MeanMetric sums over all ranks, so every rank logs the same full-split figure
        bpd, elbo = self.val_bits_per_dim.compute(), self.val_elbo.compute()
        self.log_dict({f"val/{self.bpd_key}": bpd, "val/elbo": elbo}, prog_bar=True)
        if self.likelihood == "logistic":  # the 8-bit likelihood every family's bits/dim is comparable on
            self.last_bits_per_dim = float(bpd)
        self.val_bits_per_dim.reset()
        self.val_elbo.reset()

    def generate(self, noise: PerSampleNoise, labels: Optional[torch.Tensor]) -> torch.Tensor:
        # The decoder's mean, not a draw from the pixel likelihood: pixel noise adds nothing but grain.
        params = self.decode(noise.randn(self.latent_dim), labels)
        if self.likelihood == "logistic":
            return params.chunk(2, dim=1)[0].clamp(-1, 1)
        return torch.sigmoid(params) * 2 - 1

    def configure_optimizers(self):
        return self.adam(self.parameters(), lr=self.lr)
