"""Score a set of images against a reference: Inception metrics (FID, IS, KID, precision/recall), the
auditor metrics (fd_auditor, bias audit), FD-DINOv2 and the memorisation audit, from one pass over the
images through every feature extractor the metrics need.

The reference side of every metric (features, statistics, neighbours) is computed once per Scorer and
cached under the reference's content hash (``passes.py``); each ``score`` is then one pass over a
generated set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.benchmark.distributed import Placement, barrier, broadcast
from pipeline.benchmark.images import ImageSource, Reference, ShardImages
from pipeline.benchmark.memorization import MemorizationAudit
from pipeline.benchmark.passes import FeatureSet, cache_key, feature_pass, reference_features
from pipeline.metrics import (
    AUDIT,
    AUDITOR_METRICS,
    CLIP_SCORE,
    DEFAULT,
    DEMOGRAPHICS,
    FD_AUDITOR,
    FD_DINOV2,
    FID,
    INCEPTION_METRICS,
    IS,
    KEY_ALIGNMENT,
    KEY_AUDIT,
    KEY_CLIP_SCORE,
    KEY_DEMOGRAPHICS,
    KEY_FD_AUDITOR,
    KEY_FD_AUDITOR_INF,
    KEY_FD_DINOV2,
    KEY_FD_DINOV2_INF,
    KEY_FID,
    KEY_FID_INF,
    KEY_GENDER_IMBALANCE,
    KEY_MEMORIZATION,
    KEY_SKIN_TONE_IMBALANCE,
    KID,
    MEMORIZATION,
    PR,
    SELECTABLE,
)
from pipeline.metrics.alignment import alignment_report, clip_scores
from pipeline.metrics.auditor import auditor_path, train_auditor
from pipeline.metrics.bias import audit, histogram, per_class_fd
from pipeline.metrics.clip import CLIP_WEIGHTS
from pipeline.metrics.demographics import (
    GENDER,
    GENDER_CAPTIONS,
    SKIN_TONE,
    audit_attribute,
    classifier_attribute,
    gender_from_clip,
)
from pipeline.metrics.dinov2 import DINOV2_WEIGHTS
from pipeline.metrics.extractors import EXTRACTORS, AuditorExtractor, FeatureExtractor
from pipeline.metrics.features import WeightsUnavailable, resolve_inception_weights
from pipeline.metrics.fidelity import (
    RNG_SEED,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from pipeline.metrics.frechet import fd_infinity
from pipeline.metrics.memorization import MemorizationSettings

__all__ = ["BenchmarkError", "ScoreOptions", "Scorer", "cache_key", "parse_metrics"]


class BenchmarkError(RuntimeError):
    """A run or input that cannot be benchmarked, with the reason and the fix."""


@dataclass
class ScoreOptions:
    """How images are scored; every setting that changes a number is recorded in the protocol."""

    metrics: tuple[str, ...] = DEFAULT
    batch_size: int = 250
    inception_weights: Optional[str] = None
    dinov2_weights: Optional[str] = None
    clip_weights: Optional[str] = None
    auditor: Optional[str] = None
    auditor_epochs: int = 10
    allow_tf32: bool = False
    is_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_neighborhood: int = 3
    memorization: MemorizationSettings = field(default_factory=MemorizationSettings)
    progress: bool = True
    device: Optional[str] = None  # default: the placement's device (cuda:LOCAL_RANK, else cpu)


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in SELECTABLE]
    if unknown or not names:
        raise BenchmarkError(f"--metrics {text!r}: unknown {unknown}; choose from {','.join(SELECTABLE)}")
    return names


class Scorer:
    """Scores image sets against one reference. The extractors are loaded and the reference features
    computed (or read from the cache) once, here; each ``score`` call is then one pass over a
    generated set, so ``--repeats`` and the reference rows do not redo that work. Every rank builds
    it and calls ``score`` (both are collective).

    ``held_out``: images of the reference's distribution that the model never saw (the val split): the
    memorisation audit's baseline of what "not copied" looks like.
    """

    def __init__(self, reference: Reference, opts: ScoreOptions, placement: Placement,
                 image_shape: tuple[int, ...], held_out: Optional[ImageSource] = None) -> None:
        self.reference, self.opts, self.placement = reference, opts, placement
        self.device = opts.device or placement.device
        self.wanted = set(opts.metrics)
        self.skipped: dict[str, str] = {}
        self.extractors: dict[str, FeatureExtractor] = {}
        if self.wanted & set(INCEPTION_METRICS):
            try:
                self.extractors["inception"] = EXTRACTORS["inception"](
                    resolve_inception_weights(opts.inception_weights), self.device, opts.allow_tf32)
            except WeightsUnavailable as e:
                self.skipped.update({m: str(e) for m in INCEPTION_METRICS if m in self.wanted})
        if FD_DINOV2 in self.wanted:
            try:
                self.extractors["dinov2"] = EXTRACTORS["dinov2"](DINOV2_WEIGHTS.resolve(opts.dinov2_weights),
                                                                 self.device, opts.allow_tf32)
            except WeightsUnavailable as e:
                self.skipped[FD_DINOV2] = str(e)
        self.clip_missing: Optional[str] = None
        if self.wanted & {CLIP_SCORE, DEMOGRAPHICS}:
            try:
                self.extractors["clip"] = EXTRACTORS["clip"](CLIP_WEIGHTS.resolve(opts.clip_weights), self.device,
                                                             opts.allow_tf32)
            except WeightsUnavailable as e:
                self.clip_missing = str(e)
                if CLIP_SCORE in self.wanted:
                    self.skipped[CLIP_SCORE] = str(e)
        if DEMOGRAPHICS in self.wanted:
            self.extractors["skin_tone"] = EXTRACTORS["skin_tone"]()
        if self.wanted & set(AUDITOR_METRICS) or MEMORIZATION in self.wanted:
            auditor, reason = _auditor(image_shape, reference, opts, placement, self.device)
            if auditor is not None:
                self.extractors["auditor"] = auditor
            elif reason:
                self.skipped.update({m: reason for m in AUDITOR_METRICS if m in self.wanted})
        memorization_spaces: dict[str, FeatureExtractor] = {}
        if MEMORIZATION in self.wanted:
            reason = _memorization_unavailable(image_shape, reference, opts.memorization)
            if reason:
                self.skipped[MEMORIZATION] = reason
            else:
                self.extractors["pixels"] = EXTRACTORS["pixels"](image_shape)
                memorization_spaces = {n: self.extractors[n] for n in ("pixels", "auditor", "inception", "dinov2")
                                       if n in self.extractors}
        self.labelled_reference = reference.label_histogram is not None
        self.ref_sets: dict[str, dict] = {}
        for name, extractor in self.extractors.items():
            if not extractor.on_reference:
                continue
            self.ref_sets[name] = reference_features(
                reference, reference.content_hash, extractor, opts.batch_size, placement, self.device,
                with_classes=bool(extractor.num_classes) and self.labelled_reference,
                keep_features=name in memorization_spaces, everywhere=name in memorization_spaces, show=opts.progress)
        self.memorization = None
        if memorization_spaces:
            self.memorization = MemorizationAudit(
                memorization_spaces, {n: self.ref_sets[n]["features"] for n in memorization_spaces},
                reference.content_hash, held_out, opts.memorization, opts.batch_size, placement, self.device,
                opts.progress)

    def score(self, generated: ImageSource, preview: Optional[list] = None,
              evidence: Optional[dict] = None) -> tuple[dict, dict, dict]:
        """(metrics, skipped, protocol) of one image source on rank 0 (other ranks get empty metrics).
        ``preview`` collects the first 64 generated images this rank sees, for the sample grid; ``evidence``
        the memorisation audit's closest generated/training pairs."""
        opts, placement, wanted = self.opts, self.placement, self.wanted
        metrics: dict[str, Any] = {}
        skipped = dict(self.skipped)
        protocol: dict[str, Any] = {"num_samples": generated.num_images, "reference": self.reference.describe(),
                                    "extractors": {n: e.identity for n, e in self.extractors.items()},
                                    "world_size": placement.world_size}
        if "inception" in self.extractors or "dinov2" in self.extractors:
            protocol["settings"] = {
                "is_splits": opts.is_splits, "kid_subsets": opts.kid_subsets,
                "kid_subset_size": min(opts.kid_subset_size, generated.num_images, self.reference.num_images),
                "pr_neighborhood": opts.pr_neighborhood, "rng_seed": RNG_SEED}
        if self.memorization is not None:
            protocol["memorization"] = self.memorization.describe()

        # one pass over the generated images through every extractor
        memorized = set(self.memorization.spaces) if self.memorization else set()
        # KID, precision/recall and FD-infinity need every vector, not only statistics
        vectors = {"inception": bool(wanted & {FID, KID, PR}), "dinov2": True, "clip": True,
                   "auditor": FD_AUDITOR in wanted or (AUDIT in wanted and self.labelled_reference)}
        sets = {name: FeatureSet(
            e, self.device, keep_features=name in memorized or vectors.get(name, False),
            keep_logits=name == "inception" and IS in wanted, num_classes=e.num_classes,
            keep_requested=bool(e.num_classes)) for name, e in self.extractors.items()}

        def extract(images):
            return {name: e(images) for name, e in self.extractors.items()}

        def sink(batch, out):
            if preview is not None and sum(len(p) for p in preview) < 64:
                preview.append(batch.images[:64 - sum(len(p) for p in preview)])
            for name, fs in sets.items():
                fs.update(batch.index, out[name][0], extra=out[name][1], requested=batch.labels)

        if self.extractors:
            feature_pass(generated, extract, sink, opts.batch_size, placement, self.device, "generated images",
                         opts.progress)
        gen_sets = {name: fs.finalize() for name, fs in sets.items()}
        if self.memorization is not None:
            metrics[KEY_MEMORIZATION] = self.memorization.score(gen_sets, evidence)  # collective
        if not placement.is_main:
            return {}, skipped, protocol

        if "inception" in gen_sets:
            metrics.update(_inception_metrics(gen_sets["inception"], self.ref_sets["inception"], wanted, opts,
                                              protocol["settings"], skipped))
        if "dinov2" in gen_sets:
            g, r = gen_sets["dinov2"], self.ref_sets["dinov2"]
            metrics[KEY_FD_DINOV2] = frechet_distance(g["stats"], r["stats"])
            metrics.update(_fd_infinity(KEY_FD_DINOV2_INF, g, r, skipped))
            if PR in wanted:  # precision/recall in DINOv2's space too, under their own keys
                metrics.update({f"{k}_dinov2": v for k, v in _precision_recall(g, r, opts, skipped).items()})
        if "auditor" in gen_sets:
            metrics.update(self._auditor_metrics(gen_sets["auditor"], self.ref_sets["auditor"], skipped))
        metrics.update(self._prompt_metrics(getattr(generated, "prompts", None), gen_sets, skipped))
        return metrics, skipped, protocol

    def _prompt_metrics(self, prompts: Optional[list], gen_sets: dict, skipped: dict) -> dict:
        """CLIPScore against each image's prompt, and the demographic audit over the prompts' groups."""
        out: dict[str, Any] = {}
        no_prompts = "the images carry no prompts: score a set genbench generate wrote (it records each image's prompt)"
        clip = self.extractors["clip"].net if "clip" in gen_sets else None  # type: ignore[attr-defined]
        if CLIP_SCORE in self.wanted and clip is not None:
            if prompts is None:
                skipped[CLIP_SCORE] = no_prompts
            else:
                texts = dict(sorted({p.id: p.prompt for p in prompts}.items()))
                row = {pid: i for i, pid in enumerate(texts)}
                text_embeddings = clip.encode_texts(list(texts.values())).cpu()
                scores = clip_scores(gen_sets["clip"]["features"], text_embeddings[[row[p.id] for p in prompts]])
                report = alignment_report(scores, [p.id for p in prompts], texts)
                out[KEY_CLIP_SCORE], out[KEY_ALIGNMENT] = report["mean"], report
        if DEMOGRAPHICS not in self.wanted:
            return out
        groups = [p.group for p in prompts] if prompts is not None else []
        if not any(g is not None for g in groups):
            skipped[DEMOGRAPHICS] = no_prompts if prompts is None else (
                "no prompt of the suite has a `group`; the audit compares groups (see prompts/occupations.jsonl)")
            return out
        result: dict[str, Any] = {"skin_tone": audit_attribute(SKIN_TONE, gen_sets["skin_tone"]["classes"].numpy(),
                                                               groups)}
        if clip is not None:
            captions = clip.encode_texts(GENDER_CAPTIONS).cpu()
            result["gender"] = audit_attribute(GENDER, gender_from_clip(gen_sets["clip"]["features"], captions), groups)
        else:
            skipped[f"{DEMOGRAPHICS}.gender"] = self.clip_missing
        if "auditor" in gen_sets and gen_sets["auditor"]["classes"] is not None:
            auditor = self.extractors["auditor"]
            assert isinstance(auditor, AuditorExtractor)
            result["auditor"] = audit_attribute(classifier_attribute("auditor", auditor.class_names),
                                                gen_sets["auditor"]["classes"].numpy(), groups)
        out[KEY_DEMOGRAPHICS] = result
        for key, name in ((KEY_GENDER_IMBALANCE, "gender"), (KEY_SKIN_TONE_IMBALANCE, "skin_tone")):
            if name in result:
                out[key] = result[name]["mean_group_imbalance"]
        return out

    def _auditor_metrics(self, g: dict, r: dict, skipped: dict) -> dict:
        out: dict[str, Any] = {}
        auditor, reference = self.extractors["auditor"], self.reference
        assert isinstance(auditor, AuditorExtractor)
        if FD_AUDITOR in self.wanted:
            out[KEY_FD_AUDITOR] = frechet_distance(g["stats"], r["stats"])
            out.update(_fd_infinity(KEY_FD_AUDITOR_INF, g, r, skipped))
        if AUDIT in self.wanted:
            predictions = g["classes"].numpy()
            requested = None if g["requested"] is None else g["requested"].numpy()
            ref_hist = None
            if reference.label_histogram is not None:
                missing = auditor.num_classes - len(reference.label_histogram)
                ref_hist = list(reference.label_histogram) + [0] * missing
            result = audit(histogram(predictions, auditor.num_classes), ref_hist, requested=requested,
                           predictions=predictions, class_names=auditor.class_names)
            if self.labelled_reference:
                result["per_class_fd"] = per_class_fd(g["per_class"], r["per_class"], auditor.class_names,
                                                      g["features"], g["classes"])
            out[KEY_AUDIT] = result
        return out


