"""EViT (Liang et al., ICLR 2022): keep the patch tokens the class token attends to most.

In each chosen block, between attention and MLP, the class token's attention to the patch tokens
(averaged over heads) ranks them. The top ``ceil(keep_rate * n)`` are kept, and with ``fuse`` the
rest are summed, weighted by that attention and without normalisation as in the official code, into
one extra token appended after the kept ones. Later blocks treat the fused token like any other.
There are no new parameters, so checkpoints load unchanged. Prefix tokens (class, distillation) are
never dropped; the official code protects only the class token.

Fine-tuning with reduction on follows EViT's warm-up: the keep rate is 1 for the first epochs, then
follows a cosine down to the target (:func:`keep_rate_at`, :func:`keep_rate_warmup`).
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch

from ...errors import LeanvitError
from .patch import ReducingBlocks, TokenMethod, gather_tokens


@dataclass(frozen=True)
class EViT(TokenMethod):
    """EViT token reorganisation. Defaults: DeiT-S ``deit_small_patch16_shrink_base``.

    Args:
        keep_rate: fraction of the non-prefix tokens kept at each chosen block, in (0, 1].
        fuse: fold the dropped tokens into one attention-weighted token (``--fuse_token``).
        layers: 0-based indices of the blocks that reduce (the 4th, 7th and 10th of 12 by default).
    """

    keep_rate: float = 0.7
    fuse: bool = True
    layers: tuple[int, ...] = (3, 6, 9)

    metric = "cls_attn"
    proportional = False

    def __post_init__(self) -> None:
        if not isinstance(self.keep_rate, numbers.Real) or not 0.0 < self.keep_rate <= 1.0:
            raise LeanvitError(f"EViT keep_rate must be in (0, 1], got {self.keep_rate!r}.")
        if type(self.keep_rate) not in (int, float):  # numpy's: a plain float in the repr
            object.__setattr__(self, "keep_rate", float(self.keep_rate))
        try:  # any integer type (numpy, a 0-d tensor), not a float or a string of digits
            layers = tuple(sorted(set(operator.index(i) for i in self.layers)))
        except TypeError:
            raise LeanvitError(f"EViT layers must be a sequence of block indices, e.g. (3, 6, 9), "
                               f"got {self.layers!r}.") from None
        object.__setattr__(self, "layers", layers)

    def _check_layers(self, depth: int) -> None:
        bad = [i for i in self.layers if not 0 <= i < depth]
        if bad:
            raise LeanvitError(
                f"EViT layers {bad} do not exist in a {depth}-block model; pass layers within 0..{depth - 1}."
            )

    def reducers(self, depth: int, num_prefix: int):
        self._check_layers(depth)
        reduce = partial(_evit_reduce, keep_rate=self.keep_rate, fuse=self.fuse, num_prefix=num_prefix)
        return [reduce if i in self.layers and self.keep_rate < 1 else None for i in range(depth)]

    def token_counts(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        self._check_layers(depth)
        counts, n = [], num_tokens
        for i in range(depth):
            if i in self.layers:
                kept = math.ceil(self.keep_rate * (n - num_prefix))
                if kept < n - num_prefix:
                    n = num_prefix + kept + int(self.fuse)
            counts.append(n)
        return counts


def _evit_reduce(x, size, cls_attn, *, keep_rate: float, fuse: bool, num_prefix: int):
    n = x.shape[1] - num_prefix
    kept = math.ceil(keep_rate * n)
    if kept >= n:  # the official code skips the block when nothing would be dropped
        return x, None
    score = cls_attn[:, num_prefix:]
    idx = score.topk(kept, dim=1, sorted=True).indices
    patches = x[:, num_prefix:]
    parts = [x[:, :num_prefix], gather_tokens(patches, idx)]
    if fuse:
        dropped = score.scatter(1, idx, 0.0)  # attention weight of every dropped token, 0 for kept ones
        parts.append(dropped.unsqueeze(1) @ patches)
    return torch.cat(parts, dim=1), None


def keep_rate_at(
    step: int, steps_per_epoch: int, keep_rate: float, *, start_epoch: int = 10, shrink_epochs: int = 100
) -> float:
    """EViT's keep rate at optimizer ``step`` (``helpers.adjust_keep_rate``).

    1 for the first ``start_epoch`` epochs, then a cosine from 1 down to ``keep_rate`` over
    ``shrink_epochs`` epochs, constant after. The defaults are the official 300-epoch recipe
    (``run_code.sh``); a short fine-tune should scale both down.
    """
    epoch = step // steps_per_epoch
    if epoch < start_epoch:
        return 1.0
    if epoch >= start_epoch + shrink_epochs:
        return keep_rate
    progress = (step - steps_per_epoch * start_epoch) / (steps_per_epoch * shrink_epochs)
    return keep_rate + (1.0 - keep_rate) * (math.cos(progress * math.pi) + 1) * 0.5


def keep_rate_warmup(
    model: torch.nn.Module, *, steps_per_epoch: int, start_epoch: int = 10, shrink_epochs: int = 100
) -> Callable[[int], float]:
    """Training hook: ``hook(step)`` sets the keep rate of the EViT applied to ``model`` for that step.

    ``leanvit train`` calls ``hook(global_step)`` before each forward pass and may log the keep rate
    it returns. The scheduled rate applies in training mode only: in eval mode ``model`` uses the keep
    rate it was patched with, the target, during the warm-up as after it, so each epoch's validation
    scores the model as it will run (official EViT evaluates at the epoch's scheduled rate instead).
    :func:`applied` and :func:`token_counts` report the target.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, ReducingBlocks) or not isinstance(blocks.method, EViT):
        raise LeanvitError(
            "The keep-rate warm-up needs a model with EViT applied: "
            "leanvit.tokens.apply(model, EViT(keep_rate=...)) first."
        )
    if steps_per_epoch < 1:
        raise LeanvitError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}.")
    target = blocks.method

    def hook(step: int) -> float:
        rate = keep_rate_at(step, steps_per_epoch, target.keep_rate,
                            start_epoch=start_epoch, shrink_epochs=shrink_epochs)
        if rate != (blocks.train_method or target).keep_rate:
            blocks.set_train_method(None if rate == target.keep_rate else replace(target, keep_rate=rate))
        return rate

    return hook
