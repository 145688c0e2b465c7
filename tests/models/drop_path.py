"""What the zoo's drop-path tests read off a built model."""
from __future__ import annotations

import torch.nn as nn


def drop_prob(branch: nn.Module) -> float:
    """A residual branch's drop-path rate: 0 where the model built an ``nn.Identity`` for a rate of 0."""
    return getattr(branch, "drop_prob", 0.0)


def shared_rate(*branches: nn.Module) -> float:
    """The one drop-path rate of a block's residual ``branches`` (attention and MLP, say): asserted the same for all."""
    rates = [drop_prob(b) for b in branches]
    assert len(set(rates)) == 1, f"a block's residual branches drop at different rates: {rates}"
    return rates[0]
