"""Sample grids: a fixed-seed grid of the EMA model every N steps, saved in the run and logged."""

from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks.weight_averaging import WeightAveraging
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from torchvision.utils import make_grid

from pipeline.data.imageops import save_png

GRID_SEED = 1234  # fixed, so grids of successive steps show the same noise


def grid_image(model, per_class: int = 8, unconditional: int = 64) -> torch.Tensor:
    """uint8 C x H x W grid; one row per class when the model is conditional."""
    if model.conditional:
        n = per_class * model.num_classes
        labels = torch.arange(model.num_classes).repeat_interleave(per_class)
        images = model.sample(n, labels=labels, seed=GRID_SEED)
        return make_grid(images, nrow=per_class, padding=1)
    images = model.sample(unconditional, seed=GRID_SEED)
    return make_grid(images, nrow=8, padding=1)


class SampleGrids(Callback):
    def __init__(self, every_n_steps: int = 500) -> None:
        self.every_n_steps = every_n_steps

    def _sampling_model(self, trainer: Trainer, pl_module: LightningModule):
        for cb in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's CallbackConnector
            if isinstance(cb, WeightAveraging) and cb._average_model is not None:
                return cb._average_model.module
        return pl_module

    @rank_zero_only
    def _save(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = self._sampling_model(trainer, pl_module)
        grid = grid_image(model)
        scale = max(1, 512 // grid.shape[-1])  # about 512 px wide: tiny images (8x8 digits) are unreadable at 1:1
        path = save_png(grid, Path(trainer.default_root_dir) / "samples" / f"step-{trainer.global_step:07d}.png", scale)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            pl_module.raise_if_nonfinite()  # on every rank, before rank 0 draws a grid of a diverged model
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.raise_if_nonfinite()
        self._save(trainer, pl_module)
