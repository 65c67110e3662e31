"""The VAE through the real Trainer, and the sampling contract every family keeps."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from pytorch_lightning import Callback

from conftest import REPO
from pipeline.benchmark.distributed import free_port
from pipeline.fit.train import fit
from pipeline.models import FAMILIES
from pipeline.models.vae import discretized_logistic_log_prob

# Each family's digits config, shrunk: (config, loss column, extra overrides)
FAMILY_RUNS = {
    "vae": ("vae.yaml", "train/loss", ["--model.init_args.kl_warmup_steps=0"]),
    "gan": ("gan.yaml", "train/d_loss", []),
    "ddpm": ("ddpm.yaml", "train/loss", ["--model.init_args.warmup_steps=5", "--model.init_args.sampling_steps=5"]),
    "ar": ("ar.yaml", "train/loss", ["--model.init_args.warmup_steps=5"]),
}


def _train_family(tmp_path, digits_shards, family, *overrides):
    config, _, extra = FAMILY_RUNS[family]
    return fit(["--config", str(REPO / "experiments" / "digits" / config), f"--run.root={tmp_path}",
                f"--data.init_args.shards={digits_shards}", "--data.init_args.num_workers=0",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                "--tracking.wandb=false", "--trainer.log_every_n_steps=1", *extra, *overrides])


def _column(run_dir, name):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [None, 10])
@pytest.mark.parametrize("family", sorted(FAMILY_RUNS))
def test_family_trains_loss_goes_down_and_checkpoint_reloads(tmp_path, digits_shards, family, num_classes):
    steps = 80 if family == "gan" else 60  # the GAN counts its two optimizers' steps
    run_dir = _train_family(tmp_path, digits_shards, family, f"--trainer.max_steps={steps}",
                            "--run.checkpoint_every_n_steps=20",
                            f"--model.init_args.num_classes={'null' if num_classes is None else num_classes}")
    assert list((run_dir / "checkpoints").glob("step-*.ckpt")), "no periodic checkpoint"
    losses = _column(run_dir, FAMILY_RUNS[family][1])
    assert len(losses) >= 10
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, f"{family}: loss {first:.3f} -> {last:.3f}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["family"] == family
    cls = FAMILIES[family]
    a = cls.load_from_checkpoint(str(ckpt)).sample(12, seed=1)
    b = cls.load_from_checkpoint(str(ckpt)).sample(12, seed=1)
    assert torch.equal(a, b) and a.shape == (12, 1, 8, 8)
    model = cls.load_from_checkpoint(str(ckpt))
    assert model.conditional == (num_classes is not None)
    assert model.images_seen == info["images_seen"] == (steps // (2 if family == "gan" else 1)) * 64
    # the checkpoint holds the EMA weights (Lightning's EMAWeightAveraging), the live ones beside them
    state = torch.load(ckpt, weights_only=False)
    assert any(not torch.equal(state["state_dict"][k], state["current_model_state"][k]) for k in state["state_dict"]
               if state["state_dict"][k].is_floating_point())


SMALL = {
    "vae": dict(latent_dim=4, base_channels=8, channel_mults=(1, 2)),
    "gan": dict(z_dim=8, g_channels=8, d_channels=8),
    "ddpm": dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, sampling_steps=4),
    "ar": dict(dim=16, depth=2, heads=2),
}


def _model(family="vae", **kw):
    torch.manual_seed(0)
    return FAMILIES[family](image_size=8, channels=1, sample_batch_size=8, **SMALL[family], **kw).eval()


@pytest.mark.parametrize("num_classes", [None, 10])
@pytest.mark.parametrize("family", sorted(SMALL))
def test_sample_is_uint8_and_depends_only_on_seed_and_index(family, num_classes):
    model = _model(family, num_classes=num_classes)
    a = model.sample(12, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (12, 1, 8, 8)
    assert torch.equal(a, torch.cat([model.sample(1, seed=3, first_index=i) for i in range(12)]))
    assert torch.equal(a[5:], model.sample(7, seed=3, first_index=5))  # how ranks split a draw
    assert not torch.equal(a, model.sample(12, seed=4))


def test_guided_diffusion_counts_two_evaluations_per_step():
    assert _model("ddpm", num_classes=10).nfe == 4
    assert _model("ddpm", num_classes=10, guidance_scale=2.0).nfe == 8
    assert _model("ddpm", sampler="ancestral").nfe == 1000
    assert _model("ar").nfe == 64


def test_ddpm_unet_at_the_cifar10_config_has_ho_et_al_parameter_count():
    model = FAMILIES["ddpm"](image_size=32, channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                             attn_resolutions=(16,), dropout=0.1)
    assert sum(p.numel() for p in model.net.parameters()) / 1e6 == pytest.approx(35.7, abs=0.1)


def test_conditional_labels_are_balanced_and_checked():
    model = _model(num_classes=10)
    assert model.default_labels(12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    with pytest.raises(ValueError, match="3 labels for 4"):
        model.sample(4, labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="unconditional"):
        _model().sample(2, labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("family", sorted(SMALL))
def test_non_finite_loss_stops_with_the_step(tmp_path, digits_shards, family):
    from pytorch_lightning import Trainer

    from pipeline.data.datamodule import ShardDataModule

    model = _model(family)
    with torch.no_grad():  # a NaN in the first weight poisons every loss of every family
        next(model.parameters()).view(-1)[0] = float("nan")
    trainer = Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=tmp_path, limit_val_batches=0)
    with pytest.raises(FloatingPointError, match=f"non-finite {family} loss .* at global step 0"):
        trainer.fit(model.train(), datamodule=ShardDataModule(str(digits_shards), batch_size=16, num_workers=0))


def _draw_on_rank(rank, world, port, family, state_path, n, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model(family, num_classes=10)
    model.load_state_dict(torch.load(state_path))
    share = n // world  # rank r draws samples [r * share, (r + 1) * share)
    mine = model.sample(share, seed=5, first_index=rank * share)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        torch.save(torch.cat(gathered), out)
    dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.parametrize("family", sorted(SMALL))
def test_samples_split_over_two_ddp_ranks_equal_one_process(tmp_path, family):

    import torch.multiprocessing as mp

    model = _model(family, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    port = free_port()
    mp.start_processes(_draw_on_rank, args=(2, port, family, str(tmp_path / "state.pt"), 10, str(tmp_path / "out.pt")),
                       nprocs=2, start_method="spawn")
    assert torch.equal(torch.load(tmp_path / "out.pt"), model.sample(10, seed=5))


def test_discretized_logistic_is_a_distribution_over_256_levels():
    """Independent check: the probabilities of all 256 levels sum to 1 for any mean and scale."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in [(0.0, -2.0), (0.7, -4.0), (-1.2, 0.5), (0.999, -6.0)]:
        logp = discretized_logistic_log_prob(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert math.isclose(float(logp.exp().sum()), 1.0, rel_tol=1e-4)


def test_cost_reports_hand_counted_parameters_and_nfe():
    """The AR model at dim 16, depth 2, on 8x8 grayscale (256 intensity tokens, 64 positions), counted by hand:
    token embedding (256 + 1 start token) x 16 = 4,112; positions 64 x 16 = 1,024; per block two LayerNorms
    2 x 32, qkv 16 x 48 + 48 = 816, projection 16 x 16 + 16 = 272, MLP 16 x 64 + 64 = 1,088 and
    64 x 16 + 16 = 1,040, so 3,280 a block and 6,560 for two; final LayerNorm 32; head 16 x 256 = 4,096 (no
    bias). 15,824 in all; a conditional model adds 10 class tokens x 16 = 160."""
    assert _model("ar").cost() == {"parameters": 15_824, "nfe": 64, "bits_per_dim": None, "images_seen": 0,
                                   "flops_per_image": None, "training_flops": None}  # not trained: not measured
    assert _model("ar", num_classes=10).cost()["parameters"] == 15_984
    assert _model("vae").cost()["nfe"] == 1 and _model("gan").cost()["nfe"] == 1


def test_kv_cache_sampling_equals_full_forward_decoding():
    """With top_k=1 sampling is greedy: every cached step must pick the argmax of a full forward pass."""
    model = _model("ar", num_classes=10, top_k=1)
    images = model.sample(6, seed=0).float() / 127.5 - 1
    tokens = model.tokens(images)
    with torch.no_grad():
        logits = model.logits(tokens, model.default_labels(6))
    assert torch.equal(logits.argmax(-1), tokens)


def test_ancestral_sampler_is_deterministic_per_sample():
    model = _model("ddpm", timesteps=20, sampler="ancestral")
    assert float(model.betas.max()) < 1.0
    a = model.sample(5, seed=2)
    assert 0 < a.float().mean() < 255  # not saturated
    assert torch.equal(a, torch.cat([model.sample(1, seed=2, first_index=i) for i in range(5)]))
    assert not torch.equal(a, model.sample(5, seed=3))


def _fit_steps(tmp_path, digits_shards, model, steps=4, **trainer_kw):
    from pytorch_lightning import Trainer

    from pipeline.data.datamodule import ShardDataModule

    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0, **trainer_kw)
    trainer.fit(model.train(), datamodule=ShardDataModule(str(digits_shards), batch_size=16, num_workers=0))
    return trainer


