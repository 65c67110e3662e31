"""`genbench generate` as a hostile user and a broken service find it: 200s that are not images responses, an
image URL on a dead host, a killed run followed by another model into the same --out, Ctrl-C, a suite that is
not UTF-8. Real HTTP on 127.0.0.1 (tests/fault_server.py), the real console entry point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_server import KEY, FaultServer

from conftest import REPO, genbench
from pipeline.data.generated import read_meta


def _suite(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps({"id": p.replace(" ", "-"), "prompt": p}) + "\n" for p in prompts))
    return path


def _args(server: FaultServer, suite: Path, out: Path, model: str = "fault-model") -> list[str]:
    return ["generate", "--api-base", server.base, "--model", model, "--prompts", str(suite), "--out", str(out),
            "--size", "8x8", "--max-retries", "1", "--api-key-env", "FAULT_KEY", "--concurrency", "1"]


@pytest.mark.parametrize("prompt, says", [
    ("an htmlpage digit", "answered 200 with text/html, not the JSON of an images API ('<html><body>Please log in"),
    ("an otherjson digit", "answered 200 with an object with ['foo'], not an images response"),
    ("alist digit", "answered 200 with a JSON list, not an images response"),
])
def test_a_200_that_is_not_an_images_response_stops_with_what_it_was(tmp_path, prompt, says):
    # before: AttributeError / TypeError tracebacks from response.data[0]
    suite = _suite(tmp_path, [prompt, "a plain digit"])
    with FaultServer() as server:
        run = genbench(*_args(server, suite, tmp_path / "set"), env={"FAULT_KEY": KEY}, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert says in run.stderr and "check --api-base" in run.stderr and server.base in run.stderr
    assert "Traceback" not in run.stderr and KEY not in run.stderr


def test_an_empty_data_list_and_a_dead_image_host_fail_only_their_image(tmp_path):
    # before: IndexError for {"data": []}; httpx.ConnectError for the dead host stopped the whole run
    suite = _suite(tmp_path, ["an emptydata digit", "a deadurl digit", "a plain digit"])
    out = tmp_path / "set"
    with FaultServer() as server:
        run = genbench(*_args(server, suite, out), env={"FAULT_KEY": KEY}, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]  # failed images: the same command asks again
    assert "Traceback" not in run.stderr
    assert "no image in its data" in read_meta(out, "an-emptydata-digit")["failed"][0]["error"]
    dead = read_meta(out, "a-deadurl-digit")["failed"][0]["error"]
    assert "downloading the image URL http://127.0.0.1:9/files/img.png failed" in dead and "Connect" in dead
    assert len(read_meta(out, "a-plain-digit")["images"]) == 1


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "FAULT_KEY": KEY})


def _wait_for_requests(server: FaultServer, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while sum(server.calls.values()) < n and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert sum(server.calls.values()) >= n, "no request reached the server"


def test_a_killed_run_leaves_its_settings_so_another_model_is_refused(tmp_path):
    suite = _suite(tmp_path, ["a stall digit", "a plain digit"])
    out = tmp_path / "set"
    with FaultServer() as server:
        proc = _start(_args(server, suite, out, model="model-a"))
        _wait_for_requests(server, 1, proc)  # the first request is stalling on the server: kill now
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        settings = json.loads((out / "generation.json").read_text())  # before: none, so nothing said whose
        assert settings["model"] == "model-a"
        other = genbench(*_args(server, suite, out, model="model-b"), env={"FAULT_KEY": KEY}, timeout=120)
    assert other.returncode == 2
    assert "holds images made with model 'model-a', not 'model-b'" in other.stderr
    assert not (out / "images").exists() or not any((out / "images").iterdir())


def test_ctrl_c_ends_generate_with_one_line(tmp_path):
    suite = _suite(tmp_path, ["a stall digit", "a plain digit"])
    out = tmp_path / "set"
    with FaultServer() as server:
        proc = _start(_args(server, suite, out))
        _wait_for_requests(server, 1, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "genbench generate: interrupted; what is done is kept in" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert (out / "generation.json").is_file()


def test_a_suite_that_is_not_utf8_names_file_line_and_column(tmp_path):
    suite = tmp_path / "suite.jsonl"
    suite.write_bytes(b'{"prompt": "a cat"}\n{"prompt": "a caf\xe9 at night"}\n')
    run = genbench("generate", "--api-base", "http://127.0.0.1:9/v1", "--model", "m", "--prompts", str(suite),
                   "--out", str(tmp_path / "set"))
    assert run.returncode == 2
    assert f"{suite}:2:18: byte 0xe9 is not UTF-8" in run.stderr and "Traceback" not in run.stderr
    yaml_suite = tmp_path / "suite.yaml"
    yaml_suite.write_bytes(b"- prompt: a cat\n- prompt: na\xefve\n")
    run = genbench("generate", "--api-base", "http://127.0.0.1:9/v1", "--model", "m", "--prompts", str(yaml_suite),
                   "--out", str(tmp_path / "set"))
    assert run.returncode == 2 and f"{yaml_suite}:2:13: byte 0xef is not UTF-8" in run.stderr
