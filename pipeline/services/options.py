"""What `genbench generate` is asked to do: shared by the client and every provider."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class GenerateOptions:
    model: str
    prompts: str
    out: str
    api_base: Optional[str] = None  # None: the provider's official base URL
    provider: str = "openai"
    images_per_prompt: int = 1
    size: Optional[str] = None  # "1024x1024"; None: the service's default (then no size check)
    quality: Optional[str] = None
    response_format: Optional[str] = None  # None: by model (b64_json, none for gpt-image); "none": send none
    concurrency: int = 4  # tasks in flight
    max_retries: int = 4
    timeout: float = 120.0  # seconds for one answer, and the deadline of one task, its polls included
    poll_interval: float = 1.0  # the first wait before asking about a submitted task (then backing off)
    api_key_env: Optional[str] = None  # None: the provider's (OPENAI_API_KEY, STABILITY_API_KEY, ...)
    auth_header: Optional[str] = None  # None: the provider's (Authorization: Bearer, BFL's x-key)
    client_id_env: str = "FIREFLY_CLIENT_ID"  # firefly: the OAuth client id's variable
    token_url: Optional[str] = None  # firefly: the IMS token endpoint (None: Adobe's)
    price_per_image: Optional[float] = None
    retry_refused: bool = False
    # diffusers (a local pipeline): the call's options (None: the pipeline's defaults) and where it runs
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    scheduler: Optional[str] = None
    batch_size: Optional[int] = None  # None: 8 on a GPU, 1 on the CPU
    device: Optional[str] = None  # None: cuda when there is one
    progress: bool = True
