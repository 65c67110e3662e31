"""``--provider diffusers``: a text-to-image ``DiffusionPipeline`` from a local directory (Stable Diffusion, SDXL,
FLUX, PixArt, ... as ``save_pretrained`` or the hub's snapshot lays them out), run here with Hugging Face
diffusers, never fetched (``local_files_only``). ``--model`` is the pipeline's directory.

Each image has its own seed (from the prompt id and the image index, recorded beside it) and its own
``torch.Generator``, so any image can be drawn again alone; images are drawn ``--batch-size`` at a time (default
8 on a GPU, 1 on the CPU), each row with its own generator. ``--scheduler`` (a diffusers scheduler class name,
built from the pipeline's scheduler config), ``--steps``, ``--guidance-scale`` and ``--size`` (height and width)
are the pipeline call's; unset, the pipeline's defaults. ``generation.json`` records the pipeline's identity:
its class, its ``model_index.json``, and a sha256 over the sha256 of each weight file, beside the options, so a
set is tied to the exact weights; a different pipeline or options into the same ``--out`` is refused. Resumable
as every provider: an image on disk is never drawn again, a killed run loses at most the images being drawn.
"""

from __future__ import annotations

import hashlib
import io
import json
import queue
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

from pipeline.console import verbose
from pipeline.io import sha256_file
from pipeline.seeds import stable_seed
from pipeline.services.providers.base import Answer, GenerateError, Provider, Submitted, size_of

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")
SEED_RANGE = 2**63 - 1
BATCH_WAIT = 0.05  # seconds the batcher waits for more prompts to fill a batch


def weights_identity(directory: Path) -> dict[str, Any]:
    """The sha256 of every weight file under ``directory`` and one sha256 over them all (path and hash sorted)."""
    files = {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*"))
             if p.is_file() and p.suffix in WEIGHT_SUFFIXES}
    combined = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()
    return {"weights_sha256": combined, "weight_files": files}


class LocalDiffusers(Provider):
    name = "diffusers"
    default_base = "local"
    default_key_env = ""
    needs_key = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import torch

        self.directory = Path(self.opts.model).expanduser().resolve()
        if not (self.directory / "model_index.json").is_file():
            raise GenerateError(f"--model {self.opts.model}: no model_index.json there; --provider diffusers takes "
                                "the directory of a diffusers pipeline (save_pretrained, or a downloaded snapshot)")
        self.device = self.opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = self.opts.batch_size or (8 if self.device.startswith("cuda") else 1)
        self.opts.concurrency = max(self.opts.concurrency, self.batch_size)  # enough prompts in flight to batch
        self.pipe = self._load()
        self.identity = {"class": type(self.pipe).__name__,
                         "model_index": json.loads((self.directory / "model_index.json").read_text()),
                         **weights_identity(self.directory), "scheduler": type(self.pipe.scheduler).__name__,
                         "steps": self.opts.steps, "guidance_scale": self.opts.guidance_scale,
                         "batch_size": self.batch_size, "device": self.device}
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._draw_batches, name="diffusers", daemon=True)
        self._worker.start()

    def _load(self) -> Any:
        import diffusers
        import torch
        import transformers

        if not verbose():  # their loading bars and advice carry nothing for the user (quiet unless --verbose)
            for library in (diffusers, transformers):
                library.utils.logging.disable_progress_bar()
                library.utils.logging.set_verbosity_error()
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32  # fp32 on CPUs, fp16 kernels
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(self.directory), local_files_only=True,
                                                               dtype=dtype)
        except (OSError, ValueError, ImportError) as e:  # a missing component or weight file, a foreign layout
            raise GenerateError(f"--model {self.directory}: diffusers could not load the pipeline ({e})") from None
        if self.opts.scheduler:
            cls = getattr(diffusers, self.opts.scheduler, None)
            if cls is None or not hasattr(cls, "from_config"):
                raise GenerateError(f"--scheduler {self.opts.scheduler}: not a diffusers scheduler class (e.g. "
                                    "DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler)")
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def endpoint(self) -> str:
        return str(self.directory)

    def display_name(self) -> str:
        return self.directory.name  # the pipeline's directory, not its whole path

    def describe(self) -> dict[str, Any]:
        return {"pipeline": self.identity}

    def seed(self, prompt: Any, index: int) -> int:
        return stable_seed("diffusers", prompt.id, index) % SEED_RANGE

    def run(self, prompt: Any, index: int, task: Optional[dict[str, Any]], submitted: Submitted,
            deadline: float) -> Answer:
        seed = self.seed(prompt, index)
        done: Future = Future()
        self._queue.put((prompt.prompt, seed, done))
        image = done.result()  # raises what the batch raised
        return Answer([image], {"model": self.opts.model}, requests=0, per_image=[{"seed": seed}])

    def _draw_batches(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get(timeout=BATCH_WAIT)
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            try:
                images = self._draw([b[0] for b in batch], [b[1] for b in batch])
                for (_, _, done), image in zip(batch, images):
                    done.set_result(image)
            except Exception as e:  # the batch's images failed (asked again next run); the run goes on
                for _, _, done in batch:
                    done.set_exception(ValueError(f"the pipeline failed: {type(e).__name__}: {e}"))

    def _draw(self, prompts: list[str], seeds: list[int]) -> list[bytes]:
        import torch

        kwargs: dict[str, Any] = {"prompt": prompts, "output_type": "pil",
                                  "generator": [torch.Generator(self.device).manual_seed(s) for s in seeds]}
        if self.opts.steps:
            kwargs["num_inference_steps"] = self.opts.steps
        if self.opts.guidance_scale is not None:
            kwargs["guidance_scale"] = self.opts.guidance_scale
        size = size_of(self.opts.size)
        if size:
            kwargs["width"], kwargs["height"] = size
        with torch.inference_mode():
            out = self.pipe(**kwargs).images
        pngs = []
        for image in out:
            buf = io.BytesIO()
            image.save(buf, "PNG")
            pngs.append(buf.getvalue())
        return pngs

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=60)
        super().close()
