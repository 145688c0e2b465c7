"""ToMe (Bolya et al., ICLR 2023): merge ``r`` similar tokens in every block.

In each block, between attention and MLP, the tokens are split alternately into sets A and B. Each
A token is matched to its most similar B token, using cosine similarity of the head-mean attention
keys, and the ``r`` best-matched A tokens are merged into their partners. Merging is a size-weighted
average, and proportional attention then adds log(size) to the attention logits so that a merged
token weighs as much as the patches it replaced. Prefix tokens (class, distillation) are never
merged, as in ``tome/patch/timm.py``. The official code quietly merges fewer tokens in a block that
cannot merge ``r`` (at most half of its unprotected tokens); here that is an error naming the largest
``r`` that fits, so the token counts are always the ones asked for.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, replace
from functools import partial

import torch

from ...errors import LeanvitError
from .patch import TokenMethod, gather_tokens


@dataclass(frozen=True)
class ToMe(TokenMethod):
    """Token merging.

    Args:
        r: tokens merged away in every block, or one count per block (a shorter tuple is padded
            with zeros, as ``tome.utils.parse_r`` does with a list).
        prop_attn: proportional attention. ToMe recommends it for off-the-shelf models.
        inflect: with an int ``r``, the paper's linear schedule (official ``r=(r, inflect)``): from
            ``r * (1 - inflect)`` in the first block to ``r * (1 + inflect)`` in the last, about ``r`` on average;
            -1 merges the most early on, 0 (default) the same ``r`` in every block.
    """

    r: int | tuple[int, ...] = 8
    prop_attn: bool = True
    inflect: float = 0.0

    metric = "keys"

    @property
    def proportional(self) -> bool:
        return self.prop_attn

    def __post_init__(self) -> None:
        given = _index(self.r)  # any integer type (numpy, a 0-d tensor) as a Python int
        if not isinstance(given, int):
            try:
                given = tuple(_index(v) for v in self.r)
            except TypeError:
                given = None
        if (isinstance(given, tuple) and not isinstance(self.r, PerBlock) and len(given) == 2
                and (isinstance(given[1], float) or given[1] in (-1, 0, 1))):
            raise LeanvitError(  # official ToMe's (r, inflection) tuple would silently mean two blocks' counts here
                f"ToMe r={given} is ambiguous: here a tuple gives one count per block, where official ToMe's "
                f"(r, inflection) is a schedule. Write ToMe(r={given[0]}, inflect={given[1]}) for that, or "
                + (f"ToMe(r=({given[0]}, {given[1]}, 0)) for two blocks' counts." if isinstance(given[1], int)
                   else "give every block's count."))
        if given is None or (isinstance(given, tuple) and not all(isinstance(v, int) for v in given)):
            raise LeanvitError(f"ToMe r must be an int or a sequence of ints (one per block), e.g. 8 or "
                               f"(0, 2, 2, 1), got {self.r!r}.")
        r = (given,) if isinstance(given, int) else given
        if any(v < 0 for v in r):
            raise LeanvitError(f"ToMe r must be >= 0, got {self.r}.")
        if (not isinstance(self.inflect, numbers.Real) or not -1 <= self.inflect <= 1
                or (self.inflect and not isinstance(given, int))):
            raise LeanvitError(f"ToMe inflect must be in [-1, 1] and given with an int r, got "
                               f"r={self.r}, inflect={self.inflect!r}.")
        object.__setattr__(self, "r", given if isinstance(given, int) else PerBlock(r))
        if type(self.inflect) not in (int, float):  # numpy's: a plain float in the repr
            object.__setattr__(self, "inflect", float(self.inflect))

    def schedule(self, depth: int) -> list[int]:
        """``r`` for each of ``depth`` blocks."""
        if isinstance(self.r, int):
            # tome.utils.parse_r's linear schedule (the same r in every block when inflect is 0)
            first = int(self.r * (1.0 - self.inflect))
            step = (2 * self.r - 2 * first) / max(depth - 1, 1)
            return [int(first + step * i) for i in range(depth)]
        if len(self.r) > depth:
            raise LeanvitError(f"ToMe got {len(self.r)} per-block r values for a {depth}-block model.")
        return list(self.r) + [0] * (depth - len(self.r))

    def reducers(self, depth: int, num_prefix: int):
        return [partial(_tome_reduce, r=r, num_prefix=num_prefix, block=i, method=self) if r else None
                for i, r in enumerate(self.schedule(depth))]

    def token_counts(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        schedule = self.schedule(depth)
        counts = _merged_counts(schedule, num_tokens, num_prefix)
        if len(counts) < depth:  # block len(counts) cannot merge its r
            block = len(counts)
            raise self._too_large(block, schedule[block], counts[-1] if counts else num_tokens, num_prefix,
                                  self._largest_r(num_tokens, num_prefix, depth))
        return counts

    def _largest_r(self, num_tokens: int, num_prefix: int, depth: int) -> int | None:
        """For an int ``r``: the largest smaller ``r`` whose schedule (same ``inflect``) every block can
        merge (each merges at most half), 0 if none; None for per-block counts."""
        if not isinstance(self.r, int):
            return None
        return next((r for r in range(self.r - 1, 0, -1)
                     if len(_merged_counts(replace(self, r=r).schedule(depth), num_tokens, num_prefix)) == depth), 0)

    def _too_large(self, block: int, r: int, n: int, num_prefix: int, largest: int | None = None,
                   runtime: bool = False) -> LeanvitError:
        """The error for ``block``, scheduled to merge ``r`` of its ``n`` tokens: the user's own ``r``
        first, then the block's count where a schedule made it, and the largest ``r`` of the same form."""
        given = f"r={self.r}" if isinstance(self.r, int) else f"r={tuple(self.r)}"
        scheduled = not isinstance(self.r, int) or self.inflect
        if isinstance(self.r, int) and self.inflect:
            given += f", inflect={self.inflect:g}"
        verb = "gets" if runtime else "has"  # at run time: an input of another size than the model's
        at = f"it schedules r={r} for block {block}, which {verb}" if scheduled else f"block {block} {verb}"
        hint = ""
        if largest is not None:
            form = f" with inflect={self.inflect:g}" if self.inflect else ""
            hint = (f" The largest r every block can take here{form} is {largest}." if largest
                    else f" No r > 0 fits every block here{form}.")
        fix = "Lower r or give one r per block." if isinstance(self.r, int) else "Lower that block's count."
        return LeanvitError(
            f"ToMe {given} is too large{' for this input' if runtime else ''}: {at} {n} tokens ({num_prefix} protected) "
            f"and can merge at most {(n - num_prefix) // 2}.{hint} {fix}"
        )


