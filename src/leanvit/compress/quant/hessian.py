"""Output-Hessian-guided range search (PTQ4ViT) and the labels-free task loss it weighs errors by.

Minimising each layer's output MSE treats every output value alike, but the task loss does not:
PTQ4ViT (Yuan et al., ECCV 2022) takes the second-order expansion of the loss around the float
output ``O`` of a layer, with the Hessian approximated by its diagonal Fisher form, so that
quantization costs ``sum(g^2 * (O_hat - O)^2)``, ``g`` the gradient of the loss w.r.t. ``O``. The
gradients come from one backward pass of the float model per calibration batch, all layers at
once; the loss is the cross entropy against the float model's own prediction, so no labels are
needed (PTQ4ViT's code uses a KL divergence to the float prediction, whose gradient is zero at the
float model itself).

Then, per layer: the weight's ranges (per output channel: output channel ``c`` depends only on
weight row ``c``, so the objective separates and each row's ratio is searched independently) and
the input's per-tensor range are searched in turn for a couple of rounds, starting from the
ranges calibration already set (MSE by default). Every candidate is a ratio of the min-max range
(of a weight row; for the input, of its calibrated range widened to take in the sampled inputs, which keeps its
zero point, and of the sampled inputs' min-max, which moves it), as in
:func:`~leanvit.compress.quant.quantizer.choose_range`, and the starting range is kept unless a candidate beats
it, so the search never worsens the objective. Memory stays bounded: each layer
keeps ``rows`` output positions (with the inputs they read) out of ``images`` calibration images,
drawn where the gradient is. Only Linear and conv layers are searched: the attention matmuls' input quantizers
(``attn_bits``) keep their calibrated ranges, where PTQ4ViT searches those too.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import LeanvitError
from .calibrate import quantizers_disabled
from .modules import QuantConv2d, QuantLinear
from .quantizer import fake_quantize, qparams


def pseudo_label_loss(logits, what: str) -> torch.Tensor:
    """Cross entropy against the model's own top-1 prediction, summed over images: a task loss
    without labels. ``what`` names the feature that needs it, for the error message."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise LeanvitError(f"{what} needs a classifier that returns (batch, classes) logits; this model returns "
                           f"{shape}. Use a classification head, or turn {what} off.")
    return F.cross_entropy(logits, logits.detach().argmax(1), reduction="sum")


