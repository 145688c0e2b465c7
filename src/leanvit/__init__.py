"""leanvit: efficient vision transformers, compressed and measured on real inference engines.

Importing the package registers leanvit's model families with timm, so
``timm.create_model("mobilevig_ti")`` works after ``import leanvit``.
"""
from __future__ import annotations

from . import models  # noqa: F401  (registers the zoo with timm)
from .compress.quant import QuantConfig, export, quantize
from .errors import LeanvitError
from .evaluate import evaluate
from .models.registry import create_model, resolve_model_name

__version__ = "0.1.0"

__all__ = [
    "LeanvitError", "QuantConfig", "create_model", "evaluate", "export", "quantize", "resolve_model_name",
    "__version__",
]