@pytest.mark.parametrize("family", sorted(SMALL))
def test_every_family_trains_under_bf16_mixed_precision(tmp_path, digits_shards, family):
    trainer = _fit_steps(tmp_path, digits_shards, _model(family, num_classes=10), precision="bf16-mixed")
    assert trainer.global_step == 4
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert logged and all(math.isfinite(v) for v in logged.values())


def test_gan_variants_dcgan_and_r1_penalty_train(tmp_path, digits_shards):
    for kw in (dict(arch="dcgan"), dict(arch="sngan", r1_gamma=1.0, n_critic=2)):
        model = _model("gan", num_classes=10, **kw)
        trainer = _fit_steps(tmp_path, digits_shards, model, steps=6)
        assert math.isfinite(float(trainer.callback_metrics["train/d_loss"]))
    # n_critic=2: the generator stepped on every other batch only
    assert trainer.global_step == 6 and model.images_seen == 4 * 16


def test_bernoulli_vae_reports_binary_bits_per_dim_and_no_comparable_bits_per_dim(tmp_path, digits_shards):
    """Bits/dim of binarised pixels is not the 8-bit figure the leaderboard compares across families."""
    from pytorch_lightning import Trainer

    from pipeline.data.datamodule import ShardDataModule

    model = _model("vae", likelihood="bernoulli")
    trainer = Trainer(max_epochs=1, limit_train_batches=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      num_sanity_val_steps=0)
    trainer.fit(model.train(), datamodule=ShardDataModule(str(digits_shards), batch_size=16, num_workers=0))
    assert 0 < float(trainer.callback_metrics["val/binary_bits_per_dim"]) < 2  # at most 1 bit a pixel, untrained
    assert "val/bits_per_dim" not in trainer.callback_metrics and "train/bits_per_dim" not in trainer.callback_metrics
    assert model.cost()["bits_per_dim"] is None


