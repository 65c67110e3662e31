"""`genbench serve` as a real process on 127.0.0.1: the OpenAI images API in front of a trained conditional
digits run; its bounds, its key, batching, a clean SIGTERM (every `served` block ends with one and checks
it); and (slow) the whole loop: serve -> generate -> benchmark with conditional accuracy from the prompts ->
a leaderboard with the external row beside the run."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import free_port, served

from conftest import REPO, genbench

SEVEN = "a handwritten digit seven"


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, digits_shards):
    root = tmp_path_factory.mktemp("runs")
    fit = genbench("fit", "--config", str(REPO / "experiments" / "digits" / "vae.yaml"), "--trainer.max_steps=250",
                   "--model.init_args.num_classes=10", f"--data.init_args.shards={digits_shards}",
                   f"--run.root={root}", "--run.id=cvae", "--tracking.wandb=false",
                   "--trainer.enable_progress_bar=false")
    assert fit.returncode == 0, fit.stderr[-3000:]
    return root / "cvae"


def _post(base: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{base}/images/generations", json=body, timeout=30, **kw)


def test_serve_answers_bounds_and_batches(conditional_run):
    with served(conditional_run, "--max-n", "4") as base:
        ok = _post(base, {"model": "cvae", "prompt": SEVEN, "n": 3, "size": "8x8", "response_format": "b64_json"})
        assert ok.status_code == 200, ok.text
        images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in ok.json()["data"]]
        assert len(images) == 3 and {im.size for im in images} == {(8, 8)} and images[0].mode == "L"
        # the API's error shapes: wrong size, too many images, a prompt naming no class, too long, too big
        for body, status, param in (({"prompt": SEVEN, "size": "1024x1024"}, 400, "size"),
                                    ({"prompt": SEVEN, "n": 5}, 400, "n"),
                                    ({"prompt": "a photo of a cat"}, 400, "prompt"),
                                    ({"prompt": "seven " * 1000}, 400, "prompt"),
                                    ({"prompt": SEVEN, "response_format": "url"}, 400, "response_format")):
            r = _post(base, body)
            assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
        big = _post(base, {"prompt": SEVEN, "pad": "x" * 100_000})
        assert big.status_code == 413 and "larger than" in big.json()["error"]["message"]
        # concurrent requests share network calls: 16 clients asking one image each
        calls_before = httpx.get(base.removesuffix("/v1") + "/health").json()["sampling_calls"]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: _post(base, {"prompt": SEVEN}), range(16)))
        assert all(a.status_code == 200 for a in answers)
        calls = httpx.get(base.removesuffix("/v1") + "/health").json()["sampling_calls"] - calls_before
        assert calls < 16, f"16 concurrent requests took {calls} sampling calls"
        # every served image is a different sample
        decoded = {a.json()["data"][0]["b64_json"] for a in answers}
        assert len(decoded) == 16


def test_in_flight_bound_answers_429(conditional_run):
    with served(conditional_run, "--max-in-flight", "1") as base:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: _post(base, {"prompt": SEVEN, "n": 10}), range(12)))
    limited = [a for a in answers if a.status_code == 429]
    assert limited and limited[0].headers["Retry-After"] == "1"
    assert all(a.status_code in (200, 429) for a in answers)


def test_non_loopback_needs_a_key(conditional_run):
    port = free_port()
    refused = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", "--run", str(conditional_run), "--host",
                              "0.0.0.0", "--port", str(port), "--api-key-env", "GENBENCH_TEST_SERVE_KEY"],
                             cwd=REPO, env={**os.environ, "GENBENCH_TEST_SERVE_KEY": ""}, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "GENBENCH_TEST_SERVE_KEY" in refused.stderr
    key = "serve-key-5b1c9a"
    with served(conditional_run, "--api-key-env", "GENBENCH_TEST_SERVE_KEY", host="0.0.0.0",
                env={"GENBENCH_TEST_SERVE_KEY": key}) as base:
        assert _post(base, {"prompt": SEVEN}).status_code == 401
        assert _post(base, {"prompt": SEVEN}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert _post(base, {"prompt": SEVEN}, headers={"Authorization": f"Bearer {key}"}).status_code == 200


@pytest.mark.slow
def test_generate_benchmark_and_leaderboard_through_serve(tmp_path, conditional_run, digits_shards):
    out, results = tmp_path / "set", tmp_path / "results"
    with served(conditional_run) as base:
        gen = genbench("generate", "--api-base", base, "--model", "cvae-served", "--prompts",
                       str(REPO / "prompts" / "digits.jsonl"), "--images-per-prompt", "20", "--out", str(out),
                       "--size", "8x8", "--concurrency", "8", "--price-per-image", "0.01")
        assert gen.returncode == 0, gen.stderr[-3000:]
        assert "200 new image(s)" in gen.stdout and "0 refused, 0 failed" in gen.stdout
    common = ["--results", str(results), "--metrics", "fd_auditor,audit"]
    bench = genbench("benchmark", "--images", str(out), "--reference", str(digits_shards), *common)
    assert bench.returncode == 0, bench.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in results.glob("*.json")]
    # the prompts' labels fed the conditional audit: no --labels given
    assert record["conditional"] and record["family"] == "external" and record["run_id"] == "cvae-served"
    audit = record["metrics"]["audit"]
    assert audit["conditional_accuracy"] > 0.3  # 10 classes: chance is 0.1
    ext = record["external"]
    assert ext["model"] == "cvae-served" and ext["images"] == 200 and ext["refused"] == 0 and ext["cost"] == 2.0
    assert ext["prompt_suite"]["sha256"] and ext["api_base"] == base
    run = genbench("benchmark", "--run", str(conditional_run), "--num-samples", "200", *common)
    assert run.returncode == 0, run.stderr[-3000:]
    board = genbench("leaderboard", "--results", str(results), "--out", str(tmp_path / "board"), "--wandb", "off")
    assert board.returncode == 0, board.stderr[-3000:]
    table = (tmp_path / "board" / "leaderboard.md").read_text()
    rows = [line for line in table.splitlines() if "| cvae" in line]
    assert any("cvae-served" in r and "external" in r for r in rows)
    assert any("| cvae |" in r and "vae" in r for r in rows)
    # the same weights through the API and sampled directly: the same distribution, up to sampling noise
    fd = {r["run_id"]: r["metrics"]["fd_auditor"] for r in (json.loads(p.read_text()) for p in results.glob("*.json"))}
    assert np.isfinite(list(fd.values())).all() and fd["cvae-served"] < 3 * fd["cvae"] + 0.5
