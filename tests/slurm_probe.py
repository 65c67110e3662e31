"""A Lightning callback for the SLURM and multi-node tests: what every rank trained on, and a digest of
the whole training state (weights, EMA average, optimizer) at each step and when training (re)starts.

A ``Checkpoint`` subclass only so that Lightning runs it after the EMA callback, like the checkpoints:
its digest at a batch end is the state a checkpoint written at that batch end holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from pytorch_lightning.callbacks import Checkpoint


def state_digest(trainer, pl_module) -> str:
    h = hashlib.sha256()

    def add(obj) -> None:
        if isinstance(obj, torch.Tensor):
            h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                add(obj[key])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                add(item)

    add(pl_module.state_dict())
    for cb in trainer.callbacks:
        average = getattr(cb, "_average_model", None)
        if average is not None:
            add(average.state_dict())
    for optimizer in trainer.optimizers:
        add(optimizer.state_dict()["state"])
    return h.hexdigest()


class TrainingProbe(Checkpoint):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def _write(self, trainer, event: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
        with (self.out / f"rank{trainer.global_rank}-attempt{attempt}.jsonl").open("a") as f:
            f.write(json.dumps(event) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer, {"event": "start", "step": trainer.global_step, "state": state_digest(trainer, pl_module),
                              "world_size": trainer.world_size, "node": os.environ.get("SLURMD_NODENAME"),
                              "ckpt": str(trainer.ckpt_path)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer, {"event": "batch", "step": trainer.global_step, "keys": list(batch["key"]),
                              "state": state_digest(trainer, pl_module)})
