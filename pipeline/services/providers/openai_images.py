"""``--provider openai``: the OpenAI images API (DALL-E 3, gpt-image, and every service that copies it:
CometAPI, Together, LocalAI, ``genbench serve``), through the openai SDK.

The SDK does the HTTP: it retries 408/409/429/5xx, timeouts and dropped connections with exponential backoff
and jitter, honouring ``Retry-After``, and never retries another 4xx. One image per request (DALL-E 3 takes only
n=1). A refusal is a 400 with ``content_policy_violation`` (DALL-E) or ``moderation_blocked`` (gpt-image). An
empty quota (a 429 whose code is ``insufficient_quota``) stops the run with the service's message, as a bad key
does: no later request can succeed.

``response_format`` (the SDK's ``ImageGenerateParams``): the gpt-image models take none and always answer
``b64_json``; DALL-E and the services that copy it take ``b64_json`` or ``url``. By default genbench sends
``b64_json`` except to a ``gpt-image*`` model (``--response-format`` overrides it, ``none`` sends none).
"""

from __future__ import annotations

import base64
from typing import Any, Optional

from pipeline.services.providers.base import Answer, GenerateError, Provider, Refused, Submitted

REFUSAL_CODES = ("content_policy_violation", "moderation_blocked")  # DALL-E's and gpt-image's


class OpenAIImages(Provider):
    name = "openai"
    default_base = "https://api.openai.com/v1"
    default_key_env = "OPENAI_API_KEY"
    path = "/images/generations"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import openai

        # built before the clock starts: importing the SDK takes seconds, once
        self.client = openai.OpenAI(api_key=self.key, base_url=self.opts.api_base, max_retries=self.opts.max_retries,
                                    timeout=self.opts.timeout)
        chosen = self.opts.response_format
        if chosen is None:  # by model: gpt-image refuses the parameter (it always answers b64_json)
            chosen = "none" if self.opts.model.startswith("gpt-image") else "b64_json"
        self.response_format: Optional[str] = None if chosen == "none" else chosen

    def run(self, prompt: Any, index: int, task: Optional[dict[str, Any]], submitted: Submitted,
            deadline: float) -> Answer:

        kwargs: dict[str, Any] = {"model": self.opts.model, "prompt": prompt.prompt, "n": 1}
        for name in ("size", "quality"):
            if getattr(self.opts, name):
                kwargs[name] = getattr(self.opts, name)
        if self.response_format:
            kwargs["response_format"] = self.response_format
        raw = self.call(self.client.images.with_raw_response.generate, **kwargs)
        response = self.images_response(raw)
        item = response.data[0]
        if getattr(item, "b64_json", None):
            try:
                image = base64.b64decode(item.b64_json, validate=True)
            except (ValueError, TypeError) as e:
                raise ValueError(f"b64_json is not valid base64 ({e})") from e
        elif getattr(item, "url", None):
            image = self.download(item.url)
        else:
            raise ValueError("the response item has neither b64_json nor url")
        return Answer([image], {"created": response.created, "revised_prompt": getattr(item, "revised_prompt", None)},
                      requests=raw.retries_taken + 1, retries=raw.retries_taken)

    def call(self, method: Any, **kwargs: Any) -> Any:
        """One SDK call (its retries included), its errors turned into what they mean for the run."""
        import openai

        try:
            return method(**kwargs)
        except openai.BadRequestError as e:
            if error_code(e) in REFUSAL_CODES:
                raise Refused(str(error_code(e)), message(e)) from None
            raise GenerateError(self.status_text(e)) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError,
                openai.UnprocessableEntityError) as e:
            raise GenerateError(self.status_text(e)) from None
        except openai.RateLimitError as e:
            if error_code(e) == "insufficient_quota":  # no later request can succeed either: stop, say why
                raise GenerateError(f"{self.status_text(e)} (the account's quota is used up: add credit or raise "
                                    f"the limit for the key in {self.opts.api_key_env}, then run the same command "
                                    "again)") from None
            raise ValueError(self.status_text(e)) from None
        except (openai.APIStatusError, openai.APIConnectionError) as e:  # retries spent: this image failed
            raise ValueError(self.status_text(e)) from None

    def images_response(self, raw: Any) -> Any:
        """The parsed images response of a 200, checked: ``GenerateError`` when the body is not the images
        API's (an HTML login page, another JSON: the wrong --api-base), ``ValueError`` (a failed image, asked
        again next run) when it is but holds no image."""
        import openai.types

        url = self.endpoint()
        body = self.body_of(raw, "the JSON of an images API")
        if not isinstance(body, dict) or "data" not in body or not isinstance(body["data"], list):
            shape = f"an object with {sorted(body)[:5]}" if isinstance(body, dict) else f"a JSON {type(body).__name__}"
            raise GenerateError(f"{url} answered 200 with {shape}, not an images response ({{\"data\": [...]}}); "
                                "check --api-base (it ends in /v1)")
        if not body["data"] or not isinstance(body["data"][0], dict):
            raise ValueError(f"{url} answered 200 with no image in its data ({str(body['data'])[:60]})")
        response = raw.parse()
        if not isinstance(response, openai.types.ImagesResponse):
            raise GenerateError(f"{url} answered 200 with {type(response).__name__}, not an images response")
        return response

    def body_of(self, raw: Any, expected: str) -> Any:
        """The JSON of an SDK call's 200; not JSON at all (an HTML login page) means the wrong --api-base."""
        http = raw.http_response
        try:
            return http.json()
        except ValueError:
            kind = http.headers.get("content-type", "no content type")
            raise GenerateError(f"{self.endpoint()} answered 200 with {kind}, not {expected} "
                                f"({http.text[:80]!r}); check --api-base (it ends in /v1)") from None

    def status_text(self, e: Any, url: Optional[str] = None) -> str:
        """What went wrong, where, and the fix: the endpoint and the key's variable name, never the key."""
        import openai

        url = url or self.endpoint()
        if isinstance(e, openai.APITimeoutError):
            return f"{url}: no answer within --timeout {self.opts.timeout:g} s after {self.opts.max_retries} retries"
        if isinstance(e, openai.APIConnectionError):
            return f"{url}: connection failed after {self.opts.max_retries} retries ({e.__cause__ or e})"
        status = getattr(e, "status_code", "?")
        text = f"{url} answered {status}: {message(e)}"
        if status in (401, 403):
            where = f"the environment variable {self.opts.api_key_env}" if self.from_env else "no key (none was set)"
            text += f" (the key came from {where}; check it is valid for this endpoint)"
        elif status == 404:
            text += f" (is --model {self.opts.model!r} served there, and does --api-base end in /v1?)"
        elif status in (400, 422):
            text += " (the service rejects the request itself: check --size, --quality and --model)"
        elif status == 429 or (isinstance(status, int) and status >= 500):
            text += f" after {self.opts.max_retries} retries"
        return text

    def close(self) -> None:
        super().close()
        self.client.close()


def error_code(e: Any) -> Optional[str]:
    code = getattr(e, "code", None)
    if code:
        return str(code)
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        return inner.get("code") if isinstance(inner, dict) else None
    return None


def message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", e))
