"""Sources of labelled images: each yields (uint8 HWC image, label or None, attributes dict).

Sources know nothing of shards. Every source supports ``len`` and random access so that
``genbench prepare`` can write a seeded train/val split without holding the data in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from pipeline.data.imagefile import MAX_PIXELS, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
TORCHVISION_DATASETS = ("CIFAR10", "MNIST", "FashionMNIST", "CelebA")


class SourceError(ValueError):
    """A source that cannot be read, with the reason and what to do about it."""


@dataclass
class Sample:
    image: np.ndarray  # uint8, H x W x C
    label: Optional[int]
    attributes: dict[str, Any] = field(default_factory=dict)


class Source:
    """Random-access collection of samples. ``class_names`` is empty for unlabelled data."""

    name: str
    class_names: list[str]
    attribute_names: list[str] = []

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        """The sample; raises ``pipeline.data.imagefile.ImageError`` for one that cannot be used (``prepare``
        skips it and lists it in the manifest under ``describe(index)``)."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"sample {index}"


def as_hwc(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image or array -> uint8 HWC array with 1 (grayscale) or 3 (RGB) channels."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        image = np.asarray(image)
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    return image


class DigitsSource(Source):
    """scikit-learn's handwritten digits: 1,797 8x8 grayscale images, 10 classes, inside the wheel."""

    name = "digits"

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are counts 0..16 of an 4x4 block; spread them over 0..255 so the
        # images use the same range as every other source.
        self.images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        self.labels = digits.target.astype(np.int64)
        self.class_names = [str(c) for c in digits.target_names]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        return Sample(self.images[index], int(self.labels[index]), {"source_id": f"digits:{index}"})


class FolderSource(Source):
    """An image folder: one subfolder per class (labels from the sorted folder names), or flat (no labels).

    Images are read as ``pipeline.data.imagefile.load_image`` reads them: 16-bit ones scaled by their bit depth,
    EXIF orientation applied, one above ``max_pixels`` (or damaged) raising ``ImageError``."""

    def __init__(self, root: str | os.PathLike, max_pixels: Optional[int] = MAX_PIXELS) -> None:
        self.root = Path(root)
        self.name = f"folder:{self.root}"
        self.max_pixels = max_pixels
        if not self.root.is_dir():
            raise SourceError(f"image folder {self.root} does not exist or is not a directory")
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        top = sorted(f for f in self.root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        files: list[tuple[Path, Optional[int]]] = []
        if subdirs:
            if top:  # they have no class: dropping them would lose data, guessing one would mislabel it
                names = ", ".join(f.name for f in top[:5]) + (f" and {len(top) - 5} more" if len(top) > 5 else "")
                raise SourceError(
                    f"image folder {self.root} has class subfolders ({', '.join(p.name for p in subdirs[:5])}) "
                    f"and {len(top)} image(s) beside them with no class: {names}; move each into its class's "
                    "subfolder (or remove it), or give a folder of only images for unlabelled data")
            self.class_names = [p.name for p in subdirs]
            for label, d in enumerate(subdirs):
                files += [(f, label) for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            self.class_names = []
            files = [(f, None) for f in top]
        if not files:
            raise SourceError(
                f"image folder {self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "put images in it directly, or in one subfolder per class"
            )
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.files[index]
        return Sample(load_image(path, max_pixels=self.max_pixels), label, {"source_id": self.describe(index)})

    def describe(self, index: int) -> str:
        return str(self.files[index][0].relative_to(self.root))


class TorchvisionSource(Source):
    """A torchvision dataset read from a local root (CIFAR10, MNIST, FashionMNIST, CelebA)."""

    def __init__(self, dataset: str, root: str | os.PathLike, split: str = "train", download: bool = False,
                 label_attribute: Optional[str] = None) -> None:
        import torchvision.datasets as tvd

        if dataset not in TORCHVISION_DATASETS:
            raise SourceError(f"unknown torchvision dataset {dataset!r}; choose one of "
                              f"{', '.join(TORCHVISION_DATASETS)}")
        self.name = f"torchvision:{dataset}"
        self.root = Path(root)
        self.attribute_names = []
        self.label_attribute = label_attribute
        try:
            if dataset == "CelebA":
                split = {"train": "train", "test": "test"}.get(split, split)
                self.ds = tvd.CelebA(str(self.root), split=split, target_type="attr", download=download)
                self.attribute_names = list(self.ds.attr_names[:40])
                if label_attribute is not None:
                    if label_attribute not in self.attribute_names:
                        raise SourceError(f"CelebA has no attribute {label_attribute!r}; choose one of "
                                          f"{self.attribute_names}")
                    self.class_names = [f"not {label_attribute}", label_attribute]
                else:
                    self.class_names = []
            else:
                cls = getattr(tvd, dataset)
                self.ds = cls(str(self.root), train=(split == "train"), download=download)
                self.class_names = list(self.ds.classes)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise SourceError(
                f"{dataset} not found under {self.root.resolve()} ({e}). On a machine with internet run: "
                f"genbench prepare torchvision:{dataset} --root {self.root} --download --out <DIR>"
            ) from e

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> Sample:
        image, target = self.ds[index]
        attributes: dict[str, Any] = {"source_id": f"{self.name}:{index}"}
        if self.attribute_names:
            values = [int(v) for v in target.tolist()]
            attributes.update(zip(self.attribute_names, values))
            label = values[self.attribute_names.index(self.label_attribute)] if self.label_attribute else None
        else:
            label = int(target)
        return Sample(as_hwc(image), label, attributes)


def open_source(spec: str, root: Optional[str] = None, download: bool = False,
                label_attribute: Optional[str] = None, max_pixels: Optional[int] = MAX_PIXELS) -> Source:
    """Parse a source spec: ``digits``, ``folder:PATH`` or ``torchvision:NAME``."""
    if spec == "digits":
        return DigitsSource()
    if spec.startswith("folder:"):
        return FolderSource(spec.split(":", 1)[1], max_pixels)
    if spec.startswith("torchvision:"):
        return TorchvisionSource(spec.split(":", 1)[1], root or "data/torchvision", download=download,
                                 label_attribute=label_attribute)
    raise SourceError(f"unknown source {spec!r}; use digits, folder:PATH or torchvision:NAME "
                      f"(NAME one of {', '.join(TORCHVISION_DATASETS)})")
