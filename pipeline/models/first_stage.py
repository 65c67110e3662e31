"""A two-stage model's first stage: the autoencoder run it encodes to and decodes from, pinned by checksum.

The second stage (a latent DDPM, a token transformer) names the autoencoder's run directory in
``model.init_args.first_stage``. What it learned is only meaningful in that autoencoder's latent space, so its
checkpoint records the first stage's run id and the sha256 of the checkpoint it was trained on, and refuses
to load on any other (a retrained autoencoder writes a new last.ckpt at the same path). The autoencoder is
held outside the module's parameters: it is frozen, it is not averaged by the EMA, not stepped by the
optimizer, and not copied into every second-stage checkpoint (its own run keeps it).
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters

from pipeline.io import sha256_file

CHECKPOINT = Path("checkpoints") / "last.ckpt"

# What the checkpoint being loaded says its first stage was; load_from_checkpoint sets it for the __init__ it calls.
_EXPECTED: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("expected_first_stage", default=None)


class FirstStageError(ValueError):
    """The first stage is missing, of the wrong kind, or not the one a checkpoint was trained on."""


@contextlib.contextmanager
def expecting(record: Optional[dict]) -> Iterator[None]:
    token = _EXPECTED.set(record)
    try:
        yield
    finally:
        _EXPECTED.reset(token)


def _mismatch(ckpt: Path, found: str, expected: dict) -> FirstStageError:
    return FirstStageError(
        f"first stage {ckpt} has sha256 {found}, but this model was trained on first stage {expected.get('run_id')} "
        f"with checkpoint sha256 {expected['sha256']}: the autoencoder was retrained or replaced, and its latents no "
        "longer mean what this model learned. Point model.init_args.first_stage at the run directory that holds the "
        "original checkpoint, or train the second stage again on the new first stage (it becomes a new run).")


class FirstStage:
    """The frozen autoencoder of a run directory, with its record: run id, checkpoint sha256, latent shape, the
    cost of its training (a latent model's budget includes it) and of its decoder."""

    def __init__(self, run_dir: str | Path, autoencoder: Any, quantizer: Optional[str] = None) -> None:
        """``autoencoder``: the first-stage class (the registry's ``autoencoder``, passed in so that this module
        imports no family)."""
        expected = _EXPECTED.get()
        directory = Path(run_dir)
        if not (directory / CHECKPOINT).exists() and expected and Path(expected.get("run_dir", "")).exists():
            directory = Path(expected["run_dir"])  # loaded from another working directory: the recorded absolute path
        ckpt = directory / CHECKPOINT
        if not ckpt.exists():
            pinned = (f"; this model was trained on first stage {expected.get('run_id')} with checkpoint sha256 "
                      f"{expected['sha256']}: restore that run directory, or pass its path as "
                      "model.init_args.first_stage" if expected else
                      f": train the autoencoder first (genbench fit --config experiments/digits/autoencoder-"
                      f"{quantizer or 'kl'}.yaml) and pass its run directory as "
                      "--model.init_args.first_stage=runs/<its run>")
            raise FirstStageError(f"first stage {run_dir} has no {CHECKPOINT}{pinned}")
        sha = sha256_file(ckpt)
        if expected and sha != expected["sha256"]:
            raise _mismatch(ckpt, sha, expected)
        family = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("genbench", {}).get("family")
        if family != autoencoder.family:
            raise FirstStageError(f"first stage {directory} is a {family!r} run, not an autoencoder; pass the run "
                                  "directory of a genbench fit of pipeline.models.autoencoder.Autoencoder")
        # LightningCLI builds the second stage inside a context that hands *its* config to every save_hyperparameters
        # call; the autoencoder built in its __init__ must record its own (from its checkpoint) instead
        token = _given_hyperparameters.set(None)
        try:
            self.model = autoencoder.load_from_checkpoint(  # no VGG needed to encode and decode
                str(ckpt), map_location="cpu", perceptual_weight=0.0).eval().requires_grad_(False)
        finally:
            _given_hyperparameters.reset(token)
        if quantizer is not None and self.model.quantizer_kind != quantizer:
            raise FirstStageError(f"first stage {directory} is a {self.model.quantizer_kind} autoencoder; this model "
                                  f"needs quantizer: {quantizer} (a codebook to predict the codes of)")
        spent = self.model.cost()
        self.record: dict[str, Any] = {
            "run_id": directory.resolve().name, "run_dir": str(directory.resolve()), "checkpoint": str(CHECKPOINT),
            "sha256": sha, "quantizer": self.model.quantizer_kind, "latent_shape": list(self.model.latent_shape),
            "codebook_size": self.model.codebook_size or None, "parameters": spent["parameters"],
            "decoder_flops_per_sample": spent["decoder_flops_per_sample"],
            "images_seen": spent["images_seen"], "training_flops": spent["training_flops"],
            "device_hours": self.model.device_seconds / 3600}

    def check(self, recorded: Optional[dict]) -> None:
        """Refuse a checkpoint (being resumed) trained on another first stage."""
        if recorded and recorded.get("sha256") != self.record["sha256"]:
            raise _mismatch(Path(self.record["run_dir"]) / CHECKPOINT, self.record["sha256"], recorded)

    def _on(self, x: torch.Tensor):
        model = self.model
        if next(model.parameters()).device != x.device:
            model.to(x.device)  # it is not a submodule, so it does not follow .to(): it follows its inputs
        return model

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return self._on(x).encode(x, sample=sample)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._on(z).decode(z).clamp(-1, 1)

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        return self._on(x).encode_indices(x)

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self._on(indices).decode_indices(indices).clamp(-1, 1)
