"""The fast paths compute what the plain ones do: a compiled network (the families' `compile: true`,
inductor on this CPU) against the same network eager, on the same batch and weights."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from jsonargparse.typing import import_object

from pipeline.train import resolve


@pytest.mark.slow
def test_compiled_ddpm_gives_the_eager_loss_and_gradients():
    config = resolve(["--config", str(REPO / "experiments" / "digits" / "ddpm.yaml")]).config.model
    init = config.init_args.as_dict()
    torch.manual_seed(0)
    eager = import_object(config.class_path)(**{**init, "compile": False, "dropout": 0.0})
    compiled = import_object(config.class_path)(**{**init, "compile": True, "dropout": 0.0})
    compiled.load_state_dict(eager.state_dict())
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 8, 8, generator=generator) * 2 - 1
    t = torch.randint(0, eager.timesteps, (16,), generator=generator)
    eps = torch.randn(x.shape, generator=generator)

    losses = [m.denoising_loss(x, t, eps, None) for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    grads = [torch.cat([p.grad.flatten() for p in m.net.parameters()]) for m in (eager, compiled)]
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16: equal to bf16 precision
        bf16 = [m.denoising_loss(x, t, eps, None).float().item() for m in (eager, compiled)]
    assert bf16[1] == pytest.approx(bf16[0], rel=2e-2)
    assert bf16[0] == pytest.approx(losses[0].item(), rel=5e-2)
