"""The latent two-stage models against their pixel twins, in the same run: training images/s of the latent DDPM
against the pixel DDPM at the same image size (each `genbench fit` against a plain loop, as train_throughput.py
does), encoding on the fly against precomputed latents, sampling images/s including the decoder, and the
vq codebook's usage with and without l2-normalised codes (the collapse fix docs/two-stage.md chose).

Everything runs on the embedded digits at 16x16 (experiments/digits/autoencoder-*.yaml, ldm.yaml, token-ar.yaml,
ddpm.yaml and ar.yaml at 16x16): a first stage is trained here first (its weights matter for the codebook rows
only; the work per image does not depend on them).

    PYTHONPATH=. .venv/bin/python benchmarks/two_stage.py                 # CPU or GPU
    PYTHONPATH=. .venv/bin/python benchmarks/two_stage.py --small         # CI: a few steps; checks the script works

Results are merged into benchmarks/results/<device>.json under "two_stage" (or --out).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, device, merge_results, results_path, sync
from benchmarks.sample_throughput import rate
from benchmarks.train_throughput import lightning_rate
from pipeline.benchmark.images import ShardImages
from pipeline.benchmark.stage import load_run_model
from pipeline.data.shards import write_shards
from pipeline.data.sources import DigitsSource
from pipeline.fit.train import GenbenchCLI, fit
from pipeline.models.quantizers import codebook_usage

DIGITS = REPO / "experiments" / "digits"
AT_16 = ["--model.init_args.image_size=16", "--data.init_args.image_size=16", "--data.init_args.resize=stretch"]


def common_args(config: str, shards: Path, runs: Path, *extra: str) -> list[str]:
    return ["--config", str(DIGITS / config), f"--data.init_args.shards={shards}", f"--run.root={runs}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--tracking.wandb=false",
            "--trainer.check_val_every_n_epoch=1000", "--model.init_args.sample_every_n_steps=-1",
            "--trainer.accelerator=auto", "--trainer.precision=" + ("bf16-mixed" if device() == "cuda" else "32-true"),
            *extra]


def fit_rate(args: list[str], warmup: int, steps: int) -> float:
    """train_throughput.py's timing of `genbench fit`, over one endless epoch (no loader restarts while timing)."""
    return lightning_rate([*args, "--data.init_args.samples_per_epoch=100000000"], warmup, steps, 0)


def digit_batch(shards: Path, n: int) -> torch.Tensor:
    images = ShardImages(shards, "train", {"image_size": 16, "resize": "stretch"})
    x = torch.cat([b.images for b in images.batches(n)])[:n]
    return (x.float() / 127.5 - 1).to(device())


