"""Option groups that an experiment YAML holds beside LightningCLI's model/data/trainer sections.

Each is a dataclass so that jsonargparse validates it (an unknown key fails with its name) and
``genbench fit --help`` documents it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pipeline.metrics import DEFAULT as DEFAULT_METRICS


@dataclass
class RunOptions:
    """Where the run lives.

    Args:
        name: run name; the run directory is ``<root>/<name>-<first 8 hex of the config hash>``.
        root: directory holding all run directories.
        id: explicit run id (directory name), instead of name + config hash.
        checkpoint_every_n_steps: optimizer steps between checkpoints (``last.ckpt`` is also written at the end).
        budget: stop training at this budget, one of ``{images: N}``, ``{flops: F}`` (training FLOPs, measured)
            or ``{device_hours: H}``: the same key for every family (pipeline/fit/budget.py). Set
            ``trainer.max_steps: -1`` to let the budget alone decide.
        evaluate_every: keep a checkpoint at every multiple of this budget (same units), for
            ``genbench benchmark --checkpoints all``.
    """

    name: str = "run"
    root: str = "runs"
    id: Optional[str] = None
    checkpoint_every_n_steps: int = 500
    budget: Optional[dict[str, float]] = None
    evaluate_every: Optional[dict[str, float]] = None


@dataclass
class PrepareOptions:
    """How the shards named by ``data.init_args.shards`` are made when they do not exist yet
    (``genbench prepare`` with these options).

    Args:
        source: ``digits``, ``folder:PATH`` or ``torchvision:NAME``.
        val_fraction: fraction of the samples held out as the validation split.
        seed: seed of the train/val split.
        shard_size: samples per shard (``5000``) or bytes per shard (``64MB``).
        image_size: resize images to this square size (pixels); None keeps the source's size.
        resize: with image_size: ``center-crop`` (shorter side to the size, then the central square) or
            ``stretch``.
        png_compression: zlib level of the lossless PNGs (0: largest files, fastest to decode).
        channels: convert every image to grayscale (1) or RGB (3); None keeps the source's.
        root: local root of a torchvision dataset.
    """

    source: Optional[str] = None
    val_fraction: float = 0.1
    seed: int = 0
    shard_size: str = "10000"
    image_size: Optional[int] = None
    resize: str = "center-crop"
    png_compression: int = 0
    channels: Optional[int] = None
    root: str = "data/torchvision"


@dataclass
class BenchmarkOptions:
    """Defaults of ``genbench benchmark`` for this run.

    Args:
        num_samples: generated images scored against the reference (50000 for paper numbers).
        seed: seed of the generated images.
        batch_size: images per batch when extracting features (a model samples in batches of its
            ``sample_batch_size``).
        metrics: comma-separated subset of fid,is,kid,pr,fd_auditor,audit,memorization,fd_dinov2 (default: all but
            fd_dinov2; the Inception and DINOv2 ones need their weights).
        inception_weights: explicit path of torch-fidelity's InceptionV3 weights (else the torch hub cache).
        dinov2_weights: explicit path of the DINOv2 ViT-L/14 weights for fd_dinov2 (else the torch hub cache).
        auditor_epochs: training epochs of the auditor classifier when it is not cached yet.
        results: directory of the result records.
        sample_precision: ``fp32`` samples in full precision; ``bf16`` under bf16 autocast (faster on a GPU,
            recorded with the result).
    """

    num_samples: int = 50000
    seed: int = 0
    batch_size: int = 250
    metrics: str = ",".join(DEFAULT_METRICS)
    inception_weights: Optional[str] = None
    dinov2_weights: Optional[str] = None
    auditor_epochs: int = 10
    results: str = "results"
    sample_precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class TrackingOptions:
    """Experiment tracking.

    Args:
        wandb: log to Weights & Biases (offline unless an API key is configured or WANDB_MODE says otherwise).
        project: W&B project name.
    """

    wandb: bool = True
    project: str = "genbench"
