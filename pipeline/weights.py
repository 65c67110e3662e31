"""Published weight files of the networks genbench runs but does not train (InceptionV3, DINOv2, CLIP, the VGG16
of LPIPS): where each downloads from, and the offline resolution every one of them shares (an explicit path,
then the torch hub cache, then a download; offline, an error naming the file and `genbench fetch-weights`).
Below metrics and models, which both resolve weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


class WeightsUnavailable(FileNotFoundError):
    """Weights that are neither at the given path, nor cached, nor downloadable."""


@dataclass(frozen=True)
class WeightFile:
    """A network's published weight file: where it downloads from, and how a user names it on the command line."""

    network: str  # as the error message names it
    url: str
    option: str  # the command-line option that passes an explicit path
    fetch: str  # the argument of `genbench fetch-weights` that downloads it
    filename: str = ""  # the cached file's name when the URL's last part is too generic to share a directory

    @property
    def file(self) -> str:
        return self.filename or self.url.rsplit("/", 1)[-1]

    def cache_path(self) -> Path:
        """Where torch.hub keeps it (torch-fidelity and torch.hub.load('facebookresearch/dinov2') look there too)."""
        return Path(torch.hub.get_dir()) / "checkpoints" / self.file

    def download(self, progress: bool = True) -> Path:
        """Into the torch hub cache (``genbench fetch-weights``); torch.hub writes a temp file, then moves it."""
        path = self.cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(self.url, str(path), progress=progress)
        return path

    def resolve(self, explicit: Optional[str] = None, download: bool = True) -> Path:
        """Explicit path, then the torch hub cache, then a download; else WeightsUnavailable saying what to do."""
        if explicit:
            path = Path(explicit)
            if not path.is_file():
                raise WeightsUnavailable(f"{self.option} {path} does not exist; pass the path of {self.file}, "
                                         f"or omit the option to use {self.cache_path()}")
            return path
        cached = self.cache_path()
        if cached.is_file():
            return cached
        error = "downloads disabled"
        if download and os.environ.get("GENBENCH_OFFLINE", "0") != "1":
            try:
                return self.download(progress=False)
            except Exception as e:  # no network on compute nodes is the normal case, not a crash
                error = f"{type(e).__name__}: {e}"
        raise WeightsUnavailable(
            f"{self.network} weights {self.file} not found: no {self.option} given, {cached} does not exist, "
            f"and the download failed ({error}). On a machine with internet run `genbench fetch-weights "
            f"{self.fetch}` (it writes {cached}; copy it to the same path here), or pass {self.option} PATH."
        )


