"""The VAE through the real Trainer, and the sampling contract every family keeps."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from conftest import REPO
from pipeline.models.vae import VAE, discretized_logistic_log_prob
from pipeline.train import fit

VAE_YAML = str(REPO / "experiments" / "digits" / "vae.yaml")


def _train(tmp_path, digits_shards, *overrides):
    return fit(["--config", VAE_YAML, f"--run.root={tmp_path}", f"--data.init_args.shards={digits_shards}",
                "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", "--tracking.wandb=false", *overrides])


def _losses(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [None, 10])
def test_vae_trains_and_the_loss_goes_down(tmp_path, digits_shards, num_classes):
    run_dir = _train(tmp_path, digits_shards, "--trainer.max_steps=60", "--trainer.log_every_n_steps=1",
                     "--model.init_args.kl_warmup_steps=0",
                     f"--model.init_args.num_classes={'null' if num_classes is None else num_classes}")
    losses = _losses(run_dir)
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "run.json").exists()
    model = VAE.load_from_checkpoint(str(run_dir / "checkpoints" / "last.ckpt"))
    assert model.images_seen == 60 * 64 and model.conditional == (num_classes is not None)


def _model(**kw):
    torch.manual_seed(0)
    return VAE(image_size=8, channels=1, latent_dim=4, base_channels=8, channel_mults=(1, 2), **kw).eval()


@pytest.mark.parametrize("num_classes", [None, 10])
def test_sample_is_uint8_and_depends_only_on_seed_and_index(num_classes):
    model = _model(num_classes=num_classes)
    a = model.sample(12, seed=3, batch_size=12)
    assert a.dtype == torch.uint8 and a.shape == (12, 1, 8, 8)
    assert torch.equal(a, torch.cat([model.sample(1, seed=3, first_index=i, batch_size=1) for i in range(12)]))
    assert torch.equal(a[5:], model.sample(7, seed=3, first_index=5, batch_size=4))  # how ranks split a draw
    assert not torch.equal(a, model.sample(12, seed=4))


def test_conditional_labels_are_balanced_and_checked():
    model = _model(num_classes=10)
    assert model.default_labels(12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    with pytest.raises(ValueError, match="3 labels for 4"):
        model.sample(4, labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="unconditional"):
        _model().sample(2, labels=torch.tensor([0, 1]))


@pytest.mark.slow
def test_checkpoint_reload_gives_identical_samples(tmp_path, digits_shards):
    run_dir = _train(tmp_path, digits_shards, "--trainer.max_steps=15", "--run.checkpoint_every_n_steps=10")
    assert (run_dir / "checkpoints" / "step-0000010.ckpt").exists()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    a = VAE.load_from_checkpoint(str(ckpt)).sample(20, seed=1)
    b = VAE.load_from_checkpoint(str(ckpt)).sample(20, seed=1)
    assert torch.equal(a, b)
    # the checkpoint holds the EMA weights (Lightning's EMAWeightAveraging), the live ones beside them
    state = torch.load(ckpt, weights_only=False)
    assert "current_model_state" in state
    assert any(not torch.equal(state["state_dict"][k], state["current_model_state"][k]) for k in state["state_dict"])


def test_non_finite_loss_stops_with_the_step(tmp_path, digits_shards):
    from pytorch_lightning import Trainer

    from pipeline.data.datamodule import ShardDataModule

    model = _model()
    with torch.no_grad():
        model.to_posterior.weight[0, 0] = float("nan")
    trainer = Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=tmp_path, limit_val_batches=0)
    with pytest.raises(FloatingPointError, match="global step 0"):
        trainer.fit(model.train(), datamodule=ShardDataModule(str(digits_shards), batch_size=16, num_workers=0))


def test_discretized_logistic_is_a_distribution_over_256_levels():
    """Independent check: the probabilities of all 256 levels sum to 1 for any mean and scale."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in [(0.0, -2.0), (0.7, -4.0), (-1.2, 0.5), (0.999, -6.0)]:
        logp = discretized_logistic_log_prob(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert math.isclose(float(logp.exp().sum()), 1.0, rel_tol=1e-4)


def test_cost_reports_parameters_and_nfe():
    model = _model()
    cost = model.cost()
    assert cost["parameters"] == sum(p.numel() for p in model.parameters()) and cost["nfe"] == 1
