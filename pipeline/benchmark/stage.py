"""``genbench benchmark``: score a trained run, or images from anywhere, into one result record.

A record is immutable: it is written once under a fresh name (atomically, refusing to replace any
file) and never edited. A metric that cannot be computed is absent from ``metrics`` and listed in
``skipped`` with the reason; no number in a record is made up. With ``repeats`` R > 1 the run is
sampled R times (seeds seed, seed+1, ...): ``metrics`` holds the means, ``metrics_std`` the standard
deviations and ``repeats`` every draw's metrics.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from pipeline.benchmark.distributed import Placement
from pipeline.benchmark.images import (
    GeneratedSet,
    ImageSourceError,
    ModelSamples,
    Reconstructions,
    ShardImages,
    UniformNoise,
    open_images,
)
from pipeline.benchmark.scoring import BenchmarkError, ScoreOptions, Scorer, cache_key, parse_metrics
from pipeline.data.imageops import png_bytes
from pipeline.data.remote import is_remote
from pipeline.fit.checkpoints import LAST
from pipeline.fit.provenance import describe_environment, now
from pipeline.io import write_together
from pipeline.metrics import DEFAULT, DEMOGRAPHICS, PROMPT_METRICS

RECORD_VERSION = 2
# data-module settings that change the images a model trains on: its reference is read with the same
FIT_KEYS = ("image_size", "channels", "resize", "label_key", "val_shards")
# Reference rows of the leaderboard: what a perfect model and no model at all would score.
FLOOR, CEILING = "reference: held-out validation split", "reference: uniform noise"

__all__ = ["BenchmarkError", "ScoreOptions", "benchmark_run", "benchmark_images", "benchmark_reference_rows",
           "parse_metrics", "aggregate"]


def aggregate(draws: list[Any]) -> tuple[Any, Any]:
    """(mean, standard deviation) over repeated draws of the same metrics structure, recursively:
    numbers are averaged, lists of numbers element-wise; a value missing (None) in any draw stays None, and so
    do lists of records (the closest pairs of a memorisation audit) that differ between draws."""
    first = draws[0]
    if isinstance(first, dict):
        by_key = {k: aggregate([d.get(k) for d in draws]) for k in first}
        return {k: m for k, (m, _) in by_key.items()}, {k: s for k, (_, s) in by_key.items() if s is not None}
    if isinstance(first, (list, tuple)) and first and not isinstance(first[0], (str, dict)):
        by_item = [aggregate([d[i] for d in draws]) for i in range(len(first))]
        return [m for m, _ in by_item], [s for _, s in by_item]
    if isinstance(first, bool) or not isinstance(first, (int, float)) or any(d is None for d in draws):
        return (first if all(d == first for d in draws) else None), None
    values = np.asarray(draws, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(draws) > 1 else 0.0


def checkpoint_progress(ckpt: Path) -> dict[str, Any]:
    """Training progress stored in a checkpoint: optimizer steps, images seen, training FLOPs and device-hours
    when it was written. Memory-mapped, so only the few bytes of these fields are read."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    genbench = state.get("genbench", {})
    images, fpi = genbench.get("images_seen"), genbench.get("flops_per_image")
    seconds = genbench.get("device_seconds")
    # a two-stage model's training includes its first stage's (an equal-compute comparison with pixel models)
    first = genbench.get("first_stage") or {}
    first_flops = first.get("training_flops") or 0.0
    return {"global_step": state.get("global_step"), "images_seen": images,
            "training_flops": None if images is None or fpi is None else images * fpi + first_flops,
            "device_hours_trained": None if seconds is None else seconds / 3600 + (first.get("device_hours") or 0.0),
            "first_stage": first or None}


