"""A full disk during `genbench benchmark` and `genbench leaderboard`: a real, small tmpfs filled up, so that the
write fails with ENOSPC part-way. Before: a raw OSError, orphaned grid PNGs (benchmark) or a new CSV beside the
old markdown (leaderboard). Now the files of one record (or board) are written together or not at all, and the
error names the path that could not be written."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import genbench
from pipeline import leaderboard
from pipeline.io import WriteError, write_new_json, write_together

PAGE = 4096  # tmpfs counts whole pages


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (genbench's CI runs as root, as `.ci/run` installs with apt-get)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave_pages: int) -> None:
    """Fill ``disk`` up to ``leave_pages`` free pages."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    filler.write_bytes(b"\0" * max(0, free - leave_pages * PAGE - (filler.stat().st_size if filler.exists() else 0)))
    stat = os.statvfs(disk)
    assert stat.f_bavail * stat.f_frsize == leave_pages * PAGE


def _pages(n: int) -> int:
    return -(-n // PAGE)


def test_write_together_leaves_none_of_the_files_on_enospc(small_disk):
    _fill(small_disk, 2)
    files = {small_disk / "grids" / "a.png": b"x" * PAGE, small_disk / "a.json": b"y" * (3 * PAGE)}
    with pytest.raises(WriteError) as err:
        write_together(files, new=frozenset({small_disk / "a.json"}))
    assert f"cannot write {small_disk / 'a.json'}: the file system is full" in str(err.value)
    assert "ENOSPC" in str(err.value)
    assert not (small_disk / "a.json").exists() and not (small_disk / "grids" / "a.png").exists()
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == ["filler"]  # no temporary file either


def _images(folder: Path, n: int = 100) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


@pytest.mark.slow
def test_benchmark_on_a_full_disk_names_the_path_and_leaves_no_orphaned_grid(tmp_path, small_disk, digits_shards):
    images = _images(tmp_path / "generated")
    args = ["benchmark", "--images", str(images), "--reference", str(digits_shards), "--metrics", "fd_auditor"]
    roomy = genbench(*args, "--results", str(tmp_path / "roomy"), "--name", "gen")
    assert roomy.returncode == 0, roomy.stderr[-3000:]
    (record,) = (tmp_path / "roomy").glob("*.json")
    (grid,) = (tmp_path / "roomy" / "grids").glob("*.png")
    # room for the grid, not for the record: the grid used to stay behind, alone
    assert _pages(record.stat().st_size) >= 1
    _fill(small_disk, _pages(grid.stat().st_size))
    results = small_disk / "results"
    full = genbench(*args, "--results", str(results), "--name", "gen")
    assert full.returncode == 2, full.stderr[-3000:]
    assert re.search(rf"cannot write {re.escape(str(results))}/gen-n100-[^ ]+\.json: the file system is full",
                     full.stderr), full.stderr[-2000:]
    assert "Traceback" not in full.stderr
    left = sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file())
    assert left == [], left


def _record(name: str, fd: float) -> dict:
    return {"record_version": 1, "name": name, "run_id": name, "family": "vae", "created": "2026-01-01T00:00:00",
            "metrics": {"fd_auditor": fd}, "skipped": {}, "protocol": {"protocol_id": "p", "num_samples": 100},
            "budget": None, "images_seen": 1000, "device_hours": 0.01}


def test_leaderboard_on_a_full_disk_keeps_the_previous_board_whole(tmp_path, small_disk):
    results = tmp_path / "results"
    for i in range(3):
        write_new_json(results / f"r{i}.json", _record(f"r{i}", 0.1 * (i + 1)))
    board = small_disk / "board"
    leaderboard.build(results, board, wandb="off")
    before = {p.name: p.read_bytes() for p in board.iterdir()}
    assert set(before) == {"leaderboard.md", "leaderboard.csv", "leaderboard.html"}
    write_new_json(results / "r3.json", _record("r3", 0.05))  # a new row: every file changes
    csv_pages = _pages(len(before["leaderboard.csv"])) + 1
    _fill(small_disk, csv_pages)  # room for a new csv, not for the html and md after it
    proc = genbench("leaderboard", "--results", str(results), "--out", str(board), "--wandb", "off")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cannot write {board}" in proc.stderr and "the file system is full" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in board.iterdir()} == before  # the old board, all three files
    assert json.loads((results / "r3.json").read_text())["name"] == "r3"