def test_registries_refuse_a_second_name_a_wrong_class_and_a_nameless_class():
    from pipeline.registry import Registry

    registry: Registry = Registry("model family", FAMILIES["vae"].__mro__[1], name_attr="family")
    registry.register()(FAMILIES["vae"])
    assert registry["vae"] is FAMILIES["vae"] and registry.names() == ["vae"]
    with pytest.raises(ValueError, match="'vae' is already registered as VAE"):
        registry.register()(FAMILIES["vae"])
    with pytest.raises(TypeError, match="must be a subclass of GenerativeModule"):
        registry.register("x")(int)
    nameless = type("Nameless", (FAMILIES["vae"].__mro__[1],), {})
    with pytest.raises(ValueError, match="Nameless has no name of its own: set its class attribute `family`"):
        registry.register()(nameless)
    with pytest.raises(KeyError, match="unknown model family 'flow'; registered: vae"):
        registry["flow"]


def test_palette_tokenizer_fits_once_trains_and_reloads(tmp_path, digits_shards):
    model = _model("ar", tokenizer="palette", palette_size=8, palette_shards=str(digits_shards), num_classes=10)
    assert model.seq_len == 64 and model.vocab == 8 and model.palette.shape == (8, 1)
    images = model.sample(4, seed=0)
    assert set(images.unique().tolist()) <= set(model.palette.flatten().int().tolist())  # only palette colours
    tokens = model.tokens(images.float() / 127.5 - 1)
    assert torch.equal(model.images(tokens), images.float() / 127.5 - 1)  # palette colours map to themselves
    trainer = _fit_steps(tmp_path, digits_shards, model)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    trainer.save_checkpoint(tmp_path / "ar.ckpt")
    again = FAMILIES["ar"].load_from_checkpoint(str(tmp_path / "ar.ckpt"))
    assert torch.equal(again.palette, model.palette)
    assert torch.equal(again.sample(4, seed=1), model.eval().sample(4, seed=1))
    assert _model("ar", tokenizer="palette", palette_size=8, palette_shards=str(digits_shards)).palette.equal(
        model.palette)  # cached and deterministic
    with pytest.raises(ValueError, match="palette_shards"):
        _model("ar", tokenizer="palette")


