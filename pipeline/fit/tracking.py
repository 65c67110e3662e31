"""Tracking: whether W&B runs online or offline, and a CSV metrics log that a resumed run continues.

The CSV log: Lightning's CSV writer deletes ``metrics.csv`` when it starts in a directory that has one, so a run
resumed after preemption or a crash would keep only the curve of its last attempt. Here the earlier
rows stay; rows at or after the first step the resumed attempt logs are dropped, since that attempt
logs those steps again from the checkpoint.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from pipeline.io import atomic_write_text


def wandb_mode() -> str:
    """online if the user configured W&B (API key or ``wandb login``), else offline; WANDB_MODE overrides."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    if os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
        return "online"
    return "offline"


class _ContinuingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        self._resumed_rows: Optional[list[dict]] = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                reader = csv.DictReader(f)
                self._resumed_rows = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def log_metrics(self, metrics_dict: dict[str, float], step: Optional[int] = None) -> None:
        if self._resumed_rows is not None and step is not None:
            kept = [row for row in self._resumed_rows if row.get("step") in (None, "") or int(row["step"]) < step]
            self._resumed_rows = None
            # atomically, like every file genbench writes: a crash here must not lose the earlier curve
            buf = io.StringIO(newline="")
            writer = csv.DictWriter(buf, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(self.metrics_file_path, buf.getvalue())
        super().log_metrics(metrics_dict, step)


class ContinuingCSVLogger(CSVLogger):
    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        assert isinstance(self._experiment, ExperimentWriter)
        return self._experiment
