"""The run's checkpoints: one numbered every N steps (the newest kept) and ``last.ckpt``, always at the
step where training ended.

Lightning's ModelCheckpoint writes ``last.ckpt`` only together with a periodic one, so a run whose
``max_steps`` is not a multiple of the interval ended with ``last.ckpt`` up to N-1 steps old while
run.json said otherwise, and the benchmark scored stale weights under the final step's provenance.
"""

from __future__ import annotations

from pathlib import Path

from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint

LAST = "last.ckpt"


class RunCheckpoint(ModelCheckpoint):
    """``step-NNNNNNN.ckpt`` every ``every_n_steps`` optimizer steps and ``last.ckpt`` beside it, always
    under that name (no ``last-v1.ckpt``): a rerun or a requeued job resumes from it. When training ends
    (max_steps, an early stop) at a step that has no checkpoint yet, both are written there."""

    def __init__(self, directory: Path, every_n_steps: int) -> None:
        super().__init__(dirpath=str(directory), filename="step-{step:07d}", save_last=True, save_top_k=1,
                         every_n_train_steps=every_n_steps, auto_insert_metric_name=False,
                         enable_version_counter=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A preempted run has just saved last.ckpt at its step boundary (pipeline.fit.preemption); writing it again
        # here, after the loop ended, would record an end-of-training loop state the requeued job must not see.
        if any(getattr(cb, "preempted", False) for cb in trainer.checkpoint_callbacks):
            return
        if self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