def run_checkpoints(run_dir: Path, which: str = "last") -> list[Path]:
    """The checkpoints ``--checkpoints`` names: ``last`` (last.ckpt), or ``all``: every evaluation point that
    ``run.evaluate_every`` kept, in training order, then last.ckpt unless it is the last point's step."""
    directory = run_dir / "checkpoints"
    last = directory / LAST
    if which == "last":
        return [last]
    if which != "all":
        raise BenchmarkError(f"--checkpoints {which!r}: use last or all")
    step = {p: checkpoint_progress(p)["global_step"] or 0 for p in directory.glob("eval-*.ckpt")}
    points = sorted(step, key=step.__getitem__)
    if last.exists() and (not points or step[points[-1]] != checkpoint_progress(last)["global_step"]):
        points.append(last)
    return points or [last]


def load_run_model(run_dir: Path, device: str = "cpu", run_info: Optional[dict[str, Any]] = None,
                   ckpt: Optional[Path] = None, first_stage: Optional[str] = None):
    """The run's model class from its resolved config, with the EMA weights of ``ckpt`` (default last.ckpt), and
    the training progress of that checkpoint. Refuses a last.ckpt older than the step run.json says training
    reached: its weights would be scored under another step's provenance. ``run_info``: run.json, when the
    caller has it. ``first_stage``: where a latent model's first stage is now, if it moved (it is found by the
    checksum the checkpoint records, at the recorded place first)."""
    config_path, ckpt = run_dir / "config.yaml", ckpt or run_dir / "checkpoints" / LAST
    if not config_path.exists():
        raise BenchmarkError(f"{run_dir} has no config.yaml: not a genbench run directory (genbench fit writes one)")
    if not ckpt.exists():
        raise BenchmarkError(f"{ckpt} does not exist: the run has no checkpoint yet; train it with "
                             f"genbench fit --config {config_path}")
    progress = checkpoint_progress(ckpt)
    run_info = read_run_info(run_dir) if run_info is None else run_info
    trained = run_info.get("global_step")
    if ckpt.name == LAST and trained is not None and progress["global_step"] is not None and \
            progress["global_step"] < trained:
        raise BenchmarkError(
            f"{ckpt} holds step {progress['global_step']} but {run_dir / 'run.json'} says training reached step "
            f"{trained} (status {run_info.get('status')}): the final weights were never saved, and scoring these "
            f"would credit step-{progress['global_step']} weights with step-{trained} provenance; resume the run "
            f"with genbench fit --config {config_path} to write them")
    config = yaml.safe_load(config_path.read_text())
    _resolve_data_paths(run_dir, config)
    module, _, name = config["model"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if first_stage and not progress["first_stage"]:
        raise BenchmarkError(f"--first-stage {first_stage}: {run_dir} is not a two-stage run (its checkpoint names no "
                             "first stage); drop the option")
    moved = {"first_stage": first_stage} if first_stage else {}
    model = cls.load_from_checkpoint(str(ckpt), map_location=device, **moved)
    model.eval()
    return model, config, progress


def _resolve_data_paths(run_dir: Path, config: dict[str, Any]) -> None:
    """A relative shard path in a run's config is relative to where ``genbench fit`` ran: the directory above
    ``run.root`` (runs/<id> -> .), found from the run directory itself, so that scoring or serving a run works
    from any directory. An absolute run.root leaves the working directory as the guess, then the run's parents."""
    data, root = config["data"]["init_args"], Path(config.get("run", {}).get("root") or "runs")
    here = run_dir.resolve()
    bases = ([here.parents[len(root.parts)]] if not root.is_absolute() and len(here.parents) > len(root.parts)
             else []) + [Path.cwd(), *here.parents]
    for key in ("shards", "val_shards"):
        value = data.get(key)
        if not value or is_remote(str(value)) or Path(value).is_absolute():
            continue
        found = next((base / value for base in bases if (base / value).exists()), None)
        if found is not None:
            data[key] = str(found)


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _evaluate(scorer: Scorer, sources: list) -> tuple:
    """Score each source with one scorer; returns (metrics, metrics_std, per-draw metrics, skipped, protocol,
    evidence of the first source: its preview images and closest training pairs). With one source, std and
    draws are None."""
    draws: list = []
    evidence: dict = {"preview": []}
    skipped: dict = {}
    protocol: dict = {}
    for i, source in enumerate(sources):
        metrics, skipped, protocol = scorer.score(source, evidence["preview"] if i == 0 else None,
                                                  evidence if i == 0 else None)
        draws.append(metrics)
    if len(draws) == 1:
        return draws[0], None, None, skipped, protocol, evidence
    mean, std = aggregate(draws)
    return mean, std, draws, skipped, protocol, evidence


def _protocol_id(protocol: dict) -> str:
    """What makes two records comparable: data identity, extractors, settings; not paths or world size."""
    extractors = {k: {f: v for f, v in e.items() if f != "val_accuracy"} for k, e in protocol["extractors"].items()}
    memorization = protocol.get("memorization")
    if memorization:  # its settings and held-out set, not the held-out set's path
        memorization = {**memorization, "held_out": (memorization.get("held_out") or {}).get("hash")}
    return cache_key(num_samples=protocol["num_samples"], seed=protocol.get("seed"), repeats=protocol.get("repeats", 1),
                     reference=protocol["reference"]["hash"], extractors=extractors, settings=protocol.get("settings"),
                     memorization=memorization)


def _write_record(results: Path, name: str, placement: Placement, metrics: dict, std: Optional[dict],
                  draws: Optional[list], skipped: dict, protocol: dict, evidence: dict,
                  **fields: Any) -> Optional[Path]:
    if not placement.is_main:
        return None
    protocol["protocol_id"] = _protocol_id(protocol)
    files: dict[Path, bytes] = {}  # written together with the record: a full disk leaves no orphaned grid
    grid = pairs = None
    if evidence["preview"]:
        images = torch.cat(evidence["preview"])[:64]
        grid = results / "grids" / f"{name}.png"
        files[grid] = png_bytes(_grid(images), scale=max(1, 128 // images.shape[-1]))
    if evidence.get("images") is not None:
        # each row: a generated image, then its nearest training image; closest pair first
        images = evidence["images"]
        pairs = results / "grids" / f"{name}-closest.png"
        files[pairs] = png_bytes(_grid(images, nrow=2), scale=max(1, 64 // images.shape[-1]))
    record = {"record_version": RECORD_VERSION, "name": name, "created": now(), **fields,
              "metrics": metrics, "skipped": skipped, "protocol": protocol,
              "benchmark_environment": describe_environment(),
              "sample_grid": None if grid is None else str(grid.relative_to(results)),
              "closest_pairs_grid": None if pairs is None else str(pairs.relative_to(results))}
    if std is not None:
        record["metrics_std"], record["repeats"] = std, draws
    path = results / f"{name}.json"
    files[path] = (json.dumps(record, indent=2, sort_keys=True, default=str) + "\n").encode()
    write_together(files, new=frozenset({path}))
    return path


def _record_name(stem: str, num_samples: int, seed: Optional[int]) -> str:
    seed_part = "" if seed is None else f"-s{seed}"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "set"  # a model named by a path or org/name
    return f"{stem}-n{num_samples}{seed_part}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def benchmark_run(run_dir: str | os.PathLike, num_samples: Optional[int] = None, seed: Optional[int] = None,
                  results: Optional[str] = None, opts: Optional[ScoreOptions] = None,
                  metrics: Optional[str] = None, repeats: int = 1, placement: Placement = Placement(),
                  sample_precision: Optional[str] = None, checkpoint: Optional[Path] = None,
                  first_stage: Optional[str] = None) -> Optional[Path]:
    """Sample the EMA weights of the run's ``checkpoint`` (default last.ckpt), score against its training shards,
    write the record (rank 0); its path."""
    run_dir = Path(run_dir)
    opts = opts or ScoreOptions()
    device = opts.device or placement.device
    run_info = read_run_info(run_dir)
    model, config, progress = load_run_model(run_dir, device, run_info, checkpoint, first_stage)
    bench = config.get("benchmark", {})
    num_samples = num_samples or bench.get("num_samples", 50000)
    seed = bench.get("seed", 0) if seed is None else seed
    results_dir = Path(results or bench.get("results", "results"))
    if metrics or bench.get("metrics"):
        opts.metrics = parse_metrics(metrics or bench["metrics"])
    if opts.inception_weights is None:
        opts.inception_weights = bench.get("inception_weights")
    if opts.dinov2_weights is None:
        opts.dinov2_weights = bench.get("dinov2_weights")
    opts.auditor_epochs = bench.get("auditor_epochs", opts.auditor_epochs)
    if repeats < 1:
        raise BenchmarkError(f"--repeats {repeats}: draw at least one sample set")
    check_writable(results_dir)
    data = config["data"]["init_args"]
    # the images at the size and channels the model was trained on (data.image_size etc., when set)
    fit = {k: data.get(k) for k in FIT_KEYS}
    reference = ShardImages(data["shards"], "train", fit=fit)
    precision = sample_precision or bench.get("sample_precision", "fp32")
    first_stage_row = not model.samples
    sources: list
    if first_stage_row:  # a first stage is scored on its reconstructions: deterministic, so one draw
        if repeats > 1:
            raise BenchmarkError(f"--repeats {repeats}: {run_dir} is a {model.family}, scored on its "
                                 "reconstructions of the val split, which are the same every time; drop --repeats")
        try:
            sources = [Reconstructions(model, ShardImages(data["shards"], "val", fit=fit))]
        except ImageSourceError as e:
            raise BenchmarkError(f"an autoencoder's row reconstructs the val split: {e}") from e
        num_samples, seed, repeats = sources[0].num_images, None, 1
    else:
        try:
            sources = [ModelSamples(model, num_samples, s, precision) for s in range(seed, seed + repeats)]
        except ValueError as e:
            raise BenchmarkError(f"{e} (--sample-precision or the run's benchmark.sample_precision)") from e
    scorer = Scorer(reference, opts, placement, sources[0].shape, held_out=held_out_split(reference))
    metrics_, std, draws, skipped, protocol, evidence = _evaluate(scorer, sources)
    protocol.update(seed=seed, repeats=repeats, sampling={k: v for k, v in sources[0].describe().items()
                                                         if k in ("precision", "compiled")})
    if first_stage_row:
        protocol["images"] = sources[0].describe()
    seconds = sum(s.sampling_seconds for s in sources)
    cost = model.cost()
    ckpt_name = (checkpoint or Path(LAST)).name
    stem = run_dir.name if ckpt_name == LAST else f"{run_dir.name}-{Path(ckpt_name).stem}"
    first = progress["first_stage"] or {}
    device_hours = run_info.get("device_hours") if ckpt_name == LAST else progress["device_hours_trained"]
    if ckpt_name == LAST and device_hours is not None:  # run.json's clock is this run's; its first stage's too
        device_hours += first.get("device_hours") or 0.0
    extra = {"reference_row": "reconstruction"} if first_stage_row else {}
    return _write_record(
        results_dir, _record_name(stem, num_samples, seed), placement, metrics_, std, draws, skipped, protocol,
        evidence, run_id=run_dir.name, run_dir=str(run_dir), family=model.family, conditional=model.conditional,
        checkpoint=ckpt_name, budget=None if first_stage_row else budget_of(run_info, ckpt_name, progress),
        provenance={**{k: run_info.get(k) for k in ("config_hash", "git", "packages", "data", "seed", "hardware",
                                                    "world_size", "status")},
                    # the two-stage model's first stage as its checkpoint names it: run id, checkpoint sha256
                    **({"first_stage": first, "latent_scale": run_info.get("latent_scale")} if first else {})},
        cost={"parameters": cost["parameters"], "nfe": cost["nfe"], "bits_per_dim": cost["bits_per_dim"],
              "sampling_images_per_s": round(num_samples * repeats / seconds, 2) if seconds else None,
              # training progress of the weights that were scored, read from their checkpoint
              "device_hours": device_hours,
              "device_hours_trained": progress["device_hours_trained"], "images_seen": progress["images_seen"],
              "training_flops": progress["training_flops"],
              "decoder_flops_per_sample": cost.get("decoder_flops_per_sample"),
              "global_step": progress["global_step"]}, **extra)


def budget_of(run_info: dict[str, Any], ckpt_name: str, progress: dict[str, Any]) -> Optional[dict[str, Any]]:
    """What a record says about the training budget of the weights it scored: the run's budget (unit and
    amount), the budget point the checkpoint stands for (an evaluation point, or the budget itself for the
    last.ckpt of a run that reached it; else None) and what had been spent in every unit. None for a run
    trained without a budget: it is never placed in a budget table."""
    from pipeline.fit.budget import parse_budget

    budget = parse_budget(run_info.get("budget"), "run.budget")
    every = parse_budget(run_info.get("evaluate_every"), "run.evaluate_every")
    if budget is None and every is None:
        return None
    spent = {"images": progress["images_seen"], "flops": progress["training_flops"],
             "device_hours": progress["device_hours_trained"]}
    out: dict[str, Any] = {"unit": budget[0] if budget else None, "amount": budget[1] if budget else None,
                           "point_unit": None, "point": None, "spent": spent}
    stem = ckpt_name.removesuffix(".ckpt")
    if every is not None and stem.startswith(f"eval-{every[0]}-"):
        out.update(point_unit=every[0], point=float(stem[len(f"eval-{every[0]}-"):]))
    elif budget is not None and spent[budget[0]] is not None and spent[budget[0]] >= budget[1]:
        out.update(point_unit=budget[0], point=budget[1])
    return out


def held_out_split(reference) -> Optional[ShardImages]:
    """The val split beside a shard reference's train split (the memorisation audit's "never seen" baseline);
    None for a folder or a shard directory without one."""
    if not isinstance(reference, ShardImages) or reference.split != "train":
        return None
    try:
        val = ShardImages(reference.shards, "val", reference.fit)
    except ImageSourceError:
        return None
    return val if val.num_images else None


def open_reference(path: str, split: str = "train"):
    try:
        reference = open_images(path, split=split)
    except ImageSourceError as e:
        raise BenchmarkError(f"--reference: {e}") from e
    return reference


def benchmark_images(images: str, reference: str, labels: Optional[str] = None, results: str | Path = "results",
                     name: Optional[str] = None, opts: Optional[ScoreOptions] = None,
                     placement: Placement = Placement()) -> Optional[Path]:
    """Score images produced elsewhere (an image folder, shards, or a set genbench generate wrote) against a
    reference; write the record. A generated set brings its prompts (labels for the conditional audit, CLIPScore,
    the demographic audit: scored unless ``--metrics`` says otherwise) and what made it (the ``external`` field)."""
    opts = opts or ScoreOptions()
    results_dir = Path(results)
    check_writable(results_dir)
    ref = open_reference(reference)
    try:
        source = open_images(images, channels=ref.shape[0], labels=labels, class_names=ref.class_names)
    except ImageSourceError as e:
        raise BenchmarkError(f"--images: {e}") from e
    external = None
    if isinstance(source, GeneratedSet):
        external = _external_of(source)
        if opts.metrics == DEFAULT:  # no --metrics: the prompt metrics too, the demographic audit where it applies
            grouped = any(p.group is not None for p in source.prompts)
            opts.metrics = (*DEFAULT, *(m for m in PROMPT_METRICS if m != DEMOGRAPHICS or grouped))
    scorer = Scorer(ref, opts, placement, source.shape, held_out=held_out_split(ref))
    metrics, std, draws, skipped, protocol, evidence = _evaluate(scorer, [source])
    protocol.update(seed=None, repeats=1, images=source.describe())
    name = name or (external.get("name") or external["model"] if external else Path(images).resolve().name)
    conditional = getattr(source, "labels", None) is not None
    return _write_record(results_dir, _record_name(name, source.num_images, None), placement, metrics, std, draws,
                         skipped, protocol, evidence, run_id=name, run_dir=None, family="external",
                         conditional=conditional, external=external,
                         provenance={"images": str(images), "labels": labels}, cost=_external_cost(external))


def _external_of(source: GeneratedSet) -> dict[str, Any]:
    """What a record says about a generator behind an API: service, model, prompt suite, counts, time and cost."""
    info = source.generation
    totals = info.get("totals", {})
    return {"provider": info.get("provider", "openai"), "api_base": info.get("api_base"),
            "endpoint": info.get("endpoint"), "model": info.get("model"), "size": info.get("size"),
            "quality": info.get("quality"), "prompt_suite": info.get("prompt_suite"),
            "images_per_prompt": info.get("images_per_prompt"), "images": source.num_images,
            "refused": totals.get("refused"), "failed": totals.get("failed"), "requests": totals.get("requests"),
            "wall_seconds": totals.get("wall_seconds"), "cost": totals.get("cost"),
            "price_per_image": totals.get("price_per_image"), "tasks": totals.get("tasks"),
            "task_ids": totals.get("task_ids"), "pending": totals.get("pending"),
            "billed_images": totals.get("billed_images"), "name": info.get("name"),
            **({"pipeline": info["pipeline"]} if "pipeline" in info else {})}


def _external_cost(external: Optional[dict[str, Any]]) -> dict[str, Any]:
    if not external or not external.get("wall_seconds"):
        return {}
    return {"sampling_images_per_s": round(external["images"] / external["wall_seconds"], 2),
            "usd": external.get("cost")}


def benchmark_reference_rows(shards: str, num_samples: int, seed: int = 0, results: str = "results",
                             opts: Optional[ScoreOptions] = None, placement: Placement = Placement(),
                             fit: Optional[dict[str, Any]] = None) -> list[Path]:
    """The leaderboard's frame: the held-out val split scored as if generated (the floor a perfect
    model reaches at that sample count) and uniform noise (the ceiling), both against the train split.
    ``fit``: the runs' data.image_size etc., so the frame is at the size the models were trained and scored at."""
    opts = opts or ScoreOptions()
    out = []
    ref = ShardImages(shards, "train", fit) if fit else open_reference(shards)
    val = ShardImages(shards, "val", fit)
    scorer = Scorer(ref, opts, placement, ref.shape, held_out=val)  # one reference pass for both rows
    noise = UniformNoise(num_samples, ref.shape, seed)
    for run_id, row, source, s in ((FLOOR, "floor", val, None), (CEILING, "ceiling", noise, seed)):
        metrics, std, draws, skipped, protocol, evidence = _evaluate(scorer, [source])
        protocol.update(seed=s, repeats=1, images=source.describe())
        path = _write_record(Path(results), _record_name(row, source.num_images, s), placement, metrics, std, draws,
                             skipped, protocol, evidence, run_id=run_id, run_dir=None, family="reference",
                             conditional=False, reference_row=row, provenance={"images": source.describe()}, cost={})
        if path:
            out.append(path)
    return out


def _grid(images: torch.Tensor, n: int = 64, nrow: int = 8) -> torch.Tensor:
    from torchvision.utils import make_grid

    return make_grid(images[:n], nrow=nrow, padding=1)


def check_writable(results: Path) -> None:
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BenchmarkError(f"results directory {results} is not writable ({e}); pass --results DIR") from e
