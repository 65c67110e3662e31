"""Training images/s of `genbench fit` against a plain PyTorch loop over the same network, in the same run.

`genbench fit` side: the family's CIFAR-10 experiment (experiments/cifar10/<family>.yaml) with a real
Trainer, the real ShardDataModule over 32x32 RGB shards written here, EMA and logging (CSV + offline W&B)
on; bf16-mixed on a GPU, fp32 on a CPU. Baseline: the same network, built from the same config, with its
own optimizer, trained on synthetic tensors already on the device, with no Lightning, no loader, no EMA
and no logging. The ratio is what Lightning, data loading, EMA and logging cost (target >= 0.95).
Model FLOPs utilisation = FLOPs per image (forward + backward, `torch.utils.flop_counter`) x images/s /
the device's dense bf16 peak.

    PYTHONPATH=. .venv/bin/python benchmarks/train_throughput.py --family ddpm --batch-size 512   # on a GPU
    PYTHONPATH=. .venv/bin/python benchmarks/train_throughput.py --family all --small             # CI: CPU, tiny

Results are merged into benchmarks/results/<device>.json under "train_throughput" (or --out).
`--small` trains the digits experiments' small networks on 16x16 RGB images for a few steps: it only
checks that the script works; its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import REPO, StepTimer, bf16_peak, device, device_name, merge_results, results_path, sync
from pipeline.data.shards import write_shards
from pipeline.data.sources import FolderSource
from pipeline.fit.train import GenbenchCLI

FAMILIES = ("ddpm", "vae", "gan", "ar")


def make_shards(root: Path, n: int, size: int) -> Path:
    """n RGB images with some structure (smooth gradients + noise) as shards, 10 classes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    folder = root / "images"
    for i in range(n):
        base = (np.sin(xx / rng.uniform(1, 4)) + np.cos(yy / rng.uniform(1, 4))) * 60 + 128
        img = np.clip(base[..., None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        (folder / str(i % 10)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / str(i % 10) / f"{i:06d}.png", compress_level=0)
    write_shards(FolderSource(folder), root / "shards", val_fraction=0.05, shard_size="5000", progress=False)
    return root / "shards"


def fit_args(family: str, shards: Path, runs: Path, batch: int, steps: int, small: bool) -> list[str]:
    experiment = REPO / "experiments" / ("digits" if small else "cifar10") / f"{family}.yaml"
    args = ["--config", str(experiment), f"--data.init_args.shards={shards}", f"--data.init_args.batch_size={batch}",
            f"--run.root={runs}", f"--trainer.max_steps={steps}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.check_val_every_n_epoch=1000",
            "--trainer.devices=1", "--trainer.accelerator=auto", f"--run.checkpoint_every_n_steps={10 * steps}",
            "--trainer.precision=" + ("bf16-mixed" if torch.cuda.is_available() else "32-true"),
            "--data.init_args.samples_per_epoch=100000000"]  # one endless epoch: no loader restarts while timing
    if small:
        args += ["--model.init_args.image_size=16", "--model.init_args.channels=3",
                 "--model.init_args.num_classes=null"]
    return args + ["--model.init_args.sample_every_n_steps=1000000"]  # sample grids are not training


def lightning_rate(args: list[str], warmup: int, steps: int, batch: int) -> float:
    import wandb

    cli = GenbenchCLI(args)
    timer = StepTimer(warmup, steps)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if wandb.run is not None:  # the next family gets a W&B run of its own
        wandb.finish()
    return timer.images_per_s


def _optimizers(model) -> list[torch.optim.Optimizer]:
    conf = model.configure_optimizers()
    if isinstance(conf, dict):
        return [conf["optimizer"]]
    return list(conf) if isinstance(conf, (list, tuple)) else [conf]


def plain_step(family: str, model, optimizers: list, x: torch.Tensor) -> Callable[[], None]:
    """One training step of ``family`` written as a plain loop would: forward, loss, backward, step."""
    n = len(x)

    def step(loss: torch.Tensor, opt) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if family == "ddpm":
        def run() -> None:
            t = torch.randint(0, model.timesteps, (n,), device=x.device)
            step(model.denoising_loss(x, t, torch.randn_like(x), None), optimizers[0])
    elif family == "vae":
        def run() -> None:
            nll, kl = model.negative_elbo(x, None)
            step((nll + kl).mean(), optimizers[0])
    elif family == "ar":
        def run() -> None:
            step(model._nll({"image": x, "label": None}), optimizers[0])
    else:
        opt_g, opt_d = optimizers
        batches = iter(range(1 << 62))

        def run() -> None:
            z = torch.randn(n, model.z_dim, device=x.device)
            real = x.detach().requires_grad_(model.r1_gamma > 0)
            real_logits = model.discriminator(real, None)
            d_loss = model._d_loss(real_logits, model.discriminator(model.generator(z, None).detach(), None))
            if model.r1_gamma > 0:
                grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
                d_loss = d_loss + model.r1_gamma / 2 * grad.pow(2).flatten(1).sum(1).mean()
            step(d_loss, opt_d)
            if next(batches) % model.n_critic == 0:  # as GAN.training_step: G every n_critic batches
                # D's weights frozen for G's step, as Lightning's toggled_optimizer does: the backward pass then
                # computes D's input gradients only, not weight gradients no optimizer would use
                model.discriminator.requires_grad_(False)
                step(model._g_loss(model.discriminator(model.generator(z, None), None)), opt_g)
                model.discriminator.requires_grad_(True)
    return run


def fast_paths(model, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Which of the fast paths the experiment's config turns on (both sides use the same model and optimizer)."""
    return {"compiled": model.compile_network, "channels_last": getattr(model, "memory_format", None) ==
            torch.channels_last, "fused_optimizer": all(o.defaults.get("fused", False) for o in optimizers)}


def plain_rate(args: list[str], family: str, warmup: int, steps: int, batch: int) -> tuple[float, float, dict]:
    """(images/s, FLOPs per image, fast paths) of the plain loop."""
    on = device()
    model = GenbenchCLI(args).model.to(on).train()
    c, s = model.channels, model.image_size
    x = torch.rand(batch, c, s, s, device=on) * 2 - 1
    optimizers = _optimizers(model)
    run = plain_step(family, model, optimizers, x)
    # bf16 autocast on a GPU, as the fit side's bf16-mixed; fp32 on a CPU, as its 32-true
    autocast = torch.autocast(on, dtype=torch.bfloat16, enabled=on == "cuda")
    with autocast:
        with FlopCounterMode(display=False) as counter:
            torch.compiler.disable(run)()  # counted eager: the FLOPs are the network's, however it is run
        for _ in range(warmup):
            run()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        sync()
    return steps * batch / (time.perf_counter() - t0), counter.get_total_flops() / batch, fast_paths(model, optimizers)


def measure(family: str, batch: int, warmup: int, steps: int, small: bool, work: Path) -> dict:
    shards = work / "shards"
    args = fit_args(family, shards, work / f"runs-{family}", batch, 10 * (warmup + steps), small)
    fit = lightning_rate(args, warmup, steps, batch)
    plain, flops, paths = plain_rate(args, family, warmup, steps, batch)
    peak = bf16_peak(device_name())
    return {"batch_size": batch, "warmup_steps": warmup, "timed_steps": steps,
            "genbench_fit_images_per_s": round(fit, 2), "plain_loop_images_per_s": round(plain, 2),
            "ratio_fit_vs_plain": round(fit / plain, 4), "flops_per_image": flops,
            "mfu_bf16": round(flops * fit / peak, 4) if peak else None,
            "mfu_bf16_plain": round(flops * plain / peak, 4) if peak else None,
            "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true", **paths, "small": small}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="ddpm", choices=(*FAMILIES, "all"))
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--warmup", type=int, default=20, help="steps not timed (compilation, start-up)")
    p.add_argument("--steps", type=int, default=100, help="timed steps")
    p.add_argument("--small", action="store_true", help="tiny networks, 16x16 images, a few steps (CI)")
    p.add_argument("--out", help="results file (default benchmarks/results/<device>.json)")
    args = p.parse_args()
    if args.small:
        args.batch_size, args.warmup, args.steps = min(args.batch_size, 8), 2, 4
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    out, rows = results_path(args.out), {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_shards(work, 400 if args.small else 20000, 16 if args.small else 32)
        for family in FAMILIES if args.family == "all" else (args.family,):
            row = rows[family] = measure(family, args.batch_size, args.warmup, args.steps, args.small, work)
            print(f"{family}: genbench fit {row['genbench_fit_images_per_s']:.1f} img/s, plain loop "
                  f"{row['plain_loop_images_per_s']:.1f} img/s, ratio {row['ratio_fit_vs_plain']:.3f}, "
                  f"MFU {row['mfu_bf16']}", flush=True)
    merge_results(out, "train_throughput", rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
