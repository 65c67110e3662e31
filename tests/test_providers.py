"""`genbench generate --provider P` for the named services, each against a stand-in on 127.0.0.1 that follows
its documented protocol (tests/provider_server.py): tasks that stay running for a few polls, 429 with
Retry-After, a 5xx, refusals, a bad key, a token that expires mid-run (firefly), a grid (midjourney), a task
still running at the deadline and a kill in the middle; then `genbench benchmark --images` on what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from provider_server import CLIENT_ID, KEY, QUADRANTS, ProviderServer

from conftest import REPO, genbench
from pipeline.data.generated import read_meta

MODELS = {"midjourney": "midjourney-v7", "stability": "core", "firefly": "image4_standard", "bfl": "flux-pro-1.1",
          "openai-chat": "gpt-4o-image"}
PER_PROMPT = {"midjourney": 4}  # one imagine is a 2x2 grid: four images


def _suite(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps({"id": p.replace(" ", "-"), "prompt": p, "label": i % 10}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def _args(server: ProviderServer, provider: str, suite: Path, out: Path, *extra: str) -> list[str]:
    base = server.base + ("/v1" if provider == "openai-chat" else "")
    more = ["--token-url", f"{server.base}/ims/token/v3"] if provider == "firefly" else []
    size = [] if provider in ("midjourney", "openai-chat") else ["--size", "8x8"]
    return ["generate", "--provider", provider, "--api-base", base, "--model", MODELS[provider], "--prompts",
            str(suite), "--out", str(out), "--images-per-prompt", str(PER_PROMPT.get(provider, 2)), "--api-key-env",
            "STANDIN_KEY", "--poll-interval", "0.05", "--max-retries", "3", *size, *more, *extra]


def _env(key: str = KEY) -> dict:
    return {"STANDIN_KEY": key, "FIREFLY_CLIENT_ID": CLIENT_ID}


def _generate(server, provider, suite, out, *extra, key: str = KEY):
    return genbench(*_args(server, provider, suite, out, *extra), env=_env(key), timeout=180)


def _no_secret_anywhere(out: Path, *texts: str) -> None:
    secrets = [KEY.encode(), b"ims-token-"]  # the key, and every bearer token the IMS stand-in issued
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s in data for s in secrets), path
    for text in texts:
        assert KEY not in text and "ims-token-" not in text


@pytest.mark.parametrize("provider", list(MODELS))
def test_each_provider_generates_refuses_retries_and_resumes_paying_once(tmp_path, provider):
    suite = _suite(tmp_path, ["a plain digit", "a slow digit", "a ratelimit digit", "an error500 digit",
                              "a refuse digit"])
    out = tmp_path / provider
    k = PER_PROMPT.get(provider, 2)
    with ProviderServer() as server:
        t0 = time.monotonic()
        first = _generate(server, provider, suite, out)
        elapsed = time.monotonic() - t0
        assert first.returncode == 0, first.stderr[-3000:]
        assert f"{4 * k} new image(s)" in first.stdout and f"{k} refused" in first.stdout, first.stdout
        assert elapsed > 1.0  # the 429s said Retry-After: 1, and were waited out
        meta = {p.stem: read_meta(out, p.stem) for p in (out / "meta").glob("*.jsonl")}
        for prompt_id in ("a-plain-digit", "a-slow-digit", "a-ratelimit-digit", "an-error500-digit"):
            assert sorted(i["index"] for i in meta[prompt_id]["images"]) == list(range(k)), prompt_id
        assert [r["index"] for r in meta["a-refuse-digit"]["refused"]] == list(range(k))
        assert meta["a-refuse-digit"]["images"] == [] and meta["a-refuse-digit"]["refused"][0]["message"]
        # one billed submission per task: never one for a 429 or a 500, never two for the same image
        tasks_per_prompt = 1 if provider == "midjourney" else k
        paid = {prompt: n for (p, prompt), n in server.paid.items() if p == provider}
        assert paid["a slow digit"] == paid["a ratelimit digit"] == paid["a plain digit"] == tasks_per_prompt
        if provider in ("midjourney", "firefly", "bfl"):  # submit and poll: the slow tasks were polled until done
            slow = [t for t, task in server.tasks.items() if task["prompt"] == "a slow digit"]
            assert all(server.polls[t] > 3 for t in slow)
        info = json.loads((out / "generation.json").read_text())
        assert info["provider"] == provider and info["model"] == MODELS[provider]
        assert info["endpoint"].startswith(server.base) and info["totals"]["images"] == 4 * k
        if provider in ("midjourney", "firefly", "bfl"):
            assert set(info["totals"]["task_ids"]) >= {t for t, task in server.tasks.items()
                                                      if "refuse" not in task["prompt"]}
        # the same command again: nothing asked, nothing paid
        before = sum(server.paid.values())
        again = _generate(server, provider, suite, out)
        assert again.returncode == 0 and "0 new image(s)" in again.stdout, again.stdout + again.stderr[-2000:]
        assert sum(server.paid.values()) == before
    _no_secret_anywhere(out, first.stdout, first.stderr, again.stdout, again.stderr)


@pytest.mark.parametrize("provider", list(MODELS))
def test_a_bad_key_stops_at_once_naming_the_endpoint_and_the_variable(tmp_path, provider):
    suite = _suite(tmp_path, [f"a plain digit {i}" for i in range(6)])
    with ProviderServer() as server:
        proc = _generate(server, provider, suite, tmp_path / "out", key="sk-wrong-key-0000")
        assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
        assert "STANDIN_KEY" in proc.stderr and server.base in proc.stderr and "Traceback" not in proc.stderr
        assert "sk-wrong-key-0000" not in proc.stderr + proc.stdout
        assert sum(server.paid.values()) == 0


def test_concurrency_counts_tasks_in_flight_and_a_broken_image_is_asked_again(tmp_path):
    suite = _suite(tmp_path, [f"a slow digit {i}" for i in range(6)] + ["a broken digit"])
    out = tmp_path / "out"
    with ProviderServer() as server:
        first = _generate(server, "bfl", suite, out, "--concurrency", "2")
        assert server.most_active == 2  # two tasks at a time, however many polls each took
        assert first.returncode == 1 and "2 failed" in first.stdout, first.stdout + first.stderr[-2000:]
        failed = read_meta(out, "a-broken-digit")["failed"]
        assert len(failed) == 2 and "does not decode" in failed[0]["error"]
        again = _generate(server, "bfl", suite, out)
        assert again.returncode == 1 and "0 new image(s) in" in again.stdout and "2 failed" in again.stdout
        # only the failed images were asked again
        assert server.paid[("bfl", "a broken digit")] == 4 and server.paid[("bfl", "a slow digit 0")] == 2


def test_an_unknown_model_stops_naming_it(tmp_path):
    with ProviderServer() as server:
        args = _args(server, "bfl", _suite(tmp_path, ["a plain digit"]), tmp_path / "out")
        args[args.index("--model") + 1] = "unknown-flux"
        proc = genbench(*args, env=_env())
    assert proc.returncode == 2 and "--model 'unknown-flux'" in proc.stderr and "404" in proc.stderr, proc.stderr


@pytest.mark.parametrize("provider", ["midjourney", "firefly", "bfl"])
def test_a_task_running_at_the_deadline_is_picked_up_by_the_next_run_not_paid_again(tmp_path, provider):
    suite = _suite(tmp_path, ["a held digit", "a plain digit"])
    out = tmp_path / "out"
    with ProviderServer() as server:
        first = _generate(server, provider, suite, out, "--timeout", "1.5")
        assert first.returncode == 1, first.stderr[-2000:]
        assert "pending" in first.stdout and "still running at --timeout" in first.stderr, first.stderr[-2000:]
        pending = read_meta(out, "a-held-digit")["pending"]
        held = {t for t, task in server.tasks.items() if task["prompt"] == "a held digit"}
        assert pending and {p["task"]["id"] for p in pending} == held
        paid = dict(server.paid)
        server.release.set()
        second = _generate(server, provider, suite, out, "--timeout", "30")
        assert second.returncode == 0, second.stderr[-2000:]
        assert dict(server.paid) == paid  # the running tasks were polled, not submitted again
        images = read_meta(out, "a-held-digit")["images"]
        assert len(images) == PER_PROMPT.get(provider, 2) and {i["task_id"] for i in images} == held
        assert read_meta(out, "a-held-digit")["pending"] == []


def test_a_pending_task_the_service_forgot_is_submitted_again(tmp_path):
    suite = _suite(tmp_path, ["a held digit"])
    out = tmp_path / "out"
    with ProviderServer() as server:
        assert _generate(server, "midjourney", suite, out, "--timeout", "1").returncode == 1
        server.tasks.clear()  # expired on the service's side: its fetch answers 404
        server.release.set()
        forgot = _generate(server, "midjourney", suite, out)
        assert forgot.returncode == 1 and "1 failed" not in forgot.stdout and "4 failed" in forgot.stdout
        assert "is not known there" in read_meta(out, "a-held-digit")["failed"][0]["error"]
        again = _generate(server, "midjourney", suite, out)
        assert again.returncode == 0 and "4 new image(s)" in again.stdout, again.stderr[-2000:]
        assert server.paid[("midjourney", "a held digit")] == 2


@pytest.mark.slow
def test_a_killed_run_loses_nothing_and_pays_nothing_twice(tmp_path):
    suite = _suite(tmp_path, ["a held digit", "a slow digit", "a plain digit", "a held one"])
    out = tmp_path / "out"
    with ProviderServer() as server:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *_args(server, "bfl", suite, out)], cwd=REPO,
                                env={**os.environ, **_env()}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while sum(n for (p, prompt), n in server.paid.items() if "held" in prompt) < 4:  # 2 prompts x 2 images
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)  # the other tasks finish while the held ones are polled
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        paid = dict(server.paid)
        server.release.set()
        rerun = _generate(server, "bfl", suite, out)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert dict(server.paid) == paid and all(n == 2 for n in paid.values())
        for prompt in ("a-held-digit", "a-slow-digit", "a-plain-digit", "a-held-one"):
            assert len(read_meta(out, prompt)["images"]) == 2


def test_midjourney_splits_the_grid_in_button_order_and_keeps_it(tmp_path):
    out = tmp_path / "mj"
    with ProviderServer() as server:
        proc = _generate(server, "midjourney", _suite(tmp_path, ["a plain digit"]), out, "--images-per-prompt", "8",
                         "--price-per-image", "0.01")
        paid = server.paid_for("midjourney")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert paid == 2  # eight images: two imagines
    images = sorted(read_meta(out, "a-plain-digit")["images"], key=lambda i: i["index"])
    for image in images:
        pixels = np.asarray(Image.open(out / "images" / image["file"]))
        assert pixels.shape == (8, 8) and (pixels == QUADRANTS[image["index"] % 4]).all()
        assert (out / image["grid"]).is_file() and image["grid_position"] == image["index"] % 4
        assert image["upscale_buttons"][0].startswith("MJ::JOB::upsample::1::")
    assert len({i["task_id"] for i in images}) == 2
    info = json.loads((out / "generation.json").read_text())
    assert info["images_per_task"] == 4 and info["totals"]["cost"] == pytest.approx(0.08)
    assert info["totals"]["requests"] == sum(i["requests"] for i in images)


def test_midjourney_proxy_header_and_firefly_token_renewal(tmp_path):
    suite = _suite(tmp_path, [f"a slow digit {i}" for i in range(4)])
    with ProviderServer() as server:
        mj = _generate(server, "midjourney", suite, tmp_path / "mj", "--auth-header", "mj-api-secret")
        assert mj.returncode == 0, mj.stderr[-2000:]
        ff = _generate(server, "firefly", suite, tmp_path / "ff", "--concurrency", "2")
        assert ff.returncode == 0, ff.stderr[-2000:]
        # 8 tasks x (a submission + 4 polls): 40 calls on tokens good for 10 each, renewed on their 401s
        assert server.token_requests >= 4
    _no_secret_anywhere(tmp_path / "ff", ff.stdout, ff.stderr)


def test_stability_and_chat_answer_shapes(tmp_path):
    suite = _suite(tmp_path, ["a plain digit", "a filtered digit", "a datauri digit"])
    with ProviderServer() as server:
        sd = _generate(server, "stability", suite, tmp_path / "sd", "--images-per-prompt", "1")
        chat = _generate(server, "openai-chat", suite, tmp_path / "chat", "--images-per-prompt", "1")
        ratio = _generate(server, "stability", suite, tmp_path / "ratio", "--size", "1000x700")
    assert sd.returncode == 0 and "1 refused" in sd.stdout, sd.stderr[-2000:]
    assert read_meta(tmp_path / "sd", "a-filtered-digit")["refused"][0]["code"] == "CONTENT_FILTERED"
    plain = read_meta(tmp_path / "sd", "a-plain-digit")["images"][0]
    assert plain["seed"] == str(plain["seed_sent"]) and plain["model"] == "core"  # the seed the service used
    assert chat.returncode == 0 and "3 new image(s)" in chat.stdout, chat.stderr[-2000:]  # markdown link, data URL
    assert ratio.returncode == 2 and "aspect ratio 10:7" in ratio.stderr


@pytest.mark.slow
def test_a_service_set_is_scored_with_its_provider_and_task_ids(tmp_path, digits_shards):
    out = tmp_path / "mj"
    with ProviderServer() as server:
        proc = _generate(server, "midjourney", _suite(tmp_path, [f"a plain digit {i}" for i in range(10)]), out,
                         "--price-per-image", "0.02")
        assert proc.returncode == 0, proc.stderr[-2000:]
        task_ids = {t for t in server.tasks}
    bench = genbench("benchmark", "--images", str(out), "--reference", str(digits_shards), "--metrics", "fd_auditor",
                     "--results", str(tmp_path / "results"))
    assert bench.returncode == 0, bench.stderr[-3000:]
    (record,) = (tmp_path / "results").glob("*.json")
    external = json.loads(record.read_text())["external"]
    assert external["provider"] == "midjourney" and external["endpoint"] == f"{server.base}/mj/submit/imagine"
    assert set(external["task_ids"]) == task_ids and external["images"] == 40
    assert external["cost"] == pytest.approx(0.8)
