"""Configs are validated before any work; errors name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, genbench
from pipeline.fit.train import ConfigError, resolve
from pipeline.fit.validate import check_model_fits_data

VAE = str(REPO / "experiments" / "digits" / "vae.yaml")


def _fails_with(args, *fragments):
    with pytest.raises(Exception) as err:
        resolve(args)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"


def test_unknown_keys_and_typos_fail_with_the_key(tmp_path):
    _fails_with(["--config", VAE, "--model.init_args.latnt_dim=3"], "latnt_dim")
    _fails_with(["--config", VAE, "--trainer.max_step=3"], "--trainer.max_step")  # no silent prefix matching
    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmark:\n  num_sample: 10\n")
    _fails_with(["--config", VAE, "--config", str(bad)], "num_sample")


@pytest.mark.parametrize("override,expected", [
    ("--trainer.max_step=3", "--trainer.max_step: unknown key; did you mean --trainer.max_steps?"),
    ("--model.init_args.latnt_dim=3", "--model.init_args.latnt_dim: unknown key; did you mean "
                                      "--model.init_args.latent_dim?"),
    ("--model.init_args.ema_decy=0.9", "did you mean --model.init_args.ema_decay?"),  # a base-class argument
    ("--data.init_args.batch_siz=3", "did you mean --data.init_args.batch_size?"),
    ("--run.nam=x", "--run.nam: unknown key; did you mean --run.name?"),
])
def test_a_mistyped_key_names_the_closest_valid_one_in_one_line(override, expected):
    with pytest.raises(ConfigError) as err:
        resolve(["--config", VAE, override])
    assert expected in str(err.value) and "\n" not in str(err.value) and "Subtypes" not in str(err.value)


def test_a_mistyped_key_in_yaml_names_the_file_and_the_closest_valid_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: pipeline.models.gan.GAN\n  init_args:\n    lr_gen: 0.001\n"
                   "trainer:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=rf"{bad}: model.init_args.lr_gen: unknown key; did you mean "
                                          r"model.init_args.lr_g\?"):
        resolve(["--config", str(REPO / "experiments" / "digits" / "gan.yaml"), "--config", str(bad)])
    bad.write_text("trainer:\n  max_stepz: 5\n")
    with pytest.raises(ConfigError, match=rf"{bad}: trainer.max_stepz: unknown key; did you mean trainer.max_steps"):
        resolve(["--config", VAE, "--config", str(bad)])


def test_wrong_types_and_malformed_yaml_fail(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: pipeline.models.vae.VAE\n  init_args:\n    latent_dim: many\n")
    _fails_with(["--config", VAE, "--config", str(bad)], "latent_dim")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    _fails_with(["--config", str(broken)], "broken.yaml")


def test_resolved_config_and_run_directory_follow_the_training_config(tmp_path):
    a = resolve(["--config", VAE, f"--run.root={tmp_path}"])
    assert a.run_dir.parent == tmp_path and a.run_dir.name.startswith("digits-vae-")
    assert "latent_dim: 16" in a.config_yaml and "seed: 0" in a.config_yaml
    assert resolve(["--config", VAE, f"--run.root={tmp_path}"]).run_dir == a.run_dir
    assert resolve(["--config", VAE, f"--run.root={tmp_path}", "--model.init_args.latent_dim=8"]).run_dir != a.run_dir
    # benchmark settings do not change what is trained, so not the run either
    assert resolve(["--config", VAE, f"--run.root={tmp_path}", "--benchmark.num_samples=5"]).run_dir == a.run_dir
    # the data seed is the experiment seed
    assert resolve(["--config", VAE, "--seed_everything=7"]).config.data.init_args.seed == 7


def test_model_that_does_not_fit_the_shards_fails_with_the_fix(digits_shards):
    config = resolve(["--config", VAE, f"--data.init_args.shards={digits_shards}",
                      "--model.init_args.image_size=16"]).config
    with pytest.raises(ConfigError, match="image_size=16.*8x8.*image_size: 8"):
        check_model_fits_data(config)
    config = resolve(["--config", VAE, f"--data.init_args.shards={digits_shards}",
                      "--model.init_args.channels=3"]).config
    with pytest.raises(ConfigError, match="channels: 1"):
        check_model_fits_data(config)
    config = resolve(["--config", VAE, f"--data.init_args.shards={digits_shards}",
                      "--model.init_args.num_classes=7"]).config
    with pytest.raises(ConfigError, match="num_classes: 10"):
        check_model_fits_data(config)


def test_genbench_fit_exits_2_with_the_key_and_does_nothing(tmp_path):
    proc = genbench("fit", "--config", VAE, f"--run.root={tmp_path / 'runs'}", "--model.init_args.latnt_dim=3",
                    cwd=tmp_path)
    assert proc.returncode == 2 and "latnt_dim" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "shards").exists()


def test_genbench_run_validates_every_experiment_before_training_any(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(VAE).read_text().replace("latent_dim: 16", "latent_dims: 16"))
    proc = genbench("run", VAE, str(bad), f"--runs={tmp_path / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 2 and "latent_dims" in proc.stderr
    assert not (tmp_path / "runs").exists(), "the first experiment trained although the second was malformed"
