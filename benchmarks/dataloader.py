"""Images per second delivered by ShardDataModule against torchvision ImageFolder, in the same run.

Both read the same 32x32 RGB images: as WebDataset shards written by ``genbench prepare`` (from the
folder) and as PNG files in an ImageFolder layout read with ``PILToTensor``. For reference, also the
plain ``WebDataset(...).decode("pil")`` pipeline. Figures go to ``benchmarks/results/dataloader.json``
(or ``--out``); targets from the foundation issue: at least 2x the ImageFolder rate per worker and at
least 10,000 images/s per worker.

    .venv/bin/python benchmarks/dataloader.py            # 20,000 images
    .venv/bin/python benchmarks/dataloader.py --small    # a quick run that only checks it still works
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import PILToTensor

from pipeline.data.datamodule import ShardDataModule
from pipeline.data.shards import write_shards
from pipeline.data.sources import FolderSource
from pipeline.io import atomic_write_json

BATCH = 256


def make_images(root: Path, n: int, classes: int = 10, png_compression: int = 0) -> None:
    """CIFAR-sized images with some structure (smooth gradients + noise), in class subfolders, as PNGs
    with the same zlib level as the shards, so both loaders decode the same bytes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    for c in range(classes):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = (np.sin(xx / rng.uniform(2, 8)) + np.cos(yy / rng.uniform(2, 8))) * 60 + 128
        img = np.clip(base[..., None] + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / str(i % classes) / f"{i:06d}.png", compress_level=png_compression)


def rate(loader, n_images: int, warmup_batches: int = 2) -> float:
    """Images per second over ``n_images`` after a warm-up (worker start-up is not counted)."""
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    seen, t0 = 0, time.perf_counter()
    while seen < n_images:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        seen += len(batch["image"] if isinstance(batch, dict) else batch[0])
    return seen / (time.perf_counter() - t0)


def shard_loader(shards: Path, workers: int):
    dm = ShardDataModule(str(shards), batch_size=BATCH, num_workers=workers, shuffle_buffer=1000,
                         samples_per_epoch=10**9)  # endless stream: no epoch restarts while timing
    return dm.train_dataloader()


def imagefolder_loader(folder: Path, workers: int):
    ds = ImageFolder(str(folder), transform=PILToTensor())
    return DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0)


def plain_webdataset_loader(shards: Path, workers: int):
    ds = (wds.WebDataset(sorted(str(p) for p in shards.glob("train-*.tar")), shardshuffle=False,
                         nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, empty_check=False)
          .repeat().shuffle(1000).decode("pil").to_tuple("png", "cls").map_tuple(PILToTensor(), int))
    return DataLoader(ds, batch_size=BATCH, num_workers=workers, persistent_workers=workers > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000, help="images in the data set")
    parser.add_argument("--measure", type=int, default=30000, help="images read per measurement")
    parser.add_argument("--small", action="store_true", help="2,000 images, 3,000 per measurement")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dataloader.json"))
    parser.add_argument("--png-compression", type=int, default=0,
                        help="zlib level of the PNGs in both the shards and the folder (prepare's default: 0)")
    args = parser.parse_args()
    if args.small:
        args.images, args.measure = 2000, 3000
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "folder", args.images, png_compression=args.png_compression)
        write_shards(FolderSource(tmp / "folder"), tmp / "shards", val_fraction=0.0, shard_size=2000,
                     png_compression=args.png_compression, progress=False)
        rows = {}
        for workers in (1, 2):
            rows[workers] = {
                "shard_data_module": rate(shard_loader(tmp / "shards", workers), args.measure),
                "imagefolder": rate(imagefolder_loader(tmp / "folder", workers), args.measure),
                "plain_webdataset_pil": rate(plain_webdataset_loader(tmp / "shards", workers), args.measure),
            }
    result = {
        "benchmark": "dataloader",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count(),
                 "torch": torch.__version__},
        "images": args.images, "image_size": "32x32x3", "batch_size": BATCH, "images_measured": args.measure,
        "png_compression": args.png_compression,
        "workers": {},
    }
    print(f"{'workers':>7} {'ShardDataModule':>16} {'ImageFolder':>12} {'WebDataset(pil)':>16} {'ratio':>6} "
          f"{'per worker':>11}")
    for workers, r in rows.items():
        ratio = r["shard_data_module"] / r["imagefolder"]
        result["workers"][str(workers)] = {
            **{k: round(v, 1) for k, v in r.items()},
            "ratio_vs_imagefolder": round(ratio, 3),
            "shard_data_module_per_worker": round(r["shard_data_module"] / workers, 1),
            "target_2x_imagefolder_met": ratio >= 2.0,
            "target_10k_per_worker_met": r["shard_data_module"] / workers >= 10_000,
        }
        print(f"{workers:>7} {r['shard_data_module']:>16,.0f} {r['imagefolder']:>12,.0f} "
              f"{r['plain_webdataset_pil']:>16,.0f} {ratio:>6.2f} {r['shard_data_module'] / workers:>11,.0f}")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
