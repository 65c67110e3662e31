"""``genbench fit``: LightningCLI over the model families and the ShardDataModule.

The experiment YAML is a LightningCLI config (``model``/``data`` by ``class_path`` + ``init_args``,
``trainer``, ``seed_everything``) plus genbench's own groups (``run``, ``prepare``, ``benchmark``,
``tracking``). Everything is validated before any work; the resolved config is written to the run
directory together with run.json (provenance), the checkpoints, sample grids and tracking logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace
from lightning_fabric.plugins import CheckpointIO
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelSummary, ProgressBar, TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from pipeline.console import interactive
from pipeline.data.datamodule import ShardDataModule
from pipeline.data.imagefile import MAX_PIXELS
from pipeline.data.manifest import MANIFEST, ShardError
from pipeline.data.remote import is_remote
from pipeline.fit.budget import BudgetError, TrainingBudget, parse_budget
from pipeline.fit.checkpoints import LAST, RunCheckpoint, SharedCheckpointIO
from pipeline.fit.config_errors import config_files, explain
from pipeline.fit.options import BenchmarkOptions, PrepareOptions, RunOptions, TrackingOptions
from pipeline.fit.preemption import PreemptionCheckpoint, allocation_problem, requeue_job, slurm_job_id, under_slurm
from pipeline.fit.progress import LineProgressBar
from pipeline.fit.provenance import ProvenanceCallback
from pipeline.fit.tracking import SERVICE_GONE, ContinuingCSVLogger, ResilientWandbLogger, wandb_mode
from pipeline.fit.validate import ConfigError, check_epoch_length, check_model_fits_data, check_numbers, check_schedule
from pipeline.io import atomic_write_text
from pipeline.models.base import GenerativeModule
from pipeline.models.first_stage import PINNED, dependents, expecting, identity, missing_message, split

log = logging.getLogger(__name__)

# Our train loader's __len__ is exact (per-worker quotas), and args are passed on purpose.
warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")

# Groups that do not change what is trained: excluded from the config hash that names the run.
NON_TRAINING_GROUPS = ("run", "benchmark", "tracking", "dry_run", "config")
# How long to train, not what: outside the hash, so a longer schedule continues the same run (directory, W&B
# run, metrics.csv) from its last checkpoint. The families' learning-rate schedules do not depend on them.
SCHEDULE_KEYS = ("max_steps", "max_epochs", "max_time")


class DryRun(Exception):
    """Raised after ``--dry-run`` has printed the resolved config."""

    def __init__(self, config: Namespace, config_yaml: str, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.config, self.config_yaml, self.run_dir = config, config_yaml, run_dir


# Model options added after runs existed, with the default that keeps a run's behaviour as it was (the latent
# and guidance options of the two-stage models): left out of the hash at that default.
ADDED_MODEL_DEFAULTS = {"first_stage": None, "latent_scale": None, "latent_clip": 4.0, "top_p": 1.0}
ADDED_AR_DEFAULTS = {"p_uncond": 0.0, "guidance_scale": 1.0}


def config_hash(config: Namespace) -> str:
    """What is trained: the config less the groups that do not change it and the schedule's length."""
    data = {k: v for k, v in config.as_dict().items() if k not in NON_TRAINING_GROUPS}
    data["trainer"] = {k: v for k, v in (data.get("trainer") or {}).items() if k not in SCHEDULE_KEYS}
    init = (data.get("data") or {}).get("init_args") or {}
    init.pop("verify", None)  # how far the bytes are checked, not which are trained on
    if init.get("max_pixels") == MAX_PIXELS:  # the default: runs made before the option keep their names
        init.pop("max_pixels")
    model = (data.get("model") or {}).get("init_args") or {}
    added = ADDED_MODEL_DEFAULTS | (ADDED_AR_DEFAULTS if str((data.get("model") or {}).get("class_path", "")).endswith(
        ".Autoregressive") else {})
    for key, default in added.items():  # options added since: at their default, old names stand
        if key in model and model[key] == default:
            model.pop(key)
    if model.get("first_stage"):  # the first stage by its checkpoint's hash, not by how its path was typed
        model["first_stage"] = identity(model["first_stage"])
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def run_directory(config: Namespace) -> Path:
    run = config.run
    return Path(run.root) / (run.id or f"{run.name}-{config_hash(config)[:8]}")


