"""What may be done to a first stage while latent runs depend on it (issue 38): trained on, respelled, moved,
shadowed by a same-named run in the working directory, deleted, retrained without its pin, broken; settings no run
can use; and every message naming the pinned sha256 and an action that works, without a traceback. Short runs of
the digits configs (a 12-step kl autoencoder, a 6-step latent DDPM on it), trained anew for each test that changes
them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from serving import served

from conftest import REPO
from pipeline.benchmark.stage import benchmark_run, load_run_model
from pipeline.cli import main
from pipeline.fit.train import ConfigError, fit, resolve
from pipeline.io import sha256_file
from pipeline.models import FAMILIES
from pipeline.models.first_stage import FirstStageError

DIGITS = REPO / "experiments" / "digits"
AE_NAME, LDM_NAME = "ae", "ldm"


def _args(root, shards, config, *overrides):
    return ["--config", str(DIGITS / config), f"--run.root={root}", f"--data.init_args.shards={shards}",
            "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--tracking.wandb=false",
            "--model.init_args.sample_every_n_steps=-1", "--model.init_args.ch=8",
            "--trainer.check_val_every_n_epoch=100", "--benchmark.auditor_epochs=1",
            *overrides]


def _ae(root, shards, steps, *more):
    return _args(root, shards, "autoencoder-kl.yaml", f"--trainer.max_steps={steps}", f"--run.id={AE_NAME}", *more)


def _ldm(root, shards, first_stage, steps, *more):
    return _args(root, shards, "ldm.yaml", f"--model.init_args.first_stage={first_stage}",
                 f"--trainer.max_steps={steps}", "--model.init_args.sampling_steps=4",
                 "--model.init_args.warmup_steps=2", *more)


def _train(shards) -> tuple[Path, Path]:
    """runs/ae (a kl autoencoder, 12 steps) and a latent DDPM on it (6 steps), in the working directory, with the
    relative paths a user types (the ldm's config names ``runs/ae``)."""
    ae = fit(_ae("runs", shards, 12))
    return ae, fit(_ldm("runs", shards, ae, 6))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_shards):
    """One trained pair for the tests that change nothing."""
    base, here = tmp_path_factory.mktemp("two-stage"), os.getcwd()
    os.chdir(base)
    try:
        return base, _train(digits_shards)[1].name
    finally:
        os.chdir(here)


@pytest.fixture
def tree(tmp_path, digits_shards, monkeypatch):
    """A pair to change, trained for the test (a copy would still record the original's absolute path)."""
    monkeypatch.chdir(tmp_path)
    return _train(digits_shards)


def _sha(path: Path) -> str:
    return sha256_file(path)


def _step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["global_step"]


def _pinned_sha(ldm: Path) -> str:
    return json.loads((ldm / "run.json").read_text())["first_stage"]["sha256"]