def _merged_counts(schedule: list[int], num_tokens: int, num_prefix: int) -> list[int]:
    """The tokens left after each block merging ``schedule[i]``, up to the first block that cannot merge its
    count (at most half of its unprotected tokens): shorter than ``schedule`` then."""
    counts, n = [], num_tokens
    for r in schedule:
        if r > (n - num_prefix) // 2:
            break
        n -= r
        counts.append(n)
    return counts


def _index(v):
    """``v`` as a Python int if it is of any integer type (numpy, a 0-d tensor), else ``v`` itself."""
    try:
        return operator.index(v)
    except TypeError:
        return v


class PerBlock(tuple):
    """A tuple of ToMe ``r`` values known to be one count per block (from :func:`parse_r`, or already
    checked by :class:`ToMe`), so a 2-tuple is not taken for official ToMe's ``(r, inflection)``."""

    __slots__ = ()


def parse_r(text: str) -> int | tuple[int, ...]:
    """ToMe's ``r`` from text: ``"8"`` (every block), ``"1x6"`` (1 in each of the first six blocks)
    or ``"0,2,2,1"`` (one count per block, the rest 0). Models with few tokens need a per-block
    schedule: merging in the first block, before its keys are informative, costs the most accuracy.
    A tuple returned is a :class:`PerBlock`: ``ToMe`` takes even ``"2,1"`` as two blocks' counts."""
    text = text.strip()
    try:
        if "," in text:
            return PerBlock(int(v) for v in text.split(","))
        r, sep, blocks = text.partition("x")
        return PerBlock((int(r),) * int(blocks)) if sep else int(r)
    except ValueError:
        raise LeanvitError(f"ToMe r '{text}': expected R (e.g. 8), RxK (R in the first K blocks, e.g. 1x6) "
                           "or one count per block (e.g. 0,2,2,1).") from None


def _tome_reduce(x, size, keys, *, r: int, num_prefix: int, block: int, method: ToMe):
    B, N, C = x.shape
    if r > (N - num_prefix) // 2:  # an input larger or smaller than the one validated at apply()
        raise method._too_large(block, r, N, num_prefix, runtime=True)
    metric = keys.detach()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # (B, |A|, |B|)

    # Prefix token i sits in A (even i) or B (odd i): it can be neither a source nor a destination.
    n_even, n_odd = (num_prefix + 1) // 2, num_prefix // 2
    rows = torch.arange(scores.shape[1], device=x.device).unsqueeze(1) < n_even
    cols = torch.arange(scores.shape[2], device=x.device).unsqueeze(0) < n_odd
    scores = scores.masked_fill(rows | cols, -math.inf)

    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src_idx, unm_idx = edge_idx[:, :r], edge_idx[:, r:].sort(dim=-1).values
    dst_idx = node_idx.gather(1, src_idx)

    if size is None:
        size = x.new_ones(B, N, 1)
    xs = torch.cat([x * size, size], dim=-1)  # merge the weighted sum and the size in one pass
    a, b = xs[:, ::2], xs[:, 1::2]
    unm = gather_tokens(a, unm_idx)
    dst = b.scatter_add(1, dst_idx.unsqueeze(-1).expand(-1, -1, C + 1), gather_tokens(a, src_idx))
    prefix = [unm[:, i // 2:i // 2 + 1] if i % 2 == 0 else dst[:, i // 2:i // 2 + 1] for i in range(num_prefix)]
    out = torch.cat(prefix + [unm[:, n_even:], dst[:, n_odd:]], dim=1)
    size = out[..., C:]
    return out[..., :C] / size, size
