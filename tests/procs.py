"""What /proc says about processes, for tests that check which processes a run starts and how they treat
signals."""

from __future__ import annotations

from pathlib import Path


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (of every one of its threads)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]
