"""Resumable training state: safetensors for tensors, JSON for everything else.

An epoch's checkpoint is a folder ``epoch-NNNN`` holding ``model.safetensors`` (with the
metadata :func:`leanvit.checkpoint.model_from_checkpoint` needs), ``ema.safetensors`` when EMA is
on, ``optimizer.safetensors`` (the optimizer's tensors, flattened) and ``state.json`` (epoch,
step, config, param groups, per-epoch log). It is written under a temporary name and renamed, so
an interrupted save never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.utils import ModelEmaV3

from ..checkpoint import WEIGHTS_FILE, read_checkpoint, save_weights

STATE_FILE = "state.json"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
_EPOCH_DIR = re.compile(r"epoch-(\d{4,})$")  # epoch-NNNN, with more digits from epoch 10000 on


def save_training_state(output: Path, epoch: int, *, model: torch.nn.Module, metadata: dict,
                        optimizer: torch.optim.Optimizer, ema: ModelEmaV3 | None,
                        state: dict) -> Path:
    """Write the checkpoint of completed ``epoch`` (0-based) and delete the previous one."""
    final = output / f"epoch-{epoch:04d}"
    tmp = output / f".epoch-{epoch:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(tmp / WEIGHTS_FILE, model.state_dict(), metadata)
    if ema is not None:
        save_weights(tmp / EMA_FILE, ema.module.state_dict(), metadata)
    opt = optimizer.state_dict()
    save_weights(tmp / OPTIMIZER_FILE, {f"{index}.{name}": value for index, slots in opt["state"].items()
                                        for name, value in slots.items()})
    (tmp / STATE_FILE).write_text(json.dumps({**state, "epoch": epoch, "param_groups": opt["param_groups"]},
                                             indent=1))
    tmp.rename(final)
    for old in output.glob("epoch-*"):
        if old != final:
            shutil.rmtree(old)
    return final


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete epoch checkpoint under ``output``, if any."""
    done = [(int(m.group(1)), p) for p in output.glob("epoch-*")
            if (m := _EPOCH_DIR.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return max(done)[1] if done else None  # by number: epoch-10000 sorts before epoch-9999 by name


def read_state(folder: Path) -> dict:
    """The ``state.json`` of an epoch checkpoint: epoch, step, config, param groups, epoch log."""
    return json.loads((folder / STATE_FILE).read_text())


def load_training_state(folder: Path, state: dict, *, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, ema: ModelEmaV3 | None) -> None:
    """Restore model, optimizer and EMA from ``folder``, whose :func:`read_state` is ``state``."""
    model.load_state_dict(read_checkpoint(folder / WEIGHTS_FILE)[0])
    if ema is not None:
        ema.module.load_state_dict(read_checkpoint(folder / EMA_FILE)[0])
    slots: dict[int, dict] = {}
    for key, value in load_file(str(folder / OPTIMIZER_FILE)).items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
