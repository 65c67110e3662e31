"""Start `genbench serve` as a real process on a free 127.0.0.1 port, and stop it with SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

from conftest import REPO
from pipeline.benchmark.distributed import free_port


@contextlib.contextmanager
def served(run_dir: Path, *extra: str, env: dict | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """The base URL (``http://127.0.0.1:PORT/v1``) of a `genbench serve` of ``run_dir``, ready to answer."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--run", str(run_dir), "--host", host,
                             "--port", str(port), *extra], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"genbench serve exited {proc.returncode}: {proc.stdout.read()}")  # type: ignore
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("genbench serve did not answer /health within 60 s")
            time.sleep(0.2)
        yield f"{base}/v1"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            # SIGTERM is a clean stop: requests in flight answered, exit 0, no traceback
            output = proc.stdout.read()  # type: ignore[union-attr]
            assert code == 0 and "Traceback" not in output, output[-2000:]
