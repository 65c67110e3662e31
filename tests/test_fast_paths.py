"""The fast paths compute what the plain ones do, on the same batch and weights: compiled networks (the
cifar10 experiments' `compile: true`, inductor on this CPU) against eager ones, the channels-last UNet
against the contiguous one, and the fused optimizers still clipped under bf16 mixed precision."""

from __future__ import annotations

import pytest
import torch
from jsonargparse.typing import import_object
from pytorch_lightning import Callback, Trainer

from conftest import REPO
from pipeline.data.datamodule import ShardDataModule
from pipeline.fit.train import resolve


def _digits_model(family: str, **overrides):
    config = resolve(["--config", str(REPO / "experiments" / "digits" / f"{family}.yaml")]).config.model
    torch.manual_seed(0)
    return import_object(config.class_path)(**{**config.init_args.as_dict(), **overrides})


def _ddpm_batch(timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fixed batch (x0, t, eps) of the digits DDPM."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 8, 8, generator=generator) * 2 - 1
    t = torch.randint(0, timesteps, (16,), generator=generator)
    return x, t, torch.randn(x.shape, generator=generator)


def _ddpm_losses_and_gradients(models) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each DDPM's denoising loss on the fixed batch, and its UNet's gradient as one vector."""
    batch = _ddpm_batch(models[0].timesteps)
    losses = [m.denoising_loss(*batch, None) for m in models]
    for loss in losses:
        loss.backward()
    return losses, [torch.cat([p.grad.flatten() for p in m.net.parameters()]) for m in models]


@pytest.mark.slow
def test_compiled_ddpm_gives_the_eager_loss_and_gradients():
    eager = _digits_model("ddpm", compile=False, dropout=0.0)
    compiled = _digits_model("ddpm", compile=True, dropout=0.0)
    compiled.load_state_dict(eager.state_dict())
    losses, grads = _ddpm_losses_and_gradients([eager, compiled])
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16: equal to bf16 precision
        bf16 = [m.denoising_loss(*_ddpm_batch(eager.timesteps), None).float().item() for m in (eager, compiled)]
    assert bf16[1] == pytest.approx(bf16[0], rel=2e-2)
    assert bf16[0] == pytest.approx(losses[0].item(), rel=5e-2)


def _vae_loss(model, x):
    torch.manual_seed(2)  # the reparameterisation noise
    nll, kl = model.negative_elbo(x, None)
    return (nll + kl).mean()


def _gan_loss(model, x):  # only the generator is compiled
    z = torch.randn(len(x), model.z_dim, generator=torch.Generator().manual_seed(2))
    return model.discriminator(model.generator(z, None), None).mean()


LOSSES = {"vae": _vae_loss, "gan": _gan_loss, "ar": lambda model, x: model._nll({"image": x})}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(LOSSES))
def test_every_family_compiles_to_its_eager_loss_and_gradients(family):
    """The cifar10 experiments train compiled: each family's compiled modules must compute what eager ones do."""
    eager = _digits_model(family, compile=False, num_classes=None)
    compiled = _digits_model(family, compile=True, num_classes=None)
    compiled.load_state_dict(eager.state_dict())
    x = (torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1).round(decimals=2)
    losses = [LOSSES[family](m.train(), x) for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (eager, compiled)]
    assert len(grads[0]) == len(grads[1]) > 0
    # relative to the gradient's norm: a VAE's summed per-pixel NLL has gradients from 1e-2 to 1e2
    assert (grads[1] - grads[0]).norm() <= 1e-4 * grads[0].norm()
    # Module.compile keeps the state-dict keys (load_state_dict above), so checkpoints load across the two
    assert torch.equal(compiled.eval().sample(4, seed=0), eager.eval().sample(4, seed=0))


def test_channels_last_unet_gives_the_contiguous_loss_gradients_and_samples():
    plain = _digits_model("ddpm", channels_last=False, dropout=0.0, sampling_steps=5)
    nhwc = _digits_model("ddpm", channels_last=True, dropout=0.0, sampling_steps=5)
    nhwc.load_state_dict(plain.state_dict())  # checkpoints load across layouts
    conv = nhwc.net.down[0][0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    losses, grads = _ddpm_losses_and_gradients([plain, nhwc])
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    samples = [m.sample(6, seed=3).int() for m in (plain, nhwc)]
    assert (samples[1] - samples[0]).abs().max() <= 1  # uint8 images, equal up to a rounding step


class _GradNorms(Callback):
    """The total gradient norm each optimizer step was taken with (after clipping). Read after the step: Lightning
    runs forward and backward in a closure inside ``optimizer.step``."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self.norms.append(float(torch.cat(
                [p.grad.flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None]).norm())))


@pytest.mark.slow
def test_fused_adam_is_clipped_under_bf16_mixed_precision(tmp_path, digits_shards):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer; the families clip it themselves."""
    model = _digits_model("ddpm", image_size=8, channels=1, num_classes=None)
    norms = _GradNorms()
    trainer = Trainer(max_steps=3, precision="bf16-mixed", gradient_clip_val=1e-3, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                      limit_val_batches=0, callbacks=[norms])
    trainer.fit(model, datamodule=ShardDataModule(str(digits_shards), batch_size=16, num_workers=0))
    assert trainer.optimizers[0].defaults["fused"]
    assert len(norms.norms) == 3 and max(norms.norms) <= 1e-3 * (1 + 1e-4)
