"""What each genbench command does once its arguments are parsed: calls into one stage and prints the outcome."""

from __future__ import annotations

import argparse
import json
import sys


def fail(e: BaseException) -> int:
    print(f"genbench: error: {e}", file=sys.stderr)
    return 2


def cmd_fit(args: list[str]) -> int:
    from pipeline.data.manifest import ShardError
    from pipeline.fit.train import ConfigError, DryRun, fit
    from pipeline.models.base import NonFiniteLoss
    from pipeline.models.first_stage import FirstStageError

    try:
        print(f"run directory: {fit(args)}")
    except DryRun as d:
        print(d.config_yaml)
        print(f"# run directory: {d.run_dir}")
    except (ConfigError, argparse.ArgumentError) as e:  # jsonargparse's errors name the bad key
        return fail(e)
    except (ShardError, FirstStageError, NonFiniteLoss) as e:  # genbench's own, in training: the message is the fix
        print(f"genbench: error: {e}\ngenbench fit: stopped; {_resume_hint(args)}", file=sys.stderr)
        return 1
    except BaseException as e:  # Ctrl-C (Lightning turns it into SystemExit(1)), a crash, a kill
        if isinstance(e, SystemExit) and e.code in (0, None):  # --help and --print_config exit cleanly
            raise
        print(f"genbench fit: {'interrupted' if isinstance(e, (KeyboardInterrupt, SystemExit)) else 'failed'}; "
              f"{_resume_hint(args)}", file=sys.stderr)
        raise
    return 0


def _resume_hint(args: list[str]) -> str:
    """The one command that continues the run, and from where."""
    import shlex

    from pipeline.fit.train import last_checkpoint, resolve

    command = shlex.join(["genbench", "fit", *args])
    try:
        run_dir = resolve(args).run_dir
    except BaseException:  # the config itself is what failed: nothing to resume
        return f"fix the error above, then run {command}"
    ckpt = last_checkpoint(run_dir)
    where = f"resumes from {ckpt}" if ckpt else "starts the run again (it has no checkpoint yet)"
    return f"`{command}` {where}"


def cmd_prepare(args, extra) -> int:
    import tempfile
    from pathlib import Path

    from pipeline.data.manifest import verify_shards
    from pipeline.data.remote import is_remote
    from pipeline.data.shards import upload_shards, write_shards
    from pipeline.data.sources import open_source

    if args.verify:
        problems = verify_shards(args.verify)
        for p in problems:
            print(f"FAIL {p}")
        verdict = f"{len(problems)} problem(s)" if problems else "OK, every shard matches the manifest"
        print(f"{args.verify}: {verdict}")
        return 1 if problems else 0
    if not (args.source or args.from_shards) or not args.out or (args.source and args.from_shards):
        print("genbench: error: prepare needs SOURCE or --from PATTERN (one of them), and --out DIR "
              "(or --verify DIR)", file=sys.stderr)
        return 2
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels {args.max_pixels} must be a positive number of pixels")
    options = {"val_fraction": args.val_fraction, "seed": args.seed, "shard_size": args.shard_size,
               "image_size": args.image_size, "channels": args.channels, "png_compression": args.png_compression,
               "resize_mode": args.resize}
    if args.from_shards:
        from pipeline.data.reshard import reshard

        def write(out: str, overwrite: bool) -> dict:
            return reshard(args.from_shards, out, overwrite=overwrite, label_key=args.label_key,
                           max_pixels=args.max_pixels, **options)
    else:
        source = open_source(args.source, root=args.root, download=args.download,
                             label_attribute=args.label_attribute, max_pixels=args.max_pixels)

        def write(out: str, overwrite: bool) -> dict:
            return write_shards(source, out, overwrite=overwrite, **options)
    if is_remote(args.out):  # written here in full, then uploaded (manifest last)
        with tempfile.TemporaryDirectory(prefix="genbench-prepare-") as tmp:
            manifest = write(str(Path(tmp) / "shards"), False)
            upload_shards(Path(tmp) / "shards", args.out)
    else:
        manifest = write(args.out, args.overwrite)
    _print_splits(manifest, args.out)
    return 0


def _print_splits(manifest: dict, out: str) -> None:
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['num_samples']} images in {len(info['shards'])} shard(s), "
              f"{info['image_size'][1]}x{info['image_size'][0]}x{info['channels']}")
    skipped = manifest.get("skipped_samples") or {}
    if skipped:
        print(f"skipped {sum(skipped.values())} sample(s) that do not decode, in {len(skipped)} shard(s) "
              f"(first: {next(iter(skipped))}); they are listed in the manifest")
    for key, what in (("skipped_links", "link member(s) (symbolic or hard links, not followed)"),
                      ("duplicate_names", "duplicate member or sample name(s)")):
        counts = manifest.get(key) or {}
        if counts:
            print(f"found {sum(counts.values())} {what} in {len(counts)} shard(s) (first: {next(iter(counts))}); "
                  f"counted under {key} in the manifest")
    images = manifest.get("skipped_images") or {}
    if images:
        first = next(iter(images))
        print(f"skipped {len(images)} image(s) that cannot be used (first: {first}: {images[first]}); they are "
              "listed with the reason under skipped_images in the manifest")
    print(f"wrote {out.rstrip('/')}/manifest.json")


