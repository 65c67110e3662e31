"""The benchmark scripts keep working (their figures are measured outside the tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_dataloader_benchmark_writes_its_comparison(tmp_path):
    out = tmp_path / "dataloader.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dataloader.py"), "--small", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for workers in ("1", "2"):
        row = result["workers"][workers]
        assert row["shard_data_module"] > 0 and row["imagefolder"] > 0
        assert row["ratio_vs_imagefolder"] == pytest.approx(row["shard_data_module"] / row["imagefolder"], rel=0.01)
