"""The argparse definition of every genbench command except fit (LightningCLI parses its own)."""

from __future__ import annotations

import argparse

COMMANDS = {
    "prepare": "write WebDataset shards + manifest.json from a source (digits, folder:PATH, torchvision:NAME)",
    "fit": "train a model from an experiment YAML (LightningCLI; see genbench fit --help)",
    "benchmark": "score a trained run or a folder of images (FID, IS, KID, precision/recall, bias audit) "
                 "into a result record",
    "leaderboard": "build leaderboard.md / .csv / .html from result records",
    "run": "prepare, fit, benchmark and rank one or more experiments (or a suite such as experiments/quickstart.yaml)",
    "submit": "submit a sweep (families x seeds x overrides) to SLURM: train array -> benchmark array -> leaderboard",
    "generate": "ask an OpenAI-compatible images endpoint (a service, or genbench serve) for K images per prompt of a "
                "suite; resumable",
    "serve": "an OpenAI-compatible images endpoint in front of a trained run (POST /v1/images/generations)",
    "train-auditor": "train the auditor classifier of a shard directory (done automatically by benchmark)",
    "fetch-weights": "download network weights (InceptionV3, DINOv2, CLIP, LPIPS's VGG16) into the torch hub "
                     "cache (needs internet)",
}


# The weights' file name, as the skip message names it; a constant of torch-fidelity's, read without importing
# torch (which `genbench --help` should not wait for).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


