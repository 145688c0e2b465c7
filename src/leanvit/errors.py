"""Errors a user can fix.

Everything raised as :class:`LeanvitError` is a problem with the user's input or environment; the
CLI prints its message (which names the problem and the fix) and exits with status 2, without a
traceback. Any other exception is a bug in leanvit and keeps its traceback.
"""
from __future__ import annotations

import difflib
import sys
import warnings
from typing import Callable, Iterable


class LeanvitError(Exception):
    """Bad input or a missing dependency, with a message that says how to fix it."""


class UnknownModelError(LeanvitError):
    """A model name that neither timm nor leanvit registers."""


class EngineUnavailableError(LeanvitError):
    """An inference engine whose package is not installed or whose device is absent."""


def _name_key(name: str) -> str:
    return name.lower().replace("-", "_")


def close_matches(name: str, candidates: Iterable[str], n: int = 5,
                  key: Callable[[str], str] = _name_key) -> list[str]:
    """The candidates closest to ``name``, compared by ``key`` (case-insensitive by default): those it begins, then
    those containing it, then difflib's, each group closest first. Prefix and substring hits rank first because
    difflib fills its ``n`` with look-alikes (``deit_tiny``: ``rdnet_tiny``) before the name the user was typing."""
    keyed: dict[str, list[str]] = {}
    for c in candidates:
        keyed.setdefault(key(c), []).append(c)
    k = key(name)

    def closest(keys: Iterable[str]) -> list[str]:
        return sorted(keys, key=lambda c: -difflib.SequenceMatcher(None, k, c).ratio())

    hits = [c for c in keyed if k and k in c]
    ranked = closest(c for c in hits if c.startswith(k)) + closest(c for c in hits if not c.startswith(k))
    ranked += difflib.get_close_matches(k, keyed, n=n, cutoff=0.6)
    found: list[str] = []
    for c in dict.fromkeys(ranked):
        found += [o for o in keyed[c] if o not in found]
    return found[:n]


def check_range(what: str, value: int | float, lo: int | float, hi: int | float) -> None:
    """Reject ``value`` outside ``[lo, hi]`` with a message naming the accepted range."""
    if not lo <= value <= hi:
        raise LeanvitError(f"{what} must be between {lo} and {hi}, got {value}.")


class ModelKwargsError(LeanvitError):
    """Model kwargs that a model's constructor refuses; ``cause`` is its own exception (a ``TypeError`` for an
    argument it does not take, an ``AssertionError`` or ``ValueError`` for a value it refuses)."""

    def __init__(self, message: str, cause: Exception):
        super().__init__(message)
        self.cause = cause


class InputSizeError(LeanvitError, ValueError):
    """An input whose resolution a fixed-resolution model cannot take; ``reason``, where known, is the model's own
    complaint (for a caller that words the fix itself)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


class LeanvitWarning(UserWarning):
    """Something the user should know that does not stop the work (a layer left in float, a file not read): a
    category of its own so that a script can filter leanvit's warnings, and the CLI can print them as its own."""


def warn(message: str, category: type[Warning] = LeanvitWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside leanvit and torch, whatever the depth: the line
    the user wrote, not a leanvit helper or the frame torch's ``no_grad`` decorator adds."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("leanvit", "torch"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
