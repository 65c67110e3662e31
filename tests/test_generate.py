"""`genbench generate` against real HTTP servers on 127.0.0.1: the failure paths against a fault server, resume,
and that the API key never reaches a file or the output."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fault_server import KEY, FaultServer

from conftest import REPO, genbench
from pipeline.data.generated import generated_images, read_meta
from pipeline.data.prompts import PromptSuiteError, load_prompts


def _suite(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps({"id": p.replace(" ", "-"), "prompt": p, "label": i % 10}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def _generate(server: FaultServer, suite: Path, out: Path, *extra: str, key: str = KEY):
    return genbench("generate", "--api-base", server.base, "--model", "fault-model", "--prompts", str(suite),
                    "--out", str(out), "--size", "8x8", "--max-retries", "2", *extra,
                    env={"FAULT_KEY": key}, timeout=120)


def _no_key_anywhere(out: Path, *texts: str) -> None:
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    for text in texts:
        assert KEY not in text


def test_failure_paths_then_resume(tmp_path):
    suite = _suite(tmp_path, ["a ratelimit digit", "an error500 digit", "a refuse digit", "a badb64 digit",
                              "a wrongsize digit", "a urlonly digit", "a flaky digit", "a plain digit"])
    out = tmp_path / "set"
    with FaultServer() as server:
        t0 = time.monotonic()
        first = _generate(server, suite, out, "--api-key-env", "FAULT_KEY", "--images-per-prompt", "2")
        elapsed = time.monotonic() - t0
        # failed images (bad base64, wrong size, 503 after retries) exit 1 and say how to resume
        assert first.returncode == 1, first.stderr[-2000:]
        assert "run the same command again" in first.stderr
        assert "2 refused" in first.stdout
        meta = {p.stem: read_meta(out, p.stem) for p in (out / "meta").glob("*.jsonl")}
        # 429 twice with Retry-After: 1, then success: the SDK waited as told (>= 1 s each) and retried
        rate = meta["a-ratelimit-digit"]["images"]
        assert len(rate) == 2 and max(i["requests"] for i in rate) >= 2 and elapsed > 2.0
        assert server.calls["a ratelimit digit"] == 4  # 2 refused by 429, then one success per image
        assert [i["requests"] for i in meta["an-error500-digit"]["images"]].count(2) == 1  # one 500, retried
        # a refusal is recorded against its prompt, not retried
        refused = meta["a-refuse-digit"]
        assert refused["images"] == [] and len(refused["refused"]) == 2
        assert refused["refused"][0]["code"] == "content_policy_violation"
        assert server.calls["a refuse digit"] == 2
        # malformed base64 and a wrong size are failed images with the reason
        assert "not valid base64" in meta["a-badb64-digit"]["failed"][0]["error"]
        assert "asked for 8x8 but got 16x16" in meta["a-wrongsize-digit"]["failed"][0]["error"]
        # a url answer is downloaded
        assert len(meta["a-urlonly-digit"]["images"]) == 2
        # 503 on every try: retried --max-retries times, then failed naming the endpoint
        flaky = meta["a-flaky-digit"]["failed"][0]["error"]
        assert server.base in flaky and "503" in flaky
        assert server.calls["a flaky digit"] == 2 * 3
        assert meta["a-plain-digit"]["images"][0]["revised_prompt"] == "revised: a plain digit"
        info, done = generated_images(out)
        assert len(done) == 2 * 4 and info["totals"]["refused"] == 2 and info["totals"]["failed"] == 6

        # the same command again requests only what is missing: no image twice, no refused prompt again
        before = dict(server.calls)
        server.failing.clear()
        second = _generate(server, suite, out, "--api-key-env", "FAULT_KEY", "--images-per-prompt", "2")
        assert second.returncode == 1  # bad base64 and the wrong size fail again, as they should
        new_calls = {p: server.calls[p] - before.get(p, 0) for p in server.calls}
        assert new_calls["a plain digit"] == 0 and new_calls["a refuse digit"] == 0
        assert new_calls["a flaky digit"] == 2
        assert new_calls["a badb64 digit"] == 2  # one request per missing image
        info, done = generated_images(out)
        assert len(done) == 2 * 5 and info["totals"]["failed"] == 4
    _no_key_anywhere(out, first.stdout, first.stderr, second.stdout, second.stderr)


def test_stall_fails_within_the_timeout_naming_the_url(tmp_path):
    suite = _suite(tmp_path, ["a stall digit"])
    out = tmp_path / "set"
    with FaultServer() as server:
        t0 = time.monotonic()
        run = _generate(server, suite, out, "--api-key-env", "FAULT_KEY", "--timeout", "0.5", "--max-retries", "1")
        elapsed = time.monotonic() - t0
    assert run.returncode == 1
    error = read_meta(out, "a-stall-digit")["failed"][0]["error"]
    assert "no answer within --timeout 0.5 s" in error and server.base in error
    assert elapsed < 20  # two tries of 0.5 s, backoff and start-up: bounded by the timeout, not by the stall
    _no_key_anywhere(out, run.stdout, run.stderr)


def test_a_bad_key_stops_the_run_without_showing_it(tmp_path):
    suite = _suite(tmp_path, ["a plain digit", "another plain digit"])
    out = tmp_path / "set"
    wrong = "sk-wrong-0123456789-also-secret"
    with FaultServer() as server:
        run = _generate(server, suite, out, "--api-key-env", "FAULT_KEY", key=wrong)
    assert run.returncode == 2
    assert "401" in run.stderr and "FAULT_KEY" in run.stderr and server.base in run.stderr
    assert wrong not in run.stderr + run.stdout
    for path in out.rglob("*"):
        if path.is_file():
            assert wrong.encode() not in path.read_bytes()


def test_missing_key_for_a_remote_endpoint_names_the_variable(tmp_path):
    suite = _suite(tmp_path, ["a plain digit"])
    run = genbench("generate", "--api-base", "https://images.example.invalid/v1", "--model", "m", "--prompts",
                   str(suite), "--out", str(tmp_path / "o"), "--api-key-env", "GENBENCH_TEST_UNSET_KEY",
                   env={"GENBENCH_TEST_UNSET_KEY": ""})
    assert run.returncode == 2 and "GENBENCH_TEST_UNSET_KEY" in run.stderr


def test_a_torn_last_meta_line_is_an_unrecorded_image(tmp_path):
    """A run killed mid-write leaves half a line: that image is requested again, nothing else is lost."""
    from pipeline.data.generated import MetaLog

    log = MetaLog(tmp_path, {"prompt": {"prompt": "a cat", "id": "cat"}, "model": "m"})
    for k in range(3):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / f"cat-{k:04d}.png").write_bytes(b"png")
        log.record("images", {"index": k, "file": f"cat-{k:04d}.png", "requests": 1})
    log.record("failed", {"index": 3, "error": "503"})
    log.record("images", {"index": 3, "file": "cat-0003.png", "requests": 2})  # a rerun's success supersedes it
    with log.path.open("a") as f:
        f.write('{"event": "images", "index": 4, "fi')
    meta = read_meta(tmp_path, "cat")
    assert [i["index"] for i in meta["images"]] == [0, 1, 2, 3] and meta["failed"] == []
    assert meta["prompt"] == {"prompt": "a cat", "id": "cat"} and meta["model"] == "m"
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"cat.jsonl:2 is damaged.*rerun genbench generate"):
        read_meta(tmp_path, "cat")


def test_prompt_suites(tmp_path):
    for name in ("digits", "occupations", "general"):
        suite = load_prompts(REPO / "prompts" / f"{name}.jsonl")
        assert len(suite.prompts) >= 10 and len({p.id for p in suite.prompts}) == len(suite.prompts)
    assert load_prompts(REPO / "prompts" / "occupations.jsonl").has_groups
    assert [p.label for p in load_prompts(REPO / "prompts" / "digits.jsonl").prompts] == list(range(10))
    yaml_suite = tmp_path / "s.yaml"
    yaml_suite.write_text("- a cat\n- {prompt: a dog, id: dog, group: animals}\n")
    suite = load_prompts(yaml_suite)
    assert [p.id for p in suite.prompts] == ["p0000", "dog"] and suite.prompts[1].group == "animals"
    bad = tmp_path / "bad.jsonl"
    for text, message in (('{"prompt": "ok"}\n{"promt": "typo"}\n', r"bad.jsonl:2: unknown field"),
                          ('{"prompt": "ok"}\n\n{"prompt": ""}\n', r"bad.jsonl:3: `prompt` is missing"),
                          ('{"prompt": "ok"}\nnot json\n', r"bad.jsonl:2: not valid JSON"),
                          ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', r"bad.jsonl:2: id 'x' is used "
                                                                                        r"twice \(first at .*:1\)"),
                          ('{"prompt": "a", "id": "../x"}\n', r"bad.jsonl:1: id '../x' cannot name a file")):
        bad.write_text(text)
        with pytest.raises(PromptSuiteError, match=message):
            load_prompts(bad)