def _input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(positions, groups, K)``: the vectors each output position's dot products read."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1])
    # pad as the conv does (F.pad also covers string and non-zero padding modes), then one patch per position
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)  # (B, C*kh*kw, L)
    return patches.transpose(1, 2).reshape(-1, layer.groups, patches.shape[1] // layer.groups)


def _output_rows(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer output (or its gradient) as ``(positions, channels)``, positions ordered as in :func:`_input_rows`."""
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _matmul(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's output rows (without bias) from input rows ``(N, groups, K)`` and its weight."""
    groups = rows.shape[1]
    return torch.einsum("ngk,gok->ngo", rows, weight.reshape(groups, weight.shape[0] // groups, -1)).flatten(1)


def _collect(qmodel: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor], images: int,
             rows: int, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (input rows, weighted squared output gradients)}`` at sampled output positions.

    Positions are drawn with probability proportional to their gradient energy and weighted by its
    inverse, so the rows' objective is an unbiased estimate of the full one while positions the loss
    ignores cost nothing (after a ViT's last attention only the class token has a gradient). The
    gradient is taken by a hook on each layer's output tensor, registered as soon as it exists, so a
    later in-place op on that tensor (an inplace ReLU) does not change what is recorded.
    """
    found: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
    used, images = 0, min(images, sum(len(b) for b in batches))  # fewer images than asked: their rows all the same
    for batch in batches:
        batch = batch[: images - used]
        if len(batch) == 0:
            break
        used += len(batch)
        keep = -(-rows * len(batch) // images)  # this batch's share of the rows

        def hook(name):
            def record(layer, args, out):
                if not out.requires_grad:  # computed from constants only: no gradient will reach it
                    return
                x, version = args[0].detach(), args[0]._version

                def sample(grad):
                    if x._version != version:
                        raise RuntimeError(f"hessian_search: the input of {name} was modified in place after the "
                                           f"layer read it. Please report this model.")
                    grad_sq = _output_rows(layer, grad).pow(2)
                    energy = grad_sq.sum(1)
                    if not energy.any():
                        return
                    p = energy / energy.sum()
                    index = torch.multinomial(p.cpu(), keep, replacement=True, generator=generator).to(p.device)
                    weight = 1 / (keep * p[index])
                    found[name].append((_input_rows(layer, x)[index], grad_sq[index] * weight[:, None]))

                out.register_hook(sample)
            return record

        handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
        try:
            with torch.enable_grad(), quantizers_disabled(qmodel):
                images_in = batch.detach().clone().requires_grad_()
                torch.autograd.grad(pseudo_label_loss(qmodel(images_in), "hessian_search"), images_in)
        finally:
            for h in handles:
                h.remove()
    return {name: (torch.cat([x for x, _ in pairs]), torch.cat([g for _, g in pairs]))
            for name, pairs in found.items() if pairs}


def _ratio_search(error, start: torch.Tensor) -> torch.Tensor:
    """Ratios (one per row) minimising ``error(ratios) -> (rows,)``, never worse than ``start``.

    A grid of 20 ratios of the min-max range, then 21 around the best one, as ``choose_range`` does.
    """
    best, best_err = start, error(start)

    def keep_better(ratios):
        nonlocal best, best_err
        for ratio in ratios:
            err = error(ratio)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, ratio, best)

    keep_better(r.expand_as(start) for r in torch.linspace(0.05, 1.0, 20, device=start.device))
    centre = best
    keep_better((centre + step).clamp(min=0.005) for step in torch.linspace(-0.05, 0.05, 21, device=start.device))
    return best


def _quantized_rows(rows: torch.Tensor, quantizer) -> torch.Tensor:
    """Input rows ``(N, groups, K)`` through the layer's input quantizer. :func:`_input_rows` lays each
    channel's values (its kernel positions) out consecutively, so a per-channel quantizer (whose ranges stay:
    the search is per tensor) applies along a ``(N, channels, positions)`` view."""
    if not quantizer.scheme.per_channel:
        return fake_quantize(rows, quantizer.scale, quantizer.zero_point, quantizer.scheme)
    by_channel = rows.reshape(rows.shape[0], quantizer.scale.numel(), -1)
    return fake_quantize(by_channel, quantizer.scale, quantizer.zero_point, quantizer.scheme, axis=1).reshape(rows.shape)


@torch.no_grad()
def _search_layer(layer: nn.Module, x: torch.Tensor, grad_sq: torch.Tensor, rounds: int, search_input: bool) -> None:
    """Alternate the weight ranges (per row) and the input range (per tensor) of one layer."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    weight = layer.weight.detach().float()
    target = _matmul(x, weight)
    per_row = weight.flatten(1) if wq.scheme.per_channel else weight.reshape(1, -1)
    w_lo, w_hi = per_row.amin(1), per_row.amax(1)

    def quantized(tensor, lo, hi, ratio, scheme, shape, axis):
        scale, zero = qparams(lo * ratio, hi * ratio, scheme)
        return fake_quantize(tensor, scale.reshape(shape), zero.reshape(shape), scheme, axis)

    def cost(x_hat, w_hat):  # per output channel
        return (grad_sq * (_matmul(x_hat, w_hat) - target).pow(2)).sum(0)

    def weight_cost(ratio):
        err = cost(x_hat, quantized(weight, w_lo, w_hi, ratio, wq.scheme, wq.scale.shape, 0))
        return err if wq.scheme.per_channel else err.sum().view(1)

    def input_cost(lo, hi):
        return cost(quantized(x, lo, hi, 1.0, iq.scheme, (), 0), w_hat).sum().view(1)

    # the ratio at which the min-max range gives the current scale: qparams is linear in the range
    w_start = w_ratio = wq.scale.reshape(-1) / qparams(w_lo, w_hi, wq.scheme)[0]
    if search_input:
        x_start = x_range = tuple(bound.reshape(1) for bound in iq.grid_range())
        families = _input_range_families(x, *x_start)
    x_hat = _quantized_rows(x, iq)
    for _ in range(rounds):
        w_ratio = _ratio_search(weight_cost, w_ratio)
        w_hat = quantized(weight, w_lo, w_hi, w_ratio, wq.scheme, wq.scale.shape, 0)
        if search_input:
            x_range = _input_range_search(input_cost, x_range, families)
            x_hat = quantized(x, *x_range, 1.0, iq.scheme, (), 0)
    _set_range_where_searched(wq, w_lo, w_hi, w_ratio, w_start)
    if search_input and x_range is not x_start:  # a range no candidate beat keeps its scale and zero point
        iq.set_range(*x_range)


def _input_range_families(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> list[tuple]:
    """The input range's candidates, as ``(lo, hi, start ratio)`` families whose ratios are searched: the calibrated
    range ``(lo, hi)`` widened to take in the sampled inputs (its ratios keep the zero point; ratio ``1 / widen`` is
    the range itself), and the sampled inputs' min-max (its ratios move the zero point to their asymmetry)."""
    widen = max(1.0, float(x.max() / hi) if hi > 0 else 1.0, float(x.min() / lo) if lo < 0 else 1.0)
    ones = torch.ones(1, device=x.device)
    return [(lo * widen, hi * widen, ones / widen), (x.min().reshape(1), x.max().reshape(1), ones)]


def _input_range_search(error, current: tuple, families: list[tuple]) -> tuple:
    """The ``(lo, hi)`` minimising ``error(lo, hi)``: ``current`` (the very object) unless a candidate of a family
    beats it, each family searched by :func:`_ratio_search` from its start ratio."""
    best, best_err = current, error(*current)
    for lo, hi, start in families:
        ratio = _ratio_search(lambda r: error(lo * r, hi * r), start)
        if (err := error(lo * ratio, hi * ratio)) < best_err:
            best, best_err = (lo * ratio, hi * ratio), err
    return best


def _set_range_where_searched(quantizer, lo: torch.Tensor, hi: torch.Tensor, ratio: torch.Tensor,
                              start: torch.Tensor) -> None:
    """The ranges ``ratio * (lo, hi)`` on the rows whose ratio the search moved; the others keep their scale and
    zero point bit for bit (recomputing them from the start ratio could round differently)."""
    scale, zero_point = qparams(lo * ratio, hi * ratio, quantizer.scheme)
    moved = ratio != start
    shape = quantizer.scale.shape
    quantizer.scale.copy_(torch.where(moved, scale, quantizer.scale.reshape(-1)).reshape(shape))
    quantizer.zero_point.copy_(torch.where(moved, zero_point, quantizer.zero_point.reshape(-1)).reshape(shape))


def hessian_search(qmodel: nn.Module, batches: list[torch.Tensor], *, fixed_inputs: set[str] = frozenset(),
                   images: int = 32, rows: int = 512, rounds: int = 2, seed: int = 0, progress: bool = True
                   ) -> list[str]:
    """Refine the calibrated ranges of every quantized layer of ``qmodel`` by PTQ4ViT's Hessian-guided search.

    ``fixed_inputs`` names layers whose input range must stay (RepQ-ViT's reparameterised ones,
    which share one scale derived from per-channel ranges); their weight ranges are still searched.
    Inputs quantized per channel (``QuantConfig.a_per_channel``) keep their ranges too: the search
    scales one per-tensor range.
    Returns the names of the layers searched; a layer whose output never reached the loss (no
    gradient) keeps its ranges and is left out.
    """
    from tqdm.auto import tqdm

    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    fixed_inputs = set(fixed_inputs) | {n for n, m in layers.items() if m.input_quantizer.scheme.per_channel}
    generator = torch.Generator().manual_seed(seed)
    samples = _collect(qmodel, layers, batches, images, rows, generator)
    for name in tqdm(samples, desc="hessian search", unit="layer", disable=not progress, file=sys.stderr):
        _search_layer(layers[name], *samples[name], rounds, search_input=name not in fixed_inputs)
    return list(samples)