def cmd_benchmark(args, extra) -> int:
    from pathlib import Path

    from pipeline.benchmark import (
        ScoreOptions,
        benchmark_images,
        benchmark_reference_rows,
        benchmark_run,
        parse_metrics,
    )
    from pipeline.benchmark.distributed import init_from_environment, shutdown
    from pipeline.benchmark.stage import run_checkpoints

    if args.checkpoints != "last" and not args.run:
        raise ValueError("--checkpoints chooses among a --run's checkpoints")
    if (args.images or args.reference_rows) and not args.reference:
        raise ValueError("--images and --reference-rows need --reference SHARDS_OR_FOLDER to compare with")
    if args.run and (args.reference or args.labels or args.name):
        raise ValueError("--run scores against the run's own shards; --reference, --labels and --name go with --images")
    if args.first_stage and not args.run:
        raise ValueError("--first-stage tells where a --run's first stage is now; images made elsewhere have none")
    if args.sample_precision and not args.run:
        raise ValueError("--sample-precision sets how a --run's model samples; images made elsewhere are already drawn")
    opts = ScoreOptions(batch_size=args.batch_size, inception_weights=args.inception_weights, auditor=args.auditor,
                        allow_tf32=args.allow_tf32, dinov2_weights=args.dinov2_weights,
                        clip_weights=args.clip_weights)
    if args.metrics and not args.run:
        opts.metrics = parse_metrics(args.metrics)
    placement = init_from_environment()
    opts.progress = placement.is_main
    try:
        if args.run:
            written = [benchmark_run(args.run, num_samples=args.num_samples, seed=args.seed, results=args.results,
                                     opts=opts, metrics=args.metrics, repeats=args.repeats, placement=placement,
                                     sample_precision=args.sample_precision, checkpoint=ckpt,
                                     first_stage=args.first_stage)
                       for ckpt in run_checkpoints(Path(args.run), args.checkpoints)]
        elif args.images:
            if args.repeats != 1:
                raise ValueError("--repeats draws new samples from a run; a folder of images is one sample set")
            written = [benchmark_images(args.images, args.reference, labels=args.labels, name=args.name,
                                        results=args.results or "results", opts=opts, placement=placement)]
        else:
            written = [*benchmark_reference_rows(args.reference, args.num_samples or 10000, args.seed or 0,
                                                results=args.results or "results", opts=opts, placement=placement)]
    finally:
        shutdown(placement)
    from pipeline.leaderboard import record_summary

    for path in written:
        if path is not None:
            print(record_summary(json.loads(path.read_text())))
            print(f"wrote {path}")
    return 0


def cmd_leaderboard(args, extra) -> int:
    from pipeline import leaderboard

    try:
        path = leaderboard.build(args.results, args.out, wandb=args.wandb, sort=args.sort)
    except ValueError as e:  # an unknown --sort, or a damaged record: the message names it
        print(f"genbench: error: {e}", file=sys.stderr)
        return 2
    if path is None:
        print(f"genbench: error: no result records in {args.results}; run genbench benchmark first", file=sys.stderr)
        return 1
    print(leaderboard.ranked_summary(args.results, args.out, sort=args.sort))
    return 0


def cmd_run(args, extra) -> int:
    from pipeline.launch.runner import run

    run(args.experiments, extra, runs=args.runs, results=args.results, leaderboard_dir=args.leaderboard,
        force=args.force)
    return 0


def cmd_submit(args, extra) -> int:
    from pipeline.launch.submit import prepare_submission, script, submit

    sub = prepare_submission(args.sweep, args.sweeps)
    if args.dry_run:
        print(script(sub), end="")
        return 0
    ids = submit(sub)
    print(f"submitted sweep {sub.sweep.name!r}: {len(sub.tasks)} run(s)")
    print(f"  train     job {ids['TRAIN_JOB']} (array 0-{len(sub.tasks) - 1})")
    print(f"  benchmark job {ids['BENCHMARK_JOB']} (task i after training task i succeeds)")
    for var, job in ids.items():
        if var.startswith("REFERENCE_JOB"):
            print(f"  reference job {job} (floor and ceiling rows)")
    print(f"  leaderboard job {ids['LEADERBOARD_JOB']} (after all benchmarks)")
    for task in sub.tasks:
        print(f"  [{task.index}] {task.family} seed {task.seed} {task.grid or ''} -> {task.run_dir}")
    print(f"logs: {sub.directory}/logs/   plan and job ids: {sub.directory}/sweep.json")
    print(f"results: {sub.results}/   leaderboard: {sub.leaderboard}/leaderboard.md")
    print(f"watch: squeue -j {ids['TRAIN_JOB']},{ids['BENCHMARK_JOB']},{ids['LEADERBOARD_JOB']}")
    return 0


