"""Model weights in and out of files, with errors that name every mismatched key.

leanvit writes weights as safetensors with a JSON ``leanvit`` metadata entry (model name, model
kwargs, data config, class names), so one file is enough to rebuild the model and its
pre-processing. It reads those, plain ``.pth``/``.pt``/``.bin`` state dicts, and timm- or
official-repo checkpoints (weights under ``model``/``state_dict``, ``module.`` prefixes from DDP,
the model family's ``checkpoint_filter_fn`` for the official key names).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import struct
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import LeanvitError
from .models._pretrained import WEIGHT_KEYS, evaluated_weights
from .models.registry import create_model

WEIGHTS_FILE = "model.safetensors"
#: checkpoints trained by the project (``tools/release_checkpoint.py``), each with a model card beside it
SHIPPED_DIR = Path(__file__).parent / "assets" / "checkpoints"
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(LeanvitError):
    """A checkpoint whose keys or shapes do not fit the model it is loaded into."""


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Write ``state_dict`` as safetensors, ``metadata`` (JSON-able) stored inside the file.

    The file gets the mode the umask gives any new file (safetensors writes 0600: other users, and the other nodes'
    users of a shared run folder, could not read it)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={"leanvit": json.dumps(metadata or {})})
    path.chmod(0o666 & ~_umask())
    return path


def _umask() -> int:
    """The process's umask, read from /proc where Linux gives it; elsewhere set and put back (the only other way,
    though another thread creating a file in between would get the umask set for that instant)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def shipped_checkpoints() -> dict[str, Path]:
    """The project's own trained checkpoints by name (their model cards are the ``.md`` files beside them)."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.safetensors"))}


def checkpoint_file(path: str | Path) -> Path:
    """The weights file ``path`` names: itself, a run folder's ``model.safetensors``, or a shipped checkpoint."""
    path = Path(path).expanduser()
    if not path.exists() and str(path) in shipped_checkpoints():
        path = shipped_checkpoints()[str(path)]
    if path.is_dir():
        folder, path = path, path / WEIGHTS_FILE
        if not path.is_file():
            from .train.state import latest_checkpoint  # here: leanvit.train imports this module

            last = latest_checkpoint(folder)
            if last is not None:
                raise LeanvitError(f"Checkpoint {path} does not exist: the run in {folder} has not finished. Pass "
                                   f"{last} for its last epoch's weights, or finish it with leanvit train --resume.")
    if not path.is_file():
        shipped = ", ".join(shipped_checkpoints()) or "none yet"
        raise LeanvitError(f"Checkpoint {path} does not exist (the shipped checkpoints, usable by name: {shipped}).")
    return path


