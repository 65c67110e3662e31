"""Feature extractors behind one interface, registered by name: what the benchmark's scorer runs images
through. A new feature space (DINOv2, CLIP, ...) is one class here plus its metrics, and the scorer needs
no new branch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.io import sha256_file
from pipeline.metrics.auditor import load_auditor
from pipeline.metrics.clip import CLIP_RESIZE, CLIPModel
from pipeline.metrics.demographics import SKIN_TONE, skin_tones
from pipeline.metrics.dinov2 import DINOV2_RESIZE, DINOv2Features
from pipeline.metrics.features import (
    INCEPTION_FEATURES,
    INCEPTION_LOGITS,
    INCEPTION_RESIZE,
    InceptionFeatures,
    strict_fp32,
)
from pipeline.registry import Registry


class FeatureExtractor:
    """Images (uint8 N x C x H x W) -> (features N x num_features, an extra per-image output).

    Attributes:
        name: the registry name; also the key of this extractor in a record's ``protocol.extractors``.
        num_features: length of the feature vectors (their Fréchet statistics are always accumulated).
        num_logits: length of the extra output when it is logits (the Inception Score's); 0 otherwise.
        num_classes: classes when the extra output is a predicted class per image (the auditor's); 0 otherwise.
        keep_features: whether the metrics need every feature vector, not only their statistics (KID, PR);
            the memorisation audit keeps them in every space it searches.
        statistics: whether Fréchet statistics (mean, covariance) of the features are accumulated.
        feature_dtype: of the kept vectors (pixels stay uint8: a quarter of the memory of float32).
        identity: everything that changes the features (weights hash, resize, precision): recorded in the
            protocol and part of the reference cache's key.
        on_reference: whether the reference set is passed through it too (False for what only the generated
            images are judged by: prompt alignment, perceived attributes).
    """

    name = "extractor"
    num_features = 0
    num_logits = 0
    num_classes = 0
    keep_features = False
    statistics = True
    feature_dtype = torch.float32
    on_reference = True
    identity: dict[str, Any]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError


EXTRACTORS: Registry[FeatureExtractor] = Registry("feature extractor", FeatureExtractor, name_attr="name")


@EXTRACTORS.register()
class InceptionExtractor(FeatureExtractor):
    """torch-fidelity's InceptionV3: pool3 features (FID, KID, precision/recall) and logits (IS)."""

    name = "inception"
    keep_features = True

    def __init__(self, weights: Path, device: str, allow_tf32: bool = False) -> None:
        # channels-last: oneDNN and cuDNN pick faster convolutions (1.4x on a 2-core CPU), same fp32 math
        self.net = InceptionFeatures(weights).to(device).to(memory_format=torch.channels_last).eval()
        self.num_features, self.num_logits = self.net.num_features, self.net.num_logits
        self.allow_tf32 = allow_tf32
        self.identity = {"name": self.net.name, "weights_sha256": self.net.weights_sha256, "resize": INCEPTION_RESIZE,
                         "features": f"pool3 ({INCEPTION_FEATURES}): FID, KID, precision/recall",
                         "logits": f"{INCEPTION_LOGITS}: IS",
                         "precision": "TF32 allowed" if allow_tf32 else "fp32 (TF32 off)"}

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), strict_fp32(not self.allow_tf32):
            pool, logits = self.net(images)
        return pool.float(), logits.float()


@EXTRACTORS.register()
class AuditorExtractor(FeatureExtractor):
    """The auditor classifier trained on the reference's labels: penultimate features and the predicted class."""

    name = "auditor"

    def __init__(self, path: Path, device: str) -> None:
        self.net, info = load_auditor(path)
        self.net.to(device)
        self.num_classes, self.num_features = self.net.num_classes, self.net.num_features
        hp = self.net.hparams
        self.shape = (hp["channels"], hp["image_size"], hp["image_size"])
        self.class_names = hp["class_names"] or [str(c) for c in range(self.num_classes)]
        self.identity = {"sha256": sha256_file(path), "val_accuracy": info.get("val_accuracy"),
                         "trained_on": info.get("manifest_hash"), "num_classes": self.num_classes}

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            features, logits = self.net(images)
        return features.float(), logits.argmax(1)


@EXTRACTORS.register()
class DINOv2Extractor(FeatureExtractor):
    """DINOv2 ViT-L/14 CLS features: FD-DINOv2, and precision/recall and memorisation distances in that space."""

    name = "dinov2"
    keep_features = True

    def __init__(self, weights: Path, device: str, allow_tf32: bool = False) -> None:
        self.net = DINOv2Features(weights).to(device)
        self.num_features = self.net.num_features
        self.allow_tf32 = allow_tf32
        self.identity = {"name": "dinov2-vitl14", "weights_sha256": self.net.weights_sha256, "resize": DINOV2_RESIZE,
                         "features": "CLS token after the final norm (1024)", "normalisation": "ImageNet mean/std",
                         "precision": "TF32 allowed" if allow_tf32 else "fp32 (TF32 off)"}

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        with torch.no_grad(), strict_fp32(not self.allow_tf32):
            return self.net(images).float(), None


@EXTRACTORS.register()
class PixelExtractor(FeatureExtractor):
    """The images themselves, flattened (uint8): the memorisation audit's pixel space, where a copy is a copy
    whatever a feature network thinks of it. No Fréchet statistics (a 3072-d covariance per 32 px set says
    nothing FID does not)."""

    name = "pixels"
    keep_features = True
    statistics = False
    feature_dtype = torch.uint8

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.num_features = int(torch.Size(self.shape).numel())
        self.identity = {"space": "pixels", "shape": list(self.shape), "scale": "[0, 1] (uint8 / 255)"}

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return images.flatten(1), None


@EXTRACTORS.register()
class CLIPExtractor(FeatureExtractor):
    """CLIP ViT-B/32 image embeddings (unit norm): CLIPScore against each image's prompt, and the zero-shot
    gender detector. Generated images only."""

    name = "clip"
    keep_features = True
    statistics = False
    on_reference = False

    def __init__(self, weights: Path, device: str, allow_tf32: bool = False) -> None:
        self.net = CLIPModel(weights).to(device)
        self.num_features = self.net.num_features
        self.allow_tf32 = allow_tf32
        self.identity = {"name": "clip-vit-b-32-openai", "weights_sha256": self.net.weights_sha256,
                         "resize": CLIP_RESIZE, "features": "image embedding, unit norm (512)",
                         "precision": "TF32 allowed" if allow_tf32 else "fp32 (TF32 off)"}

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        with torch.no_grad(), strict_fp32(not self.allow_tf32):
            return self.net.encode_images(images), None


@EXTRACTORS.register()
class SkinToneExtractor(FeatureExtractor):
    """Mean skin colour (RGB) and its Monk Skin Tone bin (-1: no skin pixel) per image. Generated images only."""

    name = "skin_tone"
    num_features = 3
    num_classes = len(SKIN_TONE.categories)
    statistics = False
    on_reference = False

    def __init__(self) -> None:
        self.identity = {"detector": SKIN_TONE.definition}

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, bins = skin_tones(images.cpu())
        return mean.to(images.device), bins.to(images.device)
