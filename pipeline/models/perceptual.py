"""LPIPS (Zhang et al. 2018) as the first stage's perceptual loss, the VGG16 variant LDM and VQGAN train with.

torchmetrics' LPIPS network, its linear heads from the torchmetrics wheel, and the ImageNet VGG16 backbone
resolved like Inception's weights (``--model.init_args.perceptual_weights``, the torch hub cache where
``genbench fetch-weights vgg16`` puts torchvision's file, then a download). ``genbench fit`` refuses a
perceptual weight without them (pipeline/fit/validate.py): a run would train on the pixel loss alone under the
name of one with LPIPS. Built otherwise without them, the loss is skipped and the reason logged.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from pipeline.weights import WeightFile, WeightsUnavailable

log = logging.getLogger(__name__)

VGG16_WEIGHTS = WeightFile("VGG16 (LPIPS)", "https://download.pytorch.org/models/vgg16-397923af.pth",
                           "model.init_args.perceptual_weights", "vgg16")


class LPIPSLoss(nn.Module):
    """Per-image LPIPS distance of images in [-1, 1]; grayscale is repeated to the three channels VGG takes."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.network(x, y).flatten()


def load_lpips(explicit: Optional[str] = None) -> Optional[LPIPSLoss]:
    """The frozen LPIPS-VGG loss, or None (with the reason logged) when no VGG16 weights can be had. Only the
    ``features.*`` tensors of the weight file are used: a file holding just those (the test builds one) does."""
    from torchmetrics.functional.image.lpips import _LPIPS

    try:
        path = VGG16_WEIGHTS.resolve(explicit)
    except WeightsUnavailable as e:
        log.warning("perceptual loss skipped: %s", e)
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    network = _LPIPS(pretrained=True, net="vgg", pnet_rand=True)  # linear heads from torchmetrics, VGG below
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    for block in (network.net.slice1, network.net.slice2, network.net.slice3, network.net.slice4, network.net.slice5):
        for index, layer in block.named_children():
            own = {k.split(".", 1)[1]: v for k, v in features.items() if k.split(".", 1)[0] == index}
            if own:
                layer.load_state_dict(own)
    network.eval().requires_grad_(False)
    return LPIPSLoss(network)
