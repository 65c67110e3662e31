"""Autoregressive image transformer (Image GPT style, Chen et al. 2020): a decoder-only transformer
over the image's pixels in raster order, each channel intensity one of 256 tokens. The likelihood is
exact, so it reports true bits per dimension; sampling uses a key/value cache."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.base import FAMILIES, GenerativeModule, PerSampleNoise
from pipeline.models.nets import TransformerBlock

LEVELS = 256


@FAMILIES.register("ar")
class Autoregressive(GenerativeModule):
    """Pixel-level decoder-only transformer.

    Args:
        dim: width of the transformer.
        depth: transformer blocks.
        heads: attention heads.
        dropout: dropout in attention and MLP.
        temperature: sampling temperature (1 samples the model's distribution).
        top_k: sample among the k most likely intensities (0 = all 256).
        warmup_steps: linear learning-rate warm-up.
    """

    family = "ar"

    def __init__(self, image_size: int = 32, channels: int = 3, num_classes: Optional[int] = None,
                 dim: int = 256, depth: int = 8, heads: int = 8, dropout: float = 0.0, temperature: float = 1.0,
                 top_k: int = 0, lr: float = 3e-4, warmup_steps: int = 1000, ema_decay: Optional[float] = 0.999,
                 sample_every_n_steps: int = 500, compile: bool = False,
                 sample_batch_size: int = 256) -> None:
        super().__init__(image_size, channels, num_classes, lr, ema_decay, sample_every_n_steps, compile,
                         sample_batch_size)
        self.save_hyperparameters()
        self.seq_len = image_size * image_size * channels
        self.temperature, self.top_k, self.warmup_steps = temperature, top_k, warmup_steps
        # tokens 0..255 are intensities; 256 starts an unconditional image, 257 + k starts one of class k
        self.tok_emb = nn.Embedding(LEVELS + 1 + (num_classes or 0), dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        nn.init.normal_(self.pos_emb, std=0.02)
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, dropout) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, LEVELS, bias=False)

    @property
    def nfe(self) -> int:
        return self.seq_len  # one (cached) forward pass per token

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] N x C x H x W -> N x (H W C) intensity tokens, channels interleaved in raster order."""
        levels = ((images + 1) * 127.5).round().clamp(0, LEVELS - 1).long()
        return levels.permute(0, 2, 3, 1).reshape(len(images), -1)

    def start_tokens(self, n: int, labels: Optional[torch.Tensor]) -> torch.Tensor:
        if labels is None:
            return torch.full((n,), LEVELS, dtype=torch.long, device=self.device)
        return LEVELS + 1 + labels

    def logits(self, tokens: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        inputs = torch.cat([self.start_tokens(len(tokens), labels)[:, None], tokens[:, :-1]], dim=1)
        h = self.tok_emb(inputs) + self.pos_emb
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))

    def _nll(self, batch: dict) -> torch.Tensor:
        tokens = self.tokens(batch["image"])
        labels = batch["label"] if self.conditional else None
        return F.cross_entropy(self.logits(tokens, labels).reshape(-1, LEVELS), tokens.reshape(-1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._nll(batch)
        self.check_finite(loss)
        self.log("train/loss", loss)
        self.log("train/bits_per_dim", loss / math.log(2), prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        bpd = self._nll(batch) / math.log(2)
        self.log("val/bits_per_dim", bpd, sync_dist=True, prog_bar=True, batch_size=len(batch["image"]))

    def on_validation_epoch_end(self) -> None:
        value = self.trainer.callback_metrics.get("val/bits_per_dim")
        if value is not None:
            self.last_bits_per_dim = float(value)

    def generate(self, noise: PerSampleNoise, labels: Optional[torch.Tensor]) -> torch.Tensor:
        n = len(noise)
        caches = [dict() for _ in self.blocks]
        token = self.start_tokens(n, labels)
        out = torch.empty(n, self.seq_len, dtype=torch.long, device=self.device)
        uniforms = noise.rand(self.seq_len)  # one uniform per sample and position: inverse-CDF sampling
        for i in range(self.seq_len):
            h = self.tok_emb(token[:, None]) + self.pos_emb[:, i:i + 1]
            for block, cache in zip(self.blocks, caches):
                h = block(h, cache)
            logits = self.head(self.ln(h))[:, 0].float() / max(self.temperature, 1e-6)
            if 0 < self.top_k < LEVELS:
                kth = logits.topk(self.top_k, dim=1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            cdf = logits.softmax(1).cumsum(1)
            token = torch.searchsorted(cdf, uniforms[:, i:i + 1].contiguous()).clamp(max=LEVELS - 1)[:, 0]
            out[:, i] = token
        images = out.view(n, self.image_size, self.image_size, self.channels).permute(0, 3, 1, 2)
        return images.float() / 127.5 - 1

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01, betas=(0.9, 0.95))
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, self.warmup_steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