def test_a_palette_checkpoint_loads_with_no_data_present(tmp_path, digits_shards, monkeypatch):
    """The palette travels in the checkpoint: loading it on a machine without the shards (or the palette
    cache) must neither fit a palette again nor need the data."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    model = _model("ar", tokenizer="palette", palette_size=8, palette_shards=str(shards))
    trainer = _fit_steps(tmp_path, shards, model, steps=2)
    trainer.save_checkpoint(tmp_path / "ar.ckpt")
    shutil.rmtree(shards)
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "empty-cache"))  # no cached palette either
    again = FAMILIES["ar"].load_from_checkpoint(str(tmp_path / "ar.ckpt"))
    assert torch.equal(again.palette, model.palette)
    assert torch.equal(again.sample(3, seed=2), model.eval().sample(3, seed=2))
    assert not (tmp_path / "empty-cache").exists()


@pytest.mark.parametrize("family", ["vae", "ar"])
def test_reported_bits_per_dim_is_the_logged_validation_figure(tmp_path, digits_shards, family):
    from pytorch_lightning import Trainer

    from pipeline.data.datamodule import ShardDataModule

    model = _model(family)
    trainer = Trainer(max_epochs=2, limit_train_batches=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      num_sanity_val_steps=0)
    trainer.fit(model.train(), datamodule=ShardDataModule(str(digits_shards), batch_size=16, num_workers=0))
    logged = float(trainer.callback_metrics["val/bits_per_dim"])
    assert model.last_bits_per_dim == pytest.approx(logged, rel=1e-6) and 0 < logged < 12


class _PoisonAt(Callback):
    """Puts a NaN into the first weight before batch ``step``: the run diverges there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def test_divergence_mid_run_stops_at_its_step_and_writes_no_diverged_checkpoint(tmp_path, digits_shards):
    from pytorch_lightning import Trainer
    from pytorch_lightning.callbacks import ModelCheckpoint

    from pipeline.data.datamodule import ShardDataModule

    # The finiteness test is deferred to logging steps (every 50 here), checkpoints and the end of training,
    # so that the step does not wait for the GPU; the step it names must still be the first bad one.
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                  filename="{step}")
    trainer = Trainer(max_steps=8, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
                      limit_val_batches=0, log_every_n_steps=50, callbacks=[checkpoints, _PoisonAt(3)])
    with pytest.raises(FloatingPointError, match="non-finite ddpm loss .* at global step 3"):
        trainer.fit(_model("ddpm").train(), datamodule=ShardDataModule(str(digits_shards), batch_size=16,
                                                                        num_workers=0))
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]  # step 4 would hold the NaN step's update
    for name in saved:
        state = torch.load(tmp_path / "ckpt" / name, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name


@pytest.mark.parametrize("family", sorted(SMALL))
def test_conditional_model_refuses_unlabelled_images(tmp_path, family):
    from pytorch_lightning import Trainer
    from torch.utils.data import DataLoader

    unlabelled = [{"image": torch.rand(1, 8, 8) * 2 - 1, "label": torch.tensor(-1)} for _ in range(8)]
    trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=f"conditional {family} model .* unlabelled images"):
        trainer.fit(_model(family, num_classes=10).train(), train_dataloaders=DataLoader(unlabelled, batch_size=4))


@pytest.mark.parametrize("world_size", [1, 2])
def test_model_samples_run_the_network_on_whole_batches_and_score_in_pieces(world_size):
    from pipeline.benchmark.images import ModelSamples

    model = _model("ddpm", num_classes=10)  # sample_batch_size 8, 4 DDIM steps
    calls = []
    model.net.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    source = ModelSamples(model, 20, seed=3)
    batches = [b for rank in range(world_size) for b in source.batches(3, rank, world_size)]
    # 20 samples = 3 network batches of 8 rows, 4 steps each, whatever the scoring batch of 3 and the ranks
    assert calls == [8] * 12
    assert all(len(b.index) <= 3 for b in batches)
    order = torch.cat([b.index for b in batches]).argsort()
    assert torch.equal(torch.cat([b.index for b in batches])[order], torch.arange(20))
    assert torch.equal(torch.cat([b.images for b in batches])[order], model.sample(20, seed=3))
    assert torch.equal(torch.cat([b.labels for b in batches])[order], torch.arange(20) % 10)
    # a draw smaller than a network batch per rank is split evenly: no rank is left without images
    assert [sum(len(b.index) for b in ModelSamples(model, 6, seed=3).batches(3, r, world_size))
            for r in range(world_size)] == [6 // world_size] * world_size


def test_model_samples_in_bf16_are_close_to_fp32_and_say_so():
    from pipeline.benchmark.images import ModelSamples

    model = _model("ddpm")
    fp32, bf16 = (torch.cat([b.images for b in ModelSamples(model, 8, 3, p).batches(8)]).float().flatten()
                  for p in ("fp32", "bf16"))
    assert not torch.equal(fp32, bf16)  # autocast did run the network in bf16
    # the same images up to bf16 rounding, which 4 DDIM steps of an untrained UNet amplify (measured 0.975)
    assert torch.corrcoef(torch.stack([fp32, bf16]))[0, 1] > 0.9
    assert ModelSamples(model, 8, 3, "bf16").describe()["precision"] == "bf16"
    with pytest.raises(ValueError, match="sample precision 'fp16': use one of fp32, bf16"):
        ModelSamples(model, 8, 3, "fp16")
