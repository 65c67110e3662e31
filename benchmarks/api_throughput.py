"""Images/s of `genbench generate` against `genbench serve`, beside a plain loop of requests to the same server
in the same run: the client must not be the bottleneck (target: generate >= 0.9x the plain loop at every
concurrency). Written to ``benchmarks/results/api-<device>.json``.

The task-based providers (midjourney, firefly, bfl) the same way, against the stand-in server of the tests
(``tests/provider_server.py``) with a fixed task latency: `genbench generate --provider P` against a plain
submit-and-poll loop that polls at a fixed interval (``--poll-interval``, the shortest wait generate uses), at
concurrency 1 and 8 (section ``generate_vs_task_loop``; ``--only tasks`` runs just these).

The server is a real `genbench serve` process on 127.0.0.1 in front of a conditional digits VAE this script
trains (or ``--run``). Both clients ask one image per request (what `genbench generate` does: DALL-E 3 takes
only n=1) with the digits prompts; at each concurrency the plain loop and `generate` alternate, three times,
and the median round counts for each (the server's own speed drifts with the machine's load).

Server and clients get their own cores (the server the first, with one torch thread; this process the last): on
a 2-core machine they would otherwise take CPU from each other, and a client's CPU per request would show as a
slower server rather than as a client bottleneck. On a cluster the server has its own node.

    .venv/bin/python benchmarks/api_throughput.py            # 400 images per measurement
    .venv/bin/python benchmarks/api_throughput.py --small    # a quick run that only checks it still works
    .venv/bin/python benchmarks/api_throughput.py --only tasks --task-latency 1.0
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

sys.path.insert(0, str(REPO / "tests"))  # the stand-in servers of the named services live with the tests
from provider_server import CLIENT_ID, KEY, ProviderServer  # noqa: E402

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


TASK_MODELS = {"midjourney": "midjourney-v7", "firefly": "image4_standard", "bfl": "flux-pro-1.1"}


def task_loop(provider: str, base: str, images: int, concurrency: int, interval: float) -> float:
    """images/s of a plain submit-and-poll loop: `concurrency` threads, one pooled httpx client, a fixed poll
    interval, the image downloaded; no retries, no bookkeeping, nothing written."""
    per_task = 4 if provider == "midjourney" else 1
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=2 * concurrency)) as client:
        headers = {"x-key": KEY} if provider == "bfl" else {"Authorization": f"Bearer {KEY}"}
        if provider == "firefly":
            token = client.post(f"{base}/ims/token/v3", data={"grant_type": "client_credentials", "client_id":
                                                              CLIENT_ID, "client_secret": KEY}).json()
            headers = {"Authorization": f"Bearer {token['access_token']}", "x-api-key": CLIENT_ID,
                       "x-model-version": TASK_MODELS[provider]}

        def one(i: int) -> None:
            prompt = f"a plain digit {DIGITS[i % 10]} {i}"
            if provider == "midjourney":
                task = client.post(f"{base}/mj/submit/imagine", json={"prompt": prompt}, headers=headers).json()
                poll, done, field = f"{base}/mj/task/{task['result']}/fetch", "SUCCESS", "imageUrl"
            elif provider == "firefly":
                task = client.post(f"{base}/v3/images/generate-async", json={"prompt": prompt, "numVariations": 1},
                                   headers=headers).json()
                poll, done, field = task["statusUrl"], "succeeded", "url"
            else:
                task = client.post(f"{base}/v1/{TASK_MODELS[provider]}", json={"prompt": prompt},
                                   headers=headers).json()
                poll, done, field = task["polling_url"], "Ready", "sample"
            while True:
                time.sleep(interval)
                status = client.get(poll, headers=headers).json()
                if status["status"] == done:
                    break
            url = status.get("imageUrl") or (status.get("result") or {}).get("sample") or \
                status["result"]["outputs"][0]["image"]["url"]
            assert field and client.get(url).status_code == 200

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(images // per_task)))
        return images / (time.perf_counter() - t0)


def task_generate_rate(provider: str, base: str, images: int, concurrency: int, interval: float, out: Path) -> float:
    os.environ.update(BENCH_KEY=KEY, FIREFLY_CLIENT_ID=CLIENT_ID)
    per_prompt = 4 if provider == "midjourney" else 1
    suite = out.with_suffix(".jsonl")
    suite.write_text("".join(f'{{"id": "p{i:04d}", "prompt": "a plain digit {DIGITS[i % 10]} {i}"}}\n'
                             for i in range(images // per_prompt)))
    outcome = generate(GenerateOptions(provider=provider, api_base=base, model=TASK_MODELS[provider],
                                       prompts=str(suite), out=str(out), images_per_prompt=per_prompt,
                                       concurrency=concurrency, poll_interval=interval, api_key_env="BENCH_KEY",
                                       token_url=f"{base}/ims/token/v3", progress=False))
    assert outcome.done == images and not outcome.failed, outcome
    return outcome.done / outcome.wall_seconds


def task_rows(args: argparse.Namespace, work: Path) -> dict:
    rows: dict = {}
    with ProviderServer(latency=args.task_latency, token_uses=10**9) as server:  # no token expiry here
        for provider in TASK_MODELS:
            rows[provider] = {}
            for c in (1, 8):
                # a quarter of the tasks one at a time: each takes the full task latency
                tasks = (8 if args.small else args.tasks) // (4 if c == 1 else 1)
                images = tasks * (4 if provider == "midjourney" else 1)
                plain, client = [], []
                for attempt in range(1 if args.small else args.rounds):
                    plain.append(task_loop(provider, server.base, images, c, args.poll_interval))
                    client.append(task_generate_rate(provider, server.base, images, c, args.poll_interval,
                                                     work / f"{provider}-{c}-{attempt}"))
                p, g = statistics.median(plain), statistics.median(client)
                rows[provider][str(c)] = {"plain_loop_images_per_s": round(p, 3), "generate_images_per_s": round(g, 3),
                                          "ratio_generate_vs_plain": round(g / p, 3), "images": images,
                                          "rounds": {"plain": [round(v, 3) for v in plain],
                                                     "generate": [round(v, 3) for v in client]}}
                print(f"{provider} concurrency {c}: plain {p:.2f} img/s, generate {g:.2f} img/s, ratio {g / p:.2f}",
                      flush=True)
    return rows


def serve_section(args: argparse.Namespace, work: Path, path: Path) -> None:
    images = 40 if args.small else args.images
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run to serve (default: train a conditional digits VAE)")
    parser.add_argument("--images", type=int, default=400, help="images per measurement (a multiple of 10)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--small", action="store_true", help="40 images per measurement, a 20-step model")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per concurrency (median counts)")
    parser.add_argument("--out", help="results file (default benchmarks/results/api-<device>.json)")
    parser.add_argument("--only", choices=("serve", "tasks"), help="run one of the two sections (default both)")
    parser.add_argument("--task-latency", type=float, default=1.0, help="seconds each stand-in task runs (default 1)")
    parser.add_argument("--tasks", type=int, default=32,
                        help="tasks per task-provider measurement at concurrency 8 (a quarter at 1)")
    parser.add_argument("--poll-interval", type=float, default=0.1,
                        help="the plain loop's fixed poll interval, and generate's --poll-interval (default 0.1)")
    args = parser.parse_args()
    path = Path(args.out) if args.out else results_path(None).with_name(f"api-{results_path(None).name}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "tasks":
            serve_section(args, Path(tmp), path)
        if args.only != "serve":
            merge_results(path, "generate_vs_task_loop", {
                "providers": task_rows(args, Path(tmp)), "task_latency_s": args.task_latency,
                "poll_interval_s": args.poll_interval, "server": "tests/provider_server.py in this process "
                "(threads), each task running task_latency_s", "cpus": os.cpu_count()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
