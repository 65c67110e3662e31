"""torch-fidelity's InceptionV3 as a network, and the offline resolution of its weights (the scorer's
interface to it is ``InceptionExtractor`` in ``extractors.py``).

InceptionV3 is torch-fidelity's ``inception-v3-compat`` (the TF-compatible port, so FID matches
published numbers). Its weights are resolved from an explicit path, then the torch hub cache, then a
download; offline, the error names the missing file and the command that fetches it.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from pipeline.io import sha256_file
from pipeline.weights import WeightFile, WeightsUnavailable  # noqa: F401 -- re-exported: metrics name them here

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]
INCEPTION_FEATURES = "2048"  # pool3: FID, KID and precision/recall
INCEPTION_LOGITS = "logits_unbiased"  # the Inception Score's logits, as torch-fidelity takes them
INCEPTION_RESIZE = "tf1-bilinear-299"  # torch-fidelity resizes every input to 299x299 as TF 1.x did


INCEPTION_WEIGHTS = WeightFile("InceptionV3", URL_INCEPTION_V3, "--inception-weights", "inception")


def inception_cache_path() -> Path:
    return INCEPTION_WEIGHTS.cache_path()


def fetch_inception_weights(progress: bool = True) -> Path:
    return INCEPTION_WEIGHTS.download(progress)


def resolve_inception_weights(explicit: Optional[str] = None, download: bool = True) -> Path:
    return INCEPTION_WEIGHTS.resolve(explicit, download)


@lru_cache(maxsize=4)
def weights_sha256(path: str) -> str:
    return sha256_file(path)


@contextlib.contextmanager
def strict_fp32(enabled: bool = True) -> Iterator[None]:
    """TF32 off while extracting features, so a number does not depend on the GPU generation."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class InceptionFeatures(nn.Module):
    """uint8 N x C x H x W (C = 1 or 3, any size) -> (2048 pool3 features, 1008 unbiased logits) of
    torch-fidelity's InceptionV3, from one forward pass."""

    num_features = 2048
    num_logits = 1008
    name = INCEPTION_NAME

    def __init__(self, weights: str | os.PathLike) -> None:
        super().__init__()
        self.weights_path = str(weights)
        self.extractor = FeatureExtractorInceptionV3(INCEPTION_NAME, [INCEPTION_FEATURES, INCEPTION_LOGITS],
                                                     feature_extractor_weights_path=self.weights_path)

    @property
    def weights_sha256(self) -> str:
        return weights_sha256(self.weights_path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionFeatures takes uint8 images, got {images.dtype}")
        if images.shape[1] == 1:  # grayscale: the same intensity in R, G and B
            images = images.expand(-1, 3, -1, -1)
        pool, logits = self.extractor(images)
        return pool, logits


def architecture_only_inception_weights(path: str | os.PathLike) -> Path:
    """A weight file with torch-fidelity's InceptionV3 architecture and random weights, for tests and
    timing benchmarks on machines that cannot download the real file. Never for reported numbers:
    its features are not Inception's (records name the weights by sha256, so they cannot pass for it).

    Random weights alone give near-identical features for all images: batch norm's running statistics
    are still 0/1. A few forward passes in training mode, with the cumulative average (momentum None),
    set them to the statistics of smooth random images, so that features differ between images.
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        # only the weight *loading* is bypassed, to get the untrained architecture to build a file from
        with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
                mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}):
            net = fe.FeatureExtractorInceptionV3(INCEPTION_NAME, [INCEPTION_FEATURES, INCEPTION_LOGITS])
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    net.train()
    with torch.no_grad():
        for _ in range(3):
            coarse = torch.randint(0, 256, (8, 3, 8, 8), generator=generator).float()
            net(nn.functional.interpolate(coarse, size=64, mode="bilinear").to(torch.uint8))
    torch.save(net.state_dict(), path)
    return Path(path)
