"""The 64x64 experiments (experiments/celeba64/): each family's published architecture at the parameter count
its header states, and each trains through `genbench fit` at 64x64 (narrowed: a CPU step of the full networks
takes a minute) on shards its own `prepare` group writes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import REPO, genbench
from pipeline.models import FAMILIES

EXPERIMENTS = REPO / "experiments" / "celeba64"
PARAMETERS_M = {"ddpm": 78.7, "gan": 19.1, "vae": 31.7, "ar": 78.3}
NARROW = {"ddpm": ["--model.init_args.ch=16"], "vae": ["--model.init_args.base_channels=8"],
          "gan": ["--model.init_args.g_channels=8", "--model.init_args.d_channels=8"],
          "ar": ["--model.init_args.dim=32", "--model.init_args.depth=1", "--model.init_args.heads=2",
                 "--model.init_args.palette_size=16"]}


def _config(family: str) -> tuple[dict, str]:
    text = (EXPERIMENTS / f"{family}.yaml").read_text()
    return yaml.safe_load(text), text


@pytest.mark.parametrize("family", sorted(PARAMETERS_M))
def test_the_config_builds_the_architecture_its_header_states(family):
    config, text = _config(family)
    init = {**config["model"]["init_args"], "compile": False}
    assert init["image_size"] == config["prepare"]["image_size"] == 64 and init["channels"] == 3
    model = FAMILIES[family](**init)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(PARAMETERS_M[family], abs=0.05)
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert f"{PARAMETERS_M[family]:.1f}M" in header or f"{round(PARAMETERS_M[family])}M" in header
    assert "Budget:" in header and f"{config['trainer']['max_steps'] // 1000}k" in header
    if family == "ddpm":
        # five levels, 64 -> 4, attention only at 16x16: the DDIM CelebA UNet
        assert init["ch_mult"] == [1, 2, 2, 2, 4] and init["attn_resolutions"] == [16]
    if family == "ar":
        assert model.seq_len == 64 * 64 and model.vocab == 512  # one palette token per pixel, as Image GPT


@pytest.fixture(scope="module")
def shards64(tmp_path_factory):
    return tmp_path_factory.mktemp("celeba64") / "digits64"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(PARAMETERS_M))
def test_every_family_trains_at_64x64(family, shards64, tmp_path):
    overrides = [f"--data.init_args.shards={shards64}", "--prepare.source=digits", "--prepare.channels=3",
                 "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", "--trainer.accelerator=cpu",
                 "--trainer.precision=32-true", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
                 "--model.init_args.compile=false", "--model.init_args.sample_every_n_steps=-1",
                 f"--run.root={tmp_path / 'runs'}", *NARROW[family]]
    if family == "ar":
        overrides.append(f"--model.init_args.palette_shards={shards64}")
    proc = genbench("fit", "--config", str(EXPERIMENTS / f"{family}.yaml"), *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((shards64 / "manifest.json").read_text())
    assert manifest["splits"]["train"]["image_size"] == [64, 64] and manifest["prepare"]["resize"] == "center-crop"
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["hyper_parameters"]["image_size"] == 64
