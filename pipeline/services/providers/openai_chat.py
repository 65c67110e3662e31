"""``--provider openai-chat``: an image inside a chat completion, as CometAPI serves ``gpt-4o-image``
(``POST {base}/chat/completions``, the prompt as the user message), through the openai SDK and its retries.

The image comes back in the assistant's message, in one of the shapes the services document: a markdown image
``![...](https://...)`` or a data URL ``data:image/png;base64,...`` in ``content``, or an ``images`` list of
``{"image_url": {"url": ...}}`` beside it. A refusal is what the service marks as one: a completion with
``finish_reason: content_filter`` or a 400 ``content_policy_violation``. An answer in words with no image (an
error, a progress message, or a decline the service did not mark) is a failed image, its text recorded, asked
again by the next run: genbench does not guess from prose which it was.
"""

from __future__ import annotations

import base64
import re
from typing import Any, Optional

from pipeline.services.providers.base import Answer, GenerateError, Refused, Submitted
from pipeline.services.providers.openai_images import OpenAIImages

IMAGE_URL = re.compile(r"!\[[^\]]*\]\((\S+?)\)|(data:image/[a-z]+;base64,[A-Za-z0-9+/=]+)|(https?://\S+?\.(?:png|jpe?g|webp))",
                       re.IGNORECASE)


class OpenAIChat(OpenAIImages):
    name = "openai-chat"
    default_base = "https://api.cometapi.com/v1"
    default_key_env = "COMETAPI_KEY"
    path = "/chat/completions"

    def run(self, prompt: Any, index: int, task: Optional[dict[str, Any]], submitted: Submitted,
            deadline: float) -> Answer:
        raw = self.call(self.client.chat.completions.with_raw_response.create, model=self.opts.model,
                        messages=[{"role": "user", "content": prompt.prompt}])
        body = self.chat_body(raw)
        choice = body["choices"][0]
        msg = choice.get("message") or {}
        url = image_url_of(msg)
        if url is None:
            if choice.get("finish_reason") == "content_filter":
                raise Refused("content_filter", str(msg.get("content") or "finish_reason: content_filter"))
            text = str(msg.get("content") or "").strip()
            if not text:
                raise ValueError(f"{self.endpoint()} answered a completion with neither an image nor text")
            raise ValueError(f"{self.endpoint()} answered in words without an image: {text[:300]!r}")
        if url.startswith("data:"):
            try:
                image = base64.b64decode(url.split(",", 1)[1], validate=True)
            except (ValueError, TypeError) as e:
                raise ValueError(f"the data URL is not valid base64 ({e})") from e
        else:
            image = self.download(url)
        return Answer([image], {"created": body.get("created"), "completion_id": body.get("id")},
                      requests=raw.retries_taken + 1, retries=raw.retries_taken)

    def chat_body(self, raw: Any) -> dict[str, Any]:
        body = self.body_of(raw, "a chat completion")
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise GenerateError(f"{self.endpoint()} answered 200 without \"choices\": not a chat completion; "
                                "check --api-base and --provider")
        if not body["choices"] or not isinstance(body["choices"][0], dict):
            raise ValueError(f"{self.endpoint()} answered a completion with no choices")
        return body


def image_url_of(msg: dict[str, Any]) -> Optional[str]:
    """The first image of an assistant message: an ``images`` entry, else a markdown image, data URL or image
    link in its content."""
    for item in msg.get("images") or []:
        url = (item.get("image_url") or {}).get("url") if isinstance(item, dict) else None
        if url:
            return str(url)
    content = msg.get("content")
    if isinstance(content, list):  # content parts
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                return str((part.get("image_url") or {}).get("url"))
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    match = IMAGE_URL.search(str(content or ""))
    if match is None:
        return None
    return next(g for g in match.groups() if g)
