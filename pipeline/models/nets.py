"""Shared building blocks: residual conv blocks and the convolutional encoder/decoder."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3 conv) x 2, with an optional embedding added."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: Optional[int] = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch) if emb_dim else None
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None and emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level_channels(base: int, mults: Sequence[int]) -> list[int]:
    return [base * m for m in mults]


def check_divisible(image_size: int, mults: Sequence[int]) -> None:
    factor = 2 ** (len(mults) - 1)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} is not divisible by 2^(levels-1) = {factor} for channel_mults "
                         f"{list(mults)}; use fewer levels or another image size")


def resolution_levels(chs: Sequence[int], res_blocks: int,
                      resample: type[nn.Module]) -> tuple[list[nn.Module], int]:
    """Residual blocks at each level's width, with ``resample`` (down or up) between levels."""
    layers: list[nn.Module] = []
    prev = chs[0]
    for level, ch in enumerate(chs):
        for _ in range(res_blocks):
            layers.append(ResBlock(prev, ch))
            prev = ch
        if level < len(chs) - 1:
            layers.append(resample(ch))
    return layers, prev


class ConvEncoder(nn.Module):
    """Image -> flat feature vector, halving the resolution between levels."""

    def __init__(self, in_ch: int, image_size: int, base: int, mults: Sequence[int], res_blocks: int) -> None:
        super().__init__()
        check_divisible(image_size, mults)
        chs = level_channels(base, mults)
        levels, prev = resolution_levels(chs, res_blocks, Downsample)
        layers: list[nn.Module] = [nn.Conv2d(in_ch, chs[0], 3, padding=1), *levels,
                                   group_norm(prev), nn.SiLU(), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_features = prev * (image_size // 2 ** (len(chs) - 1)) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Flat vector -> image parameters (out_ch channels), doubling the resolution between levels."""

    def __init__(self, in_features: int, out_ch: int, image_size: int, base: int, mults: Sequence[int],
                 res_blocks: int) -> None:
        super().__init__()
        check_divisible(image_size, mults)
        chs = level_channels(base, mults)[::-1]
        self.start = image_size // 2 ** (len(chs) - 1)
        self.top = chs[0]
        self.fc = nn.Linear(in_features, chs[0] * self.start ** 2)
        levels, prev = resolution_levels(chs, res_blocks, Upsample)
        layers: list[nn.Module] = [*levels, group_norm(prev), nn.SiLU(), nn.Conv2d(prev, out_ch, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, self.top, self.start, self.start))


# -- UNet (Ho et al. 2020) -------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, as in the Transformer and DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class SelfAttention2d(nn.Module):
    """Single-head self-attention over the pixels of a feature map (DDPM's attention block)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """The DDPM UNet: residual blocks with a timestep (and class) embedding, attention at chosen resolutions.

    With ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,) at 32x32 it has the
    35.7M parameters of Ho et al.'s CIFAR-10 model.
    """

    def __init__(self, in_ch: int, image_size: int, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        check_divisible(image_size, ch_mult)
        emb_dim = 4 * ch
        self.ch = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # one extra embedding row: the "no class" token of classifier-free guidance
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                blocks: list[nn.Module] = [ResBlock(cur, ch * mult, emb_dim, dropout)]
                cur = ch * mult
                if res in attn_resolutions:
                    blocks.append(SelfAttention2d(cur))
                self.down.append(nn.ModuleList(blocks))
                skips.append(cur)
            if level < len(ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, dropout), SelfAttention2d(cur),
                                  ResBlock(cur, cur, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(cur + skips.pop(), ch * mult, emb_dim, dropout)]
                cur = ch * mult
                if res in attn_resolutions:
                    blocks.append(SelfAttention2d(cur))
                self.up.append(nn.ModuleList(blocks))
            if level > 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2
        self.out = nn.Sequential(group_norm(cur), nn.SiLU(), nn.Conv2d(cur, in_ch, 3, padding=1))

    @staticmethod
    def _run(blocks: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in blocks.children():
            h = block(h, emb) if isinstance(block, (ResBlock, SelfAttention2d)) else block(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        if self.class_emb is not None and labels is not None:
            emb = emb + self.class_emb(labels)
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for blocks in self.up:
            if isinstance(next(blocks.children()), ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, emb)
        return self.out(h)


# -- Transformer (decoder-only, GPT-2 style) ------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # sampling: append this step's keys and values to the ones before
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        causal = cache is None or n > 1
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


# -- Convolutional autoencoder of the latent models (LDM / VQGAN style) ----------------------------

class SpatialEncoder(nn.Module):
    """Image -> feature map at 1/f resolution (f = 2^(levels-1)), ``out_ch`` channels; fully convolutional,
    as the first stage of LDM and VQGAN: the latent keeps the image's layout."""

    def __init__(self, in_ch: int, out_ch: int, ch: int, ch_mult: Sequence[int], res_blocks: int) -> None:
        super().__init__()
        chs = level_channels(ch, ch_mult)
        levels, prev = resolution_levels(chs, res_blocks, Downsample)
        self.net = nn.Sequential(nn.Conv2d(in_ch, chs[0], 3, padding=1), *levels, ResBlock(prev, prev),
                                 group_norm(prev), nn.SiLU(), nn.Conv2d(prev, out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpatialDecoder(nn.Module):
    """Feature map at 1/f resolution -> image (``out_ch`` channels), mirroring ``SpatialEncoder``."""

    def __init__(self, in_ch: int, out_ch: int, ch: int, ch_mult: Sequence[int], res_blocks: int) -> None:
        super().__init__()
        chs = level_channels(ch, ch_mult)[::-1]
        levels, prev = resolution_levels(chs, res_blocks, Upsample)
        self.net = nn.Sequential(nn.Conv2d(in_ch, chs[0], 3, padding=1), ResBlock(chs[0], chs[0]), *levels,
                                 group_norm(prev), nn.SiLU(), nn.Conv2d(prev, out_ch, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017) as taming-transformers' VQGAN uses it: strided 4x4 convs,
    one logit per patch. Stride-2 layers stop at a 2x2 map, so a 16x16 digit still gets patches."""

    def __init__(self, in_ch: int, image_size: int, ch: int = 64, max_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        cur, res = ch, image_size // 2
        for _ in range(max_layers - 1):
            if res <= 4:
                break
            layers += [nn.Conv2d(cur, cur * 2, 4, 2, 1), group_norm(cur * 2), nn.LeakyReLU(0.2)]
            cur, res = cur * 2, res // 2
        layers += [nn.Conv2d(cur, cur, 3, 1, 1), group_norm(cur), nn.LeakyReLU(0.2), nn.Conv2d(cur, 1, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
