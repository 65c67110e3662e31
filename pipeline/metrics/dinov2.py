"""DINOv2 ViT-L/14 as a feature network for FD-DINOv2 (Stein et al. 2023; EDM2 reports it beside FID).

The architecture is timm's ``vit_large_patch14_dinov2``; the weights are Meta's own release
(``dinov2_vitl14_pretrain.pth``, the file ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')``
and dgm-eval load), resolved like Inception's: an explicit path, the torch hub cache, a download, and
offline an error naming the file and ``genbench fetch-weights dinov2``. timm's checkpoint filter maps
Meta's keys and resamples the position embedding from the 518 px training grid to 224 px.

Preprocessing follows dgm-eval and EDM2: 224 x 224 bicubic resize, ImageNet mean/std, the CLS token
after the final norm (1024 features). dgm-eval resizes uint8 PIL images; here the resize is torch's
bicubic with antialias on floats in [0, 1], clamped, so the batch stays on the device. The choice is
recorded in the protocol (``DINOV2_RESIZE``) with the weights' sha256.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.io import sha256_file
from pipeline.metrics.features import WeightFile

if TYPE_CHECKING:  # timm is imported when DINOv2 is used, not by every `genbench benchmark`
    from timm.models.vision_transformer import VisionTransformer

DINOV2_ARCH = "vit_large_patch14_dinov2"
DINOV2_WEIGHTS = WeightFile("DINOv2 ViT-L/14", "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
                            "--dinov2-weights", "dinov2")
DINOV2_SIZE = 224
DINOV2_RESIZE = f"torch-bicubic-antialias-{DINOV2_SIZE}, clamped to [0, 1]"
DINOV2_TRAIN_SIZE = 518  # the grid of Meta's position embedding
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_dinov2(img_size: int = DINOV2_SIZE) -> VisionTransformer:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    net = timm.create_model(DINOV2_ARCH, pretrained=False, img_size=img_size, num_classes=0)
    assert isinstance(net, VisionTransformer)
    return net


class DINOv2Features(nn.Module):
    """uint8 N x C x H x W (C = 1 or 3, any size) -> N x 1024 CLS features of DINOv2 ViT-L/14 at 224 px."""

    num_features = 1024
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, weights: str | os.PathLike) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        super().__init__()
        self.weights_path = str(weights)
        self.net = build_dinov2()
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(checkpoint_filter_fn(state, self.net))
        self.net.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def weights_sha256(self) -> str:
        return _sha256(self.weights_path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"DINOv2Features takes uint8 images, got {images.dtype}")
        x = images.float().div(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = nn.functional.interpolate(x, size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic", antialias=True,
                                      align_corners=False).clamp_(0, 1)
        return self.net((x - self.mean) / self.std)


@lru_cache(maxsize=4)
def _sha256(path: str) -> str:
    return sha256_file(path)


def architecture_only_dinov2_weights(path: str | os.PathLike) -> Path:
    """A weight file in Meta's format (518 px grid, its ``mask_token`` key) with timm's DINOv2 ViT-L/14
    architecture and random weights, for tests on machines that cannot download the real one. Never for
    reported numbers (records name the weights by sha256)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_dinov2(DINOV2_TRAIN_SIZE)
    state = net.state_dict()
    # Meta's file has a mask token (unused for features); timm's filter keys its key conversion on it
    state["mask_token"] = torch.zeros(1, int(net.embed_dim))
    torch.save(state, path)
    return Path(path)
