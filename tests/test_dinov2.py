"""FD-DINOv2: its weights resolved like Inception's (a weight file this test builds with the same architecture,
since none can be downloaded here), features independent of the batch size, and the metric in a record."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import genbench
from pipeline.metrics.dinov2 import DINOV2_WEIGHTS, DINOv2Features, architecture_only_dinov2_weights
from pipeline.metrics.features import WeightsUnavailable


def _folder(path, n, seed):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((16, 16), Image.BILINEAR).save(path / f"{k:03d}.png")
    return path


def test_dinov2_weights_explicit_then_cache_then_clear_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailable, match="--dinov2-weights .*missing.pth does not exist"):
        DINOV2_WEIGHTS.resolve(str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsUnavailable) as err:  # GENBENCH_OFFLINE=1 (conftest): no download attempt
        DINOV2_WEIGHTS.resolve(None)
    message = str(err.value)
    assert str(DINOV2_WEIGHTS.cache_path()) in message and "genbench fetch-weights dinov2" in message
    assert DINOV2_WEIGHTS.cache_path().name == "dinov2_vitl14_pretrain.pth"  # Meta's file, as torch.hub names it


def test_fd_dinov2_without_weights_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    proc = genbench("benchmark", "--images", str(_folder(tmp_path / "gen", 8, 0)), "--reference",
                    str(_folder(tmp_path / "ref", 8, 1)), "--metrics", "fd_dinov2", "--results", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]
    assert "fd_dinov2" not in record["metrics"]
    assert "genbench fetch-weights dinov2" in record["skipped"]["fd_dinov2"]


@pytest.mark.slow
def test_dinov2_loads_metas_format_and_scores_fd_dinov2(tmp_path, monkeypatch):
    """A ViT-L/14 weight file in Meta's layout (518 px grid) loads at 224 px from the torch hub cache; features
    do not depend on the batch size and differ between images; a record gets FD-DINOv2 and precision/recall in
    that space, with the weights named by hash."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    built = architecture_only_dinov2_weights(tmp_path / "dinov2-test.pth")
    assert torch.load(built, mmap=True, weights_only=True)["pos_embed"].shape[1] == 37 * 37 + 1
    DINOV2_WEIGHTS.cache_path().parent.mkdir(parents=True)
    shutil.move(built, DINOV2_WEIGHTS.cache_path())
    net = DINOv2Features(DINOV2_WEIGHTS.resolve(None))
    assert net.net.pos_embed.shape[1] == 16 * 16 + 1  # resampled to the 224 px grid
    images = torch.randint(0, 256, (5, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    whole = net(images)
    pieces = torch.cat([net(images[:2]), net(images[2:])])
    assert whole.shape == (5, 1024)
    assert torch.allclose(whole, pieces, rtol=1e-4, atol=1e-4)
    assert torch.cdist(whole, whole)[~torch.eye(5, dtype=torch.bool)].min() > 1e-3
    del net

    proc = genbench("benchmark", "--images", str(_folder(tmp_path / "gen", 12, 0)), "--reference",
                    str(_folder(tmp_path / "ref", 12, 1)), "--metrics", "fd_dinov2,pr", "--batch-size", "6",
                    "--results", str(tmp_path / "r"), env={"TORCH_HOME": str(tmp_path / "torch")}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]
    m = record["metrics"]
    assert m["fd_dinov2"] > 0 and 0 <= m["precision_dinov2"] <= 1 and 0 <= m["recall_dinov2"] <= 1
    identity = record["protocol"]["extractors"]["dinov2"]
    assert identity["resize"].startswith("torch-bicubic") and len(identity["weights_sha256"]) == 64
