"""Images/s per loader worker that ShardDataModule delivers from the same 32x32 shards read locally (mmap), over
HTTP from 127.0.0.1, and from an S3-compatible server (moto) on 127.0.0.1, in the same run (target: HTTP >= 0.8x
local). Also HTTP with a ``cache_dir``, measured after one pass has filled it: what later epochs of a remote corpus
cost. Written to ``benchmarks/results/remote-shards.json`` (or ``--out``).

The HTTP server is the tests' range-answering static server (``tests/shard_server.py``: what nginx or an object
store answers to a range request), in a thread of its own process; moto's S3 server is started as a process.
Both on loopback, so the figures are the reader's cost (range requests, tar parsing from a stream instead of an
mmap), not a network's.

    PYTHONPATH=. .venv/bin/python benchmarks/remote_shards.py            # 20,000 images, 30,000 per measurement
    PYTHONPATH=. .venv/bin/python benchmarks/remote_shards.py --small    # a quick run that only checks it works
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import REPO, merge_results
from benchmarks.dataloader import make_images, rate
from pipeline.data.datamodule import ShardDataModule
from pipeline.data.shards import write_shards
from pipeline.data.sources import FolderSource

sys.path.insert(0, str(REPO / "tests"))
from shard_server import ShardServer, start_moto  # noqa: E402  (test scaffolding, not part of the package)


def loader(shards: str, workers: int, **options):
    dm = ShardDataModule(shards, batch_size=256, num_workers=workers, shuffle_buffer=1000, samples_per_epoch=10**9,
                         **options)
    return dm.train_dataloader()


def s3_copy(shards: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server with a copy of the shards: (process, s3:// URL of the copy)."""
    import fsspec

    proc, endpoint = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir("bench")
    fs.put(str(shards) + "/", "bench/shards/", recursive=True)
    return proc, "s3://bench/shards/"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--measure", type=int, default=30000, help="images read per measurement")
    parser.add_argument("--small", action="store_true", help="2,000 images, 3,000 per measurement")
    parser.add_argument("--workers", default="1,2", help="loader workers per measurement (default 1,2)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "remote-shards.json"))
    args = parser.parse_args()
    if args.small:
        args.images, args.measure = 2000, 3000
    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "folder", args.images)
        write_shards(FolderSource(root / "folder"), root / "shards", val_fraction=0.0, shard_size=2000,
                     progress=False)
        moto, s3_url = s3_copy(root / "shards")
        try:
            with ShardServer(root / "shards") as server:
                for workers in (int(w) for w in args.workers.split(",")):
                    local = rate(loader(str(root / "shards"), workers), args.measure)
                    http = rate(loader(server.url + "/", workers), args.measure)
                    s3 = rate(loader(s3_url, workers), args.measure)
                    # a whole pass first (uncounted): every shard is then in the cache
                    cached = rate(loader(server.url + "/", workers, cache_dir=str(root / f"cache-{workers}")),
                                  args.measure, warmup_batches=args.images // 256 + 2)
                    rows[str(workers)] = {"local_mmap": round(local, 1), "http": round(http, 1), "s3": round(s3, 1),
                                          "http_cached": round(cached, 1),
                                          "http_vs_local": round(http / local, 3), "s3_vs_local": round(s3 / local, 3),
                                          "http_cached_vs_local": round(cached / local, 3),
                                          "http_per_worker": round(http / workers, 1)}
                    print(f"workers {workers}: local {local:,.0f} img/s, http {http:,.0f} ({http / local:.2f}x), "
                          f"s3 {s3:,.0f} ({s3 / local:.2f}x), http after the cache filled {cached:,.0f} "
                          f"({cached / local:.2f}x)", flush=True)
        finally:
            moto.terminate()
            moto.wait(timeout=10)
    merge_results(Path(args.out), "remote_shards", {"workers": rows, "images": args.images,
                                                   "images_measured": args.measure, "image_size": "32x32x3",
                                                   "servers": "127.0.0.1: range-answering HTTP server, moto S3"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
