"""Training progress as plain lines, for logs: Lightning's bar redraws itself with carriage returns, which a
log file (a redirected run, a SLURM job) keeps as megabytes of half-lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ProgressBar

from pipeline.console import LineProgress


class LineProgressBar(ProgressBar):
    """``[fit <run>] step 500/1200 (42%), 37.1 steps/s, train/loss=0.123`` every 30 s and when training ends."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._line: Optional[LineProgress] = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            total = trainer.max_steps if trainer.max_steps > 0 else None
            self._line = LineProgress(total, f"[fit {Path(trainer.default_root_dir).name}] step", "steps")
            self._line.n = trainer.global_step  # a resumed run counts on from its checkpoint

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._line is not None:
            self._line.postfix = self._metrics(trainer, pl_module)
            self._line.update(trainer.global_step - self._line.n)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._line is not None:
            self._line.postfix = self._metrics(trainer, pl_module)
            self._line.close()
            self._line = None

    def _metrics(self, trainer: Trainer, pl_module: LightningModule) -> str:
        metrics = self.get_metrics(trainer, pl_module)
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                         if k != "v_num")
