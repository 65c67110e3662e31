"""``--provider firefly``: Adobe Firefly's v3 API, asynchronous behind an OAuth token.

The token: ``POST {--token-url}`` (Adobe IMS, ``/ims/token/v3``) with the client-credentials grant, the client id
and secret from two environment variables (``--client-id-env``, default ``FIREFLY_CLIENT_ID``, and
``--api-key-env``, default ``FIREFLY_CLIENT_SECRET``) and Firefly's scopes; it answers ``access_token`` and
``expires_in``. The token is shared by all requests, renewed a minute before it expires and at once on a 401
(a token that expired mid-run costs one more call, not a failed image). Every call sends it as a bearer
token, with the client id as ``x-api-key``.

``POST {base}/v3/images/generate-async`` (Adobe's Firefly API reference, "Generate images asynchronously") with
``prompt``, ``numVariations: 1``, ``seeds`` and ``size: {width, height}``, and the model in the
``x-model-version`` header (``--model``: ``image3``, the service's default, ``image4_standard``,
``image4_ultra``; without the header every row would be Image 3 whatever it is labelled), answers ``jobId`` and
``statusUrl``; ``GET statusUrl`` answers ``status`` ``pending`` / ``running`` until ``succeeded`` (the images'
pre-signed URLs in ``result.outputs[].image.url``, downloaded at once, and each image's ``seed``, recorded), or
``failed``, ``cancelled`` or ``timeout`` (a failed image, submitted again by the next run). A refusal: a 451,
or a 422 whose ``error_code`` is ``prompt_unsafe``, ``input_media_unsafe`` or ``output_media_unsafe``, to the
submission; a failed job whose error code ends in ``_unsafe`` or names the content policy.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

import httpx

from pipeline.data.remote import public_url
from pipeline.seeds import stable_seed
from pipeline.services.http import retries_taken
from pipeline.services.providers.base import Answer, GenerateError, Provider, Refused, Submitted, size_of

IMS_TOKEN_URL = "https://ims-na1.adobelogin.com/ims/token/v3"
SCOPES = "openid,AdobeID,session,additional_info,read_organizations,firefly_api,ff_apis"
POLICY_WORDS = ("policy", "moderat", "blocked", "not allowed", "content_filter", "guideline")
ENDED = ("failed", "cancelled", "canceled", "timeout")  # terminal states without images
SEED_RANGE = 100000  # Firefly's seeds are 0 .. 99999 (the API reference's ``seeds`` items)


def unsafe(code: Any) -> bool:
    """Firefly's moderation codes: prompt_unsafe, input_media_unsafe, output_media_unsafe."""
    return str(code or "").endswith("_unsafe")


