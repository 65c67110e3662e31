"""The fit stage: ``genbench fit`` (LightningCLI over the families and ShardDataModule), its option groups,
checkpoints, preemption handling, provenance (run.json) and tracking."""

from pipeline.fit.train import ConfigError, DryRun, fit, resolve

__all__ = ["ConfigError", "DryRun", "fit", "resolve"]
