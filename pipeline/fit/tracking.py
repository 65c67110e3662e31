"""Tracking: whether W&B runs online or offline, a W&B logger that cannot end a run, and a CSV metrics log that
a resumed run continues.

The CSV log: Lightning's CSV writer deletes ``metrics.csv`` when it starts in a directory that has one, so a run
resumed after preemption or a crash would keep only the curve of its last attempt. Here the earlier
rows stay; rows at or after the first step the resumed attempt logs are dropped, since that attempt
logs those steps again from the checkpoint.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from pipeline.io import atomic_write_text

log = logging.getLogger(__name__)


def wandb_mode() -> str:
    """online if the user configured W&B (API key or ``wandb login``), else offline; WANDB_MODE overrides."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    if os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
        return "online"
    return "offline"


# What the W&B client raises once its service process (wandb-core) is gone: the socket reset, or closed mid-message.
SERVICE_GONE = (ConnectionError, EOFError)


def _release_wandb() -> None:
    """Let the W&B client go of a service that is gone: its exit hook would otherwise print a traceback for the
    same lost connection when the process ends."""
    import wandb

    try:
        wandb.teardown()  # unregisters the hook first, then fails to reach the service
    except SERVICE_GONE:
        pass


def _unless_service_gone(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: "ResilientWandbLogger", *args: Any, **kwargs: Any) -> Any:
        if self.service_gone:
            return None
        try:
            return method(self, *args, **kwargs)
        except SERVICE_GONE as e:
            self.service_gone = True
            _release_wandb()
            log.warning("W&B's service process is gone (%s: %s): W&B logging is off for the rest of this run; its "
                        "metrics go on in logs/metrics.csv, and a resumed run continues the same W&B run. Under "
                        "SLURM this is expected after SIGTERM (preemption, requeue, cancel), which reaches every "
                        "process of the job step, W&B's too.", type(e).__name__, e)
            return None

    return call


class ResilientWandbLogger(WandbLogger):
    """A WandbLogger that cannot end a training run when W&B's service process is gone.

    SLURM sends SIGTERM (preemption, ``scontrol requeue``, ``scancel``) to every process of the job step; W&B's
    service process exits at once, while the training process checkpoints at its next step boundary
    (pipeline/fit/preemption.py). A ``wandb.log`` in between — the metrics Lightning logs at an epoch's end —
    raised ConnectionResetError, which ended the attempt before its checkpoint was written, and the requeued job
    started again from step 0. Here the first such error turns W&B off for this process, with one
    warning; the CSV log keeps the curve.
    """

    service_gone = False

    log_hyperparams = _unless_service_gone(WandbLogger.log_hyperparams)
    log_metrics = _unless_service_gone(WandbLogger.log_metrics)
    log_table = _unless_service_gone(WandbLogger.log_table)
    log_text = _unless_service_gone(WandbLogger.log_text)
    log_image = _unless_service_gone(WandbLogger.log_image)
    log_audio = _unless_service_gone(WandbLogger.log_audio)
    log_video = _unless_service_gone(WandbLogger.log_video)
    after_save_checkpoint = _unless_service_gone(WandbLogger.after_save_checkpoint)
    finalize = _unless_service_gone(WandbLogger.finalize)


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
