"""Run by test_ddp.py: a real two-process Lightning DDP fit (gloo, CPU) that records which samples
each rank trained on. Lightning's launcher re-runs this script for rank 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from pytorch_lightning import LightningModule, Trainer

from pipeline.data.datamodule import ShardDataModule


class KeyRecorder(LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)
        self.weight = torch.nn.Parameter(torch.zeros(1))  # something for DDP to all-reduce
        self.keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.keys += batch["key"]
        return (self.weight * batch["image"].mean()).sum()

    def on_train_epoch_end(self) -> None:
        record = {"rank": self.global_rank, "world_size": self.trainer.world_size, "keys": self.keys,
                  "batches": len(self.keys) // self.trainer.datamodule.batch_size}
        (self.out / f"rank{self.global_rank}-epoch{self.current_epoch}.json").write_text(json.dumps(record))
        self.keys = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    shards, out, workers, samples_per_epoch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    fit = {"image_size": int(sys.argv[5]), "channels": 3} if len(sys.argv) > 5 else {}  # foreign, mixed sizes
    dm = ShardDataModule(shards, batch_size=32, num_workers=workers, samples_per_epoch=samples_per_epoch or None,
                         seed=3, **fit)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0)
    trainer.fit(KeyRecorder(out), datamodule=dm)
