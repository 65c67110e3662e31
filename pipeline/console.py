"""What genbench prints. Quiet by default: one line per stage and run, the results, and the errors; Lightning's
and W&B's chatter that carries nothing for the user is dropped. ``--verbose`` (or ``GENBENCH_VERBOSE=1``)
shows everything. Progress is a bar on a terminal and a line every ``PROGRESS_SECONDS`` in a log (a redirected
run or a SLURM job), where carriage-return bars would fill megabytes.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any, Optional

VERBOSE_ENV = "GENBENCH_VERBOSE"
PROGRESS_SECONDS = 30.0

# Lightning's INFO lines: device availability, the litlogger tip, "Seed set to 0" per run, the model summary
# (with "FLOPs 0" on a CPU), "`Trainer.fit` stopped". Warnings still come through.
_QUIET_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")
_QUIET_WARNINGS = (
    r"The `srun` command is available on your system but is not used",  # genbench runs srun itself under SLURM
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning's own use of a deprecated torch API
    r".*Checkpoint directory .* exists and is not empty",  # a resumed run's directory is meant to have them
    r".*does not have many workers which may be a bottleneck",  # the digits runs use one worker on purpose
)


def _below_warning_from_lightning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.name.startswith(_QUIET_LOGGERS)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false", "False")


def interactive() -> bool:
    """Whether progress can be drawn as a bar (a terminal), rather than written as lines (a log file)."""
    return sys.stderr.isatty()


def configure(verbose_flag: bool = False) -> None:
    """Quiet this process (and, through the environment, the ones it starts) unless asked for everything."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        return
    # A filter on the handlers, not a level on the loggers: Lightning sets its logger to INFO when it is
    # imported, which happens after this (the commands import it lazily).
    for handler in logging.getLogger().handlers:
        handler.addFilter(_below_warning_from_lightning)
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("WANDB_SILENT", "true")  # "anonymous setting has no effect", the sync hint per run


class LineProgress:
    """A progress report as plain lines: at most one every ``every`` seconds, and one at the end."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "it", every: float = PROGRESS_SECONDS) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = 0
        self.postfix = ""  # appended to each line: the latest losses, say
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._print(now)

    def _print(self, now: float) -> None:
        rate = self.n / max(now - self._start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}{pct}, {rate:.1f} {self.unit}/s{extra}", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        self._print(time.monotonic())


def progress(total: Optional[int], desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar on a terminal, ``LineProgress`` in a log, nothing when disabled (other ranks)."""
    if enabled and not interactive():
        return LineProgress(total, desc, unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


def track(items: Any, desc: str, unit: str = "it", enabled: bool = True, total: Optional[int] = None) -> Any:
    """Iterate ``items`` while showing progress, as ``progress`` does."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    bar = progress(total, desc, unit, enabled)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
