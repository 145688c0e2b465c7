"""What the zoo's drop-path tests read off a built model."""
from __future__ import annotations

import torch.nn as nn


def drop_prob(branch: nn.Module) -> float:
    """A residual branch's drop-path rate: 0 where the model built an ``nn.Identity`` for a rate of 0."""
    return getattr(branch, "drop_prob", 0.0)
