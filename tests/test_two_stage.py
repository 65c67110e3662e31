"""The latent two-stage models: the autoencoder first stage (kl and vq), a latent DDPM on its latents and a token
transformer on its codes, through the real Trainer and the one model interface; their provenance (the first
stage pinned by checksum), their cost (the first stage counted in) and their resumption after a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from pipeline.benchmark.images import ShardImages
from pipeline.benchmark.stage import load_run_model
from pipeline.fit.train import fit
from pipeline.models import FAMILIES
from pipeline.models.first_stage import FirstStageError
from pipeline.models.quantizers import codebook_usage

DIGITS = REPO / "experiments" / "digits"
SMALL_AE = ["--model.init_args.ch=16", "--trainer.check_val_every_n_epoch=100"]
SMALL = {"ldm.yaml": ["--model.init_args.ch=16", "--model.init_args.sampling_steps=4",
                      "--model.init_args.warmup_steps=2"],
         "token-ar.yaml": ["--model.init_args.dim=32", "--model.init_args.depth=2", "--model.init_args.warmup_steps=2"]}


def _fit(root, shards, config, *overrides):
    return fit(["--config", str(DIGITS / config), f"--run.root={root}", f"--data.init_args.shards={shards}",
                "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", "--tracking.wandb=false", "--trainer.log_every_n_steps=5",
                "--model.init_args.sample_every_n_steps=-1", *SMALL.get(config, []), *overrides])


@pytest.fixture(scope="module")
def first_stages(tmp_path_factory, digits_shards):
    """A kl and a vq autoencoder of the digits at 16x16, each trained 200 steps."""
    root = tmp_path_factory.mktemp("first-stages")
    return {q: _fit(root, digits_shards, f"autoencoder-{q}.yaml", "--trainer.max_steps=200", *SMALL_AE)
            for q in ("kl", "vq")}


def _val_images(shards, n=180):
    images = ShardImages(shards, "val", {"image_size": 16, "resize": "stretch"})
    x = torch.cat([b.images for b in images.batches(n)])[:n]
    return x.float() / 127.5 - 1


@pytest.mark.parametrize("quantizer", ["kl", "vq"])
def test_the_autoencoder_reconstructs_far_better_than_untrained_and_keeps_its_codebook(first_stages, digits_shards,
                                                                                       quantizer):
    trained, _, _ = load_run_model(first_stages[quantizer])
    torch.manual_seed(0)
    untrained = FAMILIES["autoencoder"](**{**trained.hparams, "perceptual_weight": 0.0}).eval()
    x = _val_images(digits_shards)
    errors = [float((m.reconstruct(x) - x).pow(2).mean()) for m in (trained, untrained)]
    assert errors[0] < 0.25 * errors[1], errors
    if quantizer == "vq":
        # an l2-normalised codebook stays in use (here all 256 codes over the val split's 2,880 positions,
        # perplexity 234); without it the same fit uses 10% (perplexity 14) and fails both floors
        codes = trained.encode_indices(x)
        usage, perplexity = codebook_usage(torch.bincount(codes.flatten(), minlength=trained.codebook_size))
        assert usage >= 0.5 and perplexity >= 50, (usage, perplexity)
    info = json.loads((first_stages[quantizer] / "run.json").read_text())
    assert info["family"] == "autoencoder" and info["status"] == "finished"
    assert (first_stages[quantizer] / "samples").glob("reconstructions-step-*.png")


def test_an_autoencoder_does_not_sample_and_says_what_to_do(first_stages):
    model, _, _ = load_run_model(first_stages["kl"])
    with pytest.raises(TypeError, match="first stage, not a generator"):
        model.sample(2)


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, digits_shards, first_stages):
    root = tmp_path_factory.mktemp("ldm")
    return _fit(root, digits_shards, "ldm.yaml", f"--model.init_args.first_stage={first_stages['kl']}",
                "--trainer.max_steps=30", "--model.init_args.num_classes=10")


def test_latent_ddpm_records_its_first_stage_scale_and_whole_cost(ldm_run, first_stages, digits_shards):
    info = json.loads((ldm_run / "run.json").read_text())
    first = json.loads((first_stages["kl"] / "run.json").read_text())
    from pipeline.io import sha256_file

    ckpt = first_stages["kl"] / "checkpoints" / "last.ckpt"
    assert info["first_stage"]["run_id"] == first_stages["kl"].name
    assert info["first_stage"]["sha256"] == sha256_file(ckpt)
    # the scale LDM computes: 1 / std of the latents, here of the first batch; the whole split's std agrees
    model, _, _ = load_run_model(ldm_run)
    scale = info["latent_scale"]
    assert scale == pytest.approx(float(model.latent_scale), rel=1e-6)
    z = model.first_stage.encode(_val_images(digits_shards))
    assert float((z * scale).std()) == pytest.approx(1.0, abs=0.25)
    state = torch.load(ldm_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["genbench"]["first_stage"]["sha256"] == info["first_stage"]["sha256"]
    # cost: both stages' parameters, one decoder pass per sample, and the first stage's training FLOPs
    own = sum(p.numel() for p in model.parameters())
    assert info["cost"]["parameters"] == own + first["cost"]["parameters"]
    assert info["cost"]["nfe"] == model.sampling_steps + 1
    assert info["cost"]["decoder_flops_per_sample"] > 0
    own_flops = info["images_seen"] * info["cost"]["flops_per_image"]
    assert info["cost"]["training_flops"] == pytest.approx(own_flops + first["cost"]["training_flops"], rel=1e-9)


def test_latent_ddpm_samples_pixels_independent_of_batch(ldm_run):
    model, _, _ = load_run_model(ldm_run)
    model.sample_batch_size = 4
    a = model.sample(6, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (6, 1, 16, 16)
    assert torch.equal(a, torch.cat([model.sample(1, seed=3, first_index=i) for i in range(6)]))
    assert torch.equal(a[2:], model.sample(4, seed=3, first_index=2))
    # the clean-latent estimate is clipped at latent_clip (unit-variance latents), as pixels are at [-1, 1]
    from pipeline.models.base import PerSampleNoise

    noise = PerSampleNoise(3, range(4), model.device)
    assert float(model.diffuse(noise, model.default_labels(4)).abs().max()) <= model.latent_clip == 4.0


def _draw_on_rank(rank, world, port, run_dir, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, _, _ = load_run_model(run_dir)
    model.sample_batch_size = 4
    mine = model.sample(3, seed=5, first_index=rank * 3)  # rank r draws samples [3r, 3r + 3)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        torch.save(torch.cat(gathered), out)
    dist.destroy_process_group()


@pytest.mark.ddp
def test_latent_samples_split_over_two_ddp_ranks_equal_one_process(ldm_run, tmp_path):
    import torch.multiprocessing as mp

    from pipeline.benchmark.distributed import free_port

    mp.start_processes(_draw_on_rank, args=(2, free_port(), ldm_run, str(tmp_path / "out.pt")), nprocs=2,
                       start_method="spawn")
    model, _, _ = load_run_model(ldm_run)
    model.sample_batch_size = 4
    assert torch.equal(torch.load(tmp_path / "out.pt"), model.sample(6, seed=5))


def test_a_two_stage_checkpoint_loads_without_data(tmp_path, digits_shards, first_stages):
    """The scale factor is in the checkpoint, not computed again from the data. (What may be done to the first stage
    while this holds, and what is refused: tests/test_first_stage_safety.py.)"""
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    run = _fit(tmp_path / "runs", shards, "ldm.yaml", f"--model.init_args.first_stage={first_stages['kl']}",
               "--trainer.max_steps=4")
    ckpt = run / "checkpoints" / "last.ckpt"
    before = FAMILIES["ddpm"].load_from_checkpoint(str(ckpt)).sample(3, seed=1)
    shutil.rmtree(shards)
    assert torch.equal(FAMILIES["ddpm"].load_from_checkpoint(str(ckpt)).sample(3, seed=1), before)


def test_token_transformer_trains_on_codes_and_samples_through_the_interface(tmp_path, digits_shards, first_stages):
    run = _fit(tmp_path, digits_shards, "token-ar.yaml", f"--model.init_args.first_stage={first_stages['vq']}",
               "--trainer.max_steps=30")
    model, _, _ = load_run_model(run)
    assert model.vocab == 256 and model.seq_len == 16 and model.guided and model.nfe == 32
    model.sample_batch_size = 4
    a = model.sample(6, seed=2)
    assert a.shape == (6, 1, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, torch.cat([model.sample(1, seed=2, first_index=i) for i in range(6)]))
    info = json.loads((run / "run.json").read_text())
    assert info["first_stage"]["quantizer"] == "vq" and info["cost"]["nfe"] == 33
    with pytest.raises(FirstStageError, match="needs quantizer: vq"):
        FAMILIES["ar"](image_size=16, channels=1, tokenizer="vq", first_stage=str(first_stages["kl"]))


def test_guidance_and_nucleus_sampling_of_the_token_transformer(first_stages):
    torch.manual_seed(0)
    model = FAMILIES["ar"](image_size=16, channels=1, num_classes=10, tokenizer="vq", dim=16, depth=1, heads=2,
                           first_stage=str(first_stages["vq"]), sample_batch_size=4).eval()
    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0]])
    model.vocab, model.top_p = 4, 0.7  # softmax: 0.66, 0.24, 0.09, 0.01 -> the first two hold 0.7
    kept = torch.isfinite(model.truncate(logits))
    assert kept.tolist() == [[True, True, False, False]]
    model.top_p = 0.5
    assert torch.isfinite(model.truncate(logits)).tolist() == [[True, False, False, False]]  # always one token
    model.vocab, model.top_p = 256, 1.0
    unguided = model.sample(4, seed=0)
    model.guidance_scale = 3.0
    assert model.nfe == 2 * model.seq_len
    guided = model.sample(4, seed=0)
    assert not torch.equal(guided, unguided)
    assert torch.equal(guided[1:], model.sample(3, seed=0, first_index=1))


def test_a_killed_token_transformer_resumes_to_the_state_of_an_uninterrupted_run(tmp_path, digits_shards,
                                                                                 first_stages):
    """SIGKILL after step 10 of 20, then the same command: the weights, EMA and optimizer of 20 steps straight.
    Epochs of 5 batches (data order resumes per epoch), no dropout, no label dropout: the step is deterministic."""
    common = ["--config", str(DIGITS / "token-ar.yaml"), f"--data.init_args.shards={digits_shards}",
              "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false", "--tracking.wandb=false",
              "--model.init_args.sample_every_n_steps=-1", *SMALL["token-ar.yaml"],
              f"--model.init_args.first_stage={first_stages['vq']}", "--model.init_args.p_uncond=0.0",
              "--trainer.limit_train_batches=5", "--run.checkpoint_every_n_steps=5", "--trainer.max_steps=20",
              "--trainer.check_val_every_n_epoch=100"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "fit", *common, f"--run.root={tmp_path}/a",
                             "--run.name=killed"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "a").glob("killed-*/checkpoints/step-0000010.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its step-10 checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = next((tmp_path / "a").glob("killed-*"))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] < 20
    assert fit([*common, f"--run.root={tmp_path}/a", "--run.name=killed"]) == run
    straight = fit([*common, f"--run.root={tmp_path}/b", "--run.name=killed"])
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False) for d in (run, straight))
    assert a["global_step"] == b["global_step"] == 20
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), key
    assert a["genbench"]["first_stage"] == b["genbench"]["first_stage"]


def _vgg16_features_file(path):
    """torchvision's VGG16 layout (only the ``features.*`` LPIPS reads), randomly initialised: no download here."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return features


