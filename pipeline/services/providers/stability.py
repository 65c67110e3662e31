"""``--provider stability``: Stability AI's v2beta Stable Image API (platform.stability.ai/docs/api-reference),
``POST {base}/v2beta/stable-image/generate/{core|ultra|sd3}`` as multipart form data (``prompt``,
``output_format=png``, ``aspect_ratio``, ``seed``, and ``model`` for sd3), ``Accept: image/*``: the answer is the
image itself, its ``finish-reason`` header ``SUCCESS`` or ``CONTENT_FILTERED`` (a refusal), its ``seed`` header
recorded with the seed sent. A 403 is the moderation refusing the prompt, not a bad key (that is 401).

``--model core`` and ``--model ultra`` name their endpoints; ``sd3.5-large``, ``sd3.5-large-turbo``,
``sd3.5-medium``, ``sd3.5-flash`` go to ``sd3`` with the model in the form (a bare ``sd3`` is refused: the
service would choose the variant, and the record would not say which). The API takes one of nine aspect
ratios, not pixels, and answers its own pixel size for each (3:2 is 1216x832, 2.6% off the ratio): ``--size
WxH`` is sent as the ratio it has (or, given one of those pixel sizes, its ratio), and the answer checked for
that ratio within 5%.

Rate limit: 150 requests in 10 seconds lock the client out for 60 seconds (the API reference's "Rate limit"),
answered as 429: without a ``Retry-After`` the retries wait those 60 seconds instead of spending themselves
inside them.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Optional

from pipeline.seeds import stable_seed
from pipeline.services.http import retries_taken
from pipeline.services.providers.base import Answer, GenerateError, Provider, Refused, Submitted, size_of

# the ratios the API takes, with the pixel size it answers for each (Stable Image Core and SD3.5)
OUTPUT_SIZES = {"16:9": (1344, 768), "1:1": (1024, 1024), "21:9": (1536, 640), "2:3": (832, 1216),
                "3:2": (1216, 832), "4:5": (896, 1088), "5:4": (1088, 896), "9:16": (768, 1344), "9:21": (640, 1536)}
SD3_MODELS = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash")
SEED_RANGE = 4294967294  # the API's seeds are 0 .. 4294967294 (0: random)


def _ratio(name: str) -> Fraction:
    w, h = name.split(":")
    return Fraction(int(w), int(h))


def aspect_ratio_of(size: tuple[int, int]) -> Optional[str]:
    """The API's name for the ratio of ``size`` (21:9 included, which reduces to 7:3), or for one of its own pixel
    sizes; None when it takes no such ratio."""
    ratio = Fraction(*size)
    return next((name for name in OUTPUT_SIZES if _ratio(name) == ratio), None) or \
        next((name for name, pixels in OUTPUT_SIZES.items() if pixels == tuple(size)), None)


class Stability(Provider):
    name = "stability"
    default_base = "https://api.stability.ai"
    default_key_env = "STABILITY_API_KEY"
    rate_lockout = 60.0

    @property
    def path(self) -> str:  # type: ignore[override]
        return f"/v2beta/stable-image/generate/{'sd3' if self.opts.model.startswith('sd3') else self.opts.model}"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # both checked before any request: every prompt would be refused the same way
        model = self.opts.model
        if model not in ("core", "ultra") and not model.startswith("sd3"):
            raise GenerateError(f"--model {model!r}: Stability's endpoints are core, ultra and sd3 (with --model "
                                f"{', '.join(SD3_MODELS)})")
        if model == "sd3":
            raise GenerateError(f"--model sd3 lets the service choose the SD3 variant, and the record could not say "
                                f"which; name it: --model {' | '.join(SD3_MODELS)}")
        size = size_of(self.opts.size)
        self.aspect_ratio = aspect_ratio_of(size) if size else None
        if size and self.aspect_ratio is None:
            ratio = Fraction(*size)
            raise GenerateError(f"--size {self.opts.size} is the aspect ratio {ratio.numerator}:{ratio.denominator}; "
                                "Stability's API "
                                f"takes one of {', '.join(OUTPUT_SIZES)} (answered as "
                                f"{', '.join('x'.join(map(str, p)) for p in OUTPUT_SIZES.values())})")

    def run(self, prompt: Any, index: int, task: Optional[dict[str, Any]], submitted: Submitted,
            deadline: float) -> Answer:
        seed = stable_seed("stability", prompt.id, index) % SEED_RANGE + 1  # 0 would ask for a random one
        form = {"prompt": prompt.prompt, "output_format": "png", "seed": str(seed)}
        if self.aspect_ratio:
            form["aspect_ratio"] = self.aspect_ratio
        if self.opts.model.startswith("sd3"):
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
        return Answer([response.content], {"seed": response.headers.get("seed"), "seed_sent": seed,
                                           "model": self.opts.model, "finish_reason": reason},
                      requests=1 + retries_taken(response), retries=retries_taken(response))

    def size_problem(self, size: tuple[int, int]) -> Optional[str]:
        if self.aspect_ratio is None:
            return None
        return self.ratio_problem(size, _ratio(self.aspect_ratio), self.aspect_ratio)
