"""Checks of a fit config that need no work done: numbers no run can use, the model against the shards'
manifest, the epoch length of shards without counts, a schedule shorter than what a run has trained. Each
raises ``ConfigError`` naming the key and the fix, before any class is built or run directory made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from jsonargparse import Namespace

from pipeline.data.manifest import load_manifest
from pipeline.data.remote import public_url

# init_args of a model or data module that count something (sizes, steps, samples): at least 1 ...
POSITIVE_KEYS = frozenset({"batch_size", "val_batch_size", "image_size", "samples_per_epoch", "max_pixels",
                           "latent_dim", "z_dim", "base_channels", "g_channels", "d_channels", "dim", "depth",
                           "heads", "num_res_blocks", "class_embed_dim", "palette_size", "n_critic",
                           "sample_batch_size", "timesteps", "sampling_steps", "temperature", "ch",
                           "latent_channels", "code_dim", "grad_clip"})
# ... or at least 0 (the loss weights: a negative one rewards the error it should punish)
NON_NEGATIVE_KEYS = frozenset({"num_workers", "shuffle_buffer", "weight_decay", "beta", "kl_warmup_steps",
                               "warmup_steps", "dropout", "p_uncond", "top_k", "guidance_scale", "kl_weight",
                               "commitment_weight", "disc_weight", "disc_start", "perceptual_weight"})
# ... or at least this, with the reason
AT_LEAST = {"codebook_size": (2, "a codebook of one code turns every image into the same tokens (a token model on it "
                                 "learns a loss of 0 and draws one image)")}


class ConfigError(ValueError):
    """A config that does not fit the data, found before any work."""


def check_model_fits_data(config: Namespace) -> dict:
    """Image size, channels and classes of the model against the shards' manifest, with the fix; returns the
    manifest."""
    model = config.model.init_args
    manifest = load_manifest(config.data.init_args.shards, config.data.init_args.get("val_shards"))
    train = manifest["splits"].get("train")
    if train is None:
        raise ConfigError(f"{config.data.init_args.shards} has no train split")
    data = config.data.init_args
    # the data module fits every image to data.image_size / data.channels when they are set
    h, w = (data.get("image_size"),) * 2 if data.get("image_size") else train["image_size"]
    channels = data.get("channels") or train["channels"]
    if (model.image_size, model.image_size) != (h, w):
        raise ConfigError(f"model.init_args.image_size={model.image_size} but the shards in "
                          f"{config.data.init_args.shards} hold {w}x{h} images; set image_size: {h}, or "
                          f"data.init_args.image_size: {model.image_size} to fit them on loading")
    if model.channels != channels:
        raise ConfigError(f"model.init_args.channels={model.channels} but the shards hold {channels}-channel "
                          f"images; set channels: {channels}, or data.init_args.channels: {model.channels}")
    n_classes = len(manifest["class_names"]) or len(train["label_histogram"])
    if model.num_classes is not None and model.num_classes != n_classes:
        raise ConfigError(f"model.init_args.num_classes={model.num_classes} but the shards have {n_classes} classes"
                          + ("" if n_classes else " (no labels)") + f"; set num_classes: {n_classes or 'null'}")
    return manifest


def check_epoch_length(config: Namespace, manifest: dict) -> None:
    """Shards without sample counts (a URL pattern, no manifest) need the epoch length given: said now, before
    a run directory exists, not by the loader at the bottom of Lightning's traceback."""
    data = config.data.init_args
    if data.get("samples_per_epoch") is None and \
            any(s.get("num_samples") is None for s in manifest["splits"]["train"]["shards"]):
        raise ConfigError(f"the shards of {public_url(str(data.shards))} come without a manifest to count their "
                          "samples: set data.init_args.samples_per_epoch (the epoch length over all ranks)")


def check_numbers(config: Namespace, weights: bool = True) -> None:
    """Numbers no run can use, each named with what it may be: before any class is built or directory made
    (else Lightning, Adam or jsonargparse stop it later, with their own tracebacks). ``weights``: also the weight
    files the config needs (not for a dry run, which may resolve a config on a machine without them)."""
    trainer, problems = config.trainer, []
    if trainer.get("max_steps") is not None and not (trainer.max_steps == -1 or trainer.max_steps > 0):
        problems.append(f"trainer.max_steps={trainer.max_steps} must be a positive number of steps (or -1: no limit)")
    if trainer.get("max_epochs") is not None and not (trainer.max_epochs == -1 or trainer.max_epochs > 0):
        problems.append(f"trainer.max_epochs={trainer.max_epochs} must be positive (or -1: no limit)")
    for group in ("model", "data"):
        for key, value in vars(config[group].get("init_args") or Namespace()).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if (key == "lr" or key.startswith("lr_") or key.endswith("_lr")) and not value > 0:
                problems.append(f"{group}.init_args.{key}={value} must be a positive learning rate")
            elif key in POSITIVE_KEYS and not value > 0:
                problems.append(f"{group}.init_args.{key}={value} must be positive")
            elif key in NON_NEGATIVE_KEYS and value < 0:
                problems.append(f"{group}.init_args.{key}={value} must be 0 or more")
            elif key in AT_LEAST and value < AT_LEAST[key][0]:
                problems.append(f"{group}.init_args.{key}={value} must be at least {AT_LEAST[key][0]}: "
                                f"{AT_LEAST[key][1]}")
            elif key == "sample_every_n_steps" and value < -1:  # 0: a grid only at the end; -1: none
                problems.append(f"{group}.init_args.{key}={value} must be a number of steps, 0 (only at the end) "
                                "or -1 (never)")
    problems += _adversarial_and_perceptual(config, weights)
    if problems:
        raise ConfigError("; ".join(problems))


def _adversarial_and_perceptual(config: Namespace, weights: bool) -> list[str]:
    """A discriminator that would never start, and a perceptual loss without the VGG16 weights it runs on (which
    would train a pixel-loss-only model under the name of one with LPIPS)."""
    model, max_steps, problems = config.model.get("init_args") or Namespace(), config.trainer.get("max_steps"), []
    disc_weight, disc_start = model.get("disc_weight") or 0, model.get("disc_start") or 0
    if disc_weight > 0 and max_steps and max_steps > 0 and disc_start >= max_steps:
        problems.append(f"model.init_args.disc_weight={disc_weight} with disc_start={disc_start} >= trainer.max_steps="
                        f"{max_steps}: the discriminator would never start; lower disc_start, or set disc_weight: 0")
    weight = model.get("perceptual_weight") or 0
    if weights and isinstance(weight, (int, float)) and weight > 0:
        from pipeline.models.perceptual import VGG16_WEIGHTS
        from pipeline.weights import WeightsUnavailable

        try:
            VGG16_WEIGHTS.resolve(model.get("perceptual_weights"))
        except WeightsUnavailable as e:
            problems.append(f"model.init_args.perceptual_weight={weight} needs the VGG16 weights LPIPS runs on: {e} "
                            "Or set perceptual_weight: 0 to train on the pixel loss alone (another run)")
    return problems


def check_schedule(run_dir: Path, max_steps: Optional[int]) -> None:
    """A run continues to a longer schedule; a shorter one than it has trained would hand its later weights to
    the benchmark under the shorter schedule's name."""
    info_path = run_dir / "run.json"
    if not max_steps or max_steps < 0 or not info_path.exists():
        return
    trained = json.loads(info_path.read_text()).get("global_step") or 0
    if trained > max_steps:
        raise ConfigError(f"{run_dir} has already trained {trained} steps, more than trainer.max_steps={max_steps}; "
                          f"continue it with a larger max_steps, or start another run with --run.name")