def test_the_patch_discriminator_starts_at_its_step_and_lpips_runs_on_the_given_vgg(tmp_path, digits_shards):
    import csv

    features = _vgg16_features_file(tmp_path / "vgg16.pth")
    run = _fit(tmp_path, digits_shards, "autoencoder-vq.yaml", "--trainer.max_steps=6", "--model.init_args.ch=8",
               "--trainer.log_every_n_steps=1", "--model.init_args.disc_weight=0.1", "--model.init_args.disc_start=3",
               "--model.init_args.perceptual_weight=1.0",
               f"--model.init_args.perceptual_weights={tmp_path / 'vgg16.pth'}")
    with open(run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    adversarial = sorted(int(r["step"]) for r in rows if r.get("train/d_loss"))
    assert adversarial == [3, 4, 5]  # from disc_start on; its own step is not a global step (6 in all)
    assert all(r.get("train/perceptual") for r in rows if r.get("train/loss"))
    model, _, _ = load_run_model(run)  # loads without the VGG (not part of the checkpoint)
    assert not any(k.startswith("perceptual") for k in model.state_dict())
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    from pipeline.models.perceptual import load_lpips

    lpips = load_lpips(str(tmp_path / "vgg16.pth"))
    assert lpips is not None and torch.equal(lpips.network.net.slice1[0].weight, features[0].weight)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert float(lpips(x, x).abs().max()) < 1e-6 and float(lpips(x, -x).min()) > 0


@pytest.mark.slow
def test_the_compiled_autoencoder_gives_the_eager_loss_and_gradients():
    """Encoder and decoder are the compiled parts (the same networks under kl and vq); vq adds the quantiser's
    straight-through gradient between them. About a minute of inductor compilation on this CPU."""
    kw = dict(image_size=16, channels=1, quantizer="vq", ch=8, ch_mult=(1, 2, 2), codebook_size=32, code_dim=4)
    torch.manual_seed(0)
    eager = FAMILIES["autoencoder"](**kw, compile=False)
    compiled = FAMILIES["autoencoder"](**kw, compile=True)
    compiled.load_state_dict(eager.state_dict())
    x = (torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1).round(decimals=2)
    losses = []
    for model in (eager, compiled):
        rec, reg, _ = model.train()._losses(x, sample=False)
        losses.append(rec + reg)
        losses[-1].backward()
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (eager, compiled)]
    assert len(grads[0]) == len(grads[1]) > 0
    assert (grads[1] - grads[0]).norm() <= 1e-4 * grads[0].norm()
    # the same codes, and the same pixels up to the fused kernels' rounding
    assert torch.equal(compiled.eval().encode_indices(x), eager.eval().encode_indices(x))
    torch.testing.assert_close(compiled.reconstruct(x), eager.reconstruct(x), atol=1e-5, rtol=0)


