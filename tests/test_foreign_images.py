"""Other tools' WebDataset shards: images of every size and mode fitted to the configured size on the loader
workers (center-crop, random-crop, stretch), labels from .cls, a .json attribute or .txt; written here with
Python's tarfile, no manifest."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.datamodule import ShardDataModule
from pipeline.data.imageops import fit_to_size


def _bands(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Left quarter red, middle half green, right quarter blue."""
    a = np.zeros((height, width, 3), dtype=np.uint8)
    a[:, : width // 4, 0] = 255
    a[:, width // 4: 3 * width // 4, 1] = 255
    a[:, 3 * width // 4:, 2] = 255
    return Image.fromarray(a).convert(mode)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _write_tar(path: Path, samples: list[dict[str, bytes]], prefix: str = "sample") -> None:
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{prefix}{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def foreign(tmp_path) -> Path:
    """Mixed sizes and modes: RGB JPEG, RGBA PNG, CMYK JPEG, L PNG, WebP; labels as .cls, .json and .txt."""
    images = [(_bands(40, 20), "JPEG"), (_bands(20, 50, "RGBA"), "PNG"), (_bands(33, 33, "CMYK"), "JPEG"),
              (_bands(64, 64, "L"), "PNG"), (_bands(50, 40), "WEBP")]
    samples = []
    for i in range(40):
        image, fmt = images[i % len(images)]
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        samples.append({ext: _encode(image, fmt), "cls": str(i % 3).encode(),
                        "json": json.dumps({"attribute": i % 2, "name": ["cat", "dog"][i % 2]}).encode(),
                        "txt": ["cat", "dog"][i % 2].encode()})
    _write_tar(tmp_path / "train-000000.tar", samples[:30])
    _write_tar(tmp_path / "val-000000.tar", samples[30:])
    return tmp_path


@pytest.mark.parametrize("resize", ["center-crop", "random-crop", "stretch"])
def test_every_size_and_mode_is_fitted_none_is_dropped(foreign, resize):
    dm = ShardDataModule(str(foreign), batch_size=5, num_workers=0, image_size=16, channels=3, resize=resize)
    assert dm.image_shape == (3, 16, 16)
    stream = dm.stream("train", True, 5)
    batches = [b for _, b in zip(range(6), stream)]
    assert all(b["image"].shape == (5, 3, 16, 16) and b["image"].dtype == torch.uint8 for b in batches)
    assert not stream.skipped, stream.skipped  # before: every image not of the first one's size was "corrupt"
    val = list(dm.stream("val", False, 5))
    assert sum(len(b["key"]) for b in val) == 10


def test_center_crop_keeps_the_middle_and_stretch_keeps_everything():
    image = torch.from_numpy(np.array(_bands(40, 20))).permute(2, 0, 1).contiguous()
    center = fit_to_size(image, (16, 16), "center-crop").float()
    # shorter side 20 -> 16: 32 x 16, central 16 columns = the green middle half (the filter blends the edge
    # columns with their red and blue neighbours)
    inner = center[:, :, 1:-1]
    assert inner[1].min() > 250 and inner[0].max() < 5 and inner[2].max() < 5
    stretched = fit_to_size(image, (16, 16), "stretch").float()
    assert stretched[0, :, :2].mean() > 200 and stretched[2, :, -2:].mean() > 200 and stretched[1, :, 6:10].mean() > 200
    crops = {tuple(fit_to_size(image, (16, 16), "random-crop", random.Random(s))[0, 0].tolist()) for s in range(20)}
    assert len(crops) > 1  # different seeds, different windows
    same = torch.from_numpy(np.array(_bands(16, 16))).permute(2, 0, 1)
    assert fit_to_size(same, (16, 16)) is same
    # against PIL: shorter side to 16 with an antialiasing filter, then the central square
    pil = _bands(40, 20).resize((32, 16), Image.Resampling.BILINEAR).crop((8, 0, 24, 16))
    reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
    assert (center - reference).abs().mean() < 3


def test_labels_from_json_and_txt(foreign):
    by_key = {}
    for label_key in ("cls", "json:attribute", "txt"):
        manifest_names = ["cat", "dog"] if label_key == "txt" else []
        dm = ShardDataModule(str(foreign), batch_size=10, num_workers=0, image_size=8, label_key=label_key)
        dm._manifest = {**dm.manifest, "class_names": manifest_names}
        batches = list(dm.stream("val", False, 10))
        by_key[label_key] = torch.cat([b["label"] for b in batches]).tolist()
    assert by_key["cls"] == [i % 3 for i in range(30, 40)]
    assert by_key["json:attribute"] == by_key["txt"] == [i % 2 for i in range(30, 40)]
    with pytest.raises(ValueError, match="data.label_key='json'"):
        ShardDataModule(str(foreign), label_key="json")
    with pytest.raises(ValueError, match="data.resize='crop'"):
        ShardDataModule(str(foreign), resize="crop")


@pytest.mark.slow
def test_a_run_trains_and_is_scored_at_the_fitted_size(tmp_path, digits_shards):
    """8x8 digits trained at 16x16 (data.image_size): the model's size is checked against the fitted size, and
    the benchmark reads its reference at that size (the memorisation audit compares pixels, so it must) and trains
    its auditor at that size (before, the auditor metrics were skipped: an 8x8 auditor cannot read 16x16)."""
    from conftest import REPO, genbench

    fit = genbench("fit", "--config", str(REPO / "experiments" / "digits" / "vae.yaml"), "--trainer.max_steps=3",
                   f"--data.init_args.shards={digits_shards}", "--data.init_args.image_size=16",
                   "--model.init_args.image_size=16", f"--run.root={tmp_path / 'runs'}", "--tracking.wandb=false",
                   "--trainer.enable_progress_bar=false", "--benchmark.auditor_epochs=1")
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    cache = tmp_path / "cache"
    bench = genbench("benchmark", "--run", str(run), "--num-samples", "60", "--metrics", "memorization,fd_auditor",
                     "--results", str(tmp_path / "results"), env={"GENBENCH_CACHE": str(cache)})
    assert bench.returncode == 0, bench.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")]
    assert record["protocol"]["reference"]["fit"] == {"image_size": 16}
    assert record["metrics"]["memorization"]["spaces"]["pixels"]["copy_rate"] is not None
    assert record["metrics"]["fd_auditor"] > 0 and "fd_auditor" not in record.get("skipped", {})
    (info,) = [json.loads(p.read_text()) for p in (cache / "auditors").glob("*/auditor.json")]
    assert info["image_shape"] == [1, 16, 16] and info["fit"] == {"image_size": 16}
    mismatch = genbench("fit", "--config", str(REPO / "experiments" / "digits" / "vae.yaml"), "--trainer.max_steps=3",
                        f"--data.init_args.shards={digits_shards}", "--data.init_args.image_size=16",
                        f"--run.root={tmp_path / 'runs2'}", "--tracking.wandb=false")
    assert mismatch.returncode != 0 and "data.init_args.image_size: 8" in mismatch.stderr
