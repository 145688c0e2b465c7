"""``leanvit.tokens``: short name for :mod:`leanvit.compress.tokens` (EViT, ToMe, DiffRate)."""
from __future__ import annotations

from .compress.tokens import *  # noqa: F401,F403
from .compress.tokens import __all__  # noqa: F401
