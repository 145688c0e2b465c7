"""Run a model in eval mode, or with its parameters frozen, and hand it back as it came.

``model.train(was_training)`` restores one flag on every submodule: a model whose parts were in different modes (a
frozen BatchNorm in eval inside a model being trained) came back with all of them in one. These restore each
module's and each parameter's own.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn


@contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block, every submodule's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def frozen(model: nn.Module):
    """``model``'s parameters with ``requires_grad`` off inside the block, on again after where it was on."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in trainable:
            p.requires_grad_(True)
