"""``--provider bfl``: Black Forest Labs' FLUX API, submit and poll (docs.bfl.ai, API reference and "Using the
API"). ``POST {base}/v1/{model}`` (``flux-pro-1.1``, ``flux-dev``, ``flux-pro-1.1-ultra``, ``flux-kontext-pro``,
...) with ``prompt``, ``seed`` and ``output_format: png`` answers ``id`` and ``polling_url``; ``GET polling_url``
answers ``status``: ``Pending`` (and the queued states) until ``Ready``, the image's signed URL in
``result.sample`` (valid about 10 minutes: downloaded at once; a download that fails keeps the task pending,
so the next run asks the finished task for a fresh URL instead of paying again) and the seed it used in
``result.seed`` (recorded per image). ``Content Moderated`` and ``Request Moderated`` are refusals, ``Error``
and ``Failed`` failed images. The key goes in the ``x-key`` header (``--auth-header Authorization`` for a
proxy that wants a bearer token).

Sizes: FLUX.1 [pro], [dev] and 1.1 [pro] take ``width`` and ``height``; 1.1 [pro] Ultra and Kontext take an
``aspect_ratio`` (between 21:9 and 9:21; Ultra's default is 16:9) and answer their own pixel size for it, so
``--size WxH`` is sent as that ratio and the answer checked for the ratio.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Optional

from pipeline.data.remote import public_url
from pipeline.seeds import stable_seed
from pipeline.services.http import retries_taken
from pipeline.services.providers.base import Answer, GenerateError, Provider, Refused, Submitted, size_of

REFUSED = ("Content Moderated", "Request Moderated")
FAILED = ("Error", "Failed", "Task not found")
ASPECT_RATIO_MODELS = ("ultra", "kontext")  # models whose size is an aspect_ratio, not width/height
WIDEST = Fraction(21, 9)  # Ultra and Kontext take 21:9 .. 9:21
SEED_RANGE = 2**32 - 1


class BFL(Provider):
    name = "bfl"
    default_base = "https://api.bfl.ai"
    default_key_env = "BFL_API_KEY"
    path = "/v1/{model}"
    auth_header = "x-key"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = size_of(self.opts.size)
        self.by_ratio = any(m in self.opts.model for m in ASPECT_RATIO_MODELS)
        self.ratio = Fraction(*size) if size and self.by_ratio else None
        if self.ratio is not None and not 1 / WIDEST <= self.ratio <= WIDEST:
            raise GenerateError(f"--size {self.opts.size}: {self.opts.model} takes aspect ratios from 21:9 to 9:21")

    @property
    def aspect_ratio(self) -> Optional[str]:
        if self.ratio is None:
            return None
        return "21:9" if self.ratio == WIDEST else "9:21" if self.ratio == 1 / WIDEST else \
            f"{self.ratio.numerator}:{self.ratio.denominator}"

    def run(self, prompt: Any, index: int, task: Optional[dict[str, Any]], submitted: Submitted,
            deadline: float) -> Answer:
        requests = retries = 0
        if task is None:
            # PNG asked for where the service offers it (its default is JPEG); a seed per image, so a row can be
            # drawn again
            seed = stable_seed("bfl", prompt.id, index) % SEED_RANGE
            body: dict[str, Any] = {"prompt": prompt.prompt, "output_format": "png", "seed": seed}
            size = size_of(self.opts.size)
            if self.aspect_ratio:
                body["aspect_ratio"] = self.aspect_ratio
            elif size and not self.by_ratio:
                body["width"], body["height"] = size
            url = self.base + self.path.format(model=self.opts.model)
            response = self.request("POST", url, json=body)
            retries = retries_taken(response)
            requests += 1 + retries
            self.check(response, url)
            answer = self.json(response, url)
            if not answer.get("id") or not answer.get("polling_url"):
                raise GenerateError(f"{public_url(url)} answered without id and polling_url ({str(answer)[:80]}); "
                                    "check --api-base and --provider")
            task = {"id": str(answer["id"]), "poll": str(answer["polling_url"]), "seed_sent": seed}
            submitted(task)

        def state_of(status: dict[str, Any]) -> Optional[dict[str, Any]]:
            state = status.get("status")
            if state == "Ready":
                result = status.get("result") or {}
                if not result.get("sample"):
                    raise ValueError(f"task {task['id']} is Ready without result.sample")
                return result
            if state in REFUSED:
                raise Refused(str(state), str(status.get("details") or state), task["id"])
            if state in FAILED:
                raise ValueError(f"task {task['id']} ended {state}: {status.get('details') or ''}".rstrip(": "))
            return None  # Pending, Queued, ...

        result, polls = self.poll(task, task["poll"], deadline, state_of)
        image = self.fetch_result(task, str(result["sample"]))
        seed = result.get("seed", task.get("seed_sent"))
        return Answer([image], {"task_id": task["id"], "model": self.opts.model}, requests=requests + polls + 1,
                      retries=retries, per_image=[{"seed": seed}])

    def size_problem(self, size: tuple[int, int]) -> Optional[str]:
        if self.by_ratio:
            return self.ratio_problem(size, self.ratio, str(self.aspect_ratio)) if self.ratio is not None else None
        return super().size_problem(size)