def _rank_from_env() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def ensure_shards(data_config: Namespace, prepare: Namespace) -> None:
    """Write the shards the config names if they do not exist and the config says how (its ``prepare`` group)."""
    if is_remote(str(data_config.init_args.shards)):
        return  # remote shards are read where they are; genbench prepare writes local directories
    shards = Path(data_config.init_args.shards)
    if (shards / MANIFEST).exists() or (shards.is_dir() and any(shards.glob("*.tar"))):
        return
    if prepare.source is None:
        raise ConfigError(f"data.init_args.shards={shards} does not exist and the config has no prepare.source; "
                          f"create the shards with genbench prepare SOURCE --out {shards}")
    if _rank_from_env() != 0:  # another rank of the same job is preparing them
        deadline = time.time() + 1800
        while not (shards / MANIFEST).exists():
            if time.time() > deadline:
                raise ConfigError(f"waited 30 minutes for rank 0 to prepare {shards}")
            time.sleep(2)
        return
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import open_source

    write_shards(open_source(prepare.source, root=prepare.root), shards, val_fraction=prepare.val_fraction,
                 seed=prepare.seed, shard_size=prepare.shard_size, image_size=prepare.image_size,
                 png_compression=prepare.png_compression, channels=prepare.channels, resize_mode=prepare.resize)


def check_config_files(args: list[str]) -> None:
    """Every ``--config`` file exists and is YAML; jsonargparse's own message names neither the file nor the fix."""
    import yaml

    for path in config_files(args):
        if not path.is_file():
            raise ConfigError(f"experiment file {path} does not exist")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e


