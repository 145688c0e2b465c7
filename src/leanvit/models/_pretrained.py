"""Pretrained loading for families whose official evaluation used the live weights, not the EMA.

timm reads ``pretrained_cfg_overlay=dict(file=...)`` with its own ``load_state_dict``, which takes a
trainer's EMA weights (``state_dict_ema`` / ``model_ema``) whenever the file has them, before the
family's ``checkpoint_filter_fn`` sees the file. Its other sources (the hub, ``state_dict=``) hand the
filter the whole checkpoint. :func:`whole_file_filter` makes the file source do the same.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn as nn
from timm.models import clean_state_dict

FilterFn = Callable[[dict, nn.Module], dict]
#: where trainers put the weights: the live ones (what the official evaluations load) before the EMA
WEIGHT_KEYS = ('state_dict', 'model', 'module', 'state_dict_ema', 'model_ema')


def evaluated_weights(checkpoint: dict) -> dict:
    """The weights a trainer's ``checkpoint`` holds under the first of :data:`WEIGHT_KEYS` it has; a bare state
    dict as it is."""
    return next((checkpoint[k] for k in WEIGHT_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)


def read_checkpoint_file(path) -> dict:
    """The whole checkpoint at ``path``, read as timm reads one (tensors and argparse options only), with
    DDP's ``module.`` prefixes cleaned from its state dicts as timm's file loader does."""
    path = str(path)
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return clean_state_dict(load_file(path, device='cpu'))
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, dict):
        return checkpoint

    def is_state_dict(d) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())

    if is_state_dict(checkpoint):
        return clean_state_dict(checkpoint)
    return {k: clean_state_dict(v) if is_state_dict(v) else v for k, v in checkpoint.items()}


def whole_file_filter(filter_fn: FilterFn, pretrained: bool, kwargs: dict) -> FilterFn:
    """``filter_fn``, or, when timm will load the weights from a file, a filter that reads that file again
    whole and gives it to ``filter_fn``, so that the filter (not timm) picks which weights of it to load."""
    if not pretrained:
        return filter_fn
    cfg = kwargs.get('pretrained_cfg')
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg) if isinstance(cfg, dict) else {}
    cfg.update(kwargs.get('pretrained_cfg_overlay') or {})
    # timm's order of sources: an explicit hub / local-dir source, then state_dict, then file
    file = cfg.get('file')
    if not file or cfg.get('source') in ('hf-hub', 'local-dir') or cfg.get('state_dict') is not None:
        return filter_fn

    def filter_whole_file(state_dict: dict, model: nn.Module) -> dict:
        return filter_fn(read_checkpoint_file(file), model)

    return filter_whole_file
