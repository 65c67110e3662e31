"""Two real DDP processes (gloo on CPU) read disjoint samples and the same number of batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.shards import write_shards
from pipeline.data.sources import DigitsSource

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.ddp
@pytest.mark.parametrize("shard_size,workers", [
    (450, 3),  # 4 shards, 3 workers per rank: more workers than shards on a rank -> split by sample
    (135, 2),  # 12 shards over 2 ranks x 2 workers -> split by shard
])
def test_two_ranks_see_disjoint_samples_and_equal_batches(tmp_path, shard_size, workers):
    shards = tmp_path / "shards"
    manifest = write_shards(DigitsSource(), shards, shard_size=shard_size, progress=False)
    n_shards = len(manifest["splits"]["train"]["shards"])
    out = tmp_path / "out"
    out.mkdir()
    samples_per_epoch = 0  # default: one pass, as many batches as every worker surely fills
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_probe.py"), str(shards), str(out), str(workers),
                           str(samples_per_epoch)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # sample split: each of 6 consumers surely gets 1617 // 6 = 269 -> 8 batches of 32 per worker, x 3 workers;
    # shard split: each of 4 consumers gets 3 of the 12 shards, the smallest 3 hold 402 -> 12 per worker, x 2
    expected_batches = 24
    epochs = []
    for epoch in (0, 1):
        ranks = [json.loads((out / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert [r["world_size"] for r in ranks] == [2, 2]
        assert ranks[0]["batches"] == ranks[1]["batches"] == expected_batches
        k0, k1 = ranks[0]["keys"], ranks[1]["keys"]
        assert len(set(k0)) == len(k0) and len(set(k1)) == len(k1), "a rank saw a sample twice in one epoch"
        assert not set(k0) & set(k1), "the two ranks trained on the same samples"
        epochs.append(k0)
    assert epochs[0] != epochs[1], "epoch 1 repeated epoch 0's order"
    assert (n_shards < 2 * workers) == (shard_size == 450)
