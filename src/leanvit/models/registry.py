"""Model names and construction across timm and leanvit's own families.

One place turns a user's model name into a timm model, so every command gives the same error
(with the closest registered names) for a typo.
"""
from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse

import timm
from timm.models import get_arch_pretrained_cfgs
import torch.nn as nn

from ..errors import LeanvitError, ModelKwargsError, UnknownModelError, close_matches


def resolve_model_name(name: str) -> str:
    """Return ``name`` if timm knows it (leanvit's families included), else raise with hints.

    A pretrained tag (``efficientformer_l1.snap_dist_in1k``) is accepted and kept if timm registers it for the
    architecture (weights or not: ``.untrained`` builds too); a wrong one is named here with the valid ones, not in
    timm's ``RuntimeError`` from inside ``create_model``.
    """
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        hints = close_matches(arch, timm.list_models())
        hint = f" Did you mean: {', '.join(hints)}?" if hints else ""
        raise UnknownModelError(
            f"Unknown model '{name}'.{hint} `leanvit models` lists the catalog; "
            "any timm model name works too."
        )
    tags = [t.partition(".")[2] for t in get_arch_pretrained_cfgs(arch)] if tag else []  # (read for a tag only)
    if tag not in (*tags, ""):
        valid = [t for t in tags if t]
        known = f"Its tags: {', '.join(f'{arch}.{t}' for t in valid)}" if valid else f"It has none: use '{arch}'"
        raise UnknownModelError(f"Unknown pretrained tag '{tag}' for {arch}. {known}.")
    return name


def create_model(name: str, *, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` after name resolution, in eval mode.

    ``pretrained=False`` is the default because leanvit's main jobs must run offline; pass
    ``pretrained=True`` (or a ``checkpoint_path``) when weights are at hand.
    """
    name = _timm_name(name)
    try:
        with _hub_offline_if_unreachable(pretrained):
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except LeanvitError:
        raise
    except TypeError as e:  # a model kwarg it does not take, or of the wrong type
        raise ModelKwargsError(f"{name} cannot be built with the model kwargs {kwargs} ({e}). Pass only arguments "
                               "its timm constructor takes, with their types (e.g. '{\"num_classes\": 10}').", e) from None
    except (AssertionError, ValueError) as e:  # a value the constructor refuses (timm's are asserts)
        if not kwargs:
            raise
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ModelKwargsError(f"{name} cannot be built with the model kwargs {kwargs} ({why}). Change the value it "
                               "complains about, or drop it for the model's default.", e) from None
    except RuntimeError as e:  # timm's own error for a model with no weight source (e.g. mobilevig_ti)
        if not (pretrained and str(e).startswith("No pretrained weights exist")):
            raise
        notes = " ".join(getattr(timm.models.get_pretrained_cfg(name), "notes", None) or ())
        raise LeanvitError(f"{name} has no pretrained weights registered with timm, so there is nothing to download. "
                           f"Load weights from a file where the command reads one ({_FILE_FLAGS}; in Python: "
                           "pretrained_cfg_overlay=dict(file=PATH)), "
                           f"or drop --pretrained (bench times random weights the same).{' ' + notes if notes else ''}"
                           ) from None
    except OSError as e:  # huggingface_hub's offline / not-cached errors are OSErrors
        if not pretrained:
            raise
        raise LeanvitError(f"{name}'s pretrained weights are not in the local cache and could not be downloaded "
                           f"({type(e).__name__}). Connect once to cache them, or load weights from a file where the command "
                           f"reads one ({_FILE_FLAGS}; bench times random weights: drop --pretrained).") from None
    return model.eval()


#: where each command reads weights from a file instead of downloading them, for the errors that send users there
_FILE_FLAGS = ("eval, quantize, tokens: --checkpoint FILE; train: --init-checkpoint FILE; a teacher: "
               "--teacher-checkpoint FILE")


@contextlib.contextmanager
def _hub_offline_if_unreachable(pretrained: bool):
    """huggingface_hub's offline mode while the Hub cannot be reached. Without it a download with no network retries
    for most of a minute, printing each retry, before it reads the cache; with it cached weights load at once and
    weights not cached fail at once (the OSError :func:`create_model` explains)."""
    import huggingface_hub.constants as hub

    if not pretrained or hub.HF_HUB_OFFLINE or _hub_reachable(hub.ENDPOINT):
        yield
        return
    hub.HF_HUB_OFFLINE = True  # (read at every call: ``constants.is_offline_mode()``)
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = False


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a connection to ``endpoint``'s host opens within ``timeout`` seconds; assumed so behind a proxy,
    which a direct connection cannot judge."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def pretrained_num_classes(name: str) -> int | None:
    """How many classes the pretrained weights ``create_model(name, pretrained=True)`` loads were trained on
    (None where timm does not say), known before anything is downloaded."""
    cfg = timm.models.get_pretrained_cfg(_timm_name(name))
    return getattr(cfg, "num_classes", None)


def _timm_name(name: str) -> str:
    """``name`` resolved (see :func:`resolve_model_name`); a catalog model without a tag gets the tag of the published
    weights (e.g. those with 1k classes)."""
    from ..catalog import find_facts

    facts = find_facts(name)
    if facts is not None and "." not in name:
        name = facts.model_id
    return resolve_model_name(name)
