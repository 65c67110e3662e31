"""GenerativeModule: the one interface every family implements.

The benchmark, data and CLI code only ever call what is defined here: ``training_step`` (Lightning),
``sample`` and ``cost``. Families differ inside their module, never outside it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, TypeVar

import torch
from pytorch_lightning import LightningModule
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.callbacks.weight_averaging import EMAWeightAveraging
from pytorch_lightning.utilities import GradClipAlgorithmType

from pipeline.data.imageops import to_uint8
from pipeline.models.first_stage import FirstStage, expecting
from pipeline.registry import Registry
from pipeline.seeds import stable_seed

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


class EMA(EMAWeightAveraging):
    """Lightning's EMA callback, except that the live weights stay live when training ends.

    Checkpoints already carry the average in ``state_dict`` (and the live weights beside it); copying
    the average over the live weights at the end would make the final checkpoint's live state a copy of
    the average, and a run resumed from it would continue from the wrong weights.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        pass


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a draw with ``seed``: independent of batch, device and rank."""
    return stable_seed(seed, index)


class PerSampleNoise:
    """One CPU generator per sample, so sample i gets the same noise whatever batch it is drawn in."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device) -> None:
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
        self.device = device

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g) for g in self.generators]).to(self.device)


class GenerativeModule(LightningModule):
    """Base of every family.

    Args:
        image_size: height = width of the images in pixels; must match the shards.
        channels: image channels (1 grayscale, 3 RGB); must match the shards.
        num_classes: None for an unconditional model, else the number of classes it is conditioned on.
        ema_decay: decay of the exponential moving average of the weights used for sampling and
            stored in checkpoints; None disables the average.
        sample_every_n_steps: save (and log) a sample grid every this many optimizer steps; 0 only at the end;
            negative never (a smoke test of a model whose sampling is slow, such as a 64x64 pixel transformer).
        compile: compile the network in place (``Module.compile``).
        sample_batch_size: rows of every network call when sampling (fixed, so samples do not depend on
            how many are drawn together); a memory/speed setting.
    """

    family = "base"  # each family's registry name, written once: FAMILIES registers it under this
    samples = True  # a generator; False for a first stage, which the benchmark scores on its reconstructions
    lr_keys: tuple[str, ...] = ("lr",)  # its learning-rate arguments, named when a run diverges

    # Keyword-only: a family passes its arguments by name, so none can land in another's place.
    def __init__(self, *, image_size: int = 32, channels: int = 3, num_classes: Optional[int] = None,
                 ema_decay: Optional[float] = 0.999, sample_every_n_steps: int = 500,
                 compile: bool = False, sample_batch_size: int = 256) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"model.image_size={image_size} is too small; use at least 4")
        if channels not in (1, 3):
            raise ValueError(f"model.channels={channels}: only 1 (grayscale) or 3 (RGB) channels are supported")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"model.num_classes={num_classes}: use None for unconditional, or at least 2 classes")
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.ema_decay = ema_decay
        self.sample_every_n_steps = sample_every_n_steps
        self.compile_network = compile
        if sample_batch_size < 1:
            raise ValueError(f"model.init_args.sample_batch_size={sample_batch_size} must be at least 1")
        self.sample_batch_size = sample_batch_size
        self.images_seen = 0
        # training cost in the budget's units (pipeline.fit.budget measures and accumulates them)
        self.flops_per_image: Optional[float] = None
        self.device_seconds = 0.0
        self.last_bits_per_dim: Optional[float] = None
        self._nonfinite: Optional[torch.Tensor] = None  # [first non-finite step, its loss], see check_finite
        self._batches_unchecked = 0
        self.first_stage: Optional[FirstStage] = None  # a two-stage model's autoencoder (pipeline.models.first_stage)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any):
        """Lightning's, with the checkpoint's first-stage record handed to ``__init__``: a two-stage model then
        refuses any other first stage (or a missing one) with the hash it was trained on."""
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
        with expecting(state.get("genbench", {}).get("first_stage")):
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # -- what every family implements ----------------------------------------------------------
    def generate(self, noise: PerSampleNoise, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Float images in [-1, 1], N x C x H x W, drawing all randomness from ``noise``."""
        raise NotImplementedError

    @property
    def nfe(self) -> int:
        """Network evaluations per sample."""
        return 1

    @property
    def clip_option(self) -> Optional[str]:
        """The option that clips this family's gradients: Lightning's, which a manually optimised family refuses
        (it names its own, or None)."""
        return "trainer.gradient_clip_val"

    @property
    def flops_period(self) -> int:
        """Training batches after which the work per batch repeats (the GAN's n_critic): FLOPs per image are
        measured over this many."""
        return 1

    # -- the common interface -----------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def default_labels(self, n: int, first_index: int = 0) -> Optional[torch.Tensor]:
        """Balanced labels for a conditional draw: sample i asks for class i mod K."""
        if self.num_classes is None:
            return None
        return torch.arange(first_index, first_index + n) % self.num_classes

    @torch.no_grad()
    def sample(self, n: int, labels: Optional[torch.Tensor] = None, seed: int = 0,
               first_index: int = 0) -> torch.Tensor:
        """``n`` samples as uint8 N x C x H x W; sample i depends only on (seed, first_index + i, label).

        The network always runs on batches of exactly ``sample_batch_size`` rows (the last one padded):
        kernels are chosen by shape, so a fixed shape makes each sample's numbers the same whether it
        is drawn alone, among 50,000, or on another rank.
        """
        if labels is None:
            labels = self.default_labels(n, first_index)
        elif not self.conditional:
            raise ValueError(f"this {self.family} model is unconditional (num_classes=None) but labels were given")
        elif len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for {n} samples")
        was_training = self.training
        self.eval()
        out = []
        chunk = self.sample_batch_size
        try:
            for start in range(0, n, chunk):
                indices = list(range(first_index + start, first_index + min(n, start + chunk)))
                pad = chunk - len(indices)
                noise = PerSampleNoise(seed, indices + [indices[-1]] * pad, self.device)
                y = None
                if labels is not None:
                    y = labels[start:start + len(indices)]
                    y = torch.cat([y, y[-1:].expand(pad)]).to(self.device)
                out.append(to_uint8(self.generate(noise, y))[:len(indices)].cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.channels, self.image_size, self.image_size,
                                                      dtype=torch.uint8)

    def cost(self) -> dict[str, Any]:
        """Cost figures for the leaderboard: parameters, network evaluations per sample, likelihood. A two-stage
        model counts its first stage in: its parameters, one decoder pass per sample (NFE and FLOPs) and its
        training FLOPs, so that latent and pixel models compare at equal compute."""
        own = None if self.flops_per_image is None else self.images_seen * self.flops_per_image
        out: dict[str, Any] = {"parameters": sum(p.numel() for p in self.parameters()), "nfe": self.nfe,
                               "bits_per_dim": self.last_bits_per_dim, "images_seen": self.images_seen,
                               "flops_per_image": self.flops_per_image, "training_flops": own}
        if self.first_stage is not None:
            first = self.first_stage.record
            out.update(parameters=out["parameters"] + first["parameters"], nfe=self.nfe + 1,
                       decoder_flops_per_sample=first["decoder_flops_per_sample"],
                       training_flops=None if own is None or first["training_flops"] is None
                       else own + first["training_flops"],
                       first_stage={k: first[k] for k in ("run_id", "sha256", "parameters", "images_seen",
                                                          "training_flops", "device_hours")})
        return out

    def attach_first_stage(self, run_dir: str, quantizer: Optional[str] = None) -> FirstStage:
        """Make this a two-stage model on the autoencoder of ``run_dir`` (its images are this model's images)."""
        first = FirstStage(run_dir, FAMILIES["autoencoder"], quantizer)
        ae = first.model
        if (ae.image_size, ae.channels) != (self.image_size, self.channels):
            raise ValueError(f"model.init_args.first_stage {run_dir} encodes {ae.channels}-channel {ae.image_size}x"
                             f"{ae.image_size} images but this model has channels={self.channels}, image_size="
                             f"{self.image_size}; set them to the autoencoder's")
        self.first_stage = first
        return first

    def first_stage_spent(self) -> dict[str, float]:
        """What the first stage's training cost, counted into this model's budget (FLOPs, device-hours)."""
        if self.first_stage is None:
            return {"flops": 0.0, "device_hours": 0.0}
        first = self.first_stage.record
        return {"flops": float(first["training_flops"] or 0.0), "device_hours": float(first["device_hours"] or 0.0)}

    def provenance(self) -> dict[str, Any]:
        """What run.json records about this model beyond its config: a two-stage model's first stage."""
        return {} if self.first_stage is None else {"first_stage": dict(self.first_stage.record)}

    # -- guards and bookkeeping -----------------------------------------------------------------
    def check_finite(self, loss: torch.Tensor) -> None:
        """Note the first step whose loss is NaN/inf, on the loss's device.

        An ``if`` on the loss here would make the host wait for the GPU at every step, so the test is
        deferred: ``raise_if_nonfinite`` reads the note at logging steps (when Lightning reads the logged
        values anyway), before every checkpoint is written and when training ends. Training stops with the
        exact step either way, and no checkpoint ever holds the weights of a diverged run.
        """
        loss = loss.detach().double().sum()  # losses are scalars; a sum keeps any NaN/inf
        if self._nonfinite is None:
            self._nonfinite = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=loss.device)
        # torch.full writes the step on the device: no host-to-device copy in the step
        found = torch.stack([torch.full((), float(self.global_step), dtype=torch.float64, device=loss.device), loss])
        first = ~torch.isfinite(loss) & (self._nonfinite[0] < 0)
        self._nonfinite = torch.where(first, found, self._nonfinite)

    def raise_if_nonfinite(self) -> None:
        """Stop with the step number rather than train on NaN/inf and produce silent garbage."""
        if self._nonfinite is None:
            return
        step, loss = self._nonfinite.tolist()
        if step >= 0:
            raise NonFiniteLoss(
                f"non-finite {self.family} loss ({loss}) at global step {int(step)}; lower "
                f"{' / '.join('model.init_args.' + k for k in self.lr_keys)}"
                + (f" or set {self.clip_option}" if self.clip_option else ""))

    def on_train_start(self) -> None:
        self._nonfinite, self._batches_unchecked = None, 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Counted before the step: callbacks' on_train_batch_end (which save checkpoints) run before
        # the module's, so a count made there would lag one batch behind in a checkpoint.
        self.images_seen += len(batch["image"]) * self.trainer.world_size
        # Shards are labelled throughout or not at all, so the first batch of an epoch tells (a test per
        # batch would be a host sync per step).
        if self.conditional and batch_idx == 0 and bool((batch["label"] < 0).any()):
            raise ValueError(f"a conditional {self.family} model (num_classes={self.num_classes}) was given unlabelled "
                             "images; set model.init_args.num_classes: null or use labelled shards")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batches_unchecked += 1
        if self._batches_unchecked >= self.trainer.log_every_n_steps:  # type: ignore[attr-defined]  # set by a connector
            self._batches_unchecked = 0
            self.raise_if_nonfinite()

    def on_train_end(self) -> None:
        self.raise_if_nonfinite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_if_nonfinite()  # raised before anything is written: a diverged run keeps its last good checkpoint
        checkpoint["genbench"] = {"images_seen": self.images_seen, "last_bits_per_dim": self.last_bits_per_dim,
                                  "family": self.family, "flops_per_image": self.flops_per_image,
                                  "device_seconds": self.device_seconds}
        if self.first_stage is not None:  # a checkpoint names the first stage it needs, by checksum
            checkpoint["genbench"]["first_stage"] = self.provenance()["first_stage"]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("genbench", {})
        if self.first_stage is not None:  # resuming (genbench fit) on a first stage retrained since
            self.first_stage.check(state.get("first_stage"))
        self.images_seen = state.get("images_seen", 0)
        self.last_bits_per_dim = state.get("last_bits_per_dim")
        self.flops_per_image = state.get("flops_per_image")
        self.device_seconds = state.get("device_seconds", 0.0)

    def configure_callbacks(self) -> list[Callback]:
        from pipeline.models.grids import SampleGrids

        callbacks: list[Callback] = [SampleGrids(self.sample_every_n_steps)] if self.sample_every_n_steps >= 0 else []
        if self.ema_decay is not None:
            callbacks.append(EMA(decay=self.ema_decay))
        return callbacks

    def adam(self, params, decoupled_weight_decay: bool = False, **kwargs: Any) -> torch.optim.Optimizer:
        """Adam (AdamW with ``decoupled_weight_decay``) as a fused optimizer: one kernel updates every
        parameter, instead of a dozen per-tensor-list kernels. Not under float16 mixed precision, where a
        fused optimizer unscales the gradients inside its step, after they would have been clipped."""
        fp16 = self._trainer is not None and str(self.trainer.precision).startswith("16")
        adam = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
        return adam(params, fused=not fp16, **kwargs)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer, even under bf16, which has no
        # gradient scaler and so nothing to unscale; without a scaler torch's own clipping is exactly Lightning's.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and optimizer.defaults.get("fused") and scaler is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def maybe_compile(self, module: ModuleT) -> ModuleT:
        """Compile in place (``Module.compile``): unlike wrapping with ``torch.compile``, the state-dict
        keys stay the same, so compiled and eager runs load each other's checkpoints."""
        if self.compile_network:
            module.compile()
        return module


def linear_warmup(optimizer: torch.optim.Optimizer, steps: int) -> dict[str, Any]:
    """Lightning's scheduler entry for a learning rate that ramps linearly over ``steps`` optimizer steps."""
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, steps)))
    return {"scheduler": schedule, "interval": "step"}


class NonFiniteLoss(FloatingPointError):
    """Training diverged: the step and the options that would prevent it."""


FAMILIES: Registry[GenerativeModule] = Registry("model family", GenerativeModule, name_attr="family")
