"""Token reduction for plain ViTs: EViT, ToMe and DiffRate behind one patch API::

    import leanvit.tokens as tokens

    tokens.apply(model, tokens.EViT(keep_rate=0.7, fuse=True, layers=(3, 6, 9)))
    tokens.apply(model, tokens.from_spec("tome:13"))  # replaces the EViT patch
    tokens.remove(model)                              # the original model again

The model is changed in place and keeps its parameters and ``state_dict`` keys, so checkpoints load
before or after. Token counts per block are fixed by the input size (:func:`token_counts`), so the
reduced model exports to ONNX / OpenVINO with static shapes.

Fine-tuning with the reduction on (the hook ``leanvit train`` uses): apply the method to the model
before building the optimizer, then, for EViT, ``hook = keep_rate_warmup(model, steps_per_epoch=N,
start_epoch=S, shrink_epochs=E)`` and ``hook(global_step)`` before every forward pass. In training
mode the keep rate is 1 for S epochs, then follows a cosine down to the applied keep rate over E
epochs; in eval mode it is the applied keep rate throughout (official EViT evaluates each epoch at
that epoch's scheduled rate; leanvit's per-epoch top-1 is the target's, the model as it will run). The official
recipe is S=10, E=100 of 300 epochs, so scale both for a short fine-tune. ToMe and DiffRate need no
schedule. The saved weights are a plain ViT's: re-apply the method after loading them.
"""
from __future__ import annotations

from typing import Any

from ...errors import LeanvitError, close_matches
from .diffrate import DiffRate
from .evit import EViT, keep_rate_at, keep_rate_warmup
from .patch import TokenMethod, applied, apply, check_plain_vit, remove, token_counts
from .tome import ToMe, parse_r

METHODS = ("evit", "tome", "diffrate")

__all__ = [
    "DiffRate", "EViT", "METHODS", "ToMe", "TokenMethod", "applied", "apply", "check_plain_vit", "from_spec",
    "keep_rate_at", "keep_rate_warmup", "parse_r", "remove", "token_counts",
]


def from_spec(spec: str, **options: Any) -> TokenMethod:
    """Parse ``"evit:0.7"`` (keep rate), ``"tome:8"`` (r; also ``tome:1x6``, ``tome:0,2,2,1``, see
    :func:`parse_r`) or ``"diffrate:2.9"`` (target GMACs).

    ``options`` go to the method's constructor, e.g. ``from_spec("diffrate:2.9", calib=images)``
    or ``from_spec("evit:0.5", fuse=False)``.
    """
    name, sep, value = spec.partition(":")
    name = name.strip().lower()
    if name in METHODS and not sep:
        raise LeanvitError(f"Token spec '{spec}' has no value: write {name}:VALUE, e.g. "
                           f"{ {'evit': 'evit:0.7', 'tome': 'tome:8', 'diffrate': 'diffrate:2.9'}[name] }.")
    if name not in METHODS:
        hint = close_matches(name, METHODS)
        raise LeanvitError(
            f"Unknown token spec '{spec}'"
            + (f" (did you mean {hint[0]}?)" if hint else "")
            + ". Use evit:KEEP_RATE, tome:R or diffrate:GMACS, e.g. evit:0.7, tome:8, diffrate:2.9."
        )
    if name == "tome":
        return ToMe(r=parse_r(value), **options)
    try:
        number = float(value)
    except ValueError:
        raise LeanvitError(f"Token spec '{spec}': expected a number after '{name}:', got '{value}'.") from None
    if name == "evit":
        return EViT(keep_rate=number, **options)
    return DiffRate(target_macs=number * 1e9, **options)
