"""The auditor: a classifier trained on the reference data's labels.

Its predictions on generated images drive the bias audit, and its penultimate features give
``fd_auditor``, a Fréchet distance that is informative on small grayscale data and needs no
download. It is trained once per dataset (keyed by the manifest hash) with a real Lightning
Trainer and cached; its held-out accuracy travels with every record that uses it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import torch
from lightning_fabric.plugins.environments import LightningEnvironment
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import TQDMProgressBar
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from pipeline.console import interactive
from pipeline.data.datamodule import ShardDataModule
from pipeline.io import atomic_write_json, cache_dir, shared_mode


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class AuditorNet(nn.Module):
    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 32,
                 feature_dim: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), group_norm(width), nn.SiLU()]
        size, ch = image_size, width
        while size > 4:  # halve until 4x4, doubling the width
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1), group_norm(ch * 2), nn.SiLU()]
            size, ch = (size + 1) // 2, ch * 2
        layers += [nn.Conv2d(ch, ch, 3, padding=1), group_norm(ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(ch, feature_dim), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        return features, self.head(features)


class Auditor(LightningModule):
    """Classifier over uint8 or [-1, 1] images; ``forward`` gives (features, logits)."""

    def __init__(self, channels: int, image_size: int, num_classes: int, class_names: Optional[list[str]] = None,
                 lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = AuditorNet(channels, image_size, num_classes)
        self.num_classes = num_classes
        # Always trained in one process (train_auditor), possibly beside a benchmark's process group that
        # the other ranks are waiting in: syncing the metric over that group would block on them.
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro", sync_on_compute=False)

    @property
    def num_features(self) -> int:
        return self.net.feature_dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype == torch.uint8:
            images = images.float().div(127.5).sub(1.0)
        return self.net(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        self.log("auditor/train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, logits = self(batch["image"])
        self.val_accuracy.update(logits, batch["label"])

    def on_validation_epoch_end(self) -> None:
        self.log("auditor/val_accuracy", self.val_accuracy.compute(), prog_bar=True)
        self.val_accuracy.reset()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def auditor_path(manifest_hash: str, fit: Optional[dict] = None) -> Path:
    """The cached auditor of a data set, and of the size it was fitted to (``fit``: the data module's
    ``image_size``/``channels``/``resize``/``label_key`` where they differ from the defaults)."""
    key = manifest_hash[:16]
    if fit:
        key += "-" + hashlib.sha256(json.dumps(fit, sort_keys=True).encode()).hexdigest()[:8]
    return cache_dir() / "auditors" / key / "auditor.ckpt"


def train_auditor(shards: str, epochs: int = 10, seed: int = 0, out: Optional[Path] = None,
                  progress: bool = True, fit: Optional[dict] = None) -> Path:
    """Train the auditor on the train split's labels, measure it on the val split, save it atomically. ``fit``: the
    data module's ``image_size``/``channels``/``resize``/``label_key``, so it classifies images at the size a run
    trained on, not the shards' own."""
    from pytorch_lightning import seed_everything

    seed_everything(seed, verbose=False)
    fit = {k: v for k, v in (fit or {}).items() if v is not None}
    dm = ShardDataModule(shards, batch_size=128, num_workers=0, seed=seed, **fit)
    manifest, info = dm.manifest, dm.split_info("train")
    if not info["label_histogram"]:
        raise ValueError(f"the train split of {shards} has no labels; the auditor needs classes or an attribute")
    if "val" not in manifest["splits"]:
        raise ValueError(f"{shards} has no val split to measure the auditor on; prepare with --val-fraction > 0")
    c, h, _ = dm.image_shape
    model = Auditor(c, h, dm.num_classes, manifest["class_names"])
    out = out or auditor_path(dm.manifest_hash, fit)
    # LightningEnvironment: a plain single process even when started by srun/torchrun with several ranks
    # (rank 0 of a benchmark trains the auditor while the others wait), where Lightning would otherwise
    # take the launcher's world size and expect every rank to join.
    if progress:
        print(f"[auditor] training on the labels of {shards} ({epochs} epochs, once per data set)", flush=True)
    # a bar on a terminal only: in a log its carriage returns pile up
    trainer = Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                      plugins=[LightningEnvironment()],
                      enable_progress_bar=progress and interactive(), enable_model_summary=False,
                      # tqdm's bar, named: with `rich` installed Lightning would pick its rich one
                      callbacks=[TQDMProgressBar()] if progress and interactive() else None,
                      check_val_every_n_epoch=epochs, default_root_dir=str(out.parent))
    trainer.fit(model, datamodule=dm)
    accuracy = float(trainer.callback_metrics["auditor/val_accuracy"])
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(out))  # Lightning writes checkpoints atomically
    shared_mode(out)
    if progress:
        print(f"[auditor] held-out accuracy {accuracy:.3f}: {out}", flush=True)
    atomic_write_json(out.with_suffix(".json"), {"val_accuracy": accuracy, "manifest_hash": dm.manifest_hash,
                                                 "epochs": epochs, "seed": seed, "num_classes": dm.num_classes,
                                                 "image_shape": list(dm.image_shape), **({"fit": fit} if fit else {}),
                                                 "class_names": manifest["class_names"]})
    return out


def load_auditor(path: Path) -> tuple[Auditor, dict]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"auditor checkpoint {path} does not exist; train one with "
                                "genbench train-auditor --data SHARDS, or omit --auditor to train it automatically")
    model = Auditor.load_from_checkpoint(str(path), map_location="cpu")
    model.eval()
    info_path = Path(path).with_suffix(".json")
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return model, info
