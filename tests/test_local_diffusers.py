"""`genbench generate --provider diffusers`: a tiny Stable Diffusion pipeline with random weights, built and saved
here as diffusers' own tests build theirs (tests/tiny_pipeline.py), loaded from its directory without the hub;
one seeded generator per image (recorded, so an image is drawn again exactly), batches, the pipeline's identity in
generation.json, resume, a kill and rerun, and the set scored by the benchmark like any other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from tiny_pipeline import build_tiny_pipeline

from conftest import REPO, genbench
from pipeline.data.generated import read_meta
from pipeline.services.providers.local_diffusers import weights_identity


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd")


def _suite(tmp_path, n=2):
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"a handwritten digit {i}", "label": i}) + "\n"
                            for i in range(n)))
    return path


def _generate(pipeline_dir, suite, out, *extra):
    return genbench("generate", "--provider", "diffusers", "--model", str(pipeline_dir), "--prompts", str(suite),
                    "--out", str(out), "--steps", "2", "--size", "32x32", *extra, timeout=300)


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_a_local_pipeline_draws_every_image_from_its_recorded_seed_and_resumes(pipeline_dir, tmp_path):
    suite, out = _suite(tmp_path), tmp_path / "sd"
    first = _generate(pipeline_dir, suite, out, "--images-per-prompt", "3")
    assert first.returncode == 0 and "6 new image(s)" in first.stdout, first.stdout + first.stderr[-3000:]
    info = json.loads((out / "generation.json").read_text())
    pipeline = info["pipeline"]
    assert info["provider"] == "diffusers" and info["endpoint"] == str(pipeline_dir)
    assert pipeline["class"] == "StableDiffusionPipeline" and pipeline["steps"] == 2
    assert pipeline["model_index"] == json.loads((pipeline_dir / "model_index.json").read_text())
    assert pipeline["weights_sha256"] == weights_identity(pipeline_dir)["weights_sha256"]
    assert set(pipeline["weight_files"]) >= {"unet/diffusion_pytorch_model.safetensors",
                                             "text_encoder/model.safetensors"}
    images = read_meta(out, "p0")["images"]
    assert len({i["seed"] for i in images}) == 3 and all(i["format"] == "PNG" for i in images)
    assert Image.open(out / "images" / images[0]["file"]).size == (32, 32)
    # one image removed: the rerun draws only it, from its recorded seed, to the same pixels
    kept = (out / "images" / images[1]["file"]).read_bytes()
    (out / "images" / images[1]["file"]).unlink()
    again = _generate(pipeline_dir, suite, out, "--images-per-prompt", "3")
    assert again.returncode == 0 and "1 new image(s)" in again.stdout, again.stdout + again.stderr[-3000:]
    assert (out / "images" / images[1]["file"]).read_bytes() == kept
    assert read_meta(out, "p0")["images"][1]["seed"] == images[1]["seed"]
    # drawn in batches of 3, each image keeps its own generator: the same images up to the kernels' rounding
    batched = _generate(pipeline_dir, suite, tmp_path / "batched", "--images-per-prompt", "3", "--batch-size", "3")
    assert batched.returncode == 0, batched.stderr[-3000:]
    for image in images:
        diff = np.abs(_pixels(out / "images" / image["file"]) - _pixels(tmp_path / "batched" / "images" /
                                                                         image["file"]))
        assert diff.max() <= 2, (image["file"], diff.max())


def test_another_pipeline_or_settings_into_the_same_set_and_a_missing_pipeline_are_refused(pipeline_dir, tmp_path):
    suite, out = _suite(tmp_path, 1), tmp_path / "sd"
    assert _generate(pipeline_dir, suite, out).returncode == 0
    other = _generate(pipeline_dir, suite, out, "--steps", "3", "--images-per-prompt", "2")
    assert other.returncode == 2 and "another pipeline or other options" in other.stderr
    missing = _generate(tmp_path / "no-pipeline", suite, tmp_path / "x")
    assert missing.returncode == 2 and "no model_index.json" in missing.stderr and "Traceback" not in missing.stderr
    scheduler = _generate(pipeline_dir, suite, tmp_path / "y", "--scheduler", "NoSuchScheduler")
    assert scheduler.returncode == 2 and "--scheduler NoSuchScheduler" in scheduler.stderr
    euler = _generate(pipeline_dir, suite, tmp_path / "euler", "--scheduler", "EulerDiscreteScheduler")
    assert euler.returncode == 0, euler.stderr[-3000:]
    assert json.loads((tmp_path / "euler" / "generation.json").read_text())["pipeline"]["scheduler"] == \
        "EulerDiscreteScheduler"


@pytest.mark.slow
def test_a_killed_local_run_loses_nothing_and_draws_nothing_twice(pipeline_dir, tmp_path, digits_shards):
    suite, out = _suite(tmp_path, 4), tmp_path / "sd"
    args = ["generate", "--provider", "diffusers", "--model", str(pipeline_dir), "--prompts", str(suite), "--out",
            str(out), "--steps", "30", "--size", "32x32", "--images-per-prompt", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "images").glob("*.png"))) < 3 if (out / "images").exists() else True:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
    assert 3 <= len(before) < 16
    rerun = genbench(*args, timeout=300)
    assert rerun.returncode == 0 and f"{16 - len(before)} new image(s)" in rerun.stdout, rerun.stderr[-3000:]
    assert all((out / "images" / name).read_bytes() == data for name, data in before.items())
    for i in range(4):
        history = [e for e in read_meta(out, f"p{i}")["history"] if e["event"] == "images"]
        assert sorted(e["index"] for e in history) == [0, 1, 2, 3]  # each image drawn and recorded once
    # scored like any other generated set
    bench = genbench("benchmark", "--images", str(out), "--reference", str(digits_shards), "--metrics", "audit",
                     "--results", str(tmp_path / "results"))
    assert bench.returncode == 0, bench.stderr[-3000:]
    (record,) = (tmp_path / "results").glob("*.json")
    record = json.loads(record.read_text())
    assert record["run_id"] == pipeline_dir.name  # the pipeline's directory, not its path
    assert record["external"]["provider"] == "diffusers" and record["external"]["images"] == 16
    assert record["external"]["pipeline"]["weights_sha256"] == weights_identity(pipeline_dir)["weights_sha256"]
