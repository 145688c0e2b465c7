"""Errors a user can fix.

Everything raised as :class:`LeanvitError` is a problem with the user's input or environment; the
CLI prints its message (which names the problem and the fix) and exits with status 2, without a
traceback. Any other exception is a bug in leanvit and keeps its traceback.
"""
from __future__ import annotations

import difflib
import sys
import warnings
from typing import Iterable


class LeanvitError(Exception):
    """Bad input or a missing dependency, with a message that says how to fix it."""


class UnknownModelError(LeanvitError):
    """A model name that neither timm nor leanvit registers."""


class EngineUnavailableError(LeanvitError):
    """An inference engine whose package is not installed or whose device is absent."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates closest to ``name``: difflib's ratio, then substring hits, best first."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if len(found) < n:
        key = name.lower().replace("-", "_")
        found += [c for c in candidates if key in c and c not in found][: n - len(found)]
    return found


def check_range(what: str, value: int | float, lo: int | float, hi: int | float) -> None:
    """Reject ``value`` outside ``[lo, hi]`` with a message naming the accepted range."""
    if not lo <= value <= hi:
        raise LeanvitError(f"{what} must be between {lo} and {hi}, got {value}.")


class InputSizeError(LeanvitError, ValueError):
    """An input whose resolution a fixed-resolution model cannot take."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside leanvit and torch, whatever the depth: the line
    the user wrote, not a leanvit helper or the frame torch's ``no_grad`` decorator adds."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("leanvit", "torch"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
