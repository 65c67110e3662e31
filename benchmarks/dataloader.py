"""Images per second delivered by ShardDataModule against torchvision ImageFolder, in the same run.

Both read the same 32x32 RGB images: as WebDataset shards written by ``genbench prepare`` (from the
folder) and as PNG files in an ImageFolder layout read with ``PILToTensor``. For reference, also the
plain ``WebDataset(...).decode("pil")`` pipeline. Figures go to ``benchmarks/results/dataloader.json``
(or ``--out``); targets from the foundation issue: at least 2x the ImageFolder rate per worker and at
least 10,000 images/s per worker.

    .venv/bin/python benchmarks/dataloader.py            # 20,000 images
    .venv/bin/python benchmarks/dataloader.py --small    # a quick run that only checks it still works

``--jpeg`` compares at larger sizes instead, as other tools' corpora come: 256x256 JPEGs (quality 90) in tar
shards written with Python's ``tarfile`` (no manifest, as img2dataset writes them) against ``ImageFolder`` over
the same JPEG files, both fitted to 64 and to 256 (``Resize`` + ``CenterCrop`` + ``PILToTensor`` for
ImageFolder; ``image_size`` with ``resize: center-crop`` for the data module). Target: >= 1.5x ImageFolder per
worker. Results in ``benchmarks/results/dataloader-jpeg256.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import CenterCrop, Compose, PILToTensor, Resize

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


def make_jpeg_corpus(root: Path, n: int, size: int = 256, classes: int = 10, per_shard: int = 500) -> None:
    """``n`` photo-like JPEGs (smooth shapes, mild noise, quality 90) as an ImageFolder tree under ``root/folder``
    and, with the same bytes, as tar shards ``root/shards/train-NNNNNN.tar`` (``.jpg`` + ``.cls``)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    (root / "shards").mkdir(parents=True)
    for c in range(classes):
        (root / "folder" / str(c)).mkdir(parents=True)
    tar = None
    for i in range(n):
        if i % per_shard == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(root / "shards" / f"train-{i // per_shard:06d}.tar", "w")
        base = (np.sin(xx / rng.uniform(8, 40)) + np.cos(yy / rng.uniform(8, 40)))[..., None] * \
            rng.uniform(30, 80, 3) + rng.uniform(60, 190, 3)
        img = np.clip(base + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        (root / "folder" / str(i % classes) / f"{i:06d}.jpg").write_bytes(data)
        for ext, payload in (("jpg", data), ("cls", str(i % classes).encode())):
            info = tarfile.TarInfo(f"{i:06d}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    if tar is not None:
        tar.close()


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


def fitted_shard_loader(shards: Path, workers: int, size: int):
    dm = ShardDataModule(str(shards), batch_size=BATCH, num_workers=workers, shuffle_buffer=1000,
                         samples_per_epoch=10**9, image_size=size, resize="center-crop")
    return dm.train_dataloader()


def fitted_imagefolder_loader(folder: Path, workers: int, size: int):
    ds = ImageFolder(str(folder), transform=Compose([Resize(size), CenterCrop(size), PILToTensor()]))
    return DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0)


def jpeg_main(args: argparse.Namespace) -> None:
    """256x256 JPEG shards fitted to 64 and 256 against ImageFolder with the equivalent transforms."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpeg_corpus(root, args.images)
        for size in (64, 256):
            for workers in (1, 2):
                shard = rate(fitted_shard_loader(root / "shards", workers, size), args.measure)
                folder = rate(fitted_imagefolder_loader(root / "folder", workers, size), args.measure)
                rows.setdefault(str(size), {})[str(workers)] = {
                    "shard_data_module": round(shard, 1), "imagefolder": round(folder, 1),
                    "shard_data_module_per_worker": round(shard / workers, 1),
                    "ratio_vs_imagefolder": round(shard / folder, 3), "target_1_5x_met": shard / folder >= 1.5}
                print(f"256 -> {size:>3}, {workers} worker(s): ShardDataModule {shard:,.0f} img/s, "
                      f"ImageFolder {folder:,.0f} img/s, ratio {shard / folder:.2f}")
    result = {"benchmark": "dataloader-jpeg256", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "host": {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count(),
                       "torch": torch.__version__},
              "images": args.images, "source": "256x256x3 JPEG quality 90, tar shards without manifest",
              "resize": "center-crop", "batch_size": BATCH, "images_measured": args.measure, "fitted_to": rows}
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


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
    parser.add_argument("--jpeg", action="store_true", help="256x256 JPEGs fitted to 64 and 256 (see above)")
    parser.add_argument("--out", help="results file (default: benchmarks/results/dataloader.json, or "
                                      "dataloader-jpeg256.json with --jpeg)")
    parser.add_argument("--png-compression", type=int, default=0,
                        help="zlib level of the PNGs in both the shards and the folder (prepare's default: 0)")
    args = parser.parse_args()
    if args.small:
        args.images, args.measure = 2000, 3000
    torch.set_num_threads(1)
    if args.jpeg:
        # 256x256 images decode ~50x slower than 32x32 ones: fewer of them measure as well
        args.images, args.measure = (300, 600) if args.small else (min(args.images, 4000), min(args.measure, 6000))
        args.out = args.out or str(Path(__file__).parent / "results" / "dataloader-jpeg256.json")
        jpeg_main(args)
        return
    args.out = args.out or str(Path(__file__).parent / "results" / "dataloader.json")
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
