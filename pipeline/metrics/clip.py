"""CLIP ViT-B/32 (OpenAI's weights, open_clip's architecture): image and text embeddings for CLIPScore and
the zero-shot gender detector of the demographic audit.

ViT-B/32 is the model of Hessel et al.'s CLIPScore and of HEIM's gender metric, so numbers compare with theirs.
The weights are OpenAI's release as open_clip publishes it on the Hugging Face hub, resolved like Inception's
(``--clip-weights``, then the torch hub cache, then a download; offline, an error naming
``genbench fetch-weights clip``). OpenAI's CLIP uses QuickGELU, so the architecture is built with it.

Preprocessing: 224 x 224 bicubic resize with antialias on floats in [0, 1] (clamped), CLIP's own mean/std.
open_clip's PIL transform resizes the shorter side and centre-crops; generated images are square, so the two
agree up to the resampling kernel, and the batch stays on the device. Recorded as ``CLIP_RESIZE``.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from pipeline.io import sha256_file
from pipeline.metrics.features import WeightFile

CLIP_ARCH = "ViT-B-32"
CLIP_WEIGHTS = WeightFile(
    "CLIP ViT-B/32 (OpenAI)",
    "https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_pytorch_model.bin",
    "--clip-weights", "clip", filename="open_clip_vit_b_32_openai.bin")
CLIP_SIZE = 224
CLIP_RESIZE = f"torch-bicubic-antialias-{CLIP_SIZE}, clamped to [0, 1]"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip() -> nn.Module:
    """The architecture with random weights (the caller loads the resolved file into it)."""
    import open_clip

    quiet = logging.getLogger()  # open_clip warns on the root logger that no weights were loaded: by design here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(CLIP_ARCH, pretrained=None, force_quick_gelu=True)
    finally:
        quiet.setLevel(level)


class CLIPModel(nn.Module):
    """uint8 N x C x H x W -> unit-norm image embeddings; strings -> unit-norm text embeddings (512-d)."""

    num_features = 512
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, weights: str | os.PathLike) -> None:
        import open_clip

        super().__init__()
        self.weights_path = str(weights)
        self.net: Any = build_clip()  # open_clip's CLIP: encode_image / encode_text
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        self.net.eval()
        self.tokenizer = open_clip.get_tokenizer(CLIP_ARCH)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def weights_sha256(self) -> str:
        return _sha256(self.weights_path)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"CLIPModel takes uint8 images, got {images.dtype}")
        x = images.to(self.device).float().div(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = nn.functional.interpolate(x, size=(CLIP_SIZE, CLIP_SIZE), mode="bicubic", antialias=True,
                                      align_corners=False).clamp_(0, 1)
        return nn.functional.normalize(self.net.encode_image((x - self.mean) / self.std).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        # the tokenizer truncates at CLIP's 77 tokens, as CLIPScore's reference code does
        tokens = self.tokenizer(list(texts)).to(self.device)
        return nn.functional.normalize(self.net.encode_text(tokens).float(), dim=-1)


@lru_cache(maxsize=4)
def _sha256(path: str) -> str:
    return sha256_file(path)


def architecture_only_clip_weights(path: str | os.PathLike) -> Path:
    """A weight file with CLIP ViT-B/32's architecture and random weights, for tests on machines that cannot
    download the real one. Never for reported numbers: records name the weights by sha256."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_clip()
    torch.save(net.state_dict(), path)
    return Path(path)
