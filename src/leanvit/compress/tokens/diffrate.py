"""DiffRate (Chen et al., ICCV 2023): per-block prune and merge counts found by gradient descent.

Inference, with the counts frozen. In every block, between attention and MLP:

1. The non-prefix tokens are sorted by the class token's head-mean attention.
2. Prune: the first ``prune[l]`` tokens are kept. Counts include the prefix tokens, as in
   ``compression_rate.json``.
3. Merge: every token beyond ``merge[l]`` is averaged into its most cosine-similar token among the
   first ``merge[l]``, using the token features themselves. Prefix tokens are never destinations. The
   merged token's size, scaled by that similarity, is added to its destination's size.
4. Attention is proportional: log(size) is added to the logits.

The search (:func:`search_rates`) keeps every token and learns, per block, a softmax over candidate
kept counts (``granularity`` apart) for pruning and one for merging. The expected count is rounded
up with a straight-through ceil. Tokens past the count are masked out of the following attentions
by a straight-through mask, so the classification loss reaches the rates. The loss is
``CE + λ ((MACs − target) / unreduced MACs)²``. Only these rate parameters are trained (AdamW, lr 0.1
cosine to 0.01); the backbone is frozen, and the found counts then apply without fine-tuning. The
MACs the found counts reach are checked against the target, and a miss is reported.

Four deviations from the official code:

- The MAC term is relative to the model's own MACs. The official ``5 (GMACs − target)²`` was tuned on
  ImageNet DeiTs (DeiT-S: 4.6 GMACs, where it equals λ ≈ 100 here); on a 0.37 GMAC CIFAR DeiT the same term
  is 150× weaker than there, and the search barely moved from its start whatever the target.
- The learning rate is 10× the official 0.01 (cosine to 0.001), for a search of hundreds of steps on a CPU:
  Adam moves a rate logit about one learning rate per step, so 300 steps at 0.01 left the counts near their
  uniform start (a tiny DeiT asked for half its MACs kept 54 %; at 0.1, 49.5 % within 60 steps).
- The backbone runs in eval mode during the search (the official search keeps drop-path and mixup
  on), for determinism.
- A negative similarity counts as 0 when sizes are merged, so log(size) stays finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ...errors import LeanvitError, warn
from ...modes import eval_mode, frozen
from .patch import TokenMethod, gather_tokens, model_tokens

#: Kept-token counts published with DiffRate (``compression_rate.json``), searched on ImageNet for
#: the official DeiT weights: {(timm architecture, target GMACs): (prune, merge)}.
PUBLISHED_RATES: dict[tuple[str, float], tuple[tuple[int, ...], tuple[int, ...]]] = {
    ("deit_tiny_patch16_224", 0.6): ((197, 196, 180, 157, 130, 107, 86, 73, 63, 51, 40, 3),
                                     (197, 187, 167, 139, 114, 90, 76, 66, 57, 45, 37, 3)),
    ("deit_tiny_patch16_224", 0.7): ((197, 196, 194, 180, 150, 123, 98, 82, 68, 60, 52, 3),
                                     (197, 196, 192, 158, 133, 103, 88, 72, 64, 58, 49, 3)),
    ("deit_tiny_patch16_224", 0.8): ((197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3),
                                     (197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3)),
    ("deit_tiny_patch16_224", 0.9): ((197, 197, 196, 190, 182, 166, 141, 125, 113, 105, 99, 3),
                                     (197, 196, 194, 188, 172, 147, 129, 115, 107, 103, 96, 3)),
    ("deit_tiny_patch16_224", 1.0): ((197, 197, 196, 194, 188, 184, 178, 164, 156, 137, 129, 21),
                                     (197, 197, 196, 190, 186, 154, 148, 156, 145, 135, 125, 21)),
    ("deit_small_patch16_224", 2.3): ((197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3),
                                      (197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3)),
    ("deit_small_patch16_224", 2.5): ((197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3),
                                      (197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3)),
    ("deit_small_patch16_224", 2.7): ((197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3),
                                      (197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3)),
    ("deit_small_patch16_224", 2.9): ((197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3),
                                      (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)),
    ("deit_small_patch16_224", 3.1): ((197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3),
                                      (197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3)),
    ("deit_base_patch16_224", 8.7): ((197, 192, 172, 156, 131, 107, 90, 72, 56, 33, 17, 3),
                                     (197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3)),
    ("deit_base_patch16_224", 10.0): ((197, 194, 182, 168, 148, 129, 113, 101, 82, 49, 25, 3),
                                      (197, 186, 174, 156, 137, 117, 105, 90, 66, 31, 19, 3)),
    ("deit_base_patch16_224", 10.4): ((197, 196, 188, 174, 156, 141, 121, 103, 90, 58, 25, 3),
                                      (197, 190, 184, 164, 145, 131, 107, 94, 74, 31, 21, 3)),
    ("deit_base_patch16_224", 11.5): ((197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3),
                                      (197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3)),
    ("deit_base_patch16_224", 12.5): ((197, 197, 196, 192, 184, 170, 154, 139, 129, 94, 58, 3),
                                      (197, 196, 194, 190, 176, 160, 145, 131, 115, 68, 47, 3)),
}


#: the DiffRate fields that only the search reads
SEARCH_OPTIONS = ("steps", "granularity", "lr", "min_lr", "macs_weight", "batch_size")
#: how far (a fraction of the unreduced MACs) the searched counts may land from the target before it is reported
MISS_TOLERANCE = 0.02


def _published_key(arch: str, gmacs: float) -> tuple[str, float] | None:
    """The ``PUBLISHED_RATES`` key of ``arch`` at exactly ``gmacs`` (the table's targets have one decimal): a
    target between two of them is not rounded onto either, whose counts would miss it."""
    tenth = round(float(gmacs), 1)
    return (arch.split(".")[0], tenth) if math.isclose(tenth, gmacs, abs_tol=1e-6) else None


@dataclass(frozen=True)
class DiffRate(TokenMethod):
    """DiffRate prune + merge with per-block kept-token counts.

    Give the counts (``prune`` and ``merge``, one per block, prefix tokens included) or a
    ``target_macs`` (absolute MACs, e.g. ``2.9e9``). With a target, the counts are searched on
    ``calib`` when :func:`leanvit.tokens.apply` runs. Without ``calib``, the published counts are
    used for an official DeiT architecture at a published target (0.6-1.0 G for DeiT-T, 2.3-3.1 G
    for DeiT-S, 8.7-12.5 G for DeiT-B).

    ``calib`` is a tensor of images, or an iterable of image tensors or (images, labels) batches.
    Without labels, the unreduced model's own top-1 serves as the label.
    """

    target_macs: float | None = None
    prune: tuple[int, ...] | None = None
    merge: tuple[int, ...] | None = None
    calib: Any = field(default=None, repr=False, compare=False)
    steps: int = 300
    granularity: int = 4
    lr: float = 0.1
    min_lr: float = 0.01
    #: λ of the relative MAC term (see the module docstring)
    macs_weight: float = 100.0
    batch_size: int = 32

    metric = "cls_attn"
    proportional = True

    def __post_init__(self) -> None:
        if (self.prune is None) != (self.merge is None):
            raise LeanvitError("DiffRate needs both prune and merge counts, or neither (with target_macs).")
        if self.prune is None and self.target_macs is None:
            raise LeanvitError("DiffRate needs target_macs (e.g. 2.9e9) or explicit prune and merge counts.")
        if self.prune is not None and self.calib is not None:
            raise LeanvitError("DiffRate got both kept counts and calibration data; the counts leave nothing "
                               "to search. Drop one of them.")
        if self.prune is not None:
            object.__setattr__(self, "prune", tuple(int(v) for v in self.prune))
            object.__setattr__(self, "merge", tuple(int(v) for v in self.merge))
        if self.steps < 1 or self.granularity < 1 or self.batch_size < 1:
            raise LeanvitError("DiffRate steps, granularity and batch_size must be at least 1.")

    def _check_no_search_options(self) -> None:
        """An error naming the search options set where no search runs (they would be ignored)."""
        searching = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                     if f.name in SEARCH_OPTIONS and getattr(self, f.name) != f.default]
        if searching:
            raise LeanvitError(f"DiffRate({', '.join(searching)}) sets the rate search, which needs calibration "
                               f"images: pass calib=... (leanvit tokens: --calib DATA), or drop the option to use "
                               f"the published counts.")

    @classmethod
    def published(cls, arch: str, gmacs: float) -> DiffRate:
        """The counts DiffRate published for ``arch`` (a timm DeiT name) at ``gmacs``."""
        key = _published_key(arch, gmacs)
        if key not in PUBLISHED_RATES:
            known = ", ".join(f"{a}@{g}" for a, g in PUBLISHED_RATES)
            raise LeanvitError(f"DiffRate published no rates for {arch} at {gmacs} GMACs. Published: {known}.")
        prune, merge = PUBLISHED_RATES[key]
        return cls(target_macs=key[1] * 1e9, prune=prune, merge=merge)

    def resolve(self, model: VisionTransformer) -> DiffRate:
        if self.prune is not None:
            return self
        if self.calib is not None:
            prune, merge = search_rates(model, self.calib, self)
            return replace(self, prune=prune, merge=merge, calib=None)
        self._check_no_search_options()
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        key = _published_key(arch, self.target_macs / 1e9)
        if key in PUBLISHED_RATES and model_tokens(model) == PUBLISHED_RATES[key][0][0]:
            return replace(DiffRate.published(*key), target_macs=self.target_macs)
        known = [f"{g:g}" for a, g in PUBLISHED_RATES if a == arch.split(".")[0]]
        raise LeanvitError(
            f"DiffRate has no published rates for {arch} at {self.target_macs / 1e9:g} GMACs"
            + (f" (published at 224x224: {', '.join(known)})" if known else "")
            + "; give calibration images (calib=..., or `leanvit tokens --method diffrate --calib DIR`) to search "
            "them, or use a published target."
        )

    def reducers(self, depth: int, num_prefix: int):
        self._check(depth, num_prefix)
        return [
            partial(_diffrate_reduce, prune=p, merge=m, num_prefix=num_prefix)
            for p, m in zip(self.prune, self.merge)
        ]

    def token_counts(self, num_tokens: int, num_prefix: int, depth: int) -> list[int]:
        self._check(depth, num_prefix)
        counts, n = [], num_tokens
        for p, m in zip(self.prune, self.merge):
            n = min(n, p, m)
            counts.append(n)
        return counts

    def _check(self, depth: int, num_prefix: int) -> None:
        if len(self.prune) != depth or len(self.merge) != depth:
            raise LeanvitError(
                f"DiffRate has {len(self.prune)} prune and {len(self.merge)} merge counts for a "
                f"{depth}-block model; give one of each per block."
            )
        if min(self.prune + self.merge) <= num_prefix:
            raise LeanvitError(
                f"DiffRate counts include the {num_prefix} prefix token(s) and must keep at least one "
                f"more; got a minimum of {min(self.prune + self.merge)}."
            )


def _diffrate_reduce(x, size, cls_attn, *, prune: int, merge: int, num_prefix: int):
    N = x.shape[1]
    keep = min(N, prune)
    kept = min(keep, merge)
    if kept == N:
        return x, size  # the official code sorts here too; order does not change any output
    idx = cls_attn[:, num_prefix:].topk(keep - num_prefix, dim=1, sorted=True).indices + num_prefix
    idx = torch.cat([torch.arange(num_prefix, device=x.device).expand(x.shape[0], -1), idx], dim=1)
    x = gather_tokens(x, idx)
    if size is not None:
        size = gather_tokens(size, idx)
    if kept == keep:
        return x, size
    node_max, node_idx = _closest(x, kept, keep, num_prefix)
    return _merge_tail(x, size, node_max, node_idx, kept)


def _closest(x: torch.Tensor, kept: int, end: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For tokens ``[kept:end]``: cosine similarity to, and index of, the closest of ``[num_prefix:kept]``."""
    metric = x[:, :end].detach()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    sim = metric[:, kept:] @ metric[:, :kept].transpose(-1, -2)
    prefix = torch.arange(kept, device=x.device) < num_prefix
    return sim.masked_fill(prefix, -math.inf).max(dim=-1)


def _average_into(x: torch.Tensor, node_idx: torch.Tensor, kept: int) -> torch.Tensor:
    """Average tokens ``[kept:]`` into their destinations ``node_idx`` (each destination counts itself)."""
    B, N, C = x.shape
    idx = node_idx.unsqueeze(-1)
    count = x.new_ones(B, kept, 1).scatter_add(1, idx, x.new_ones(B, N - kept, 1))
    return x[:, :kept].scatter_add(1, idx.expand(-1, -1, C), x[:, kept:]) / count


def _merge_tail(x, size, node_max, node_idx, kept: int):
    """Inference merge of tokens ``[kept:]``; sizes add up weighted by similarity."""
    if size is None:
        size = x.new_ones(*x.shape[:2], 1)
    weight = size[:, kept:] * node_max.clamp(min=0).unsqueeze(-1)
    return _average_into(x, node_idx, kept), size[:, :kept].scatter_add(1, node_idx.unsqueeze(-1), weight)


# --------------------------------------------------------------------------------------------
# Differentiable rate search


def _ste_ceil(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.ceil(x) - x).detach()


def _ste_min(n: torch.Tensor, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """min(n, p, m) whose gradient reaches both ``p`` and ``m`` in full (the official ``STE_Min``)."""
    return (p + m) + (torch.minimum(n, torch.minimum(p, m)) - (p + m)).detach()


class _BlockCost:
    """MACs of one block as a function of its token counts, from the block's own layer shapes."""

    def __init__(self, blk: nn.Module) -> None:
        attn = blk.attn
        dim, inner = attn.qkv.in_features, attn.num_heads * attn.head_dim
        self.linear_attn = dim * 3 * inner + inner * attn.proj.out_features
        self.quadratic = 2 * inner
        self.mlp = sum(m.in_features * m.out_features for m in blk.mlp.modules() if isinstance(m, nn.Linear))

    def attention(self, n):
        return n * self.linear_attn + n * n * self.quadratic

    def ffn(self, n):
        return n * self.mlp


def _counted_macs(costs: list[_BlockCost], fixed: float, n0: int, kept: list[int]) -> float:
    """The MACs of the model whose blocks see ``n0`` tokens first and keep ``kept[i]`` after block ``i``'s attention
    (``fixed``: the MACs outside the blocks)."""
    macs, n = fixed, n0
    for cost, k in zip(costs, kept):
        macs += cost.attention(n) + cost.ffn(k)
        n = k
    return macs


def _token_probability(probs: torch.Tensor, candidates: torch.Tensor, n: int, num_prefix: int) -> torch.Tensor:
    """P(token position t is kept) under the count distribution ``probs`` over ``candidates``."""
    pos = torch.arange(n, device=probs.device, dtype=probs.dtype).unsqueeze(1)
    return (probs * (pos < candidates + num_prefix)).sum(dim=1)


def _token_mask(probs, candidates, kept: int, end: int, n: int, num_prefix: int) -> torch.Tensor:
    """1 outside ``[kept:end]``, 0 inside, with the kept-probability's gradient (straight-through)."""
    soft = _token_probability(probs, candidates, n, num_prefix)
    hard = torch.ones_like(soft)
    hard[kept:end] = 0
    return hard - soft.detach() + soft


def _masked_attention(attn, x, size, mask, eps: float = 1e-6):
    """Attention where masked keys are ignored (each token still sees itself): ``softmax_with_policy``."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log().view(B, 1, 1, N)
    keys = mask.view(B, 1, 1, N)
    policy = keys + (1 - keys) * torch.eye(N, device=x.device)
    w = (logits - logits.amax(dim=-1, keepdim=True)).exp() * policy
    w = (w + eps / N) / (w.sum(dim=-1, keepdim=True) + eps)
    out = attn.norm((w @ v).transpose(1, 2).reshape(B, N, -1))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj(out), w[:, :, 0].mean(dim=1)


def _merge_keep_sources(x, size, kept: int, end: int, num_prefix: int):
    """Search-time merge of ``[kept:end]`` into ``[:kept]``; the sources stay in place (masked later)."""
    node_max, node_idx = _closest(x, kept, end, num_prefix)
    merged = _average_into(x[:, :end], node_idx, kept)
    src_size = (size[:, kept:end] * node_max.unsqueeze(-1)).clamp(min=1)
    dst_size = size[:, :kept].clamp(min=1).scatter_add(1, node_idx.unsqueeze(-1), src_size)
    x = torch.cat([merged, x[:, kept:]], dim=1)
    return x, torch.cat([dst_size, src_size, size[:, end:]], dim=1)


def _calibration_batches(model: nn.Module, calib: Any, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches; labels default to the unreduced model's own top-1."""
    if isinstance(calib, torch.Tensor):
        calib = calib.split(batch_size)
    batches = []
    for item in calib:
        images, labels = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise LeanvitError("DiffRate calib must hold image tensors (B, C, H, W) or (images, labels) batches.")
        if tuple(images.shape[-2:]) != tuple(model.patch_embed.img_size):
            raise LeanvitError(f"DiffRate calibration images are {tuple(images.shape[-2:])} but the model takes "
                               f"{tuple(model.patch_embed.img_size)}; pre-process them for this model.")
        if labels is None:
            with torch.no_grad():
                labels = model(images).argmax(dim=-1)
        batches.append((images, labels))
    if not batches:
        raise LeanvitError("DiffRate got an empty calibration set.")
    return batches


def search_rates(model: VisionTransformer, calib: Any, cfg: DiffRate) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """DiffRate's differentiable search of per-block (prune, merge) counts on ``calib``.

    ``model`` must be unreduced. The backbone is frozen and in eval mode, and only the rate
    distributions are trained, for ``cfg.steps`` steps that cycle over the calibration batches.
    """
    from ...profile import count_macs

    blocks = list(model.blocks)
    depth, prefix = len(blocks), model.num_prefix_tokens
    n0 = model_tokens(model)
    candidates = torch.arange(n0 - prefix, 0, -cfg.granularity, dtype=torch.float32)
    costs = [_BlockCost(b) for b in blocks]
    full = count_macs(model, (model.patch_embed.proj.in_channels, *model.patch_embed.img_size))
    fixed = full - sum(c.attention(n0) + c.ffn(n0) for c in costs)
    least = _counted_macs(costs, fixed, n0, [n0] + [prefix + int(candidates.min())] * (depth - 1))
    if not least < cfg.target_macs < full:
        raise LeanvitError(
            f"DiffRate's target of {cfg.target_macs / 1e9:.4g} GMACs (target_macs={cfg.target_macs:.4g}) is outside "
            f"what this model can reach: give one between {least / 1e9:.3f} and its unreduced {full / 1e9:.3f} GMACs "
            f"(--target-gmacs in GMACs, e.g. 2.9; target_macs in MACs, e.g. 2.9e9)."
        )

    with eval_mode(model), frozen(model):
        batches = _calibration_batches(model, calib, cfg.batch_size)
        # Block 0 is never reduced (the official search gives it a single candidate: keep all).
        logits = nn.Parameter(torch.zeros(depth - 1, 2, len(candidates)))
        opt = torch.optim.AdamW([logits], lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.min_lr)
        for step in range(cfg.steps):
            images, labels = batches[step % len(batches)]
            out, macs = _search_forward(model, images, logits, candidates, costs, fixed)
            loss = F.cross_entropy(out, labels) + cfg.macs_weight * ((macs - cfg.target_macs) / full) ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            kept = (torch.ceil(logits.softmax(dim=-1) @ candidates) + prefix).int().tolist()
    prune = (n0,) + tuple(p for p, _ in kept)
    merge = (n0,) + tuple(m for _, m in kept)
    reached = _counted_macs(costs, fixed, n0, DiffRate(prune=prune, merge=merge).token_counts(n0, prefix, depth))
    if abs(reached - cfg.target_macs) > MISS_TOLERANCE * full:
        warn(f"DiffRate's search reached {reached / 1e9:.4g} GMACs for a target of {cfg.target_macs / 1e9:.4g} "
             f"(unreduced {full / 1e9:.4g}): more than {MISS_TOLERANCE:.0%} of the model's MACs off. Raise "
             f"macs_weight (now {cfg.macs_weight:g}; leanvit tokens: --macs-weight) to weigh the target more against "
             f"accuracy, or steps (now {cfg.steps}; leanvit tokens: --steps).")
    return prune, merge


def _search_forward(model, images, logits, candidates, costs, fixed):
    """The masked, differentiable forward of the search; returns (class logits, expected MACs)."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    B, N, _ = x.shape
    size, mask = x.new_ones(B, N, 1), x.new_ones(B, N)
    n = x.new_tensor(float(N))
    macs = x.new_tensor(float(fixed))
    for i, blk in enumerate(model.blocks):
        h, cls_attn = _masked_attention(blk.attn, blk.norm1(x), size, mask)
        x = x + blk.ls1(h)
        macs = macs + costs[i].attention(n)
        if i > 0:
            order = cls_attn[:, prefix:].argsort(dim=1, descending=True) + prefix
            order = torch.cat([torch.arange(prefix, device=x.device).expand(B, -1), order], dim=1)
            x, size, mask = gather_tokens(x, order), gather_tokens(size, order), mask.gather(1, order)
            present = int(mask[0].sum().round())
            probs_p, probs_m = logits[i - 1].softmax(dim=-1)
            p = _ste_ceil(candidates @ probs_p) + prefix
            if int(p) < present:
                mask = mask * _token_mask(probs_p, candidates, int(p), present, N, prefix)
            mid = min(present, int(p))
            m = _ste_ceil(candidates @ probs_m) + prefix
            if int(m) < mid:
                x, size = _merge_keep_sources(x, size, int(m), mid, prefix)
                mask = mask * _token_mask(probs_m, candidates, int(m), mid, N, prefix)
            n = _ste_min(n, p, m)
        macs = macs + costs[i].ffn(n)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x)), macs
