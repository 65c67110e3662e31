"""The services `genbench generate` speaks to, one module per protocol (see docs/services.md)."""

from __future__ import annotations

from pipeline.services.providers.base import Answer, GenerateError, Pending, Provider, Refused
from pipeline.services.providers.bfl import BFL
from pipeline.services.providers.firefly import Firefly
from pipeline.services.providers.local_diffusers import LocalDiffusers
from pipeline.services.providers.midjourney import Midjourney
from pipeline.services.providers.openai_chat import OpenAIChat
from pipeline.services.providers.openai_images import OpenAIImages
from pipeline.services.providers.stability import Stability

PROVIDERS: dict[str, type[Provider]] = {p.name: p for p in (OpenAIImages, OpenAIChat, Stability, Firefly, Midjourney,
                                                              BFL, LocalDiffusers)}

__all__ = ["PROVIDERS", "Answer", "GenerateError", "Pending", "Provider", "Refused"]
