"""The leaderboard stage: result records -> ranked table (``table``) -> markdown/CSV (``text``) and
self-contained HTML (``html``), written by ``build``; ``terminal`` prints a summary."""

from pipeline.leaderboard.build import build, log_to_wandb
from pipeline.leaderboard.table import load_records, ranked_rows
from pipeline.leaderboard.terminal import ranked_summary, record_summary

__all__ = ["build", "load_records", "log_to_wandb", "ranked_rows", "ranked_summary", "record_summary"]
