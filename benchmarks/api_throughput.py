"""Images/s of `genbench generate` against `genbench serve`, beside a plain loop of requests to the same server
in the same run: the client must not be the bottleneck (target: generate >= 0.9x the plain loop at every
concurrency). Written to ``benchmarks/results/api-<device>.json``.

The server is a real `genbench serve` process on 127.0.0.1 in front of a conditional digits VAE this script
trains (or ``--run``). Both clients ask one image per request (what `genbench generate` does: DALL-E 3 takes
only n=1) with the digits prompts; at each concurrency the plain loop and `generate` alternate, three times,
and the median round counts for each (the server's own speed drifts with the machine's load).

Server and clients get their own cores (the server the first, with one torch thread; this process the last): on
a 2-core machine they would otherwise take CPU from each other, and a client's CPU per request would show as a
slower server rather than as a client bottleneck. On a cluster the server has its own node.

    .venv/bin/python benchmarks/api_throughput.py            # 400 images per measurement
    .venv/bin/python benchmarks/api_throughput.py --small    # a quick run that only checks it still works
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.common import REPO, merge_results, results_path
from pipeline.benchmark.distributed import free_port
from pipeline.services.client import GenerateOptions, generate

PROMPTS = REPO / "prompts" / "digits.jsonl"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def train_run(work: Path, steps: int = 200) -> Path:
    """A conditional digits VAE: the served model (its quality does not change the throughput)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "fit", "--config", str(REPO / "experiments" / "digits" / "vae.yaml"),
           "--model.init_args.num_classes=10", f"--trainer.max_steps={steps}", f"--run.root={work / 'runs'}",
           "--run.id=served", "--tracking.wandb=false", "--trainer.enable_progress_bar=false",
           f"--data.init_args.shards={work / 'shards'}"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    return work / "runs" / "served"


def start_server(run: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cores = sorted(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if len(cores) > 1 else dict(os.environ)
    pin = (lambda: os.sched_setaffinity(0, {cores[0]})) if len(cores) > 1 else None
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--run", str(run), "--port", str(port),
                             "--max-in-flight", "256"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env=env, preexec_fn=pin)
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[-1]})  # the clients: another core than the server's
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, f"{base}/v1"
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("genbench serve did not start")


def plain_loop(base: str, images: int, concurrency: int) -> float:
    """images/s of `concurrency` threads posting n=1 requests with one pooled httpx client, nothing else."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=120, limits=limits) as client:
        def one(i: int) -> None:
            r = client.post(f"{base}/images/generations", json={"model": "served", "n": 1, "size": "8x8",
                                                                "prompt": f"a handwritten digit {DIGITS[i % 10]}",
                                                                "response_format": "b64_json"})
            r.raise_for_status()

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(images)))
        return images / (time.perf_counter() - t0)


def generate_rate(base: str, images: int, concurrency: int, out: Path) -> float:
    outcome = generate(GenerateOptions(api_base=base, model="served", prompts=str(PROMPTS), out=str(out),
                                       images_per_prompt=images // 10, size="8x8", concurrency=concurrency,
                                       progress=False))
    assert outcome.done == images and not outcome.failed, outcome
    return outcome.done / outcome.wall_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run to serve (default: train a conditional digits VAE)")
    parser.add_argument("--images", type=int, default=400, help="images per measurement (a multiple of 10)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--small", action="store_true", help="40 images per measurement, a 20-step model")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per concurrency (median counts)")
    parser.add_argument("--out", help="results file (default benchmarks/results/api-<device>.json)")
    args = parser.parse_args()
    images = 40 if args.small else args.images
    path = Path(args.out) if args.out else results_path(None).with_name(f"api-{results_path(None).name}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = Path(args.run) if args.run else train_run(work, 20 if args.small else 200)
        proc, base = start_server(run)
        try:
            plain_loop(base, 20, 4)  # warm-up: first sampling calls, connection set-up
            rows = {}
            for c in (int(v) for v in args.concurrency.split(",")):
                plain, client = [], []
                for attempt in range(args.rounds):
                    plain.append(plain_loop(base, images, c))
                    client.append(generate_rate(base, images, c, work / f"gen-{c}-{attempt}"))
                p, g = statistics.median(plain), statistics.median(client)
                rows[str(c)] = {"plain_loop_images_per_s": round(p, 2), "generate_images_per_s": round(g, 2),
                                "ratio_generate_vs_plain": round(g / p, 3), "images": images,
                                "rounds": {"plain": [round(v, 2) for v in plain],
                                           "generate": [round(v, 2) for v in client]}}
                print(f"concurrency {c}: plain {p:.1f} img/s, generate {g:.1f} img/s, ratio {g / p:.2f}", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    merge_results(path, "generate_vs_serve", {"concurrency": rows, "server": "genbench serve, conditional digits "
                                              "VAE 8x8, one image per request, one core (1 torch thread)",
                                              "client": "one core", "cpus": os.cpu_count()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