def _cli(capsys, *argv) -> tuple[int, str]:
    """The console entry point in this process: its exit code and what it printed to stderr."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_training_the_first_stage_on_keeps_what_a_latent_run_was_trained_on(tree, digits_shards, capsys):
    ae, ldm = tree
    pinned = _pinned_sha(ldm)
    assert _sha(ae / "checkpoints" / "pinned" / f"{pinned}.ckpt") == pinned  # kept the moment the ldm was trained
    before = load_run_model(ldm)[0].sample(3, seed=1)

    fit(_ae("runs", digits_shards, 16))  # the documented way to train a finished run further: the same run
    assert "they need stay in" in capsys.readouterr().out
    assert _step(ae) == 16 and _sha(ae / "checkpoints" / "last.ckpt") != pinned
    assert _sha(ae / "checkpoints" / "pinned" / f"{pinned}.ckpt") == pinned  # untouched by the new last.ckpt

    # the latent run still loads (the same samples), benchmarks and serves
    model = load_run_model(ldm)[0]
    assert model.first_stage.record["sha256"] == pinned and torch.equal(model.sample(3, seed=1), before)
    record = benchmark_run(ldm, num_samples=40, results="results", metrics="fd_auditor")
    assert json.loads(record.read_text())["provenance"]["first_stage"]["sha256"] == pinned
    with served(ldm.resolve()) as base:
        answer = httpx.post(f"{base}/images/generations", json={"prompt": "a digit", "n": 1}, timeout=60)
        assert answer.status_code == 200, answer.text

    # resumes on its own first stage, named by its pinned checkpoint; the ae's new checkpoint is a new run
    resumed = fit(_ldm("runs", digits_shards, ae / "checkpoints" / "pinned" / f"{pinned}.ckpt", 8))
    assert resumed == ldm and _step(ldm) == 8 and _pinned_sha(ldm) == pinned
    assert resolve(_ldm("runs", digits_shards, ae, 8)).run_dir != ldm


def test_every_spelling_of_a_first_stage_names_one_run(trained, digits_shards, monkeypatch):
    base, ldm = trained
    monkeypatch.chdir(base)
    spellings = ["runs/ae", "./runs/ae", "runs/ae/", str(base / "runs" / "ae"), "runs/ae/checkpoints/last.ckpt",
                 "runs//ae/../ae"]
    assert {resolve(_ldm("runs", digits_shards, s, 6)).run_dir.name for s in spellings} == {ldm}


def test_a_moved_first_stage_is_found_where_the_user_points_and_the_run_resumes(tree, digits_shards, capsys):
    ae, ldm = tree
    pinned = _pinned_sha(ldm)
    moved = Path("archive") / "ae-moved"
    moved.parent.mkdir()
    shutil.move(ae, moved)

    code, err = _cli(capsys, "benchmark", "--run", str(ldm), "--num-samples", "40", "--metrics", "fd_auditor")
    assert code != 0 and pinned in err and "--first-stage" in err and "Traceback" not in err
    code, err = _cli(capsys, "fit", *_ldm("runs", digits_shards, ae, 8))  # the old command, the old place
    assert code != 0 and pinned in err and "--model.init_args.first_stage=" in err and "Traceback" not in err

    model = load_run_model(ldm, first_stage=str(moved))[0]
    assert model.first_stage.record["sha256"] == pinned
    assert model.first_stage.record["run_dir"] == str(moved.resolve())
    code, err = _cli(capsys, "benchmark", "--run", str(ldm), "--num-samples", "40", "--metrics", "fd_auditor",
                     "--first-stage", str(moved))
    assert code == 0, err
    assert fit(_ldm("runs", digits_shards, moved, 8)) == ldm and _step(ldm) == 8  # resumed, not a new run
    with served(ldm.resolve()) as base:  # its checkpoint now records the new place
        assert httpx.post(f"{base}/images/generations", json={"prompt": "x"}, timeout=60).status_code == 200


def test_the_recorded_first_stage_wins_over_a_same_named_run_in_the_working_directory(trained, digits_shards,
                                                                                      tmp_path, monkeypatch):
    base, ldm = trained
    other = tmp_path / "other"
    fit(_ae(other / "runs", digits_shards, 4))  # another autoencoder, at the relative path the ldm's config names
    monkeypatch.chdir(other)
    model = load_run_model(base / "runs" / ldm)[0]
    assert model.first_stage.record["run_dir"] == str((base / "runs" / AE_NAME).resolve())
    assert model.first_stage.record["sha256"] == _pinned_sha(base / "runs" / ldm)


def test_a_deleted_first_stage_is_named_by_its_hash_in_every_message(tree, digits_shards, capsys):
    ae, ldm = tree
    pinned = _pinned_sha(ldm)
    shutil.rmtree(ae)
    runs_before = sorted(Path("runs").iterdir())
    code, err = _cli(capsys, "fit", *_ldm("runs", digits_shards, ae, 8))
    assert code == 2 and pinned in err and ldm.name in err and "Traceback" not in err
    assert "train the autoencoder first" not in err  # that would lead to a refusal: a new one has other latents
    assert sorted(Path("runs").iterdir()) == runs_before
    with pytest.raises(FirstStageError, match=f"sha256 {pinned}, and it is not there any more") as gone:
        load_run_model(ldm)
    assert "--first-stage" in str(gone.value)


def test_a_first_stage_retrained_without_its_pin_is_refused_with_both_hashes(tree, digits_shards, capsys):
    ae, ldm = tree
    pinned = _pinned_sha(ldm)
    fit(_ae("runs", digits_shards, 16))
    (ae / "checkpoints" / "pinned" / f"{pinned}.ckpt").unlink()  # the one way to lose it: by hand
    found = _sha(ae / "checkpoints" / "last.ckpt")
    with pytest.raises(FirstStageError) as refused:
        load_run_model(ldm)
    assert pinned in str(refused.value) and found in str(refused.value) and "pinned" in str(refused.value)
    # resuming that run by its id: one message with both hashes and the fix, no traceback, nothing trained
    code, err = _cli(capsys, "fit", *_ldm("runs", digits_shards, ae, 8, f"--run.id={ldm.name}"))
    assert code == 2 and pinned in err and found in err and "Traceback" not in err
    assert "--model.init_args.first_stage=" in err and _step(ldm) == 6


def test_a_first_stage_with_non_finite_weights_is_blamed_itself(trained, tmp_path):
    base, _ = trained
    broken = shutil.copytree(base / "runs" / AE_NAME, tmp_path / "broken", symlinks=True)
    ckpt = broken / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    key = next(k for k in state["state_dict"] if k.startswith("decoder"))
    state["state_dict"][key].view(-1)[0] = float("nan")
    ckpt.unlink()
    torch.save(state, ckpt)
    with pytest.raises(FirstStageError, match=f"non-finite weights in 1 tensor.*{key}.*train it again") as refused:
        FAMILIES["ddpm"](image_size=16, channels=1, ch=8, ch_mult=(1, 2), attn_resolutions=(2,),
                         first_stage=str(broken))
    assert _sha(ckpt) in str(refused.value) and "lr" in str(refused.value)


def test_a_diverged_autoencoder_names_its_own_gradient_clip():
    model = FAMILIES["autoencoder"](image_size=16, channels=1, ch=8, ch_mult=(1, 2, 2))
    model._nonfinite = torch.tensor([3.0, float("nan")], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="at global step 3") as diverged:
        model.raise_if_nonfinite()
    assert "model.init_args.grad_clip" in str(diverged.value) and "gradient_clip_val" not in str(diverged.value)
    gan = FAMILIES["gan"](image_size=8, channels=1)  # manual optimisation without clipping: no clip to advise
    gan._nonfinite = model._nonfinite
    with pytest.raises(FloatingPointError) as diverged:
        gan.raise_if_nonfinite()
    assert "clip" not in str(diverged.value)


def test_settings_no_run_can_use_are_refused_in_one_message_before_any_run_directory(tmp_path, digits_shards):
    args = _args(tmp_path / "runs", digits_shards, "autoencoder-vq.yaml", "--trainer.max_steps=20",
                 "--model.init_args.codebook_size=1", "--model.init_args.commitment_weight=-0.5",
                 "--model.init_args.disc_weight=0.1", "--model.init_args.disc_start=20",
                 "--model.init_args.perceptual_weight=1.0", f"--model.init_args.perceptual_weights={tmp_path}/no.pth")
    with pytest.raises(ConfigError) as refused:
        fit(args)
    message = str(refused.value)
    for part in ("codebook_size=1 must be at least 2", "commitment_weight=-0.5 must be 0 or more",
                 "disc_start=20 >= trainer.max_steps=20", f"{tmp_path}/no.pth does not exist", "perceptual_weight: 0"):
        assert part in message, (part, message)
    with pytest.raises(ConfigError, match="kl_weight=-1.0 must be 0 or more"):
        fit(_args(tmp_path / "runs", digits_shards, "autoencoder-kl.yaml", "--model.init_args.kl_weight=-1"))
    with pytest.raises(ConfigError, match="needs the VGG16 weights .*genbench fetch-weights vgg16"):  # offline, none
        fit(_args(tmp_path / "runs", digits_shards, "autoencoder-kl.yaml", "--model.init_args.perceptual_weight=1"))
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="codebook_size=1 must be at least 2"):  # built directly, too
        FAMILIES["autoencoder"](image_size=16, channels=1, quantizer="vq", codebook_size=1, ch_mult=(1, 2, 2))


def test_a_changed_shard_is_one_message_before_any_run_directory(tmp_path, digits_shards, capsys):
    shards = shutil.copytree(digits_shards, tmp_path / "shards")
    shard = next(shards.glob("train-*.tar"))
    data = bytearray(shard.read_bytes())
    data[5000] ^= 1
    shard.write_bytes(bytes(data))
    code, err = _cli(capsys, "fit", *_ae(tmp_path / "runs", shards, 2))
    assert code == 2 and str(shard) in err and "manifest" in err
    assert "Traceback" not in err and "starts the run again" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_two_stage_suite_run_again_longer_keeps_the_old_latent_run(tmp_path, digits_shards):
    import yaml

    from pipeline.launch.runner import run

    exps = {n: str(DIGITS / f"{n}.yaml") for n in ("autoencoder-kl", "ldm")}
    suite = {"experiments": list(exps.values()), "first_stages": {exps["ldm"]: exps["autoencoder-kl"]},
             "overrides": ["--trainer.max_steps=10", f"--data.init_args.shards={digits_shards}",
                           "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false",
                           "--tracking.wandb=false", "--model.init_args.sample_every_n_steps=-1",
                           "--model.init_args.ch=8", "--trainer.check_val_every_n_epoch=100",
                           "--benchmark.num_samples=40", "--benchmark.auditor_epochs=1",
                           "--benchmark.metrics=fd_auditor"],
             "experiment_overrides": {exps["ldm"]: ["--model.init_args.sampling_steps=4"]},
             "runs": str(tmp_path / "runs"), "results": str(tmp_path / "results"),
             "leaderboard": str(tmp_path / "board")}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    run([str(path)], [], progress=False)
    first_ldm = next((tmp_path / "runs").glob("digits-ldm-*"))
    run([str(path)], ["--trainer.max_steps=14"], progress=False)  # the autoencoder continues to 14 steps
    ldms = sorted((tmp_path / "runs").glob("digits-ldm-*"))
    assert len(ldms) == 2 and first_ldm in ldms  # the old latent run stays; the new first stage has its own
    assert _step(first_ldm) == 10 and load_run_model(first_ldm)[0].sample(2).shape == (2, 1, 16, 16)
    new = next(p for p in ldms if p != first_ldm)
    ae = next((tmp_path / "runs").glob("digits-autoencoder-kl-*"))
    assert _pinned_sha(new) == _sha(ae / "checkpoints" / "last.ckpt") != _pinned_sha(first_ldm)
    assert {json.loads(p.read_text())["run_id"] for p in (tmp_path / "results").glob("*.json")} >= \
        {first_ldm.name, new.name}