class GenbenchCLI(LightningCLI):
    def __init__(self, args: Optional[list[str]] = None, instantiate: bool = True) -> None:
        check_config_files(args or [])
        self._instantiate = instantiate
        self.run_dir: Optional[Path] = None
        self.budget: Optional[tuple[str, float]] = None
        self.evaluate_every: Optional[tuple[str, float]] = None
        super().__init__(
            GenerativeModule, ShardDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_callback=None, run=False, args=args, auto_configure_optimizers=False,
            seed_everything_default=0,
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False, "prog": "genbench fit",
                           "description": __doc__},
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunOptions, "run")
        parser.add_class_arguments(PrepareOptions, "prepare")
        parser.add_class_arguments(BenchmarkOptions, "benchmark")
        parser.add_class_arguments(TrackingOptions, "tracking")
        parser.add_argument("--dry-run", action="store_true",
                            help="print the resolved config and the run directory, then exit")
        # Data order is a function of the experiment seed: not set separately.
        parser.link_arguments("seed_everything", "data.init_args.seed")

    def before_instantiate_classes(self) -> None:
        dry = self.config.dry_run or not self._instantiate
        check_numbers(self.config, weights=not dry)
        self.run_dir = run_directory(self.config)
        if dry:
            raise DryRun(self.config, self.parser.dump(self.config, skip_none=False), self.run_dir)
        problem = allocation_problem(self.config.trainer.devices) if under_slurm() else None
        if problem:
            raise ConfigError(problem)
        try:
            ensure_shards(self.config.data, self.config.prepare)
            check_epoch_length(self.config, check_model_fits_data(self.config))
        except ShardError as e:  # missing, unreachable or unreadable shards: the message says which and the fix
            raise ConfigError(str(e)) from None
        check_schedule(self.run_dir, self.config.trainer.max_steps)
        check_first_stage(self.config)
        try:
            self.budget = parse_budget(self.config.run.budget, "run.budget")
            self.evaluate_every = parse_budget(self.config.run.evaluate_every, "run.evaluate_every")
        except BudgetError as e:
            raise ConfigError(str(e)) from None
        if self.budget and self.config.trainer.max_epochs is None:
            self.config.trainer.max_epochs = -1  # Lightning's default of 1000 epochs would cut a budget short

    def instantiate_classes(self) -> None:
        assert self.run_dir is not None
        try:
            # a resumed two-stage run is rebuilt on the first stage its checkpoint names (by hash), wherever it is now
            two_stage = bool(self.config.model.init_args.get("first_stage"))
            with expecting(recorded_first_stage(self.run_dir) if two_stage else None):
                super().instantiate_classes()
        except ValueError as e:
            # jsonargparse wraps what a model's or data module's __init__ raised (its own message names the key
            # and the fix) under "Does not validate against any of the Union subtypes" and a namespace dump
            cause = _innermost(e)
            if cause is e or not isinstance(cause, (ValueError, ShardError)):
                raise
            raise ConfigError(str(cause)) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        run_dir = self.run_dir
        assert run_dir is not None
        check = getattr(self.datamodule, "check", None)
        if check is not None:  # shards whose bytes changed since prepare: one message, before any run directory
            try:
                check()
            except ShardError as e:
                raise ConfigError(str(e)) from None
        config_yaml = self.parser.dump(self.config, skip_none=False)
        chash = config_hash(self.config)
        if _rank_from_env() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", config_yaml)
        loggers: list = [ContinuingCSVLogger(str(run_dir), name="logs", version="")]
        mode = wandb_mode() if self.config.tracking.wandb else "disabled"
        tracking = {"csv": str(run_dir / "logs" / "metrics.csv"), "wandb_mode": mode}
        if mode != "disabled":
            wandb_id = _wandb_id(run_dir, chash)
            wandb_logger = ResilientWandbLogger(project=self.config.tracking.project, name=run_dir.name, id=wandb_id,
                                                save_dir=str(run_dir), offline=(mode == "offline"),
                                                resume="allow")
            # Lightning always passes anonymous=None, which wandb warns about on every run ("the anonymous
            # setting has no effect") although nothing was asked for: leave the setting out
            wandb_logger._wandb_init.pop("anonymous", None)
            loggers.append(wandb_logger)
            tracking.update(wandb_id=wandb_id, wandb_project=self.config.tracking.project)
            if mode == "offline":  # run.json says how to upload it later
                tracking["wandb_sync"] = f"wandb sync {run_dir}/wandb/offline-run-*"
        extra = [TrainingBudget(run_dir / "checkpoints", self.budget, self.evaluate_every),
                 RunCheckpoint(run_dir / "checkpoints", self.config.run.checkpoint_every_n_steps),
                 ProvenanceCallback(run_dir, self.config, chash, tracking)]
        trainer_config = self._get(self.config_init, "trainer", default={})
        user_callbacks = _as_list(trainer_config.get("callbacks"))
        if trainer_config.get("enable_progress_bar") is not False and \
                not any(isinstance(cb, ProgressBar) for cb in user_callbacks):
            # in a log, lines every 30 s instead of a redrawn bar; on a terminal tqdm's bar, named here because with
            # `rich` installed (diffusers' CLI brings it) Lightning would pick its rich bar and print around genbench
            extra.append(TQDMProgressBar() if interactive() else LineProgressBar())
        if trainer_config.get("enable_model_summary") is not False and \
                not any(isinstance(cb, ModelSummary) for cb in user_callbacks):
            extra.append(ModelSummary())  # logged (quiet unless --verbose), not RichModelSummary's direct print
        plugins = _as_list(trainer_config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SharedCheckpointIO())
        if under_slurm():
            # Lightning's own auto-requeue checkpoints inside the signal handler; PreemptionCheckpoint does it at a
            # step boundary on all ranks (see pipeline/fit/preemption.py).
            plugins.append(SLURMEnvironment(auto_requeue=False))
            extra.append(PreemptionCheckpoint(run_dir / "checkpoints" / "last.ckpt"))
        # The run directory, loggers and checkpointing are genbench's; the rest of the trainer is the config's.
        return super().instantiate_trainer(default_root_dir=str(run_dir), logger=loggers,
                                           callbacks=user_callbacks + extra, plugins=plugins or None, **kwargs)


