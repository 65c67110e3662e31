"""Autoregressive image transformer (Image GPT style, Chen et al. 2020): a decoder-only transformer
over the image's pixels in raster order. Tokens are either each channel's intensity (256 levels; the
likelihood is then exact and reported in bits per dimension) or, as in Image GPT, the index of the
pixel's nearest colour in a k-means palette fitted on the training pixels (one token per pixel, a
3x shorter sequence for RGB, but a lossy quantisation, so no bits/dim), or (``tokenizer: vq``) the codes of
a vector-quantised autoencoder's grid, as VQGAN's transformer and LlamaGen: a two-stage model whose samples
the first stage decodes. Sampling uses a key/value cache, temperature, top-k / top-p, and classifier-free
guidance for a class-conditional model trained with label dropout (``p_uncond``), as LlamaGen."""

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
        top_p: sample among the most likely tokens whose probabilities sum to top_p (nucleus sampling; 1 = all).
        lr: AdamW learning rate.
        warmup_steps: linear learning-rate warm-up.
        tokenizer: ``intensity`` (256 levels per channel), ``palette`` (k-means colours, one token per pixel) or
            ``vq`` (the code grid of the vq autoencoder ``first_stage``, raster order).
        palette_size: colours in the palette.
        palette_shards: shard directory whose training pixels the palette is fitted on (``palette`` only;
            fitted once and cached under the manifest hash; the palette is saved in checkpoints).
        first_stage: the run directory of a ``quantizer: vq`` autoencoder (``vq`` only).
        p_uncond: probability of replacing the class token by the unconditional one in training (classifier-free
            guidance; LlamaGen uses 0.1).
        guidance_scale: 1 samples the conditional model; s > 1 mixes the logits as u + s (c - u), two passes.
    """

    family = "ar"

    def __init__(self, image_size: int = 32, channels: int = 3, num_classes: Optional[int] = None,
                 dim: int = 256, depth: int = 8, heads: int = 8, dropout: float = 0.0, temperature: float = 1.0,
                 top_k: int = 0, lr: float = 3e-4, warmup_steps: int = 1000,
                 tokenizer: Literal["intensity", "palette", "vq"] = "intensity", palette_size: int = 512,
                 palette_shards: Optional[str] = None, ema_decay: Optional[float] = 0.999,
                 sample_every_n_steps: int = 500, compile: bool = False,
                 sample_batch_size: int = 256, first_stage: Optional[str] = None, p_uncond: float = 0.0,
                 guidance_scale: float = 1.0, top_p: float = 1.0) -> None:
        super().__init__(image_size=image_size, channels=channels, num_classes=num_classes, ema_decay=ema_decay,
                         sample_every_n_steps=sample_every_n_steps, compile=compile,
                         sample_batch_size=sample_batch_size)
        self.lr = lr
        self.save_hyperparameters()
        self.temperature, self.top_k, self.warmup_steps = temperature, top_k, warmup_steps
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"model.init_args.top_p={top_p} must be in (0, 1]")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"model.init_args.p_uncond={p_uncond} must be in [0, 1)")
        self.top_p, self.p_uncond, self.guidance_scale = top_p, p_uncond, guidance_scale
        self.tokenizer = tokenizer
        if (tokenizer == "vq") != (first_stage is not None):
            raise ValueError("model.init_args.tokenizer=vq and model.init_args.first_stage go together: the codes "
                             "come from a vq autoencoder's run directory" if tokenizer == "vq" else
                             f"model.init_args.first_stage is set but tokenizer={tokenizer}; use tokenizer: vq to "
                             "model an autoencoder's codes")
        if tokenizer == "vq":
            assert first_stage is not None
            first = self.attach_first_stage(first_stage, quantizer="vq")
            _, h, w = first.model.latent_shape
            self.grid = (h, w)
            self.vocab, self.seq_len = first.model.codebook_size, h * w
        elif tokenizer == "palette":
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
    def guided(self) -> bool:
        return self.conditional and self.guidance_scale != 1.0

    @property
    def nfe(self) -> int:
        return self.seq_len * (2 if self.guided else 1)  # one (cached) forward pass per token (and guidance's)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] N x C x H x W -> N x L tokens in raster order (channels interleaved for intensities)."""
        if self.tokenizer == "vq":
            assert self.first_stage is not None
            return self.first_stage.encode_indices(images).flatten(1)
        levels = ((images + 1) * 127.5).round().clamp(0, LEVELS - 1)
        pixels = levels.permute(0, 2, 3, 1).reshape(len(images), -1, self.channels)
        if self.tokenizer == "palette":
            return torch.cdist(pixels, self.palette.to(pixels)[None]).argmin(-1)
        return pixels.reshape(len(images), -1).long()

    def images(self, tokens: torch.Tensor) -> torch.Tensor:
        """N x L tokens -> [-1, 1] N x C x H x W."""
        if self.tokenizer == "vq":
            assert self.first_stage is not None
            return self.first_stage.decode_indices(tokens.view(len(tokens), *self.grid))
        pixels = self.palette.to(tokens.device)[tokens] if self.tokenizer == "palette" else tokens.float()
        pixels = pixels.reshape(len(tokens), self.image_size, self.image_size, self.channels).permute(0, 3, 1, 2)
        return pixels.float() / 127.5 - 1

    def start_tokens(self, n: int, labels: Optional[torch.Tensor], drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            return torch.full((n,), self.vocab, dtype=torch.long, device=self.device)
        if drop is not None:
            return torch.where(drop, self.vocab, self.vocab + 1 + labels)
        return self.vocab + 1 + labels

    def logits(self, tokens: torch.Tensor, labels: Optional[torch.Tensor],
               drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        inputs = torch.cat([self.start_tokens(len(tokens), labels, drop)[:, None], tokens[:, :-1]], dim=1)
        h = self.tok_emb(inputs) + self.pos_emb
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))

    def _nll(self, batch: dict) -> torch.Tensor:
        tokens = self.tokens(batch["image"])
        labels = batch["label"] if self.conditional else None
        drop = None
        if labels is not None and self.training and self.p_uncond > 0:
            # classifier-free guidance: the unconditional start token (vocab) in place of the class's
            drop = torch.rand(len(labels), device=labels.device) < self.p_uncond
        return F.cross_entropy(self.logits(tokens, labels, drop).reshape(-1, self.vocab), tokens.reshape(-1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._nll(batch)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=self.tokenizer != "intensity")
        if self.tokenizer == "intensity":
            self.log("train/bits_per_dim", loss / math.log(2), prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # intensity tokens: the exact negative log-likelihood of the 8-bit image, in bits per dimension;
        # palette tokens: only the loss over palette indices (the quantisation discards information)
        loss = self._nll(batch)
        # vq tokens: the loss over code indices (the autoencoder is lossy too)
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
        guided = self.guided and labels is not None
        caches: list[dict] = [{} for _ in self.blocks]
        token = self.start_tokens(n, labels)
        if guided:  # the unconditional sequences ride in the same batch, each with its own cache rows
            token = torch.cat([token, self.start_tokens(n, None)])
        out = torch.empty(n, self.seq_len, dtype=torch.long, device=self.device)
        uniforms = noise.rand(self.seq_len)  # one uniform per sample and position: inverse-CDF sampling
        for i in range(self.seq_len):
            h = self.tok_emb(token[:, None]) + self.pos_emb[:, i:i + 1]
            for block, cache in zip(self.blocks, caches):
                h = block.forward(h, cache)  # eager: the growing cache would recompile a compiled block every step
            logits = self.head(self.ln(h))[:, 0].float()
            if guided:
                cond, free = logits.chunk(2)
                logits = free + self.guidance_scale * (cond - free)
            logits = self.truncate(logits / max(self.temperature, 1e-6))
            cdf = logits.softmax(1).cumsum(1)
            token = torch.searchsorted(cdf, uniforms[:, i:i + 1].contiguous()).clamp(max=self.vocab - 1)[:, 0]
            out[:, i] = token
            if guided:
                token = torch.cat([token, token])
        return self.images(out)

    def truncate(self, logits: torch.Tensor) -> torch.Tensor:
        """Top-k, then top-p (the smallest set of most likely tokens holding top_p of the probability)."""
        if 0 < self.top_k < self.vocab:
            kth = logits.topk(self.top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=1, descending=True)
            before = ordered.softmax(1).cumsum(1) - ordered.softmax(1)  # mass of the tokens ranked above each
            drop = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, before >= self.top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits

    def configure_optimizers(self):
        opt = self.adam(self.parameters(), decoupled_weight_decay=True, lr=self.lr, weight_decay=0.01,
                        betas=(0.9, 0.95))
        return {"optimizer": opt, "lr_scheduler": linear_warmup(opt, self.warmup_steps)}
