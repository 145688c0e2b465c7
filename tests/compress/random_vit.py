"""Random weights for the token-reduction tests: a fresh ViT's layer scales, norms and zero biases hide a misplaced
branch, so every parameter is drawn away from its init."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def randomised(model: nn.Module, seed: int = 5) -> nn.Module:
    """Overwrite ``model``'s state in place (deterministic for ``seed``): fan-in scaled matrices, norm and layer
    scales around 1, biases around 0; returns it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g)
            if t.ndim > 1:  # fan-in scaled matrices
                t.copy_(noise / math.sqrt(math.prod(t.shape[1:])))
            elif name.endswith(("weight", "gamma")):  # norm scales and layer scales, away from 1 (and 1e-5)
                t.copy_(1 + 0.2 * noise)
            else:  # biases
                t.copy_(0.2 * noise)
    return model
