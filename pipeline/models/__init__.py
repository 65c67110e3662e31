"""Model families. Each registers itself in ``FAMILIES`` by its short name; configs name it by ``class_path``."""

from pipeline.models import autoencoder, autoregressive, diffusion, gan, vae  # noqa: F401,E402 -- registration
from pipeline.models.base import FAMILIES, GenerativeModule

__all__ = ["FAMILIES", "GenerativeModule"]