def test_a_flops_budget_counts_the_first_stage_training(tmp_path, digits_shards, first_stages):
    first = json.loads((first_stages["kl"] / "run.json").read_text())["cost"]["training_flops"]
    run = _fit(tmp_path, digits_shards, "ldm.yaml", f"--model.init_args.first_stage={first_stages['kl']}",
               "--trainer.max_steps=-1", f"--run.budget={{flops: {first * 1.001}}}")
    info = json.loads((run / "run.json").read_text())
    # the autoencoder already spent all but 0.1% of it: a step or two of the latent model's own
    assert 1 <= info["global_step"] <= 3, info["global_step"]
    assert info["cost"]["training_flops"] >= first * 1.001


@pytest.mark.slow
def test_a_two_stage_suite_runs_end_to_end_into_one_leaderboard(tmp_path, digits_shards):
    import csv

    import yaml

    from pipeline.launch.runner import run

    exps = {name: str(DIGITS / f"{name}.yaml") for name in ("autoencoder-kl", "ldm", "ddpm")}
    suite = {"experiments": list(exps.values()), "first_stages": {exps["ldm"]: exps["autoencoder-kl"]},
             "overrides": ["--trainer.max_steps=20", f"--data.init_args.shards={digits_shards}",
                           "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false",
                           "--tracking.wandb=false", "--model.init_args.sample_every_n_steps=-1",
                           "--model.init_args.ch=8", "--benchmark.num_samples=100",
                           "--benchmark.auditor_epochs=1", "--benchmark.metrics=fd_auditor,audit"],
             "experiment_overrides": {exps["ldm"]: ["--model.init_args.sampling_steps=4"],
                                      exps["ddpm"]: ["--model.init_args.sampling_steps=4",
                                                     "--model.init_args.image_size=16",
                                                     "--data.init_args.image_size=16",
                                                     "--data.init_args.resize=stretch",
                                                     "--model.init_args.attn_resolutions=[8]"]},
             "runs": str(tmp_path / "runs"), "results": str(tmp_path / "results"),
             "leaderboard": str(tmp_path / "board")}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    run([str(path)], [], progress=False)
    with open(tmp_path / "board" / "leaderboard.csv") as f:
        rows = {r["run"].split("-")[1]: r for r in csv.DictReader(f) if r["run"].startswith("digits-")}
    kl = next((tmp_path / "runs").glob("digits-autoencoder-kl-*")).name
    assert rows["autoencoder"]["run"] == kl and rows["autoencoder"]["num_samples"] == "180"  # the val split
    assert rows["ldm"]["first_stage"] == kl and rows["ldm"]["family"] == "ddpm" and not rows["ddpm"]["first_stage"]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")]
    assert {r.get("reference_row") for r in records if r["family"] == "autoencoder"} == {"reconstruction"}
    assert any(r["family"] == "ddpm" and r["provenance"].get("first_stage", {}).get("run_id") == kl for r in records)
    # the floor and ceiling rows frame the models at the 16x16 they were trained and scored at
    hashes = {r.get("reference_row") or r["family"]: r["protocol"]["reference"]["hash"] for r in records}
    assert hashes["floor"] == hashes["ceiling"] == hashes["ddpm"] == hashes["reconstruction"]
    # a rerun scores nothing again, the autoencoder's row included
    before = len(records)
    run([str(path)], [], progress=False)
    assert len(list((tmp_path / "results").glob("*.json"))) == before