def _memorization_unavailable(image_shape: tuple[int, ...], reference: Reference,
                              settings: MemorizationSettings) -> Optional[str]:
    if tuple(reference.shape) != tuple(image_shape):
        return (f"the generated images are {tuple(image_shape)} (C, H, W) but the training images "
                f"{tuple(reference.shape)}: a pixel-space copy search needs one size")
    if reference.num_images <= settings.neighbours:
        return (f"the reference holds {reference.num_images} images; the copy score normalises by the "
                f"{settings.neighbours} nearest, so it needs more than that")
    return None


def _inception_metrics(g: dict, r: dict, wanted: set, opts: ScoreOptions, settings: dict, skipped: dict) -> dict:
    out: dict[str, float] = {}
    if FID in wanted:
        out[KEY_FID] = frechet_distance(g["stats"], r["stats"])
        out.update(_fd_infinity(KEY_FID_INF, g, r, skipped))
    try_metrics = []
    if IS in wanted:
        try_metrics.append((IS, lambda: inception_score(g["logits"], opts.is_splits)))
    if KID in wanted:
        try_metrics.append((KID, lambda: kernel_inception_distance(g["features"], r["features"], opts.kid_subsets,
                                                                   settings["kid_subset_size"])))
    for name, fn in try_metrics:
        try:
            out.update(fn())
        except ValueError as e:  # too few samples for the protocol: say so, never a made-up number
            skipped[name] = str(e)
    if PR in wanted:
        out.update(_precision_recall(g, r, opts, skipped))
    return out


