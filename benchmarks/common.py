"""What the GPU benchmark scripts share: the device's name and bf16 peak, and the per-device results file."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from pytorch_lightning import Callback

from pipeline.benchmark.distributed import free_port
from pipeline.io import atomic_write_json

REPO = Path(__file__).resolve().parent.parent
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against the device name.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def bf16_peak(name: str) -> Optional[float]:
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def results_path(out: Optional[str]) -> Path:
    name = re.sub(r"[^A-Za-z0-9]+", "-", device_name()).strip("-")
    return Path(out) if out else REPO / "benchmarks" / "results" / f"{name}.json"


def merge_results(path: Path, section: str, rows: dict[str, Any]) -> None:
    """Update one section of the device's results file, stamped with the device, torch version and date."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(device=device_name(), torch=torch.__version__, date=dt.date.today().isoformat())
    results.setdefault(section, {}).update(rows)
    atomic_write_json(path, results)


def _descendants(pid: int) -> list[int]:
    """Every process below pid, read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_python(pid: int) -> bool:
    try:
        return b"python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def torchrun(processes: int, args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Run ``torchrun --nproc_per_node=processes ARGS`` from this checkout, with ``env`` added; its output.

    On a CPU every process gets one thread, so P processes use P cores against 1. A run that fails stops the
    benchmark with its output; one stuck past ``timeout`` seconds is stopped with SIGABRT, which faulthandler
    turns into every Python thread's stack, so the failure says where it was stuck."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **({} if torch.cuda.is_available() else {"OMP_NUM_THREADS": "1"}),
           **env, "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
           f"--master_port={free_port()}", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stuck = _descendants(proc.pid)  # torchrun starts its workers in sessions of their own
        for pid in [*stuck, proc.pid]:
            if _is_python(pid):  # not W&B's Go service: its goroutine dump would bury the Python stacks
                _signal(pid, signal.SIGABRT)
        try:
            log, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for pid in [*stuck, proc.pid]:
                _signal(pid, signal.SIGKILL)
            log, _ = proc.communicate()
        for pid in stuck:  # whatever outlived its parent
            _signal(pid, signal.SIGKILL)
        raise SystemExit(f"{processes}-process run did not finish in {timeout} s; stacks of its processes:\n"
                         f"{log[-20000:]}") from None
    if proc.returncode != 0:
        raise SystemExit(f"{processes}-process run failed:\n{log[-3000:]}")
    return log


class StepTimer(Callback):
    """Images/s over the training batches after a warm-up (compilation, worker start-up, autotuning), then
    stops training. Counted in batches: a GAN's global step counts its two optimizers' steps separately.

    Args:
        warmup: batches not timed.
        steps: batches timed.
        out: a JSON file rank 0 writes the figures to (for runs in another process, e.g. under torchrun).
    """

    def __init__(self, warmup: int, steps: int, out: Optional[str] = None) -> None:
        self.warmup, self.total, self.out = warmup, warmup + steps, out
        self.t0 = self.t1 = 0.0
        self.steps = self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:
            sync()
            self.t0 = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.steps += 1
            self.images += len(batch["image"]) * trainer.world_size
            sync()
            self.t1 = time.perf_counter()
        if batch_idx + 1 >= self.total:
            trainer.should_stop = True

    @property
    def images_per_s(self) -> float:
        return self.images / (self.t1 - self.t0)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.out and trainer.is_global_zero:
            atomic_write_json(self.out, {"images_per_s": self.images_per_s, "steps": self.steps,
                                         "world_size": trainer.world_size, "seconds": self.t1 - self.t0})
