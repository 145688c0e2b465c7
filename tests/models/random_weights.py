"""Random weights for the zoo's tests: outputs that depend on every parameter and buffer.

Fresh timm inits leave layer scales at 1e-5 and norms at identity, which hides mistakes in the
branches they scale; these values keep every branch visible while deep networks stay finite.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

#: Layer-scale parameter names across the families' model files.
LAYER_SCALES = ("gamma", "gamma_1", "layer_scale_2")


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite ``model``'s floating-point state in place (deterministic for ``seed``); returns it."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            t.copy_(random_like(name, t.shape, g))
    return model


def random_like(name: str, shape, g: torch.Generator) -> torch.Tensor:
    """Fan-in scaled weights; norm scales, BN statistics and layer scales well away from init."""
    leaf = name.rsplit(".", 1)[-1]
    noise = torch.randn(shape, generator=g)
    if leaf == "running_var":
        return noise.abs() * 0.5 + 0.5
    if leaf == "weight" and len(shape) > 1:
        return noise / math.sqrt(math.prod(shape[1:]))
    if leaf in LAYER_SCALES:
        return 0.1 * (1 + 0.2 * noise)  # large enough to matter, small enough for a 30-block network
    if leaf == "weight":
        return 1 + 0.2 * noise
    return 0.2 * noise