class Firefly(Provider):
    name = "firefly"
    default_base = "https://firefly-api.adobe.io"
    default_key_env = "FIREFLY_CLIENT_SECRET"
    path = "/v3/images/generate-async"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        env = self.opts.client_id_env
        self.client_id = os.environ.get(env, "").strip()
        if not self.client_id or not self.from_env:
            raise GenerateError(f"Firefly needs a client id and secret: set the environment variables {env} and "
                                f"{self.opts.api_key_env} (an OAuth server-to-server credential of the Adobe "
                                "Developer Console)")
        self.token_url = self.opts.token_url or IMS_TOKEN_URL
        self._token: Optional[str] = None
        self._expires = 0.0
        self._tokens: list[str] = []  # every token this run held: all are secrets
        self._lock = threading.Lock()

    def secrets(self) -> list[str]:
        return [self.key, *self._tokens]

    def token(self, renew: bool = False, stale: Optional[str] = None) -> str:
        with self._lock:
            # another thread may have renewed it already: renew only the token that was refused
            if self._token and not (renew and self._token == stale) and time.time() < self._expires - 60:
                return self._token
            response = self.request("POST", self.token_url, data={
                "grant_type": "client_credentials", "client_id": self.client_id, "client_secret": self.key,
                "scope": SCOPES}, auth=False)
            if response.status_code in (400, 401, 403):
                where = f"the environment variables {self.opts.client_id_env} and {self.opts.api_key_env}"
                raise GenerateError(f"{public_url(self.token_url)} refused the client credentials "
                                    f"({response.status_code}: {self.message_of(response)}); check {where}")
            self.check(response, self.token_url)
            body = self.json(response, self.token_url)
            if not body.get("access_token"):
                raise GenerateError(f"{public_url(self.token_url)} answered no access_token; check --token-url")
            self._token = str(body["access_token"])
            self._tokens.append(self._token)
            self._expires = time.time() + float(body.get("expires_in", 3600))
            return self._token

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}", "x-api-key": self.client_id}

    def request(self, method: str, url: str, *, auth: bool = True, **kwargs: Any) -> httpx.Response:
        if not auth:  # the token call itself: the credentials go in the form
            return super().request(method, url, auth=False, **kwargs)
        for _ in range(3):  # the token expired mid-run: again with a new one (another thread may renew first)
            token = self.token()  # the one this call sends (auth() reads the same cached token)
            response = super().request(method, url, **kwargs)
            if response.status_code != 401:
                return response
            self.token(renew=True, stale=token)
        return response  # a new token refused as well: the 401 is the key's, and check() says so

    def run(self, prompt: Any, index: int, task: Optional[dict[str, Any]], submitted: Submitted,
            deadline: float) -> Answer:
        requests = retries = 0
        if task is None:
            seed = stable_seed("firefly", prompt.id, index) % SEED_RANGE
            body: dict[str, Any] = {"prompt": prompt.prompt, "numVariations": 1, "seeds": [seed]}
            size = size_of(self.opts.size)
            if size:
                body["size"] = {"width": size[0], "height": size[1]}
            url = self.base + self.path
            response = self.request("POST", url, json=body, headers={"x-model-version": self.opts.model})
            retries = retries_taken(response)
            requests += 1 + retries
            if response.status_code == 451:
                raise Refused("451", self.message_of(response))
            if response.status_code in (400, 422):
                code = _error_code(response)
                if unsafe(code):
                    raise Refused(str(code), self.message_of(response))
            self.check(response, url)
            answer = self.json(response, url)
            if not answer.get("jobId") or not answer.get("statusUrl"):
                raise GenerateError(f"{public_url(url)} answered without jobId and statusUrl "
                                    f"({str(answer)[:80]}); check --api-base and --provider")
            task = {"id": str(answer["jobId"]), "poll": str(answer["statusUrl"])}
            submitted(task)

        def state_of(status: dict[str, Any]) -> Optional[dict[str, Any]]:
            state = status.get("status")
            if state == "succeeded":
                outputs = (status.get("result") or {}).get("outputs") or []
                url = outputs[0].get("image", {}).get("url") if outputs and isinstance(outputs[0], dict) else None
                if not url:
                    raise ValueError(f"job {task['id']} succeeded without result.outputs[0].image.url")
                return outputs[0]
            if state in ENDED:
                error: dict[str, Any] = status["error"] if isinstance(status.get("error"), dict) else status
                text = f"{error.get('error_code', '')} {error.get('message', '')}".strip() or str(state)
                if unsafe(error.get("error_code")) or any(word in text.lower() for word in POLICY_WORDS):
                    raise Refused(str(error.get("error_code") or "policy"), text, task["id"])
                raise ValueError(f"job {task['id']} ended {state}: {text}; the next run submits it again")
            return None  # pending, running

        output, polls = self.poll(task, task["poll"], deadline, state_of)
        image = self.fetch_result(task, str(output["image"]["url"]))
        return Answer([image], {"task_id": task["id"], "model_version": self.opts.model},
                      requests=requests + polls + 1, retries=retries, per_image=[{"seed": output.get("seed")}])


def _error_code(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error_code") if isinstance(body, dict) else None