def _fd_infinity(key: str, g: dict, r: dict, skipped: dict) -> dict:
    try:
        return {key: fd_infinity(g["features"], r["stats"])}
    except ValueError as e:  # too few samples to extrapolate: say so
        skipped[key] = str(e)
        return {}


def _precision_recall(g: dict, r: dict, opts: ScoreOptions, skipped: dict) -> dict:
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return precision_recall(g["features"].to(device), r["features"].to(device), opts.pr_neighborhood)
    except ValueError as e:  # too few samples for the protocol: say so, never a made-up number
        skipped[PR] = str(e)
        return {}


def _auditor(image_shape: tuple[int, ...], reference: Reference, opts: ScoreOptions, placement: Placement, device: str):
    """(AuditorExtractor, None), or (None, the reason the auditor metrics are skipped)."""
    if opts.auditor:
        path = Path(opts.auditor)
    elif reference.label_histogram is None or not isinstance(reference, ShardImages):  # labels come from shards
        return None, (f"the reference {reference.describe()['path']} has no labels to train an auditor on; pass "
                      "--auditor CKPT (genbench train-auditor) or score against a labelled shard directory")
    else:
        manifest_hash = reference.content_hash.split(":")[0]
        path = auditor_path(manifest_hash, reference.fit)
        if not broadcast(path.exists(), placement):
            # One process trains it (a single-process Trainer, whatever the launcher); the others wait for it.
            if placement.is_main:
                train_auditor(reference.shards, epochs=opts.auditor_epochs, progress=opts.progress, fit=reference.fit)
            barrier(placement)
    auditor = EXTRACTORS["auditor"](path, device)
    assert isinstance(auditor, AuditorExtractor)
    for what, shape in (("generated images", image_shape), ("reference", reference.shape)):
        if tuple(shape) != auditor.shape:
            return None, (f"the auditor classifies {auditor.shape} (C, H, W) images but the {what} are "
                          f"{tuple(shape)}; use an auditor trained on data of that size")
    return auditor, None
