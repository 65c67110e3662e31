"""GANs in one module with manual optimisation: a DCGAN-style baseline (Radford et al. 2016) and an
SNGAN-style model (Miyato et al. 2018: spectral norm, hinge loss). Class-conditional through
class-conditional batch norm in the generator and a projection discriminator (Miyato & Koyama 2018)."""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.models.base import FAMILIES, GenerativeModule, PerSampleNoise


class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose scale and shift come from the class (plain affine BatchNorm when unconditional)."""

    def __init__(self, ch: int, num_classes: Optional[int]) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(ch, affine=num_classes is None)
        if num_classes:
            self.gamma, self.beta = nn.Embedding(num_classes, ch), nn.Embedding(num_classes, ch)
            nn.init.ones_(self.gamma.weight)
            nn.init.zeros_(self.beta.weight)
        self.conditional = bool(num_classes)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.bn(x)
        if self.conditional:
            h = self.gamma(labels)[:, :, None, None] * h + self.beta(labels)[:, :, None, None]
        return h


class Generator(nn.Module):
    def __init__(self, z_dim: int, channels: int, image_size: int, ch: int, num_classes: Optional[int]) -> None:
        super().__init__()
        levels = int(math.log2(image_size // 4))
        if 4 * 2 ** levels != image_size:
            raise ValueError(f"GAN image_size {image_size} must be 4 x a power of two (8, 16, 32, 64, ...)")
        widths = [ch * 2 ** (levels - i) for i in range(levels + 1)]
        self.top = widths[0]
        # the class enters twice: an embedding beside z (a strong signal from the first layer, as in
        # BigGAN's shared embedding) and the scale/shift of every batch norm
        self.class_emb = nn.Embedding(num_classes, z_dim) if num_classes else None
        self.fc = nn.Linear(2 * z_dim if num_classes else z_dim, widths[0] * 16)
        self.norms = nn.ModuleList([ConditionalBatchNorm(w, num_classes) for w in widths])
        self.convs = nn.ModuleList([nn.Conv2d(widths[i], widths[i + 1], 3, padding=1) for i in range(levels)])
        self.to_image = nn.Conv2d(widths[-1], channels, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        if self.class_emb is not None:
            z = torch.cat([z, self.class_emb(labels)], dim=1)
        h = self.fc(z).view(len(z), self.top, 4, 4)
        for norm, conv in zip(self.norms, self.convs):
            h = conv(F.interpolate(F.relu(norm(h, labels)), scale_factor=2.0, mode="nearest"))
        return torch.tanh(self.to_image(F.relu(self.norms[-1](h, labels))))


class Discriminator(nn.Module):
    def __init__(self, channels: int, image_size: int, ch: int, num_classes: Optional[int], sn: bool) -> None:
        super().__init__()
        wrap = spectral_norm if sn else (lambda m: m)
        levels = int(math.log2(image_size // 4))
        layers, cur = [wrap(nn.Conv2d(channels, ch, 3, padding=1)), nn.LeakyReLU(0.1)], ch
        for _ in range(levels):
            layers += [wrap(nn.Conv2d(cur, cur * 2, 4, stride=2, padding=1)), nn.LeakyReLU(0.1)]
            cur *= 2
        self.features = nn.Sequential(*layers)
        self.linear = wrap(nn.Linear(cur, 1))
        self.embed = wrap(nn.Embedding(num_classes, cur)) if num_classes else None

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.features(x).sum(dim=(2, 3))  # global sum pooling
        out = self.linear(h).squeeze(1)
        if self.embed is not None:  # projection: <embed(y), h>
            out = out + (self.embed(labels) * h).sum(1)
        return out


@FAMILIES.register()
class GAN(GenerativeModule):
    """GAN with manual optimisation.

    Args:
        arch: ``sngan`` (spectral norm in D, hinge loss) or ``dcgan`` (no spectral norm, non-saturating loss).
        z_dim: size of the latent noise vector.
        g_channels, d_channels: widths of generator and discriminator.
        lr_g, lr_d: learning rates (two time-scale update rule when they differ).
        betas: Adam betas of both optimizers.
        n_critic: discriminator steps per generator step.
        r1_gamma: weight of the R1 gradient penalty on real images (0 = off).
    """

    family = "gan"
    lr_keys = ("lr_g", "lr_d")

    def __init__(self, image_size: int = 32, channels: int = 3, num_classes: Optional[int] = None,
                 arch: Literal["sngan", "dcgan"] = "sngan", z_dim: int = 128, g_channels: int = 64,
                 d_channels: int = 64, lr_g: float = 2e-4, lr_d: float = 2e-4, betas: tuple[float, float] = (0.0, 0.9),
                 n_critic: int = 1, r1_gamma: float = 0.0, ema_decay: Optional[float] = 0.999,
                 sample_every_n_steps: int = 500, compile: bool = False,
                 sample_batch_size: int = 256) -> None:
        super().__init__(image_size=image_size, channels=channels, num_classes=num_classes, ema_decay=ema_decay,
                         sample_every_n_steps=sample_every_n_steps, compile=compile,
                         sample_batch_size=sample_batch_size)
        self.save_hyperparameters()
        self.automatic_optimization = False  # two optimizers, stepped in turn
        self.arch, self.z_dim, self.n_critic, self.r1_gamma = arch, z_dim, n_critic, r1_gamma
        self.generator = self.maybe_compile(Generator(z_dim, channels, image_size, g_channels, num_classes))
        self.discriminator = Discriminator(channels, image_size, d_channels, num_classes, sn=(arch == "sngan"))

    @property
    def clip_option(self) -> None:
        return None  # manual optimisation, no clipping: Lightning's gradient_clip_val is refused

    def _d_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        if self.arch == "sngan":  # hinge
            return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()

    def _g_loss(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return -fake_logits.mean() if self.arch == "sngan" else F.softplus(-fake_logits).mean()

    @property
    def flops_period(self) -> int:
        return self.n_critic  # one generator step every n_critic batches

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()  # type: ignore[attr-defined]  # a list: configure_optimizers returns two
        real = batch["image"]
        labels = batch["label"] if self.conditional else None
        z = torch.randn(len(real), self.z_dim, device=self.device)

        with self.toggled_optimizer(opt_d):  # only D's parameters take gradients
            real = real.requires_grad_(self.r1_gamma > 0)
            real_logits = self.discriminator(real, labels)
            fake_logits = self.discriminator(self.generator(z, labels).detach(), labels)
            d_loss = self._d_loss(real_logits, fake_logits)
            if self.r1_gamma > 0:  # R1: penalise D's gradient on real data (Mescheder et al. 2018)
                grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
                d_loss = d_loss + self.r1_gamma / 2 * grad.pow(2).flatten(1).sum(1).mean()
            self._step(opt_d, d_loss)
        self.log("train/d_loss", d_loss, prog_bar=True)

        if batch_idx % self.n_critic == 0:
            with self.toggled_optimizer(opt_g):
                g_loss = self._g_loss(self.discriminator(self.generator(z, labels), labels))
                self._step(opt_g, g_loss)
            self.log("train/g_loss", g_loss, prog_bar=True)

    def _step(self, optimizer, loss: torch.Tensor) -> None:
        self.check_finite(loss)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        labels = batch["label"] if self.conditional else None
        self.log("val/d_real", self.discriminator(batch["image"], labels).mean(), sync_dist=True,
                 batch_size=len(batch["image"]))

    def generate(self, noise: PerSampleNoise, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return self.generator(noise.randn(self.z_dim), labels)

    def configure_optimizers(self):
        betas = tuple(self.hparams.betas)
        return (self.adam(self.generator.parameters(), lr=self.hparams.lr_g, betas=betas),
                self.adam(self.discriminator.parameters(), lr=self.hparams.lr_d, betas=betas))
