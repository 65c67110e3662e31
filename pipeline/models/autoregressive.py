"""Autoregressive image transformer (Image GPT style, Chen et al. 2020): a decoder-only transformer
over the image's pixels in raster order. Tokens are either each channel's intensity (256 levels; the
likelihood is then exact and reported in bits per dimension) or, as in Image GPT, the index of the
pixel's nearest colour in a k-means palette fitted on the training pixels (one token per pixel, a
3x shorter sequence for RGB, but a lossy quantisation, so no bits/dim). Sampling uses a key/value cache."""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.data.palette import fit_palette
from pipeline.models.base import FAMILIES, GenerativeModule, PerSampleNoise, linear_warmup
from pipeline.models.nets import TransformerBlock

LEVELS = 256


@FAMILIES.register()
class Autoregressive(GenerativeModule):
    """Pixel-level decoder-only transformer.

    Args:
        dim: width of the transformer.
        depth: transformer blocks.
        heads: attention heads.
        dropout: dropout in attention and MLP.
        temperature: sampling temperature (1 samples the model's distribution).
        top_k: sample among the k most likely tokens (0 = all).
        lr: AdamW learning rate.
        warmup_steps: linear learning-rate warm-up.
        tokenizer: ``intensity`` (256 levels per channel) or ``palette`` (k-means colours, one token per pixel).
        palette_size: colours in the palette.
        palette_shards: shard directory whose training pixels the palette is fitted on (``palette`` only;
            fitted once and cached under the manifest hash; the palette is saved in checkpoints).
    """

    family = "ar"

    def __init__(self, image_size: int = 32, channels: int = 3, num_classes: Optional[int] = None,
                 dim: int = 256, depth: int = 8, heads: int = 8, dropout: float = 0.0, temperature: float = 1.0,
                 top_k: int = 0, lr: float = 3e-4, warmup_steps: int = 1000,
                 tokenizer: Literal["intensity", "palette"] = "intensity", palette_size: int = 512,
                 palette_shards: Optional[str] = None, ema_decay: Optional[float] = 0.999,
                 sample_every_n_steps: int = 500, compile: bool = False,
                 sample_batch_size: int = 256) -> None:
        super().__init__(image_size=image_size, channels=channels, num_classes=num_classes, ema_decay=ema_decay,
                         sample_every_n_steps=sample_every_n_steps, compile=compile,
                         sample_batch_size=sample_batch_size)
        self.lr = lr
        self.save_hyperparameters()
        self.temperature, self.top_k, self.warmup_steps = temperature, top_k, warmup_steps
        self.tokenizer = tokenizer
        if tokenizer == "palette":
            if palette_shards is None:
                raise ValueError("model.init_args.tokenizer=palette needs model.init_args.palette_shards: the shard "
                                 "directory to fit the colour palette on (usually data.init_args.shards)")
            # Not a buffer: the EMA callback averages buffers, which would blur the colours. It travels
            # in checkpoints through on_save/on_load_checkpoint, and is identical on every rank. Fitted on
            # first use, not here: a model loaded from a checkpoint takes the checkpoint's palette and needs
            # no shards at all.
            self._palette: Optional[torch.Tensor] = None
            self.vocab, self.seq_len = palette_size, image_size * image_size
        else:
            self.vocab, self.seq_len = LEVELS, image_size * image_size * channels
        # tokens 0..vocab-1 are pixel values; vocab starts an unconditional image, vocab + 1 + k one of class k
        self.tok_emb = nn.Embedding(self.vocab + 1 + (num_classes or 0), dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        nn.init.normal_(self.pos_emb, std=0.02)
        self.blocks = nn.ModuleList([self.maybe_compile(TransformerBlock(dim, heads, dropout)) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.vocab, bias=False)

    @property
    def palette(self) -> torch.Tensor:
        """The k-means colours (palette_size x channels, 0..255): the checkpoint's, else fitted on the shards."""
        if self._palette is None:
            hp = self.hparams
            self._palette = fit_palette(hp["palette_shards"], hp["palette_size"], hp["channels"])
        return self._palette

    @property
    def nfe(self) -> int:
        return self.seq_len  # one (cached) forward pass per token

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] N x C x H x W -> N x L tokens in raster order (channels interleaved for intensities)."""
        levels = ((images + 1) * 127.5).round().clamp(0, LEVELS - 1)
        pixels = levels.permute(0, 2, 3, 1).reshape(len(images), -1, self.channels)
        if self.tokenizer == "palette":
            return torch.cdist(pixels, self.palette.to(pixels)[None]).argmin(-1)
        return pixels.reshape(len(images), -1).long()

    def images(self, tokens: torch.Tensor) -> torch.Tensor:
        """N x L tokens -> [-1, 1] N x C x H x W."""
        pixels = self.palette.to(tokens.device)[tokens] if self.tokenizer == "palette" else tokens.float()
        pixels = pixels.reshape(len(tokens), self.image_size, self.image_size, self.channels).permute(0, 3, 1, 2)
        return pixels.float() / 127.5 - 1

    def start_tokens(self, n: int, labels: Optional[torch.Tensor]) -> torch.Tensor:
        if labels is None:
            return torch.full((n,), self.vocab, dtype=torch.long, device=self.device)
        return self.vocab + 1 + labels

    def logits(self, tokens: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        inputs = torch.cat([self.start_tokens(len(tokens), labels)[:, None], tokens[:, :-1]], dim=1)
        h = self.tok_emb(inputs) + self.pos_emb
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))

    def _nll(self, batch: dict) -> torch.Tensor:
        tokens = self.tokens(batch["image"])
        labels = batch["label"] if self.conditional else None
        return F.cross_entropy(self.logits(tokens, labels).reshape(-1, self.vocab), tokens.reshape(-1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._nll(batch)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=self.tokenizer == "palette")
        if self.tokenizer == "intensity":
            self.log("train/bits_per_dim", loss / math.log(2), prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # intensity tokens: the exact negative log-likelihood of the 8-bit image, in bits per dimension;
        # palette tokens: only the loss over palette indices (the quantisation discards information)
        loss = self._nll(batch)
        name, value = ("val/bits_per_dim", loss / math.log(2)) if self.tokenizer == "intensity" else ("val/loss", loss)
        self.log(name, value, sync_dist=True, prog_bar=True, batch_size=len(batch["image"]))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer == "palette":
            checkpoint["genbench"]["palette"] = self.palette.cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.tokenizer == "palette" and "palette" in checkpoint.get("genbench", {}):
            self._palette = checkpoint["genbench"]["palette"]

    def on_validation_epoch_end(self) -> None:
        # values logged in validation_step are already reduced over the epoch (and ranks) here
        value = self.trainer.callback_metrics.get("val/bits_per_dim")
        if value is not None and self.tokenizer == "intensity":
            self.last_bits_per_dim = float(value)

    def generate(self, noise: PerSampleNoise, labels: Optional[torch.Tensor]) -> torch.Tensor:
        n = len(noise)
        caches: list[dict] = [{} for _ in self.blocks]
        token = self.start_tokens(n, labels)
        out = torch.empty(n, self.seq_len, dtype=torch.long, device=self.device)
        uniforms = noise.rand(self.seq_len)  # one uniform per sample and position: inverse-CDF sampling
        for i in range(self.seq_len):
            h = self.tok_emb(token[:, None]) + self.pos_emb[:, i:i + 1]
            for block, cache in zip(self.blocks, caches):
                h = block.forward(h, cache)  # eager: the growing cache would recompile a compiled block every step
            logits = self.head(self.ln(h))[:, 0].float() / max(self.temperature, 1e-6)
            if 0 < self.top_k < self.vocab:
                kth = logits.topk(self.top_k, dim=1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            cdf = logits.softmax(1).cumsum(1)
            token = torch.searchsorted(cdf, uniforms[:, i:i + 1].contiguous()).clamp(max=self.vocab - 1)[:, 0]
            out[:, i] = token
        return self.images(out)

    def configure_optimizers(self):
        opt = self.adam(self.parameters(), decoupled_weight_decay=True, lr=self.lr, weight_decay=0.01,
                        betas=(0.9, 0.95))
        return {"optimizer": opt, "lr_scheduler": linear_warmup(opt, self.warmup_steps)}
