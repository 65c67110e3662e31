"""`genbench serve` against hostile clients and configs: a run with relative shard paths served from another
directory, stalled half-sent bodies, clients that disconnect, whitespace-only prompts and keys. A real server
process on 127.0.0.1 (tests/serving.py), raw sockets for the clients that misbehave."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serving import free_port, served

from conftest import REPO, genbench

BODY = json.dumps({"prompt": "a digit", "n": 2}).encode()
HEAD = b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def project_run(tmp_path_factory):
    """A run trained the way the quickstart trains one: from its project directory, with relative paths
    (shards/digits, runs/<id>) in its config."""
    project = tmp_path_factory.mktemp("project")
    fit = genbench("fit", "--config", str(REPO / "experiments" / "digits" / "vae.yaml"), "--trainer.max_steps=5",
                   "--data.init_args.shards=shards/digits", "--run.id=tiny", "--tracking.wandb=false",
                   "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false", cwd=project)
    assert fit.returncode == 0, fit.stderr[-3000:]
    return project / "runs" / "tiny"


def _connect(base: str) -> socket.socket:
    port = int(base.split(":")[2].split("/")[0])
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def test_a_run_with_relative_shards_is_served_from_another_directory(project_run):
    # served() starts the server in the repository, not the project: before, "shards/digits does not exist"
    with served(project_run) as base:
        r = httpx.post(f"{base}/images/generations", json={"prompt": "a digit"}, timeout=30)
        assert r.status_code == 200, r.text
    # and scored from there too: benchmark --run reads the same relative path through the same resolution
    score = genbench("benchmark", "--run", str(project_run), "--num-samples", "64", "--metrics", "memorization",
                     "--results", str(project_run.parent.parent / "results"))
    assert score.returncode == 0, score.stderr[-2000:]


def test_stalled_bodies_time_out_and_never_hold_other_clients_at_429(project_run):
    with served(project_run, "--max-in-flight", "4", "--body-timeout", "1") as base:
        stalled = []
        for _ in range(16):  # more half-sent bodies than the in-flight bound
            s = _connect(base)
            s.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY[:5])
            stalled.append(s)
        t0 = time.monotonic()
        r = httpx.post(f"{base}/images/generations", json={"prompt": "a digit"}, timeout=30)
        assert r.status_code == 200, r.text  # before: 429 while the stalled bodies counted as in flight
        assert time.monotonic() - t0 < 5
        for s in stalled:  # each gets the API's error shape once its second is up
            answer = s.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer, answer[:300]
            s.close()


def test_clients_that_disconnect_leave_no_traceback_in_the_log(project_run):
    # served() asserts, on stopping, that the server's output holds no traceback
    with served(project_run) as base:
        for pause in (0.0, 0.05, 0.3):  # before its body, during the sampling, after
            for _ in range(3):
                s = _connect(base)
                s.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + (BODY if pause else BODY[:7]))
                time.sleep(pause)
                s.close()
        s = _connect(base)  # a reset (RST), not a close
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)
        s.close()
        time.sleep(0.5)
        assert httpx.post(f"{base}/images/generations", json={"prompt": "a digit"}, timeout=30).status_code == 200


def test_whitespace_prompts_and_keys_are_refused(project_run):
    with served(project_run) as base:
        for prompt in ("   ", "\n\t"):
            r = httpx.post(f"{base}/images/generations", json={"prompt": prompt}, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", "--run", str(project_run), "--port",
                           str(free_port()), "--api-key-env", "GENBENCH_TEST_SERVE_KEY"], cwd=REPO,
                          env={**os.environ, "GENBENCH_TEST_SERVE_KEY": "   "}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "GENBENCH_TEST_SERVE_KEY holds only whitespace" in proc.stderr
    gen = genbench("generate", "--api-base", "https://images.example.invalid/v1", "--model", "m", "--prompts",
                   str(REPO / "prompts" / "digits.jsonl"), "--out", str(project_run.parent / "g"),
                   "--api-key-env", "GENBENCH_TEST_SERVE_KEY", env={"GENBENCH_TEST_SERVE_KEY": " \t"})
    assert gen.returncode == 2 and "GENBENCH_TEST_SERVE_KEY holds only whitespace" in gen.stderr