def test_a_latent_config_without_its_first_stage_says_what_to_train_and_pass(tmp_path):
    from conftest import genbench

    proc = genbench("fit", "--config", str(DIGITS / "token-ar.yaml"), f"--run.root={tmp_path}",
                    "--tracking.wandb=false")
    assert proc.returncode != 0
    assert "experiments/digits/autoencoder-vq.yaml" in proc.stderr and "--model.init_args.first_stage=" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())  # one line, no run directory


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO / "experiments")) for p in
                                          (REPO / "experiments").glob("*/*.yaml")))
def test_every_experiment_config_parses_and_names_its_run(config):
    from pipeline.fit.train import resolve

    resolved = resolve(["--config", str(REPO / "experiments" / config)])
    assert resolved.run_dir.name.startswith(resolved.config.run.name)


def test_a_first_stage_is_neither_served_nor_drawn_again(first_stages, tmp_path):
    from pipeline.benchmark.scoring import BenchmarkError
    from pipeline.benchmark.stage import benchmark_run
    from pipeline.services.server import ServeError, ServeOptions, build_app

    with pytest.raises(ServeError, match="first stage with nothing to sample"):
        build_app(ServeOptions(run=str(first_stages["kl"])))
    with pytest.raises(BenchmarkError, match="drop --repeats"):
        benchmark_run(first_stages["kl"], results=str(tmp_path), repeats=2)