def plain_ddpm_rate(model, x: torch.Tensor, warmup: int, steps: int, encode: str) -> float:
    """A plain loop of DDPM steps on the batch ``x``: pixels, or latents encoded every step (``on_the_fly``)
    or once before the loop (``precomputed``)."""
    model = model.to(x.device).train()
    opt = model.configure_optimizers()["optimizer"]
    latents = model.latents(x, sample=True).detach() if encode == "precomputed" else None

    def step() -> None:
        x0 = latents if latents is not None else model.latents(x, sample=True)
        t = torch.randint(0, model.timesteps, (len(x0),), device=x.device)
        loss = model.denoising_loss(x0, t, torch.randn_like(x0), None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.autocast(device(), dtype=torch.bfloat16, enabled=device() == "cuda"):
        for _ in range(warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
    return len(x) * steps / (time.perf_counter() - t0)


def sample_rate(model, n: int, repeats: int) -> float:
    """sample_throughput.py's timing, at ``n`` images per network call."""
    model = model.to(device()).eval()
    model.sample_batch_size = n
    return rate(model, n, repeats)


def codebook_rows(shards: Path, runs: Path, steps: int) -> dict:
    rows = {}
    x = digit_batch(shards, 1617).cpu()
    for l2 in (True, False):
        run = fit(common_args("autoencoder-vq.yaml", shards, runs, f"--trainer.max_steps={steps}",
                              f"--model.init_args.l2_normalize={str(l2).lower()}", f"--run.name=vq-l2-{l2}"))
        model, _, _ = load_run_model(run)
        codes = model.encode_indices(x)
        usage, perplexity = codebook_usage(torch.bincount(codes.flatten(), minlength=model.codebook_size))
        mse = float(((model.reconstruct(x) - x) / 2).pow(2).mean())
        rows["l2_normalized" if l2 else "plain"] = {"codebook_usage": round(usage, 4),
                                                    "perplexity": round(perplexity, 1),
                                                    "psnr_db": round(-10 * float(torch.log10(torch.tensor(mse))), 2),
                                                    "steps": steps, "codebook_size": model.codebook_size}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="train,encoding,sampling,codebook", help="comma-separated sections")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=60, help="timed training steps")
    p.add_argument("--small", action="store_true", help="a few steps and samples: checks the script works")
    p.add_argument("--out", help="results file (default benchmarks/results/<device>.json)")
    a = p.parse_args()
    only = set(a.only.split(","))
    warmup, steps = (2, 3) if a.small else (10, a.steps)
    n_samples, repeats = (8, 1) if a.small else (250, 2)
    rows: dict = {"image_size": 16, "batch_size": a.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = root / "digits"
        write_shards(DigitsSource(), shards, val_fraction=0.1, seed=0, shard_size=10000, progress=False)
        runs = root / "runs"
        kl = fit(common_args("autoencoder-kl.yaml", shards, runs, f"--trainer.max_steps={5 if a.small else 300}"))
        vq = fit(common_args("autoencoder-vq.yaml", shards, runs, f"--trainer.max_steps={5 if a.small else 300}"))
        batch = f"--data.init_args.batch_size={a.batch_size}"
        ldm = common_args("ldm.yaml", shards, runs, f"--model.init_args.first_stage={kl}", batch,
                          "--trainer.max_steps=-1")
        pixel = common_args("ddpm.yaml", shards, runs, *AT_16, "--model.init_args.attn_resolutions=[8]", batch,
                            "--trainer.max_steps=-1")
        if "train" in only or "encoding" in only:
            x = digit_batch(shards, a.batch_size)
            latent_model, pixel_model = GenbenchCLI(ldm).model, GenbenchCLI(pixel).model
            plain = {"pixel": plain_ddpm_rate(pixel_model, x, warmup, steps, "pixels"),
                     "on_the_fly": plain_ddpm_rate(latent_model, x, warmup, steps, "on_the_fly"),
                     "precomputed": plain_ddpm_rate(latent_model, x, warmup, steps, "precomputed")}
        if "train" in only:
            fit_ldm, fit_pixel = fit_rate(ldm, warmup, steps), fit_rate(pixel, warmup, steps)
            rows["train"] = {
                "latent_ddpm_fit_images_per_s": round(fit_ldm, 1), "pixel_ddpm_fit_images_per_s": round(fit_pixel, 1),
                "latent_ddpm_plain_images_per_s": round(plain["on_the_fly"], 1),
                "pixel_ddpm_plain_images_per_s": round(plain["pixel"], 1),
                "latent_fit_vs_plain": round(fit_ldm / plain["on_the_fly"], 3),
                "pixel_fit_vs_plain": round(fit_pixel / plain["pixel"], 3),
                "latent_vs_pixel_fit": round(fit_ldm / fit_pixel, 3)}
        if "encoding" in only:
            rows["encoding"] = {"on_the_fly_images_per_s": round(plain["on_the_fly"], 1),
                                "precomputed_images_per_s": round(plain["precomputed"], 1),
                                "on_the_fly_vs_precomputed": round(plain["on_the_fly"] / plain["precomputed"], 3)}
        if "sampling" in only:
            models = {"latent_ddpm": GenbenchCLI(ldm).model, "pixel_ddpm": GenbenchCLI(pixel).model,
                      "token_ar": GenbenchCLI(common_args("token-ar.yaml", shards, runs,
                                                          f"--model.init_args.first_stage={vq}")).model,
                      "pixel_ar": GenbenchCLI(common_args("ar.yaml", shards, runs, *AT_16)).model}
            got = {k: sample_rate(m, n_samples, repeats) for k, m in models.items()}
            rows["sampling"] = {**{f"{k}_images_per_s": round(v, 1) for k, v in got.items()},
                                "latent_vs_pixel_ddpm": round(got["latent_ddpm"] / got["pixel_ddpm"], 3),
                                "token_vs_pixel_ar": round(got["token_ar"] / got["pixel_ar"], 3),
                                "note": "decoder included; 50 DDIM steps; token AR guided (2 passes), pixel AR not"}
        if "codebook" in only:
            rows["codebook"] = codebook_rows(shards, runs, 5 if a.small else 300)
    path = results_path(a.out)
    merge_results(path, "two_stage", rows)
    print(f"two_stage -> {path}: {rows}")


if __name__ == "__main__":
    main()
