"""Training budgets in units that compare families fairly: images seen, training FLOPs, device-hours.

``max_steps`` means different things per family (the GAN's two optimizers count twice) and says nothing
about compute; EDM's ``total_kimg`` counts images instead, and this generalises it. ``run.budget:
{images: N}`` (or ``{flops: F}``, ``{device_hours: H}``) stops training at the end of the first batch that
reaches the budget, on every rank, across resumes. ``run.evaluate_every: {<unit>: X}`` keeps a checkpoint at
the first batch that reaches each multiple of X, named by that point and never overwritten, for
``genbench benchmark --checkpoints all``.

Training FLOPs are measured, not estimated: ``torch.utils.flop_counter`` counts the matrix products and
convolutions of the first real training batches (forward, backward and every player's step: the GAN's
discriminator and generator, ``n_critic`` batches for one period of its schedule), divided by their images.
Every later batch of a family does the same work per image, so FLOPs = images x that figure. Device-hours
are the wall time of the training loop times the number of processes (GPUs, or CPU processes).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning import Callback, LightningModule, Trainer
from torch.utils.flop_counter import FlopCounterMode

UNITS = ("images", "flops", "device_hours")


class BudgetError(ValueError):
    """A malformed ``run.budget`` or ``run.evaluate_every``."""


def parse_budget(value: Optional[dict], key: str) -> Optional[tuple[str, float]]:
    """``{unit: amount}`` -> (unit, amount); None when unset. Exactly one unit, a positive number."""
    if not value:
        return None
    if not isinstance(value, dict) or len(value) != 1:
        raise BudgetError(f"{key}={value!r}: give exactly one of {', '.join(UNITS)}, e.g. {key}: {{images: 2000000}}")
    (unit, amount), = value.items()
    if unit not in UNITS:
        raise BudgetError(f"{key}.{unit}: unknown unit; use one of {', '.join(UNITS)}")
    try:
        amount = float(amount)
    except (TypeError, ValueError):
        raise BudgetError(f"{key}.{unit}={amount!r} is not a number") from None
    if not amount > 0:
        raise BudgetError(f"{key}.{unit}={amount!r}: must be positive")
    return unit, amount


def point_name(unit: str, amount: float) -> str:
    """The file stem of the evaluation checkpoint at ``amount`` of ``unit``: sortable, exact for images."""
    if unit == "images":
        return f"eval-images-{int(round(amount)):012d}"
    return f"eval-{unit}-{amount:.4e}"


def spent(module: Any) -> dict[str, Optional[float]]:
    """What a module's training has spent so far, in every unit (FLOPs once measured)."""
    fpi = getattr(module, "flops_per_image", None)
    # a two-stage model starts with its first stage's FLOPs and device-hours spent (images are its own)
    first = module.first_stage_spent() if hasattr(module, "first_stage_spent") else {"flops": 0.0, "device_hours": 0.0}
    return {"images": float(module.images_seen),
            "flops": None if fpi is None else module.images_seen * fpi + first["flops"],
            "device_hours": module.device_seconds / 3600 + first["device_hours"]}


class TrainingBudget(Callback):
    """Measures FLOPs per image, accumulates device time, stops at the budget and keeps the evaluation
    checkpoints. Runs before the checkpoint callbacks (Lightning puts those last), so the final batch it
    stops at is the one ``RunCheckpoint`` writes as last.ckpt."""

    def __init__(self, directory: Path, budget: Optional[tuple[str, float]] = None,
                 evaluate_every: Optional[tuple[str, float]] = None) -> None:
        self.directory, self.budget, self.evaluate_every = Path(directory), budget, evaluate_every
        self.points_done = 0
        self._counter: Optional[FlopCounterMode] = None
        self._measure_batches = 0
        self._measured = [0, 0]  # FLOPs and images of the batches measured so far
        self._clock = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"points_done": self.points_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points_done = int(state_dict.get("points_done", 0))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clock = time.monotonic()
        if getattr(pl_module, "flops_per_image", None) is None:  # restored from a checkpoint otherwise
            self._measure_batches = int(getattr(pl_module, "flops_period", 1))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._measure_batches > 0:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._measured[0] += self._counter.get_total_flops()
            self._measured[1] += len(batch["image"])
            self._counter = None
            self._measure_batches -= 1
            if self._measure_batches == 0:
                pl_module.flops_per_image = self._measured[0] / self._measured[1]  # type: ignore[assignment]
        now = time.monotonic()
        pl_module.device_seconds += (now - self._clock) * trainer.world_size  # type: ignore[operator,assignment]
        self._clock = now
        used = spent(pl_module)
        if self.evaluate_every is not None:
            unit, every = self.evaluate_every
            while used[unit] is not None and used[unit] >= (self.points_done + 1) * every:  # type: ignore[operator]
                self.points_done += 1
                path = self.directory / f"{point_name(unit, self.points_done * every)}.ckpt"
                if not path.exists():  # a resumed run that crosses a point again keeps the first checkpoint
                    trainer.save_checkpoint(path)
        if self.budget is not None:
            unit, amount = self.budget
            reached = used[unit] is not None and used[unit] >= amount  # type: ignore[operator]
            if unit == "device_hours":  # clocks differ between ranks: stop where any rank says so, on all
                reached = trainer.strategy.reduce_boolean_decision(reached, all=False)
            if reached:
                trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_counting()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop_counting()  # a step that failed inside a measured batch leaves no counter behind

    def _stop_counting(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
