"""A Lightning callback for test_tracking.py: at one step, kill W&B's service process (wandb-core), as SLURM's
SIGTERM to a job step does, and wait until it is gone."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from procs import children
from pytorch_lightning.callbacks import Callback


def wandb_service_pids() -> list[int]:
    """This process's children that run wandb-core (the W&B client does not expose them)."""
    return [pid for pid in children(os.getpid()) if b"wandb" in _cmdline(pid)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # exited meanwhile
        return b""


class KillWandbService(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.at_step or not trainer.is_global_zero:
            return
        pids = wandb_service_pids()
        assert pids, "no wandb-core child process: is W&B on?"
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 30
        while any(Path(f"/proc/{pid}/stat").exists() and "Z" not in _state(pid) for pid in pids):
            assert time.time() < deadline, "wandb-core did not exit on SIGTERM"
            time.sleep(0.05)
        print(f"killed wandb-core {pids} at step {self.at_step}", flush=True)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
