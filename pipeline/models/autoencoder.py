"""The first stage of a latent model: a convolutional autoencoder, KL- or VQ-regularised.

``quantizer: kl`` is LDM's first stage (Rombach et al. 2022): a diagonal Gaussian latent with a small KL
weight, the space a latent DDPM (``DDPM(first_stage=...)``) diffuses in. ``quantizer: vq`` is VQGAN's
(Esser et al. 2021) with LlamaGen's codebook (l2-normalised low-dimensional codes): the discrete code grid a
token transformer (``Autoregressive(tokenizer=vq)``) predicts. Optional: taming's patch discriminator after
``disc_start`` steps, and an LPIPS perceptual loss (pipeline/models/perceptual.py).

An autoencoder is not a generator: ``benchmark --run`` scores its reconstructions of the val split, the
reference row below every latent model on this first stage (the best they can reach).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics import MeanMetric

from pipeline.data.imageops import save_png, to_uint8
from pipeline.models.base import FAMILIES, GenerativeModule, PerSampleNoise
from pipeline.models.nets import PatchDiscriminator, SpatialDecoder, SpatialEncoder, check_divisible
from pipeline.models.quantizers import DiagonalGaussian, VectorQuantizer, codebook_usage

if TYPE_CHECKING:
    from pipeline.models.perceptual import LPIPSLoss

DEFAULT_CH_MULT = (1, 2, 2, 4)  # LDM's first stages widen as they downsample
DOWNSAMPLE_FACTORS = (1, 2, 4, 8)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak 1 on the [0, 1] scale)."""
    mse = ((x - y) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return -10 * torch.log10(mse)


@FAMILIES.register()
class Autoencoder(GenerativeModule):
    """Convolutional autoencoder, the first stage of the two-stage models.

    Args:
        quantizer: ``kl`` (Gaussian latent, KL-regularised) or ``vq`` (codebook).
        downsample: the factor f between image and latent side (1, 2, 4 or 8).
        latent_channels: channels of the latent (kl); of the encoder's output, projected to ``code_dim`` when they
            differ (vq).
        ch: channels of the first level; ``ch_mult`` (one entry per level, log2(f) + 1 of them) widens the rest.
        num_res_blocks: residual blocks per level.
        kl_weight: weight of the KL term (LDM uses 1e-6: a near-deterministic latent).
        codebook_size, code_dim: number and dimension of the codes (vq).
        commitment_weight: the commitment loss's beta (vq).
        l2_normalize: search codes and encoder outputs on the unit sphere (LlamaGen; against codebook collapse).
        recon_loss: ``l1`` or ``l2`` pixel loss.
        disc_weight: weight of the adversarial (hinge) loss of a patch discriminator; 0 = none.
        disc_start: optimizer step the discriminator (and its loss) starts at.
        perceptual_weight: weight of the LPIPS loss; 0 = none.
        perceptual_weights: the VGG16 weight file LPIPS runs on (else the torch hub cache, then a download);
            when none can be had the loss is skipped and the reason logged.
        lr: Adam learning rate (both optimizers).
        grad_clip: gradient-norm clip of the autoencoder's step (the optimisation is manual: trainer.gradient_clip_val
            does not apply).
    """

    family = "autoencoder"
    samples = False  # scored on its reconstructions (benchmark --run): the floor of the latent models on it

    def __init__(self, image_size: int = 32, channels: int = 3, num_classes: Optional[int] = None,
                 quantizer: Literal["kl", "vq"] = "kl", downsample: int = 4, latent_channels: int = 4, ch: int = 64,
                 ch_mult: Optional[Sequence[int]] = None, num_res_blocks: int = 1, kl_weight: float = 1e-6,
                 codebook_size: int = 1024, code_dim: int = 8, commitment_weight: float = 0.25,
                 l2_normalize: bool = True, recon_loss: Literal["l1", "l2"] = "l1", disc_weight: float = 0.0,
                 disc_start: int = 0, perceptual_weight: float = 0.0, perceptual_weights: Optional[str] = None,
                 lr: float = 1e-3, grad_clip: Optional[float] = 1.0, ema_decay: Optional[float] = None,
                 sample_every_n_steps: int = 500, compile: bool = False, sample_batch_size: int = 256) -> None:
        super().__init__(image_size=image_size, channels=channels, num_classes=num_classes, ema_decay=ema_decay,
                         sample_every_n_steps=sample_every_n_steps, compile=compile,
                         sample_batch_size=sample_batch_size)
        if num_classes is not None:
            raise ValueError("model.init_args.num_classes: an autoencoder is unconditional; set it to null (the "
                             "latent model on top of it is the one conditioned on classes)")
        if downsample not in DOWNSAMPLE_FACTORS:
            raise ValueError(f"model.init_args.downsample={downsample}: use one of {DOWNSAMPLE_FACTORS}")
        levels = int(math.log2(downsample)) + 1
        ch_mult = tuple(ch_mult) if ch_mult is not None else DEFAULT_CH_MULT[:levels]
        if len(ch_mult) != levels:
            raise ValueError(f"model.init_args.ch_mult={list(ch_mult)} has {len(ch_mult)} levels but downsample="
                             f"{downsample} needs log2({downsample}) + 1 = {levels}")
        check_divisible(image_size, ch_mult)
        for name, value in (("latent_channels", latent_channels), ("codebook_size", codebook_size),
                            ("code_dim", code_dim), ("ch", ch)):
            if value < 1:
                raise ValueError(f"model.init_args.{name}={value} must be at least 1")
        if quantizer == "vq" and codebook_size < 2:
            raise ValueError(f"model.init_args.codebook_size={codebook_size} must be at least 2: one code turns every "
                             "image into the same tokens")
        for name, weight in (("kl_weight", kl_weight), ("commitment_weight", commitment_weight),
                             ("disc_weight", disc_weight), ("perceptual_weight", perceptual_weight)):
            if weight < 0:  # a negative weight rewards the error it should punish
                raise ValueError(f"model.init_args.{name}={weight} must be 0 or more")
        self.lr = lr
        self.save_hyperparameters()
        self.automatic_optimization = False  # the discriminator's step is its own (and not a global step)
        self.quantizer_kind, self.downsample = quantizer, downsample
        self.kl_weight, self.recon_loss, self.grad_clip = kl_weight, recon_loss, grad_clip
        self.disc_weight, self.disc_start, self.perceptual_weight = disc_weight, disc_start, perceptual_weight
        moments = 2 * latent_channels if quantizer == "kl" else latent_channels  # kl: mean and log-variance
        encoder: torch.nn.Module = SpatialEncoder(channels, moments, ch, ch_mult, num_res_blocks)
        decoder: torch.nn.Module = SpatialDecoder(latent_channels, channels, ch, ch_mult, num_res_blocks)
        # 1x1 projections to and from the low-dimensional codes (LlamaGen's quant_conv, 256 -> 8 channels); none when
        # the encoder is as narrow as the codes: on digits (4 -> 4) a projection cut the codebook in use from 100%
        # to 22% of 256 codes (benchmarks/two_stage.py --only codebook)
        if quantizer == "vq" and latent_channels != code_dim:
            encoder = torch.nn.Sequential(encoder, torch.nn.Conv2d(latent_channels, code_dim, 1))
            decoder = torch.nn.Sequential(torch.nn.Conv2d(code_dim, latent_channels, 1), decoder)
        self.encoder, self.decoder = self.maybe_compile(encoder), self.maybe_compile(decoder)
        self.gaussian = DiagonalGaussian() if quantizer == "kl" else None
        self.quantizer = VectorQuantizer(codebook_size, code_dim, commitment_weight, l2_normalize) \
            if quantizer == "vq" else None
        self.discriminator = PatchDiscriminator(channels, image_size, ch) if disc_weight > 0 else None
        # Not a submodule: the frozen VGG stays out of the state dict, checkpoints and the EMA copy, so a checkpoint
        # loads where no VGG weights are (loading with perceptual_weight > 0 just logs the loss as skipped).
        perceptual = None
        if perceptual_weight > 0:
            from pipeline.models.perceptual import load_lpips

            perceptual = load_lpips(perceptual_weights)  # None (and the reason logged) without weights
        object.__setattr__(self, "perceptual", perceptual)
        self.perceptual: Optional[LPIPSLoss]  # set above, outside the module registry
        self.val_psnr, self.val_rec = MeanMetric(), MeanMetric()
        self._val_counts: Optional[torch.Tensor] = None

    @property
    def clip_option(self) -> str:
        return "model.init_args.grad_clip"  # manual optimisation: Lightning's gradient_clip_val is refused

    # -- the latent space the second stage sees ------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Channels, height, width of ``encode``'s output (the DDPM's images; the vq code grid is h x w)."""
        c = self.hparams["latent_channels"] if self.quantizer_kind == "kl" else self.hparams["code_dim"]
        side = self.image_size // self.downsample
        return c, side, side

    @property
    def codebook_size(self) -> int:
        """Codes in the codebook (vq); 0 for kl."""
        return self.quantizer.codebook_size if self.quantizer is not None else 0

    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Images in [-1, 1] -> latents: the posterior mean (or a draw, ``sample``) for kl; the encoder's
        output before quantisation for vq (``decode`` quantises, as LDM's VQ-regularised models do)."""
        h = self.encoder(x)
        if self.gaussian is not None:
            return self.gaussian(h, sample=sample)[0]
        return h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.quantizer is not None:
            z = self.quantizer.lookup(self.quantizer.nearest(z))
        return self.decoder(z)

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> N x h x w code indices (vq)."""
        assert self.quantizer is not None, "encode_indices needs a vq autoencoder"
        return self.quantizer.nearest(self.encoder(x))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        assert self.quantizer is not None, "decode_indices needs a vq autoencoder"
        return self.decoder(self.quantizer.lookup(indices))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstructions (the posterior mean for kl) in [-1, 1]."""
        return self.decode(self.encode(x)).clamp(-1, 1)

    def decoder_flops(self) -> int:
        """FLOPs of decoding one latent to pixels: what a latent model adds to every sample."""
        z = torch.zeros(1, *self.latent_shape, device=self.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.decode(z)
        return int(counter.get_total_flops())

    # -- training -------------------------------------------------------------------------------
    def _losses(self, x: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction, the weighted regulariser (+ perceptual), and what is logged."""
        h = self.encoder(x)
        logs: dict[str, torch.Tensor] = {}
        if self.gaussian is not None:
            z, kl = self.gaussian(h, sample=sample)
            reg = self.kl_weight * kl.mean() / x[0].numel()  # LDM's weight on a per-image sum, here per pixel
            logs["kl"] = kl.mean()
        else:
            assert self.quantizer is not None
            z, reg, indices = self.quantizer(h)
            logs["indices"] = indices
        rec = self.decoder(z)
        diff = (rec - x).abs() if self.recon_loss == "l1" else (rec - x).pow(2)
        rec_loss = diff.mean()
        if self.perceptual is not None:
            p = self.perceptual.to(x.device)(rec, x).mean()
            logs["perceptual"] = p
            rec_loss = rec_loss + self.perceptual_weight * p
        logs["rec"] = rec  # with its graph: the generator's adversarial loss goes through it
        return rec_loss, reg, logs

    def training_step(self, batch: dict, batch_idx: int) -> None:
        optimizers = self.optimizers()
        opt_ae, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        x = batch["image"]
        rec_loss, reg, logs = self._losses(x, sample=True)
        loss = rec_loss + reg
        adversarial = self.discriminator is not None and self.global_step >= self.disc_start
        if adversarial:
            assert self.discriminator is not None
            with self.toggled_optimizer(opt_ae):  # D's parameters take no gradient from the generator's loss
                g_loss = -self.discriminator(logs["rec"]).mean()
            loss = loss + self.disc_weight * g_loss
            self.log("train/g_loss", g_loss)
        self.check_finite(loss)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt_ae.param_groups for p in g["params"]], self.grad_clip)
        opt_ae.step()
        if adversarial and opt_d is not None:
            assert self.discriminator is not None
            with self.toggled_optimizer(opt_d):
                real, fake = self.discriminator(x), self.discriminator(logs["rec"].detach())
                d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()  # hinge, as taming
                self.check_finite(d_loss)
                opt_d.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
                opt_d.optimizer.step()  # the raw optimizer: global_step counts the autoencoder's steps only
            self.log("train/d_loss", d_loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/rec_loss", rec_loss)
        self.log("train/psnr", psnr(logs["rec"].detach(), x).mean(), prog_bar=True)
        if "kl" in logs:
            self.log("train/kl", logs["kl"])
        if "perceptual" in logs:
            self.log("train/perceptual", logs["perceptual"])
        if "indices" in logs:
            counts = torch.bincount(logs["indices"].flatten(), minlength=self.codebook_size)
            self.log("train/codebook_usage", codebook_usage(counts)[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        rec_loss, _, logs = self._losses(x, sample=False)
        rec = logs["rec"].detach().clamp(-1, 1)
        self.val_psnr.update(psnr(rec, x))
        self.val_rec.update(rec_loss.detach().expand(len(x)))
        if "indices" in logs:
            counts = torch.bincount(logs["indices"].flatten(), minlength=self.codebook_size)
            self._val_counts = counts if self._val_counts is None else self._val_counts + counts
        if batch_idx == 0 and self.trainer.is_global_zero:
            self._save_reconstructions(x[:32], rec[:32])

    def _save_reconstructions(self, x: torch.Tensor, rec: torch.Tensor) -> None:
        """Originals above their reconstructions, in the run's samples/ (an autoencoder has no sample grid)."""
        from torchvision.utils import make_grid

        rows = torch.cat([torch.cat([to_uint8(x[i:i + 8]), to_uint8(rec[i:i + 8])]) for i in range(0, len(x), 8)])
        grid = make_grid(rows.cpu(), nrow=min(8, len(x)), padding=1)
        path = Path(self.trainer.default_root_dir) / "samples" / f"reconstructions-step-{self.global_step:07d}.png"
        save_png(grid, path, max(1, 512 // grid.shape[-1]))

    def on_validation_epoch_end(self) -> None:
        self.log_dict({"val/psnr": self.val_psnr.compute(), "val/rec_loss": self.val_rec.compute()}, prog_bar=True)
        self.val_psnr.reset()
        self.val_rec.reset()
        if self._val_counts is not None:
            counts = self._val_counts
            if self.trainer.world_size > 1:
                counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
            usage, perplexity = codebook_usage(counts)
            self.log_dict({"val/codebook_usage": usage, "val/perplexity": perplexity}, prog_bar=True)
            self._val_counts = None

    def configure_optimizers(self):
        ae = [p for name, p in self.named_parameters() if not name.startswith("discriminator.")]
        opt = self.adam(ae, lr=self.lr, betas=(0.5, 0.9))  # taming's betas
        if self.discriminator is None:
            return opt
        return opt, self.adam(self.discriminator.parameters(), lr=self.lr, betas=(0.5, 0.9))

    # -- the interface: an autoencoder does not sample -------------------------------------------
    def generate(self, noise: PerSampleNoise, labels: Optional[torch.Tensor]) -> torch.Tensor:
        raise TypeError("an autoencoder is a first stage, not a generator: it has no prior to sample from. "
                        "genbench benchmark --run scores its reconstructions; train a latent model on it "
                        "(model.init_args.first_stage) to sample")

    def configure_callbacks(self) -> list:
        from pipeline.models.grids import SampleGrids

        # the reconstruction grid of validation_step takes the sample grid's place
        return [cb for cb in super().configure_callbacks() if not isinstance(cb, SampleGrids)]

    def cost(self) -> dict[str, Any]:
        out = super().cost()
        # what inference runs: the discriminator only trains it
        out["parameters"] = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("discriminator."))
        out["decoder_flops_per_sample"] = self.decoder_flops()
        return out
