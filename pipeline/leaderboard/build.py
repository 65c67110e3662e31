"""``genbench leaderboard``: write leaderboard.md, .csv and .html from a results directory, and optionally
log the table to W&B."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.fit.tracking import wandb_mode
from pipeline.io import write_together
from pipeline.leaderboard.html import render_html
from pipeline.leaderboard.table import COLUMNS, budget_tables, ranked_rows, ranks
from pipeline.leaderboard.text import render_csv, render_markdown


def build(results: str | Path, out: str | Path, wandb: str = "auto", sort: Optional[str] = None) -> Optional[Path]:
    """Write leaderboard.md, .csv and .html into ``out``, ranked by ``sort`` (default: the primary metric);
    returns the markdown path (None if no records)."""
    rows, metric = ranked_rows(results, sort)
    if not rows:
        return None
    every, _ = ranked_rows(results, sort, every_point=True)  # every budget point of every run
    tables = budget_tables(every, metric)
    out = Path(out)
    path = out / "leaderboard.md"
    # together: a full disk leaves the previous three, never a new csv beside an old md
    write_together({out / "leaderboard.csv": render_csv(every, out).encode(),
                    out / "leaderboard.html": render_html(rows, metric, ranks(rows), results, out, tables,
                                                          every).encode(),
                    path: render_markdown(rows, metric, results, out, tables).encode()})
    log_to_wandb(rows, out, wandb)
    return path


def log_to_wandb(rows: list[dict], out: Path, mode: str = "auto",
                 project: str = "genbench") -> Optional[str]:
    """Log the table as a W&B Table (``auto``: only when W&B is logged in); returns the run's directory."""
    resolved = {"auto": "online" if wandb_mode() == "online" else "off"}.get(mode, mode)
    if resolved == "off":
        return None
    if resolved not in ("online", "offline"):
        raise ValueError(f"--wandb {mode!r}: use auto, online, offline or off")
    import wandb

    run = wandb.init(project=project, job_type="leaderboard", name=f"leaderboard-{out.name}", dir=str(out),
                     mode="online" if resolved == "online" else "offline", reinit="create_new")
    columns: list[tuple[str, Callable[[dict], Any]]] = [(c.header, c.value) for c in COLUMNS]
    headers: list[str | int] = ["rank", *(h for h, _ in columns), "record"]
    table = wandb.Table(columns=headers,
                        data=[[rank] + [get(r) for _, get in columns] + [os.path.basename(r["_file"])]
                              for rank, r in zip(ranks(rows), rows)])
    run.log({"leaderboard": table})
    directory = run.dir
    run.finish()
    return directory