FIRST_STAGE_HELP = ("a latent model's first stage (its autoencoder run directory or checkpoint file) where it is now, "
                    "if it was moved: found by the sha256 the model was trained on (default: the recorded place)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genbench", description="Train and fairly compare image generators.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Quickstart: genbench run experiments/quickstart.yaml\n"
                                       "Every command is quiet by default; --verbose (anywhere on the line, or "
                                       "GENBENCH_VERBOSE=1) shows Lightning's and W&B's own output too.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        if name == "fit":
            sub.add_parser(name, help=text, add_help=False)
    prep = sub.add_parser("prepare", help=COMMANDS["prepare"], description=COMMANDS["prepare"])
    prep.add_argument("source", nargs="?",
                      help="digits | folder:PATH | torchvision:NAME (CIFAR10, MNIST, FashionMNIST, CelebA)")
    prep.add_argument("--out", help="output shard directory, or s3://bucket/prefix/ (uploaded, manifest last)")
    prep.add_argument("--from", dest="from_shards", metavar="PATTERN",
                      help="instead of SOURCE: re-shard another tool's WebDataset corpus, streamed once: a brace "
                           "pattern of shard URLs or paths (https://host/train-{000000..000099}.tar, s3://..., "
                           "pipe:CMD) or a directory of .tar shards")
    prep.add_argument("--label-key", default="cls",
                      help="with --from: where the class is: cls (default), json:ATTRIBUTE or txt")
    prep.add_argument("--verify", metavar="DIR", help="check the shards of DIR against its manifest instead of writing")
    prep.add_argument("--val-fraction", type=float, default=0.1,
                      help="fraction held out as the val split (default 0.1)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    prep.add_argument("--shard-size", default="10000", help="samples (5000) or bytes (64MB) per shard (default 10000)")
    prep.add_argument("--image-size", type=int, help="resize to this square size in pixels (default: keep)")
    prep.add_argument("--resize", choices=("center-crop", "stretch"), default="center-crop",
                      help="with --image-size: center-crop (shorter side to the size, then the central square; "
                           "default) or stretch (both sides: proportions change)")
    prep.add_argument("--channels", type=int, choices=(1, 3),
                      help="convert every image to grayscale (1) or RGB (3) (default: keep)")
    prep.add_argument("--png-compression", type=int, default=0,
                      help="zlib level of the lossless PNGs, 0-9 (default 0: largest files, ~2.8x faster to decode)")
    # the default is pipeline.data.imagefile.MAX_PIXELS, written out: the parser imports nothing heavy
    prep.add_argument("--max-pixels", type=int, default=64_000_000,
                      help="skip and list (in the manifest) images above this many pixels, read from the header "
                           "before any pixel is decoded (default 64000000)")
    prep.add_argument("--root", default="data/torchvision", help="local root of torchvision datasets")
    prep.add_argument("--download", action="store_true", help="let torchvision download the dataset (needs internet)")
    prep.add_argument("--label-attribute", help="CelebA: use this attribute (e.g. Male) as the class label")
    prep.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    bench = sub.add_parser(
        "benchmark", help=COMMANDS["benchmark"], description=COMMANDS["benchmark"] +
        ". Under torchrun or srun every rank samples and extracts its share; rank 0 writes the record.")
    what = bench.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", "--run-dir", dest="run",
                      help="run directory (runs/<id>): sample its EMA weights, score against its shards (spell it "
                           "--run-dir under torchrun, which takes --run for its own --run-path)")
    what.add_argument("--images", help="images made elsewhere: a folder of PNG/JPEG files, or a shard directory")
    what.add_argument("--reference-rows", action="store_true",
                      help="score the leaderboard's reference rows for --reference: its val split (floor) and "
                           "uniform noise (ceiling)")
    bench.add_argument("--reference", help="with --images/--reference-rows: shard directory (genbench prepare) "
                                           "or image folder to compare with")
    bench.add_argument("--labels", help="with --images: CSV of `file,label` rows, the class each image was asked to be")
    bench.add_argument("--name", help="with --images: the row's name on the leaderboard (default: the folder name)")
    bench.add_argument("--num-samples", type=int,
                       help="generated images to score (default: the run's benchmark.num_samples; 50000)")
    bench.add_argument("--seed", type=int, help="seed of the generated images (default: the run's benchmark.seed)")
    bench.add_argument("--repeats", type=int, default=1,
                       help="draw this many sample sets (seeds seed..seed+R-1); the record holds mean and std")
    bench.add_argument("--metrics", help="comma-separated subset of fid,is,kid,pr,fd_auditor,audit,memorization,"
                                         "fd_dinov2,clip_score,demographics (default: all but fd_dinov2; "
                                         "clip_score and demographics for a set genbench generate wrote)")
    bench.add_argument("--inception-weights", metavar="PATH",
                       help=f"torch-fidelity's InceptionV3 weights, the file {INCEPTION_FILE} (default: the torch "
                            "hub cache, where `genbench fetch-weights` puts it)")
    bench.add_argument("--dinov2-weights", metavar="PATH",
                       help="DINOv2 ViT-L/14 weights for fd_dinov2, Meta's dinov2_vitl14_pretrain.pth (default: the "
                            "torch hub cache, where `genbench fetch-weights dinov2` puts it)")
    bench.add_argument("--clip-weights", metavar="PATH",
                       help="CLIP ViT-B/32 weights for clip_score and the gender detector (default: the torch hub "
                            "cache, where `genbench fetch-weights clip` puts it)")
    bench.add_argument("--auditor", help="auditor checkpoint (default: trained on the reference's labels and cached)")
    bench.add_argument("--batch-size", type=int, default=250, help="images per batch (default 250)")
    bench.add_argument("--allow-tf32", action="store_true",
                       help="let the GPU use TF32 for features (faster; recorded in the protocol)")
    bench.add_argument("--results",
                       help="directory of result records (default: the run's benchmark.results, else results/)")
    bench.add_argument("--checkpoints", choices=("last", "all"), default="last",
                       help="with --run: score last.ckpt (default), or every checkpoint run.evaluate_every kept and "
                            "last.ckpt, each into its own record with the budget spent")
    bench.add_argument("--sample-precision", choices=("fp32", "bf16"),
                       help="with --run: sample in fp32 or under bf16 autocast (default: the run's "
                            "benchmark.sample_precision, fp32); recorded in the protocol")
    bench.add_argument("--first-stage", metavar="PATH", help=FIRST_STAGE_HELP)

    board = sub.add_parser("leaderboard", help=COMMANDS["leaderboard"], description=COMMANDS["leaderboard"])
    board.add_argument("--results", default="results", help="directory of result records (default results/)")
    board.add_argument("--out", default="leaderboard", help="output directory (default leaderboard/)")
    board.add_argument("--sort", metavar="METRIC",
                       help="rank by this metric column, e.g. fd_dinov2 or memorization (default: fid when every "
                            "model row has it, else fd_auditor)")
    board.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto",
                       help="log the table to W&B: auto = when W&B is logged in (default), offline = a local run "
                            "to `wandb sync` later")

    run = sub.add_parser("run", help=COMMANDS["run"], description=COMMANDS["run"] +
                         ". Other options are dotted overrides for every experiment, e.g. --trainer.max_steps=100.")
    run.add_argument("experiments", nargs="+", help="experiment or suite YAML files")
    run.add_argument("--runs", help="directory of run directories (default: the suite's, else runs/)")
    run.add_argument("--results", help="directory of result records (default: the suite's, else results/)")
    run.add_argument("--leaderboard", help="leaderboard output directory (default: the suite's, else leaderboard/)")
    run.add_argument("--force", action="store_true",
                     help="benchmark every run again, even one that already has a record of the same checkpoint, "
                          "sample count, seed and extractors")

    sw = sub.add_parser("submit", help=COMMANDS["submit"], description=COMMANDS["submit"] +
                        ". Every run is resolved and checked before the first sbatch.")
    sw.add_argument("sweep", help="sweep YAML (see experiments/sweep-digits.yaml)")
    sw.add_argument("--dry-run", action="store_true",
                    help="print the task lists and the exact sbatch commands as a shell script; submit nothing")
    sw.add_argument("--sweeps", default="sweeps", help="where each sweep's task lists, logs and sweep.json go "
                                                       "(default sweeps/, then <name>/)")

    gen = sub.add_parser(
        "generate", help=COMMANDS["generate"], description=COMMANDS["generate"] +
        ". Retries 408/409/429/5xx, timeouts and dropped connections with backoff (honouring Retry-After); records "
        "content-policy refusals and goes on; the same command again requests only the images still missing.")
    gen.add_argument("--provider", default="openai",
                     choices=("openai", "openai-chat", "stability", "firefly", "midjourney", "bfl", "diffusers"),
                     help="the service's protocol (default openai: the OpenAI images API and its copies; see "
                          "docs/services.md for each)")
    gen.add_argument("--api-base",
                     help="the API's base URL (default: the provider's official one), e.g. https://api.openai.com/v1, "
                          "https://api.cometapi.com for midjourney through CometAPI, http://127.0.0.1:8000/v1")
    gen.add_argument("--model", required=True, help="the model name the service knows, e.g. dall-e-3, gpt-image-1; "
                                                    "for --provider diffusers the pipeline's local directory")
    gen.add_argument("--prompts", required=True, help="prompt suite: JSONL or YAML (see prompts/)")
    gen.add_argument("--out", required=True, help="directory of the generated set (images/, meta/, generation.json)")
    gen.add_argument("--images-per-prompt", type=int, default=1, help="images K per prompt (default 1)")
    gen.add_argument("--size", help="WIDTHxHEIGHT to ask for, e.g. 1024x1024 (checked on every image); default: "
                                    "the service's")
    gen.add_argument("--quality", help="the service's quality setting, e.g. standard, hd, low, high")
    gen.add_argument("--response-format", choices=("b64_json", "url", "none"),
                     help="openai: ask for b64_json or url, or send none (default: b64_json, none for a gpt-image "
                          "model, which rejects the parameter)")
    gen.add_argument("--concurrency", type=int, default=4,
                     help="tasks in flight (default 4): a task's submission and its polls hold one slot")
    gen.add_argument("--max-retries", type=int, default=4, help="retries per request (default 4)")
    gen.add_argument("--timeout", type=float, default=120.0,
                     help="seconds to wait for one answer, and for one task to finish, its polls included (default "
                          "120); a task still running then is picked up by the next run")
    gen.add_argument("--poll-interval", type=float, default=1.0,
                     help="the shortest wait between polls of a submitted task (default 1 s); a task running longer "
                          "is asked every tenth of its age so far, at most every 15 s")
    gen.add_argument("--api-key-env",
                     help="environment variable holding the API key (default: the provider's, OPENAI_API_KEY, "
                          "COMETAPI_KEY, STABILITY_API_KEY, BFL_API_KEY, FIREFLY_CLIENT_SECRET; a loopback endpoint "
                          "needs none)")
    gen.add_argument("--auth-header",
                     help="the header the key goes in (default: the provider's): Authorization sends 'Bearer KEY', "
                          "another name (mj-api-secret, x-key) the bare key")
    gen.add_argument("--client-id-env", default="FIREFLY_CLIENT_ID",
                     help="firefly: the environment variable holding the OAuth client id (default FIREFLY_CLIENT_ID)")
    gen.add_argument("--token-url", help="firefly: the token endpoint (default Adobe IMS's /ims/token/v3)")
    gen.add_argument("--price-per-image", type=float,
                     help="USD per image, for the record's cost (midjourney: the price of one imagine / 4)")
    gen.add_argument("--retry-refused", action="store_true", help="ask again for images that were refused before")
    gen.add_argument("--steps", type=int, help="diffusers: inference steps (default: the pipeline's)")
    gen.add_argument("--guidance-scale", type=float, help="diffusers: classifier-free guidance scale (default: the "
                                                          "pipeline's)")
    gen.add_argument("--scheduler", help="diffusers: a scheduler class, e.g. DDIMScheduler, EulerDiscreteScheduler "
                                         "(built from the pipeline's scheduler config; default: its own)")
    gen.add_argument("--batch-size", type=int, help="diffusers: images per pipeline call (default 8 on a GPU, 1 on "
                                                    "the CPU); each image keeps its own seed")
    gen.add_argument("--device", help="diffusers: torch device (default cuda when there is one, else cpu)")

    srv = sub.add_parser("serve", help=COMMANDS["serve"], description=COMMANDS["serve"] +
                         ". Prompts map to classes through the shards' class names; concurrent requests are "
                         "sampled in one batch.")
    srv.add_argument("--run", required=True, help="run directory (runs/<id>)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1; any other needs a key in --api-key-env)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key-env", default="GENBENCH_API_KEY",
                     help="environment variable holding the bearer key clients must send (default GENBENCH_API_KEY)")
    srv.add_argument("--max-n", type=int, default=10, help="most images per request (default 10)")
    srv.add_argument("--max-in-flight", type=int, default=64, help="requests being sampled at once; more get 429 "
                                                                   "(default 64)")
    srv.add_argument("--body-timeout", type=float, default=10.0,
                     help="seconds a client may take to send its request body; a stalled one gets 408 (default 10)")
    srv.add_argument("--seed", type=int, default=0, help="seed of the served samples (default 0)")
    srv.add_argument("--device", default="cpu", help="torch device to sample on (default cpu)")
    srv.add_argument("--first-stage", metavar="PATH", help=FIRST_STAGE_HELP)

    aud = sub.add_parser("train-auditor", help=COMMANDS["train-auditor"], description=COMMANDS["train-auditor"])
    aud.add_argument("--data", required=True, help="shard directory with labels")
    aud.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    aud.add_argument("--out", help="checkpoint path (default: the cache, keyed by the manifest hash and the fit)")
    aud.add_argument("--image-size", type=int, help="classify images fitted to this size, as a run with "
                                                    "data.image_size sees them (default: the shards' size)")
    aud.add_argument("--channels", type=int, choices=(1, 3), help="convert to 1 or 3 channels (default: the shards')")
    aud.add_argument("--resize", choices=("center-crop", "random-crop", "stretch"), default="center-crop",
                     help="with --image-size: how images are fitted (default center-crop)")

    fetch = sub.add_parser("fetch-weights", help=COMMANDS["fetch-weights"], description=COMMANDS["fetch-weights"])
    fetch.add_argument("networks", nargs="*", choices=("inception", "dinov2", "clip", "vgg16"),
                       metavar="NETWORK",
                       help="inception (default), dinov2 (DINOv2 ViT-L/14, 1.2 GB, for --metrics fd_dinov2), clip "
                            "(CLIP ViT-B/32, 600 MB, for clip_score and the demographic audit), vgg16 (528 MB, the "
                            "autoencoder's perceptual loss)")
    return p