def checkpoint_sha256(path: str | Path) -> str:
    """The sha256 of the weights file ``path`` names: what identifies it once a name or file is reused."""
    with open(checkpoint_file(path), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict in ``path`` and leanvit's metadata (empty for foreign checkpoints).

    A folder stands for the ``model.safetensors`` that ``leanvit train`` writes into it; the name of
    a shipped checkpoint (:func:`shipped_checkpoints`) for that file.
    """
    path = checkpoint_file(path)
    try:
        if _is_safetensors(path):
            with safe_open(str(path), framework="pt") as f:
                return {_strip_prefixes(k): f.get_tensor(k) for k in f.keys()}, _leanvit_metadata(f)
        # timm's train.py and the official repos (DeiT's) save their argparse options beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a pickled model object or other code, or not a pickle at all
        raise _not_a_state_dict(path, e) from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, struct.error) as e:
        raise _unreadable(path, e) from None
    if isinstance(obj, dict):
        obj = evaluated_weights(obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LeanvitError(f"{path} holds no state dict of tensors (looked under {', '.join(WEIGHT_KEYS)}).")
    return {_strip_prefixes(k): v for k, v in obj.items()}, {}


def read_metadata(path: str | Path) -> dict:
    """leanvit's metadata in the checkpoint ``path`` names, read from the file's header alone (no tensors)."""
    path = checkpoint_file(path)
    if not _is_safetensors(path):
        return {}  # a pickled state dict carries no leanvit metadata
    try:
        with safe_open(str(path), framework="pt") as f:
            return _leanvit_metadata(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def _is_safetensors(path: Path) -> bool:
    """By content, whatever the file is called: safetensors starts with its JSON header's length, then the header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def _not_a_state_dict(path: Path, error: pickle.UnpicklingError) -> LeanvitError:
    """torch's weights-only refusal, said in one line: which object the file holds, and what to do."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found is None:
        return _unreadable(path, error)
    what = found.group(1)
    module = what.startswith("torch.nn.") or ".models." in what or what.startswith("timm.")
    fix = ("A file from torch.save(model) holds the model object: save model.state_dict() instead (or safetensors)."
           if module else "Save only the state dict (a dict of tensors), or convert it to safetensors.")
    return LeanvitError(f"Cannot read checkpoint {path} as a state dict: it holds a Python object ({what}) that "
                        f"loading would have to run code for, which leanvit does not do. {fix}")


def _leanvit_metadata(f) -> dict:
    return json.loads((f.metadata() or {}).get("leanvit", "{}"))


def _unreadable(path: Path, error: Exception) -> LeanvitError:
    if isinstance(error, pickle.UnpicklingError):  # torch's text is about weights_only, not about this file
        reason = "not a pickle torch can read"
    else:
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or ['no detail'])[0]}"
    return LeanvitError(f"Cannot read checkpoint {path} ({reason}). Is it a complete weights file (safetensors, or a "
                        "state dict saved with torch.save)?")


def load_weights(model: nn.Module, path: str | Path, *, ignore_classifier: bool = False) -> dict:
    """Load ``path`` into ``model`` and return the checkpoint's leanvit metadata.

    Every key must match in name and shape, else :class:`CheckpointMismatchError` lists the
    missing, unexpected and mis-shaped keys. ``ignore_classifier`` leaves the model's classifier
    (``pretrained_cfg['classifier']``) as initialised, for fine-tuning on other classes.
    """
    state, meta = read_checkpoint(path)
    _load_state(model, state, meta, path, ignore_classifier)
    return meta


def model_from_checkpoint(name: str, path: str | Path, *, with_tokens: bool = True,
                          **kwargs) -> tuple[nn.Module, dict]:
    """``name`` built with the kwargs the checkpoint was trained with, its weights loaded.

    A leanvit checkpoint records ``model_kwargs`` (``num_classes``, ``img_size``, ...); they are
    applied when it was saved from the same architecture, and ``kwargs`` override them. A model
    trained with token reduction on (``leanvit train --tokens``) gets that reduction back, unless
    ``with_tokens`` is False (its weights are a plain ViT's: ``leanvit tokens`` measures it unreduced first).
    """
    state, meta = read_checkpoint(path)
    saved = meta.get("model")
    same_arch = saved is not None and saved.split(".")[0] == name.split(".")[0]
    model = create_model(name, **{**(meta.get("model_kwargs", {}) if same_arch else {}), **kwargs})
    _load_state(model, state, meta, path, ignore_classifier=False)
    if same_arch and meta.get("tokens") and with_tokens:
        from .compress.tokens import apply, from_spec

        apply(model, from_spec(meta["tokens"], **meta.get("tokens_options", {})))  # (ToMe trained without prop_attn)
    return model, meta


def _load_state(model: nn.Module, state: dict, meta: dict, path, ignore_classifier: bool) -> None:
    expected = model.state_dict()
    if _mismatch(expected, state, ignore_classifier, model):
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                filtered = filter_fn(dict(state), model)
            except Exception:  # any failure means the keys are not in the official layout either
                filtered = None
            if filtered is not None and not _mismatch(expected, filtered, ignore_classifier, model):
                state = filtered
    problems = _mismatch(expected, state, ignore_classifier, model)
    if problems:
        arch = _arch(model)
        saved = meta.get("model")
        hint = (f" It was saved from '{saved}': load it into that model." if saved and saved.split(".")[0] != arch
                else " Create the model with the architecture and num_classes the checkpoint was trained with.")
        raise CheckpointMismatchError(f"Checkpoint {path} does not fit {arch}: {'; '.join(problems)}.{hint}")
    if ignore_classifier:
        state = {k: v for k, v in state.items() if not _is_classifier(k, model)}
    model.load_state_dict(state, strict=not ignore_classifier)


def _mismatch(expected: dict, state: dict, ignore_classifier: bool, model: nn.Module) -> list[str]:
    keep = (lambda k: not _is_classifier(k, model)) if ignore_classifier else (lambda k: True)
    missing = sorted(k for k in expected.keys() - state.keys() if keep(k))
    unexpected = sorted(k for k in state.keys() - expected.keys() if keep(k))
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
              for k in sorted(expected.keys() & state.keys())
              if keep(k) and state[k].shape != expected[k].shape]
    return [f"{len(items)} {what} ({', '.join(items[:8])}{', ...' if len(items) > 8 else ''})"
            for items, what in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                                (shapes, "shape mismatches")) if items]


def _is_classifier(key: str, model: nn.Module) -> bool:
    heads = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else heads
    return any(key.startswith(f"{h}.") for h in heads)


def _arch(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _strip_prefixes(key: str) -> str:
    """``key`` without the wrappers' prefixes, in any order and number (``torch.compile(DDP(model))`` writes
    ``_orig_mod.module.``, ``DDP(torch.compile(model))`` ``module._orig_mod.``)."""
    while prefix := next((p for p in _PREFIXES if key.startswith(p)), None):
        key = key[len(prefix):]
    return key
