"""The run's checkpoints: one numbered every N steps (the newest kept) and ``last.ckpt``, always at the
step where training ended.

Lightning's ModelCheckpoint writes ``last.ckpt`` only together with a periodic one, so a run whose
``max_steps`` is not a multiple of the interval ended with ``last.ckpt`` up to N-1 steps old while
run.json said otherwise, and the benchmark scored stale weights under the final step's provenance.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from pipeline.io import shared_mode

LAST = "last.ckpt"


class SharedCheckpointIO(TorchCheckpointIO):
    """Lightning's atomic checkpoint save, then the mode a plain ``open`` gives (its temporary file is 0600)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if os.path.isfile(path) and os.stat(path).st_nlink > 1:
            # a first stage's checkpoint that a second stage pinned by a hard link (pipeline.models.first_stage.pin):
            # Lightning's save renames a temporary file over it today; should a later version write in place, it
            # would write into the pinned file. A copy renamed over it first (never a moment without the file).
            temp = f"{path}.{os.getpid()}.unlinked"
            shutil.copyfile(path, temp)
            os.replace(temp, path)
        super().save_checkpoint(checkpoint, path, storage_options)
        if os.path.isfile(path):
            shared_mode(path)


def is_final_batch(trainer: Trainer, batch_idx: int) -> bool:
    """Whether training stops after this batch: by its schedule (max_steps, the last batch of max_epochs) or
    because a callback asked it to (the training budget, pipeline.fit.budget)."""
    if 0 < trainer.max_steps <= trainer.global_step or trainer.should_stop:
        return True
    last_epoch = trainer.max_epochs is not None and trainer.max_epochs > 0 and \
        trainer.current_epoch + 1 >= trainer.max_epochs
    return last_epoch and batch_idx + 1 >= trainer.num_training_batches


class RunCheckpoint(ModelCheckpoint):
    """``step-NNNNNNN.ckpt`` every ``every_n_steps`` optimizer steps and ``last.ckpt`` beside it, always
    under that name (no ``last-v1.ckpt``): a rerun or a requeued job resumes from it. The step training ends
    at is always checkpointed too.

    The final checkpoint is written at the end of the final batch, like every periodic one, so a run
    continued from it (a longer schedule) restores the same loop state a periodic checkpoint would. A stop
    between batches (an early stop at validation) is caught when training ends.
    """

    def __init__(self, directory: Path, every_n_steps: int) -> None:
        super().__init__(dirpath=str(directory), filename="step-{step:07d}", save_last=True, save_top_k=1,
                         every_n_train_steps=every_n_steps, auto_insert_metric_name=False,
                         enable_version_counter=False)

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so runs checkpointed before this subclass existed resume with their state
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Not ModelCheckpoint's own: under manual optimisation (the GAN) it looks for a test fixture's
        # pre-step copy of the weights and warns for 12 lines when there is none. The state after the step is
        # the one that matches global_step and the EMA, so every family is checkpointed the same way.
        periodic = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if (periodic or is_final_batch(trainer, batch_idx)) and not self._should_skip_saving_checkpoint(trainer):
            self._save_step(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A preempted run has just saved last.ckpt at its step boundary (pipeline.fit.preemption); writing it again
        # here, after the loop ended, would record an end-of-training loop state the requeued job must not see.
        if not any(getattr(cb, "preempted", False) for cb in trainer.checkpoint_callbacks):
            self._save_step(trainer)
        super().on_train_end(trainer, pl_module)

    def _save_step(self, trainer: Trainer) -> None:
        """The numbered checkpoint and last.ckpt at this step, unless it has them already."""
        if self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
