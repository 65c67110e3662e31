"""``--provider bfl``: Black Forest Labs' FLUX API, submit and poll. ``POST {base}/v1/{model}`` (``flux-pro-1.1``,
``flux-dev``, ``flux-kontext-pro``, ...) with ``prompt`` (and ``width``/``height`` from ``--size``) answers
``id`` and ``polling_url``; ``GET polling_url`` answers ``status``: ``Pending`` (and the queued states) until
``Ready``, the image's signed URL in ``result.sample`` (valid ~10 minutes: downloaded at once). ``Content
Moderated`` and ``Request Moderated`` are refusals, ``Error`` and ``Failed`` failed images. The key goes in
the ``x-key`` header (``--auth-header Authorization`` for a proxy that wants a bearer token).
"""

from __future__ import annotations

from typing import Any, Optional

from pipeline.data.remote import public_url
from pipeline.services.http import retries_taken
from pipeline.services.providers.base import Answer, GenerateError, Provider, Refused, Submitted, size_of

REFUSED = ("Content Moderated", "Request Moderated")
FAILED = ("Error", "Failed", "Task not found")


class BFL(Provider):
    name = "bfl"
    default_base = "https://api.bfl.ai"
    default_key_env = "BFL_API_KEY"
    path = "/v1/{model}"
    auth_header = "x-key"

    def run(self, prompt: Any, index: int, task: Optional[dict[str, Any]], submitted: Submitted,
            deadline: float) -> Answer:
        requests = retries = 0
        if task is None:
            body: dict[str, Any] = {"prompt": prompt.prompt}
            size = size_of(self.opts.size)
            if size:
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
            task = {"id": str(answer["id"]), "poll": str(answer["polling_url"])}
            submitted(task)

        def state_of(status: dict[str, Any]) -> Optional[str]:
            state = status.get("status")
            if state == "Ready":
                sample = (status.get("result") or {}).get("sample")
                if not sample:
                    raise ValueError(f"task {task['id']} is Ready without result.sample")
                return str(sample)
            if state in REFUSED:
                raise Refused(str(state), str(status.get("details") or state), task["id"])
            if state in FAILED:
                raise ValueError(f"task {task['id']} ended {state}: {status.get('details') or ''}".rstrip(": "))
            return None  # Pending, Queued, ...

        sample, polls = self.poll(task, task["poll"], deadline, state_of)
        return Answer([self.download(sample)], {"task_id": task["id"]}, requests=requests + polls + 1,
                      retries=retries)
