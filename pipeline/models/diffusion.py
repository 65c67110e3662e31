"""DDPM (Ho et al. 2020): epsilon prediction, linear or cosine noise schedule, ancestral and DDIM
sampling, classifier-free guidance (Ho & Salimans 2022) for the class-conditional variant."""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch.nn import functional as F

from pipeline.models.base import FAMILIES, GenerativeModule, PerSampleNoise, linear_warmup
from pipeline.models.nets import UNet


def beta_schedule(kind: str, steps: int) -> torch.Tensor:
    if kind == "linear":  # Ho et al.: 1e-4 to 0.02 over 1000 steps, scaled for other lengths
        scale = 1000 / steps
        # short schedules (T < 50) would reach beta = 1, where 1 / sqrt(1 - beta) blows up
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64).clamp(max=0.999)
    if kind == "cosine":  # Nichol & Dhariwal 2021
        s = 0.008
        t = torch.linspace(0, steps, steps + 1, dtype=torch.float64) / steps
        abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"model.init_args.schedule={kind!r}: use linear or cosine")


@FAMILIES.register()
class DDPM(GenerativeModule):
    """Denoising diffusion probabilistic model.

    Args:
        timesteps: diffusion steps T of training (1000 in Ho et al.).
        schedule: ``linear`` (Ho et al.) or ``cosine`` (Nichol & Dhariwal) noise schedule.
        ch, ch_mult, num_res_blocks, attn_resolutions, dropout: the UNet (Ho et al. CIFAR-10: 128,
            [1,2,2,2], 2, [16], 0.1).
        sampler: ``ddim`` (deterministic, ``sampling_steps`` steps) or ``ancestral`` (all T steps).
        sampling_steps: DDIM steps.
        p_uncond: probability of dropping the label in training (classifier-free guidance).
        guidance_scale: 1 samples the conditional model; s > 1 extrapolates away from the unconditional one.
        lr: Adam learning rate.
        warmup_steps: linear learning-rate warm-up.
        channels_last: keep the UNet's weights and activations in NHWC, the layout tensor-core convolutions
            run in (faster in bf16 on a GPU; the same numbers up to rounding).
        first_stage: an autoencoder's run directory: a latent diffusion model (Rombach et al. 2022) that diffuses
            that autoencoder's latents, encoded on the fly, and decodes its samples to pixels.
        latent_scale: the factor latents are multiplied by; None computes it as LDM does, 1 / std of the first
            training batch's latents (all ranks'), so the diffusion sees unit variance. Kept in checkpoints and
            run.json.
        latent_clip: a latent model's sampler clips its estimate of the clean (scaled, unit-variance) latent to
            +-latent_clip, as a pixel model clips to [-1, 1]; None clips nothing (LDM's clip_denoised=False). At
            t near T the estimate divides by sqrt(alpha-bar_T) (2e-9 under the cosine schedule, 4e-5 under the
            linear one) and a small model's error there, unclipped, sends the whole chain off the data.
    """

    family = "ddpm"
    betas: torch.Tensor  # buffers registered in __init__
    alphas_cumprod: torch.Tensor
    latent_scale: torch.Tensor  # a latent model's (registered only with a first stage)

    def __init__(self, image_size: int = 32, channels: int = 3, num_classes: Optional[int] = None,
                 timesteps: int = 1000, schedule: Literal["linear", "cosine"] = "linear", ch: int = 128,
                 ch_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1,
                 sampler: Literal["ddim", "ancestral"] = "ddim", sampling_steps: int = 100, p_uncond: float = 0.1,
                 guidance_scale: float = 1.0, lr: float = 2e-4, warmup_steps: int = 5000,
                 ema_decay: Optional[float] = 0.9999, sample_every_n_steps: int = 500, compile: bool = False,
                 sample_batch_size: int = 256, channels_last: bool = False, first_stage: Optional[str] = None,
                 latent_scale: Optional[float] = None, latent_clip: Optional[float] = 4.0) -> None:
        super().__init__(image_size=image_size, channels=channels, num_classes=num_classes, ema_decay=ema_decay,
                         sample_every_n_steps=sample_every_n_steps, compile=compile,
                         sample_batch_size=sample_batch_size)
        self.lr = lr
        self.save_hyperparameters()
        if not 1 <= sampling_steps <= timesteps:
            raise ValueError(f"model.init_args.sampling_steps={sampling_steps} must be in [1, timesteps={timesteps}]")
        self.timesteps, self.sampler, self.sampling_steps = timesteps, sampler, sampling_steps
        self.p_uncond, self.guidance_scale, self.warmup_steps = p_uncond, guidance_scale, warmup_steps
        betas = beta_schedule(schedule, timesteps)
        abar = torch.cumprod(1 - betas, 0)
        # float64 schedule, stored as buffers so it follows the module to its device
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        # the samplers' scalars come from host copies: reading one from a GPU buffer is a sync per step
        self.host_betas, self.host_alphas_cumprod = betas.tolist(), abar.tolist()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        shape = (channels, image_size, image_size)
        if first_stage is not None:
            shape = self.attach_first_stage(first_stage).model.latent_shape
            if latent_scale is not None and latent_scale <= 0:
                raise ValueError(f"model.init_args.latent_scale={latent_scale} must be positive (or null: computed)")
            # a buffer, so it is in every checkpoint's state dict (the EMA copy's too); 0 until computed
            self.register_buffer("latent_scale", torch.tensor(float(latent_scale or 0.0)))
        self._scale_known = latent_scale is not None
        if latent_clip is not None and latent_clip <= 0:
            raise ValueError(f"model.init_args.latent_clip={latent_clip} must be positive (or null: no clipping)")
        self.latent_clip = latent_clip
        self.shape = shape  # what is diffused: the image, or the first stage's latent
        net = UNet(shape[0], shape[1], ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_classes)
        self.net = self.maybe_compile(net.to(memory_format=self.memory_format))

    @property
    def nfe(self) -> int:
        steps = self.timesteps if self.sampler == "ancestral" else self.sampling_steps
        return steps * (2 if self.conditional and self.guidance_scale != 1.0 else 1)

    def denoising_loss(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                       labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Epsilon-prediction MSE at timesteps ``t``: noise x0 to x_t in closed form, predict the noise."""
        abar = self.alphas_cumprod[t].float()[:, None, None, None]
        x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).contiguous(memory_format=self.memory_format)
        return F.mse_loss(self.net(x_t, t, labels), eps)

    def latents(self, images: torch.Tensor, sample: bool) -> torch.Tensor:
        """What is diffused: the images themselves, or the first stage's scaled latents of them (a posterior
        draw in training, as LDM; the mean in validation)."""
        if self.first_stage is None:
            return images
        z = self.first_stage.encode(images, sample=sample)
        if not self._scale_known:
            if not self.training:  # Lightning's sanity check before the first step: a provisional factor
                return z * z.float().var().rsqrt()
            self._set_latent_scale(z)  # from training images only
        return z * self.latent_scale

    def _set_latent_scale(self, z: torch.Tensor) -> None:
        var = z.float().var()
        if self._trainer is not None and self.trainer.world_size > 1:  # the same factor on every rank
            var = self.trainer.strategy.reduce(var, reduce_op="mean")
        self.latent_scale.fill_(float(var.rsqrt()))
        self._scale_known = True

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.first_stage is not None:  # restored from a checkpoint by now (one host read per fit)
            self._scale_known = bool(self.latent_scale.item() > 0)

    def provenance(self) -> dict:
        out = super().provenance()
        if self.first_stage is not None:
            out["latent_scale"] = float(self.latent_scale) if self._scale_known else None
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = self.latents(batch["image"], sample=True)
        n = len(x0)
        t = torch.randint(0, self.timesteps, (n,), device=self.device)
        labels = None
        if self.num_classes is not None:
            drop = torch.rand(n, device=self.device) < self.p_uncond
            # the "no class" embedding; torch.where, not labels[drop] = ..., which waits for the GPU
            labels = torch.where(drop, self.num_classes, batch["label"])
        loss = self.denoising_loss(x0, t, torch.randn_like(x0), labels)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # the same objective on held-out images, at fixed timesteps and noise so epochs compare
        x0 = self.latents(batch["image"], sample=False)
        g = torch.Generator(device="cpu").manual_seed(batch_idx)
        t = torch.randint(0, self.timesteps, (len(x0),), generator=g).to(self.device)
        eps = torch.randn(x0.shape, generator=g).to(self.device)
        loss = self.denoising_loss(x0, t, eps, batch["label"] if self.conditional else None)
        self.log("val/loss", loss, sync_dist=True, prog_bar=True, batch_size=len(x0))

    def _eps(self, x: torch.Tensor, t: int, labels: Optional[torch.Tensor]) -> torch.Tensor:
        tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        x = x.contiguous(memory_format=self.memory_format)
        if self.num_classes is None or labels is None:
            return self.net(x, tt)
        if self.guidance_scale == 1.0:
            return self.net(x, tt, labels)
        uncond = torch.full_like(labels, self.num_classes)
        both = self.net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, uncond]))
        cond, free = both.chunk(2)
        return free + self.guidance_scale * (cond - free)

    def generate(self, noise: PerSampleNoise, labels: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.diffuse(noise, labels)
        if self.first_stage is None:
            return x
        return self.first_stage.decode(x / self.latent_scale)

    def diffuse(self, noise: PerSampleNoise, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The reverse process from noise to a sample of what is diffused (images, or scaled latents)."""
        shape = self.shape
        # pixels live in [-1, 1]; scaled latents have unit variance, and are clipped at latent_clip of it
        bound = 1.0 if self.first_stage is None else self.latent_clip or math.inf
        lo, hi = -bound, bound
        x = noise.randn(*shape)
        abar = self.host_alphas_cumprod
        if self.sampler == "ancestral":
            for t in range(self.timesteps - 1, -1, -1):
                eps = self._eps(x, t, labels)
                beta, a_t = self.host_betas[t], abar[t]
                mean = (x - beta / math.sqrt(1 - a_t) * eps) / math.sqrt(1 - beta)
                if t > 0:  # posterior variance (beta tilde)
                    var = beta * (1 - abar[t - 1]) / (1 - a_t)
                    x = mean + math.sqrt(var) * noise.randn(*shape)
                else:
                    x = mean
            return x.clamp(lo, hi)
        # DDIM, eta = 0: deterministic given x_T
        times = torch.linspace(self.timesteps - 1, 0, self.sampling_steps).round().long().tolist()
        for i, t in enumerate(times):
            eps = self._eps(x, t, labels)
            a_t = abar[t]
            x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(lo, hi)
            a_prev = abar[times[i + 1]] if i + 1 < len(times) else 1.0
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        return x.clamp(lo, hi)

    def configure_optimizers(self):
        opt = self.adam(self.net.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": linear_warmup(opt, self.warmup_steps)}