def cmd_generate(args, extra) -> int:
    from pipeline.services.client import GenerateError, GenerateOptions, generate

    opts = GenerateOptions(provider=args.provider, api_base=args.api_base, model=args.model, prompts=args.prompts,
                           out=args.out, images_per_prompt=args.images_per_prompt, size=args.size,
                           quality=args.quality,
                           response_format=args.response_format,
                           concurrency=args.concurrency, max_retries=args.max_retries, timeout=args.timeout,
                           poll_interval=args.poll_interval, api_key_env=args.api_key_env,
                           auth_header=args.auth_header, client_id_env=args.client_id_env, token_url=args.token_url,
                           price_per_image=args.price_per_image, retry_refused=args.retry_refused,
                           steps=args.steps, guidance_scale=args.guidance_scale, scheduler=args.scheduler,
                           batch_size=args.batch_size, device=args.device)
    try:
        outcome = generate(opts)
    except GenerateError as e:
        print(f"genbench generate: {e}\nwhat is done is kept in {args.out}; the same command resumes", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the requests in flight were finished and recorded first
        print(f"genbench generate: interrupted; what is done is kept in {args.out}; the same command resumes",
              file=sys.stderr)
        return 130
    print(f"{args.out}: {outcome.done} new image(s) in {outcome.wall_seconds:.1f} s ({outcome.skipped_existing} "
          f"already there), {outcome.refused} refused, {outcome.failed} failed, {outcome.pending} pending, "
          f"{outcome.retries} retries")
    if outcome.refused:
        print(f"refusals are recorded in {args.out}/meta/<id>.json (\"refused\"); --retry-refused asks again")
    if outcome.pending:
        print(f"{outcome.pending} image(s) are in tasks still running at --timeout; the same command again polls "
              "those tasks (nothing is paid twice)", file=sys.stderr)
    if outcome.failed:
        print(f"{outcome.failed} image(s) failed (see \"failed\" in {args.out}/meta/); run the same command again "
              "to request them", file=sys.stderr)
    return 1 if outcome.failed or outcome.pending else 0


def cmd_serve(args, extra) -> int:
    from pipeline.services.server import ServeError, ServeOptions, serve

    try:
        serve(ServeOptions(run=args.run, host=args.host, port=args.port, api_key_env=args.api_key_env,
                           max_n=args.max_n, max_in_flight=args.max_in_flight, seed=args.seed, device=args.device,
                           body_timeout=args.body_timeout, first_stage=args.first_stage))
    except ServeError as e:
        return fail(e)
    return 0


def cmd_train_auditor(args, extra) -> int:
    from pathlib import Path

    from pipeline.benchmark.images import FIT_DEFAULTS
    from pipeline.metrics.auditor import train_auditor

    fit = {k: v for k, v in (("image_size", args.image_size), ("channels", args.channels), ("resize", args.resize))
           if v is not None and FIT_DEFAULTS.get(k) != v}
    print(f"auditor: {train_auditor(args.data, epochs=args.epochs, out=Path(args.out) if args.out else None, fit=fit)}")
    return 0


def cmd_fetch_weights(args, extra) -> int:
    from pipeline.metrics.clip import CLIP_WEIGHTS
    from pipeline.metrics.dinov2 import DINOV2_WEIGHTS
    from pipeline.metrics.features import INCEPTION_WEIGHTS
    from pipeline.models.perceptual import VGG16_WEIGHTS

    weights = {"inception": INCEPTION_WEIGHTS, "dinov2": DINOV2_WEIGHTS, "clip": CLIP_WEIGHTS, "vgg16": VGG16_WEIGHTS}
    for name in args.networks or ["inception"]:
        print(f"{weights[name].network} weights: {weights[name].download()}")
    return 0


COMMAND_FUNCS = {"prepare": cmd_prepare, "benchmark": cmd_benchmark, "leaderboard": cmd_leaderboard, "run": cmd_run,
                 "submit": cmd_submit,
                 "generate": cmd_generate, "serve": cmd_serve, "train-auditor": cmd_train_auditor,
                 "fetch-weights": cmd_fetch_weights}
