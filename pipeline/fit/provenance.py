"""run.json: everything needed to trace a run's numbers back to its config, code, data and machine."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_only

from pipeline.io import atomic_write_json
from pipeline.models.base import GenerativeModule

log = logging.getLogger(__name__)

PACKAGES = ("genbench", "torch", "torchvision", "pytorch-lightning", "torchmetrics", "torch-fidelity",
            "webdataset", "wandb", "numpy", "scipy", "scikit-learn", "jsonargparse")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES",
              "SLURM_NTASKS", "SLURM_RESTART_COUNT")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_state(path: Optional[Path] = None) -> dict[str, Any]:
    """Commit and dirty flag of the genbench checkout (None outside a git checkout, e.g. a wheel install)."""
    path = path or Path(__file__).resolve().parents[2]  # the checkout: pipeline/fit/provenance.py -> repo
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"host": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count(), "gpus": gpus,
            "slurm": {k: os.environ[k] for k in SLURM_VARS if k in os.environ} or None}


def describe_environment() -> dict[str, Any]:
    """The code and machine half of provenance, shared by run.json and result records."""
    return {"git": git_state(), "packages": package_versions(), "hardware": hardware()}


class ProvenanceCallback(Callback):
    """Writes run.json at the start of fit and completes it at the end (or on failure)."""

    def __init__(self, run_dir: Path, config, config_hash: str, tracking: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.config_hash = config_hash
        self.tracking = tracking
        self.seed = config.seed_everything
        self.shards = str(config.data.init_args.shards)
        self.budget = {"budget": config.run.budget, "evaluate_every": config.run.evaluate_every}
        self.record: dict[str, Any] = {}
        self._t0 = 0.0
        # corrupt samples the loaders skipped (each batch says how many since its worker's last), this rank
        self._skipped = {"train": 0, "val": 0}
        self._skipped_before: dict[str, int] = {}  # the earlier attempts' counts (run.json)

    def _data(self, trainer: Any) -> dict[str, Any]:
        """Which data: the shards (URLs without credentials) and the manifest hash (for remote shards without a
        manifest, a hash over each shard's URL, size and ETag/Last-Modified as the server gave them)."""
        from pipeline.data.manifest import load_manifest, manifest_hash, shard_paths
        from pipeline.data.remote import is_remote, public_url

        dm = getattr(trainer, "datamodule", None)
        manifest = dm.manifest if dm is not None and hasattr(dm, "manifest") else load_manifest(self.shards)
        out: dict[str, Any] = {"shards": public_url(self.shards) if is_remote(self.shards) else self.shards,
                               "manifest_hash": manifest_hash(manifest),
                               # how far the bytes were checked against that identity (data.verify)
                               "verify": getattr(dm, "verify", None)}
        if is_remote(self.shards):
            out["shard_urls"] = {split: [public_url(p) for p in shard_paths(self.shards, manifest, split)]
                                 for split in manifest["splits"]}
        return out

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._skipped["train"] += batch.get("skipped", 0) if isinstance(batch, dict) else 0

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._skipped["val"] += batch.get("skipped", 0) if isinstance(batch, dict) else 0

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # every rank is here (a collective): the record counts all ranks' skips, not rank 0's share
        counts = torch.tensor([self._skipped["train"], self._skipped["val"]], dtype=torch.float64,
                              device=pl_module.device)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self._skipped = {"train": int(counts[0].item()), "val": int(counts[1].item())}

    @rank_zero_only
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.time()
        previous = self._read()
        self._skipped_before = previous.get("data", {}).get("skipped_samples") or {"train": 0, "val": 0}
        self.record = {
            "run_id": self.run_dir.name,
            "status": "running",
            "family": getattr(pl_module, "family", type(pl_module).__name__),
            "model_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "config_hash": self.config_hash,
            "seed": self.seed,
            "data": self._data(trainer),
            **describe_environment(),
            "world_size": trainer.world_size,
            "max_steps": trainer.max_steps,  # this attempt's schedule; each resume records the one it continued to
            "num_nodes": trainer.num_nodes,
            "precision": str(trainer.precision),
            "tracking": self.tracking,
            "accelerator": type(trainer.accelerator).__name__,
            "start_time": previous.get("start_time", now()),
            "attempts": previous.get("attempts", 0) + 1,
            "wall_time_s": previous.get("wall_time_s", 0.0),
            "device_hours": previous.get("device_hours", 0.0),
            "images_seen": pl_module.images_seen,
            "resumes": previous.get("resumes", []),
            **(pl_module.provenance() if isinstance(pl_module, GenerativeModule) else {}),
        }
        atomic_write_json(self.run_dir / "run.json", self.record)

    @rank_zero_only
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The loops are restored by now: the step a resumed run continues from.
        if trainer.ckpt_path and self.record:
            slurm = self.record["hardware"]["slurm"] or {}
            self.record["resumes"].append({
                "attempt": self.record["attempts"], "checkpoint": str(trainer.ckpt_path),
                "global_step": trainer.global_step, "max_steps": trainer.max_steps, "time": now(),
                "slurm_job_id": slurm.get("SLURM_JOB_ID"), "slurm_restart_count": slurm.get("SLURM_RESTART_COUNT")})
            atomic_write_json(self.run_dir / "run.json", self.record)

    def _read(self) -> dict[str, Any]:
        path = self.run_dir / "run.json"
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except json.JSONDecodeError:
            return {}

    def _finish(self, trainer: Trainer, pl_module: LightningModule, status: str, error: Optional[str] = None) -> None:
        if not self.record:
            return
        elapsed = time.time() - self._t0
        self.record.update({
            "status": status,
            "end_time": now(),
            "wall_time_s": round(self.record["wall_time_s"] + elapsed, 3),
            # Devices x hours: GPU-hours on GPUs, CPU-process-hours otherwise.
            "device_hours": round(self.record["device_hours"] + elapsed * trainer.world_size / 3600, 6),
            "global_step": trainer.global_step,
            "images_seen": pl_module.images_seen,
            **self.budget,
            "cost": pl_module.cost() if isinstance(pl_module, GenerativeModule) else None,
            # a two-stage model's first stage (run id, checkpoint sha256) and, for a latent DDPM, its latent scale
            **(pl_module.provenance() if isinstance(pl_module, GenerativeModule) else {}),
        })
        skipped = {split: self._skipped_before.get(split, 0) + n for split, n in self._skipped.items()}
        self.record["data"]["skipped_samples"] = skipped  # all attempts; rank 0's share when a run fails
        if any(self._skipped.values()):
            log.warning("the loaders skipped %d corrupt train and %d val sample(s) in this attempt (the first of each "
                        "shard is named in a warning above); genbench prepare --verify %s checks the shards",
                        self._skipped["train"], self._skipped["val"], self.shards)
        if error:
            self.record["error"] = error
        atomic_write_json(self.run_dir / "run.json", self.record)

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module, "preempted" if _preempted(trainer) else
                     "interrupted" if trainer.interrupted else "finished")

    @rank_zero_only
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning ends a run that got SIGTERM with an exception, also after the step's checkpoint was saved.
        status = "preempted" if _preempted(trainer) else "failed"
        self._finish(trainer, pl_module, status, f"{type(exception).__name__}: {exception}")


def _preempted(trainer: Trainer) -> bool:
    from pipeline.fit.preemption import PreemptionCheckpoint

    return any(isinstance(cb, PreemptionCheckpoint) and cb.preempted for cb in trainer.checkpoint_callbacks)