def _innermost(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _wandb_id(run_dir: Path, chash: str) -> str:
    """The W&B run id lives in the run directory, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_id"
    if path.exists():
        return path.read_text().strip()
    wandb_id = f"{run_dir.name}-{chash[:6]}".replace("/", "-")[:64]
    if _rank_from_env() == 0:
        atomic_write_text(path, wandb_id + "\n")
    return wandb_id


def _finish_wandb() -> None:
    import wandb

    if wandb.run is not None:
        try:
            wandb.finish()
        except SERVICE_GONE as e:  # the requeue below matters more than this attempt's last W&B rows
            log.warning("W&B could not finish this attempt's run (%s); requeueing anyway", e)


def last_checkpoint(run_dir: Path) -> Optional[Path]:
    path = run_dir / "checkpoints" / LAST
    return path if path.exists() else None


def recorded_first_stage(run_dir: Path) -> Optional[dict]:
    """The first stage the run's last checkpoint was trained on (a two-stage run being resumed), else None."""
    import torch

    ckpt = last_checkpoint(run_dir)
    if ckpt is None:
        return None
    return torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("genbench", {}).get("first_stage")


def check_first_stage(config: Namespace) -> None:
    """A first stage without a checkpoint that runs under run.root were trained on: say which, with the hash each
    needs (the model's own message, for a first stage never trained, says how to train one)."""
    given = config.model.init_args.get("first_stage")
    if given and not split(given)[1].is_file():
        runs = dependents(config.run.root, given)
        if runs:
            raise ConfigError(missing_message(given, config.model.init_args.get("tokenizer"), runs))


def _say_pins_kept(run_dir: Path) -> None:
    """Continuing an autoencoder that second stages were trained on: their checkpoints stay, and the new one is
    another first stage."""
    pins = sorted((run_dir / PINNED).glob("*.ckpt"))
    if pins and last_checkpoint(run_dir) is not None and _rank_from_env() == 0:
        print(f"{run_dir}: continuing a first stage that second stages were trained on; the {len(pins)} checkpoint(s) "
              f"they need stay in {run_dir / PINNED}, and a second stage trained on the continued one is a new run",
              flush=True)


def parse(args: list[str], instantiate: bool = True) -> GenbenchCLI:
    """GenbenchCLI, with a mistyped key explained in one line (the key and the closest valid one)."""
    try:
        return GenbenchCLI(args, instantiate=instantiate)
    except ArgumentError as e:
        short = explain(str(e), args)
        if short is None:
            raise
        raise ConfigError(short) from e


def fit(args: list[str]) -> Path:
    """Parse, validate, train; resumes from the run's last.ckpt when one exists. Returns the run directory."""
    cli = parse(args)
    assert cli.run_dir is not None
    _say_pins_kept(cli.run_dir)
    ckpt = last_checkpoint(cli.run_dir)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt) if ckpt else None)
    preemption = next((cb for cb in cli.trainer.checkpoint_callbacks if isinstance(cb, PreemptionCheckpoint)), None)
    if preemption is not None and preemption.requeue:
        job = slurm_job_id()
        if cli.trainer.is_global_zero:
            print(f"preempted at step {preemption.preempted_at_step}: saved {preemption.checkpoint}; "
                  f"{'requeueing SLURM job ' + job if job else 'resubmit the same command to resume'}", flush=True)
            _finish_wandb()  # the requeue ends the job at once: W&B would lose this attempt's unflushed curve
            if job:
                requeue_job(job)
    elif preemption is not None and preemption.preempted and cli.trainer.is_global_zero:
        print(f"stopped by SIGTERM at step {preemption.preempted_at_step}: saved {preemption.checkpoint}; SLURM "
              "requeues a preempted job, which resumes from it (after scancel, resubmit the same command)", flush=True)
    return cli.run_dir


def resolve(args: list[str]) -> DryRun:
    """Parse and validate an experiment without doing any work: its resolved config and run directory."""
    try:
        parse(args, instantiate=False)
    except DryRun as d:
        return d
    raise AssertionError("unreachable: GenbenchCLI(instantiate=False) always raises DryRun")
