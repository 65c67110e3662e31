"""``--provider stability``: Stability AI's v2beta Stable Image API, ``POST {base}/v2beta/stable-image/generate/
{core|ultra|sd3}`` as multipart form data (``prompt``, ``output_format=png``, ``aspect_ratio``, ``seed``, and
``model`` for sd3), ``Accept: image/*``: the answer is the image itself, its ``finish-reason`` header
``SUCCESS`` or ``CONTENT_FILTERED`` (a refusal), its ``seed`` header recorded. A 403 is the moderation
refusing the prompt, not a bad key (that is 401).

``--model core`` and ``--model ultra`` name their endpoints; ``sd3``, ``sd3.5-large``, ``sd3.5-medium`` ... go
to ``sd3`` with the model in the form. The API takes an aspect ratio, not pixels, so ``--size WxH`` is sent as
the ratio and the answer checked for that ratio, not for W x H.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Optional

from pipeline.services.http import retries_taken
from pipeline.services.providers.base import Answer, GenerateError, Provider, Refused, Submitted, size_of

ASPECT_RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")


class Stability(Provider):
    name = "stability"
    default_base = "https://api.stability.ai"
    default_key_env = "STABILITY_API_KEY"

    @property
    def path(self) -> str:  # type: ignore[override]
        return f"/v2beta/stable-image/generate/{'sd3' if self.opts.model.startswith('sd3') else self.opts.model}"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # both checked before any request: every prompt would be refused the same way
        if self.opts.model not in ("core", "ultra") and not self.opts.model.startswith("sd3"):
            raise GenerateError(f"--model {self.opts.model!r}: Stability's endpoints are core, ultra and sd3 "
                                "(with --model sd3.5-large, sd3.5-medium, ...)")
        size = size_of(self.opts.size)
        self.ratio = Fraction(*size) if size else None
        self.aspect_ratio = f"{self.ratio.numerator}:{self.ratio.denominator}" if self.ratio else None
        if self.aspect_ratio is not None and self.aspect_ratio not in ASPECT_RATIOS:
            raise GenerateError(f"--size {self.opts.size} is the aspect ratio {self.aspect_ratio}; Stability's API "
                                f"takes one of {', '.join(ASPECT_RATIOS)}")

    def run(self, prompt: Any, index: int, task: Optional[dict[str, Any]], submitted: Submitted,
            deadline: float) -> Answer:
        form = {"prompt": prompt.prompt, "output_format": "png"}
        if self.aspect_ratio:
            form["aspect_ratio"] = self.aspect_ratio
        if self.opts.model.startswith("sd3") and self.opts.model != "sd3":
            form["model"] = self.opts.model
        url = self.base + self.path
        # multipart even without a file: the API reads only multipart/form-data
        response = self.request("POST", url, data=form, files={"none": ("", b"")},
                                headers={"Accept": "image/*"})
        if response.status_code == 403:
            raise Refused("moderation", self.message_of(response))
        self.check(response, url)
        reason = response.headers.get("finish-reason", "SUCCESS")
        if reason == "CONTENT_FILTERED":
            raise Refused("CONTENT_FILTERED", "the answer's finish-reason is CONTENT_FILTERED")
        if reason != "SUCCESS":
            raise ValueError(f"{self.endpoint()} answered finish-reason {reason}")
        if not response.headers.get("content-type", "").startswith("image/"):
            raise GenerateError(f"{self.endpoint()} answered {response.status_code} with "
                                f"{response.headers.get('content-type', 'no content type')}, not an image; check "
                                "--api-base and --provider")
        return Answer([response.content], {"seed": response.headers.get("seed"), "finish_reason": reason},
                      requests=1 + retries_taken(response),
                      retries=retries_taken(response))

    def size_problem(self, size: tuple[int, int]) -> Optional[str]:
        if self.ratio is not None and abs(size[0] / size[1] - self.ratio) > 0.02 * self.ratio:
            return f"asked for the aspect ratio {self.aspect_ratio} but got {size[0]}x{size[1]}"
        return None
