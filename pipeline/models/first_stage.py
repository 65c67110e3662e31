"""A two-stage model's first stage: the autoencoder checkpoint it encodes to and decodes from, pinned by checksum.

The second stage (a latent DDPM, a token transformer) names the autoencoder in ``model.init_args.first_stage``: its
run directory (the run's ``checkpoints/last.ckpt``) or one of its checkpoint files. What the second stage learned
is only meaningful in that checkpoint's latent space, so:

- the first stage is identified by the sha256 of that checkpoint, never by how its path was typed: the second
  stage's run name hashes it (``identity``), its checkpoints and run.json record it, and loading refuses any other;
- the checkpoint is kept under its hash, ``checkpoints/pinned/<sha256>.ckpt`` in the autoencoder's run (a hard
  link: no second copy on disk), so training the autoencoder on (which replaces ``last.ckpt``) never takes away
  the weights a second stage depends on; the continued autoencoder is another first stage, and a second stage
  trained on it another run;
- it is looked for by hash: in the run directory recorded when the second stage was trained (an absolute path),
  then where the caller says it is now (a moved run is found there).

The autoencoder is held outside the module's parameters: it is frozen, not averaged by the EMA, not stepped by the
optimizer, and not copied into every second-stage checkpoint (its own run keeps it).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters

from pipeline.io import sha256_file

log = logging.getLogger(__name__)

CHECKPOINT = Path("checkpoints") / "last.ckpt"
PINNED = Path("checkpoints") / "pinned"
# how a moved first stage is passed to each command that loads a second stage
WHERE_NOW = ("genbench fit: --model.init_args.first_stage=NEW_PLACE; genbench benchmark and genbench serve: "
             "--first-stage NEW_PLACE")

# What the checkpoint being loaded or resumed says its first stage was: set by load_from_checkpoint and by
# genbench fit (resuming a run) for the __init__ they call.
_EXPECTED: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("expected_first_stage", default=None)


class FirstStageError(ValueError):
    """The first stage is missing, of the wrong kind, broken, or not the one a checkpoint was trained on."""


@contextlib.contextmanager
def expecting(record: Optional[dict]) -> Iterator[None]:
    token = _EXPECTED.set(record)
    try:
        yield
    finally:
        _EXPECTED.reset(token)


def split(given: str | os.PathLike) -> tuple[Path, Path]:
    """(run directory, checkpoint file) of a first stage given as a run directory or as one of its checkpoints."""
    path = Path(given)
    if path.suffix == ".ckpt" or path.is_file():
        return next((p.parent for p in path.parents if p.name == "checkpoints"), path.parent), path
    return path, path / CHECKPOINT


_HASHES: dict[tuple, str] = {}


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint file, hashed once per process while its size, mtime and inode stay the same (the run
    name, the instantiation and the pin each ask)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def identity(given: str | os.PathLike) -> str:
    """What a second stage's run name hashes of its first stage: the checkpoint's sha256, so that ``runs/ae``,
    ``./runs/ae/``, the absolute path, ``runs/ae/checkpoints/last.ckpt`` and the run moved elsewhere name one run,
    and an autoencoder trained on names another. A path with no checkpoint yet (a suite's first stage before it is
    trained, a config's placeholder) stands for itself."""
    _, ckpt = split(given)
    return f"sha256:{checkpoint_sha256(ckpt)}" if ckpt.is_file() else os.path.normpath(str(given))


def pin(run_dir: Path, ckpt: Path, sha: str) -> Path:
    """Keep ``ckpt`` (of sha256 ``sha``) as ``run_dir/checkpoints/pinned/<sha>.ckpt``: a hard link (a copy where
    links are not possible), which a later ``last.ckpt`` of the autoencoder (written to a temporary file and
    renamed over it, see pipeline.fit.checkpoints) leaves as it is. Where it cannot be written (a read-only run
    of someone else) the checkpoint is used where it is, with a warning."""
    target = run_dir / PINNED / f"{sha}.ckpt"
    if target.exists() or ckpt.resolve() == target.resolve():
        return target
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(ckpt, temp)
        except OSError:  # another file system, or links refused: a copy
            shutil.copyfile(ckpt, temp)
        if sha256_file(temp) != sha:  # last.ckpt was replaced between hashing and linking: pin nothing
            temp.unlink()
            return ckpt
        os.replace(temp, target)
        return target
    except OSError as e:
        temp.unlink(missing_ok=True)
        log.warning("could not keep the first stage's checkpoint as %s (%s): training that autoencoder further would "
                    "replace the checkpoint this model depends on (sha256 %s)", target, e, sha)
        return ckpt


def _unique(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def locate(given: str | os.PathLike, expected: Optional[dict],
           quantizer: Optional[str] = None) -> tuple[Path, Path, str]:
    """(run directory, checkpoint, sha256) of the first stage: with ``expected`` (a checkpoint's record) the file
    of its sha256, looked for in the recorded run directory first, then in the given place; without, the given
    checkpoint (none: how to train one, for ``quantizer``). Raises FirstStageError naming the hash, where it
    looked and what to do."""
    run_dir, ckpt = split(given)
    if not expected:
        if not ckpt.is_file():
            raise FirstStageError(missing_message(given, quantizer, []))
        return run_dir, ckpt, checkpoint_sha256(ckpt)
    sha = expected["sha256"]
    dirs = _unique(([Path(expected["run_dir"])] if expected.get("run_dir") else []) + [run_dir])
    candidates = _unique([d / PINNED / f"{sha}.ckpt" for d in dirs] + [ckpt] + [d / CHECKPOINT for d in dirs])
    other: dict[Path, str] = {}
    for candidate in candidates:
        if candidate.is_file():
            found = checkpoint_sha256(candidate)
            if found == sha:
                return split(candidate)[0], candidate, sha
            other[candidate] = found
    trained_on = (f"this model was trained on first stage {expected.get('run_id')} (recorded at "
                  f"{expected.get('run_dir')}) with checkpoint sha256 {sha}")
    if other:
        path, found = next(iter(other.items()))
        raise FirstStageError(
            f"first stage {path} has sha256 {found}, but {trained_on}, and no checkpoint with that hash is left "
            f"(looked for {', '.join(str(d / PINNED / (sha + '.ckpt')) for d in dirs)}): the autoencoder was "
            "retrained or replaced and the checkpoint this model depends on removed by hand, so its latents no "
            f"longer mean what this model learned. Restore that file, or train this model again on the current "
            f"first stage (genbench fit with --model.init_args.first_stage={run_dir}: a new run)")
    raise FirstStageError(
        f"{trained_on}, and it is not there any more (looked in {', '.join(str(d) for d in dirs)}). If the run was "
        f"moved, pass its new place ({WHERE_NOW}); if it was deleted, restore it: an autoencoder trained again has "
        "other latents, and a model on it is a new run")


def dependents(root: str | os.PathLike, given: str | os.PathLike) -> list[tuple[str, dict]]:
    """The runs under ``root`` whose run.json says they were trained on the first stage ``given`` (by its absolute
    run directory or its run id): what a missing first stage takes with it."""
    run_dir = split(given)[0]
    out = []
    for info_path in sorted(Path(root).glob("*/run.json")):
        try:
            first = json.loads(info_path.read_text()).get("first_stage") or {}
        except (OSError, ValueError):
            continue
        if first.get("sha256") and (first.get("run_dir") == str(run_dir.resolve()) or
                                    first.get("run_id") == run_dir.resolve().name):
            out.append((info_path.parent.name, first))
    return out


def missing_message(given: str | os.PathLike, quantizer: Optional[str], runs: list[tuple[str, dict]]) -> str:
    """A first stage without a checkpoint: the runs that were trained on it (and the hash each needs), or how to
    train one."""
    if runs:
        pinned = "; ".join(f"{name} needs {first['run_id']} with checkpoint sha256 {first['sha256']} (recorded at "
                           f"{first['run_dir']})" for name, first in runs)
        return (f"first stage {given} has no checkpoint, but runs were trained on it: {pinned}. If it was moved, pass "
                f"its new place ({WHERE_NOW}); if it was deleted, restore it: an autoencoder trained again has other "
                "latents, and a model on it is a new run")
    return (f"first stage {given} has no checkpoint: train the autoencoder first (genbench fit --config "
            f"experiments/digits/autoencoder-{quantizer or 'kl'}.yaml) and pass its run directory as "
            "--model.init_args.first_stage=runs/<its run>")


class FirstStage:
    """The frozen autoencoder of a first-stage checkpoint, with its record: run id, checkpoint sha256, latent shape,
    the cost of its training (a latent model's budget includes it) and of its decoder."""

    def __init__(self, given: str | Path, autoencoder: Any, quantizer: Optional[str] = None) -> None:
        """``given``: the run directory or a checkpoint file; ``autoencoder``: the first-stage class (the
        registry's ``autoencoder``, passed in so that this module imports no family)."""
        directory, ckpt, sha = locate(given, _EXPECTED.get(), quantizer)
        family = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("genbench", {}).get("family")
        if family != autoencoder.family:
            raise FirstStageError(f"first stage {given} is a {family!r} run, not an autoencoder; pass the run "
                                  "directory of a genbench fit of pipeline.models.autoencoder.Autoencoder")
        # LightningCLI builds the second stage inside a context that hands *its* config to every save_hyperparameters
        # call; the autoencoder built in its __init__ must record its own (from its checkpoint) instead
        token = _given_hyperparameters.set(None)
        try:
            self.model = autoencoder.load_from_checkpoint(  # no VGG needed to encode and decode
                str(ckpt), map_location="cpu", perceptual_weight=0.0).eval().requires_grad_(False)
        finally:
            _given_hyperparameters.reset(token)
        broken = [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
        if broken:  # else the second stage's loss goes non-finite and its own learning rate gets the blame
            raise FirstStageError(
                f"first stage {ckpt} (sha256 {sha}) has non-finite weights in {len(broken)} tensor(s), e.g. "
                f"{broken[0]}: that autoencoder diverged; train it again (a lower model.init_args.lr, or "
                "model.init_args.grad_clip), then this model on it")
        if quantizer is not None and self.model.quantizer_kind != quantizer:
            raise FirstStageError(f"first stage {directory} is a {self.model.quantizer_kind} autoencoder; this model "
                                  f"needs quantizer: {quantizer} (a codebook to predict the codes of)")
        ckpt = pin(directory, ckpt, sha)
        spent = self.model.cost()
        self.record: dict[str, Any] = {
            "run_id": directory.resolve().name, "run_dir": str(directory.resolve()),
            "checkpoint": os.path.relpath(ckpt.resolve(), directory.resolve()),
            "sha256": sha, "quantizer": self.model.quantizer_kind, "latent_shape": list(self.model.latent_shape),
            "codebook_size": self.model.codebook_size or None, "parameters": spent["parameters"],
            "decoder_flops_per_sample": spent["decoder_flops_per_sample"],
            "images_seen": spent["images_seen"], "training_flops": spent["training_flops"],
            "device_hours": self.model.device_seconds / 3600}

    def check(self, recorded: Optional[dict]) -> None:
        """Refuse a checkpoint (being resumed) trained on another first stage."""
        if recorded and recorded.get("sha256") != self.record["sha256"]:
            raise FirstStageError(
                f"this run's checkpoint was trained on first stage {recorded.get('run_id')} with checkpoint sha256 "
                f"{recorded['sha256']}, but it was built on {self.record['run_dir']} with sha256 "
                f"{self.record['sha256']}; give --model.init_args.first_stage="
                f"{recorded.get('run_dir')}/{PINNED}/{recorded['sha256']}.ckpt to continue it on its own first stage")

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
