"""``--provider midjourney``: Midjourney through a task proxy that speaks the midjourney-proxy protocol (CometAPI's
``/mj/...`` endpoints, a self-hosted midjourney-proxy). Midjourney itself has no official API.

``POST {base}/mj/submit/imagine`` with ``{"prompt": ...}`` answers ``{"code", "description", "result": <task id>}``
(midjourney-proxy's ``ReturnCode``): code 1 is submitted, 22 queued (also submitted), 24 a banned prompt (a
refusal), 23 a full queue and 9 a failure of the proxy's own (both failed images, submitted again by the next
run), anything else a request the proxy rejects. ``GET {base}/mj/task/{id}/fetch`` answers the task: ``status``
``NOT_START``, ``SUBMITTED``, ``IN_PROGRESS`` (with ``progress``), then ``SUCCESS`` with ``imageUrl`` (a 2x2 grid
of four images) and ``buttons`` (``U1``..``U4`` upscale one image through ``/mj/submit/action``), ``FAILURE`` with
``failReason`` (a moderation reason, "banned prompt" and the like, is a refusal), or, in the proxies that have
them (trueai-org's midjourney-proxy ``TaskStatus``; CometAPI's fetch documentation), ``MODAL`` (the task waits
for input in a dialog, which an imagine never gets) and ``CANCEL``: both end the task without images (failed,
submitted again by the next run). The Midjourney version (``--v 7``, ``--niji 6``) is recorded per image, from
the prompt the proxy ran (``properties.finalPrompt`` / ``promptEn``) or else the one sent.

One imagine is four images: genbench cuts the grid into its four quadrants rather than upscaling each one
(U1..U4 would be four more paid jobs and four more waits, for images at twice the size that another generator's
row is not compared at). The grid is kept beside them (``grids/<id>-<task>.png``) with the task id, so that
what Midjourney answered can be checked. Images k = 4t .. 4t+3 of a prompt come from its task t.

Authentication: ``Authorization: Bearer KEY`` (CometAPI, the default); ``--auth-header mj-api-secret`` sends the
bare key in midjourney-proxy's header.
"""

from __future__ import annotations

import io
import re
from typing import Any, Optional

from PIL import Image

from pipeline.data.remote import public_url
from pipeline.services.http import retries_taken
from pipeline.services.providers.base import Answer, GenerateError, Provider, Refused, Submitted

SUBMITTED = (1, 22)
BANNED, QUEUE_FULL, FAILURE = 24, 23, 9
ENDED_WITHOUT_IMAGES = ("MODAL", "CANCEL")
VERSION = re.compile(r"--(v|version|niji)\s+([0-9][0-9.]*)")
MODERATION_WORDS = ("banned", "moderation", "sensitive", "forbidden", "not allowed", "community guidelines")


class Midjourney(Provider):
    name = "midjourney"
    default_base = "https://api.cometapi.com"
    default_key_env = "COMETAPI_KEY"
    images_per_task = 4
    path = "/mj/submit/imagine"

    def run(self, prompt: Any, index: int, task: Optional[dict[str, Any]], submitted: Submitted,
            deadline: float) -> Answer:
        requests = retries = 0
        if task is None:
            url = self.base + self.path
            response = self.request("POST", url, json={"prompt": prompt.prompt})
            retries = retries_taken(response)
            requests += 1 + retries
            self.check(response, url)
            answer = self.json(response, url)
            code = answer.get("code")
            if code == BANNED:
                raise Refused("banned_prompt", str(answer.get("description") or "banned prompt"))
            if code in (QUEUE_FULL, FAILURE):  # transient: this task, not every prompt
                raise ValueError(f"{public_url(url)} did not take the task (code {code}: "
                                 f"{answer.get('description')}); the next run submits it again")
            if code not in SUBMITTED or not answer.get("result"):
                raise GenerateError(f"{public_url(url)} did not take the task (code {code}: "
                                    f"{answer.get('description')}); check --model, --api-base and --provider")
            task = {"id": str(answer["result"])}
            submitted(task)
        fetch = f"{self.base}/mj/task/{task['id']}/fetch"

        def state_of(status: dict[str, Any]) -> Optional[dict[str, Any]]:
            state = status.get("status")
            if state == "SUCCESS":
                if not status.get("imageUrl"):
                    raise ValueError(f"task {task['id']} is SUCCESS without imageUrl")
                return status
            if state == "FAILURE":
                reason = str(status.get("failReason") or "FAILURE")
                if any(word in reason.lower() for word in MODERATION_WORDS):
                    raise Refused("moderation", reason, task["id"])
                raise ValueError(f"task {task['id']} failed: {reason}")
            if state in ENDED_WITHOUT_IMAGES:
                raise ValueError(f"task {task['id']} ended {state} without images; the next run submits it again")
            return None  # NOT_START, SUBMITTED, IN_PROGRESS

        done, polls = self.poll(task, fetch, deadline, state_of)
        grid = self.fetch_result(task, str(done["imageUrl"]))
        buttons = [b.get("customId") for b in done.get("buttons") or [] if isinstance(b, dict)]
        ran = (done.get("properties") or {}).get("finalPrompt") or done.get("promptEn") or prompt.prompt
        return Answer(split_grid(grid), {"task_id": task["id"], "upscale_buttons": buttons[:4],
                                         "model_version": model_version(str(ran))},
                      requests=requests + polls + 1, retries=retries, grid=grid)


def model_version(prompt: str) -> Optional[str]:
    """``v7`` / ``niji6`` from a Midjourney prompt's ``--v 7`` / ``--niji 6``; None when it names none (the
    account's default version, which the proxy does not report)."""
    match = VERSION.search(prompt)
    if match is None:
        return None
    return ("niji" if match.group(1) == "niji" else "v") + match.group(2)


def split_grid(grid: bytes) -> list[bytes]:
    """The four images of a 2x2 grid, left to right and top to bottom (U1..U4's order), as PNG."""
    try:
        with Image.open(io.BytesIO(grid)) as image:
            image.load()
            w, h = image.size
            if w < 2 or h < 2:
                raise ValueError(f"the grid is {w}x{h}, too small to hold 2x2 images")
            quads = []
            for top, left in ((0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)):
                buf = io.BytesIO()
                image.crop((left, top, left + w // 2, top + h // 2)).save(buf, "PNG")
                quads.append(buf.getvalue())
            return quads
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"the grid image does not decode ({e})") from e
