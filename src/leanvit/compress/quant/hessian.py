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
drawn where the gradient is.

The attention matmuls' input quantizers (``attn_bits``) are searched the same way, as PTQ4ViT does: for each
product ``A @ B`` whose operands come straight from two quantizers, the cost is the gradient-weighted error of its
output rows, and the two per-tensor ranges are searched in turn (a non-uniform softmax quantizer keeps its fit and
is applied as it is); a quantizer that several products read is searched on the sum of their errors. Their
candidates keep the zero point (ratios of the calibrated range): an unsigned operand stays on a grid starting at 0,
the form the engines' INT8 matmuls take.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ...errors import LeanvitError
from .attention import PLAIN_MATMULS, QuantMatmuls
from .calibrate import quantizers_disabled
from .modules import QuantConv2d, QuantLinear
from .quantizer import FakeQuantizer, fake_quantize, qparams


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


def _draw_rows(grad_sq: torch.Tensor, keep: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``keep`` rows of ``grad_sq`` (rows, channels) drawn with probability proportional to their energy, and those
    rows weighted by its inverse (an unbiased estimate of the full sum); None when no row has a gradient.

    A row drawn several times is returned once with its weights summed: the same objective, its error computed
    once. Most draws repeat where the gradient reaches few rows (after a ViT's attention, mostly the class token's:
    32 distinct rows of 512 drawn in DeiT-tiny's projections and MLPs).
    """
    energy = grad_sq.sum(1)
    if not energy.any():
        return None
    p = energy / energy.sum()
    index = torch.multinomial(p.cpu(), keep, replacement=True, generator=generator).to(p.device)
    index, draws = index.unique(return_counts=True)  # (a product, not a sum: CUDA's index_add_ is not deterministic)
    return index, grad_sq[index] * (draws / (keep * p[index]))[:, None]


def _gradient_batches(batches: list[torch.Tensor], images: int, rows: int):
    """``(batch, keep)`` over the first ``images`` calibration images: ``keep`` is the batch's share of the ``rows``
    drawn (with fewer images than asked, their rows are all the same)."""
    used, images = 0, min(images, sum(len(b) for b in batches))
    for batch in batches:
        batch = batch[: images - used]
        if len(batch) == 0:
            return
        used += len(batch)
        yield batch, -(-rows * len(batch) // images)


def _float_backward(qmodel: nn.Module, batch: torch.Tensor, handles: list, mode=None) -> None:
    """One forward and backward pass of ``qmodel``'s float function on ``batch`` under the pseudo-label loss, for
    the hooks to record (``mode``: a torch function mode active meanwhile); the hooks' ``handles`` removed after."""
    try:
        with torch.enable_grad(), quantizers_disabled(qmodel), mode or contextlib.nullcontext():
            images_in = batch.detach().clone().requires_grad_()
            torch.autograd.grad(pseudo_label_loss(qmodel(images_in), "hessian_search"), images_in)
    finally:
        for h in handles:
            h.remove()


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
    for batch, keep in _gradient_batches(batches, images, rows):
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
                    if (drawn := _draw_rows(grad_sq, keep, generator)) is not None:
                        index, weighted = drawn
                        found[name].append((_input_rows(layer, x)[index], weighted))

                out.register_hook(sample)
            return record

        _float_backward(qmodel, batch, [layer.register_forward_hook(hook(name)) for name, layer in layers.items()])
    return {name: (torch.cat([x for x, _ in pairs]), torch.cat([g for _, g in pairs]))
            for name, pairs in found.items() if pairs}


def _ratio_search(error, start: torch.Tensor) -> torch.Tensor:
    """Ratios (one per row) minimising ``error(ratios) -> errors``, both ``(candidates, rows)``, never worse than
    ``start``.

    A grid of 20 ratios of the min-max range, then 21 around the best one, as ``choose_range`` does; each pass's
    candidates go to ``error`` at once, for an error that weighs them together.
    """
    best, best_err = start, error(start[None])[0]

    def keep_better(ratios):
        nonlocal best, best_err
        for ratio, err in zip(ratios, error(ratios)):
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, ratio, best)

    keep_better(torch.linspace(0.05, 1.0, 20, device=start.device)[:, None].expand(-1, len(start)))
    keep_better((best + torch.linspace(-0.05, 0.05, 21, device=start.device)[:, None]).clamp(min=0.005))
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
        return torch.stack([cost(quantized(x, *one, 1.0, iq.scheme, (), 0), w_hat).sum() for one in zip(lo, hi)])

    # the ratio at which the min-max range gives the current scale: qparams is linear in the range
    w_start = w_ratio = wq.scale.reshape(-1) / qparams(w_lo, w_hi, wq.scheme)[0]
    if search_input:
        x_start = x_range = tuple(bound.reshape(1) for bound in iq.grid_range())
        families = _input_range_families(x, *x_start)
    x_hat = _quantized_rows(x, iq)
    for _ in range(rounds):
        w_ratio = _ratio_search(lambda ratios: torch.stack([weight_cost(r) for r in ratios]), w_ratio)
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
    """The ``(lo, hi)`` minimising ``error(lo, hi)`` (of candidate ranges, ``(candidates,)`` each, to their errors):
    ``current`` (the very object) unless a candidate of a family beats it, each family searched by
    :func:`_ratio_search` from its start ratio."""
    best, best_err = current, error(*current)
    for lo, hi, start in families:
        ratio = _ratio_search(lambda r: error(lo * r[:, 0], hi * r[:, 0])[:, None], start)
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


class _ProductRecorder(TorchFunctionMode):
    """Calls ``record(a_name, b_name, a, b, out)`` for each plain matrix product whose operands are, as tensor
    objects, the outputs of two tagged quantizers (``tags``: id -> (name, tensor); a disabled quantizer returns its
    input itself, so the operand of ``q_quantizer(q) @ ...`` is the tagged tensor)."""

    def __init__(self, tags: dict[int, tuple[str, torch.Tensor]], record):
        super().__init__()
        self.tags, self.record = tags, record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in PLAIN_MATMULS and len(args) == 2 and not kwargs:
            a, b = (args[1], args[0]) if func is torch.Tensor.__rmatmul__ else args
            tag_a, tag_b = self.tags.get(id(a)), self.tags.get(id(b))
            # (``x @ x``: one tensor through both quantizers carries one tag, so the pair is unknown: not searched)
            if (tag_a and tag_b and tag_a[1] is a and tag_b[1] is b and a is not b and a.ndim >= 2 and b.ndim >= 2
                    and out.requires_grad):
                self.record(tag_a[0], tag_b[0], a, b, out)
        return out


def _matmul_quantizers(qmodel: nn.Module) -> dict[str, nn.Module]:
    """``{name: quantizer}`` of every attention matmul input quantizer of ``qmodel``."""
    return {f"{name}.{q}": getattr(module, q) for name, module in qmodel.named_modules()
            if isinstance(module, QuantMatmuls) for q in module.QUANTIZERS}


def _collect_products(qmodel: nn.Module, matmul_quantizers: dict[str, nn.Module], batches: list[torch.Tensor],
                      images: int, rows: int, generator: torch.Generator) -> dict[tuple[str, str], tuple]:
    """``{(a quantizer, b quantizer): (a rows (R, K), their groups (R,), b (G, K, N), weighted squared gradients
    (R, N))}`` for the products :class:`_ProductRecorder` finds, output rows sampled as :func:`_collect` samples
    positions. ``B`` is kept whole per group (a batch element and head): every output row reads all of it."""
    found: dict[tuple[str, str], list] = {}
    shapes: dict[tuple[str, str], tuple] = {}  # each product's (K,) and (K, N), from its first call
    for batch, keep in _gradient_batches(batches, images, rows):
        tags: dict[int, tuple[str, torch.Tensor]] = {}

        def tag(name):
            def hook(quantizer, args, out):
                tags[id(out)] = (name, out)
            return hook

        def record(a_name, b_name, a, b, out):
            batch_shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
            a = a.detach().expand(*batch_shape, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
            b = b.detach().expand(*batch_shape, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
            versions = a._version, b._version
            pairs = found.setdefault((a_name, b_name), [])
            if shapes.setdefault((a_name, b_name), (a.shape[2:], b.shape[1:])) != (a.shape[2:], b.shape[1:]):
                return  # a call at another size (a module run on two resolutions): the first size's rows serve

            def sample(grad):
                if (a._version, b._version) != versions:
                    raise RuntimeError(f"hessian_search: an operand of {a_name} @ {b_name} was modified in place "
                                       f"after the product read it. Please report this model.")
                drawn = _draw_rows(grad.reshape(-1, grad.shape[-1]).pow(2), keep, generator)
                if drawn is not None:
                    index, weighted = drawn
                    offset = sum(len(b_) for _, _, b_, _ in pairs)
                    pairs.append((a.reshape(-1, a.shape[-1])[index], index // a.shape[1] + offset, b, weighted))

            out.register_hook(sample)

        _float_backward(qmodel, batch, [q.register_forward_hook(tag(n)) for n, q in matmul_quantizers.items()],
                        _ProductRecorder(tags, record))
    return {key: tuple(torch.cat(parts) for parts in zip(*pairs)) for key, pairs in found.items() if pairs}


#: values of candidates the product search computes at once (operand copies and products): batches this size
#: (4 MiB of float32) stay in the caches; larger ones measured slower
_CANDIDATE_VALUES = 2**20


def _per_tensor(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, quantizer: FakeQuantizer) -> torch.Tensor:
    """``x`` quantized on the per-tensor grid of ``quantizer``'s scheme spanning each candidate range ``(lo[c],
    hi[c])``, ``(candidates, *x.shape)``: :func:`fake_quantize`'s arithmetic bit for bit (its reciprocal scale,
    rounding half to even, clamp and rescale) in whole-tensor operations, which run several times faster than
    torch's fake-quantize kernels, one value at a time."""
    scale, zero_point = qparams(lo, hi, quantizer.scheme)
    scale, zero_point = (t.reshape(-1, *[1] * x.ndim) for t in (scale, zero_point.float()))
    codes = (x * (1 / scale)).round_().add_(zero_point).clamp_(quantizer.scheme.qmin, quantizer.scheme.qmax)
    return codes.sub_(zero_point).mul_(scale)


class _Product:
    """A product ``A @ B`` as sampled (:func:`_collect_products`): rows of ``A``, each reading its group's ``B``, with
    their float values and weighted squared gradients, and the errors of candidate ranges of one operand's quantizer.

    A row drawn more than once comes once, its weights summed (:func:`_draw_rows`). The rows are laid out by group,
    padded to the most rows a group has, so that one batched matmul computes them all (gathering ``B`` for each row
    would copy it once per row and candidate).
    """

    def __init__(self, a_quantizer: nn.Module, b_quantizer: nn.Module, a_rows: torch.Tensor, groups: torch.Tensor,
                 b: torch.Tensor, grad_sq: torch.Tensor):
        order = torch.argsort(groups, stable=True)  # by group (as collected already), each group's rows contiguous
        a_rows, groups, grad_sq = a_rows[order], groups[order], grad_sq[order]
        used, groups = groups.unique(return_inverse=True)  # only the groups a sampled row reads
        counts = torch.bincount(groups)
        slots = torch.arange(len(groups), device=groups.device) - (counts.cumsum(0) - counts)[groups]  # place in group
        self.quantizers, self.grad_sq = (a_quantizer, b_quantizer), grad_sq
        self.operands = (a_rows, b[used])
        self.groups, self.slots, self.padded = groups, slots, (len(counts), int(counts.max()))
        self.target = self.rows(*self.operands)

    def rows(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The rows ``(..., R, N)`` from ``a``'s rows ``(..., R, K)`` and ``b`` ``(..., G, K, N)``, one of them with
        a leading candidate dimension."""
        padded = a.new_zeros(*a.shape[:-2], *self.padded, a.shape[-1])
        padded[..., self.groups, self.slots, :] = a
        # a's candidates join the matmul's rows (a broadcast b would be copied once per candidate)
        products = torch.einsum("...gmk,gkn->...gmn", padded, b) if b.ndim == 3 else padded @ b
        return products[..., self.groups, self.slots, :]

    def quantized(self, side: int) -> torch.Tensor:
        """Operand ``side`` (0: a, 1: b) through its quantizer as it stands."""
        return self.quantizers[side].quantize(self.operands[side])

    def error(self, side: int, lo: torch.Tensor, hi: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """The gradient-weighted errors ``(candidates,)`` of the ranges ``(lo, hi)`` of operand ``side``, the other
        operand ``other`` (quantized); the candidates a memory-bounded batch at a time."""
        x, quantizer = self.operands[side], self.quantizers[side]
        padded_rows = self.padded[0] * self.padded[1] * (self.operands[0].shape[-1] + self.target.shape[-1])
        chunk = max(1, _CANDIDATE_VALUES // (x.numel() + padded_rows))  # a candidate's x, padded a rows and products
        errors = []
        for candidates in zip(lo.split(chunk), hi.split(chunk)):
            x_hat = _per_tensor(x, *candidates, quantizer)
            rows = self.rows(x_hat, other) if side == 0 else self.rows(other, x_hat)
            errors.append((self.grad_sq * (rows - self.target).pow(2)).sum((-2, -1)))
        return torch.cat(errors)


def _searchable(quantizer: nn.Module) -> bool:
    """A per-tensor uniform quantizer (a log2 or twin-uniform softmax quantizer keeps its own fit)."""
    return isinstance(quantizer, FakeQuantizer) and quantizer.scale.numel() == 1


@torch.no_grad()
def _search_product(product: _Product, feeds: dict[nn.Module, list[tuple[_Product, int]]], rounds: int) -> list[int]:
    """Alternate the per-tensor ranges of ``product``'s operand quantizers that ``feeds`` still holds (``{quantizer:
    [(product, side), ...]}``, every product each one feeds), each on the summed errors of the products it feeds with
    their other operands at their current ranges, and take them out of ``feeds``; returns the sides searched."""
    searched = [(side, quantizer, feeds.pop(quantizer))
                for side, quantizer in enumerate(product.quantizers) if quantizer in feeds]
    ranges, families = {}, {}
    for _, quantizer, fed in searched:
        ranges[quantizer] = tuple(bound.reshape(1) for bound in quantizer.grid_range())
        extremes = torch.stack([v for p, s in fed for v in p.operands[s].aminmax()])  # all the family reads
        families[quantizer] = _input_range_families(extremes, *ranges[quantizer])[:1]  # zero point kept
    for _ in range(rounds):
        for _, quantizer, fed in searched:
            others = [(p, s, p.quantized(1 - s)) for p, s in fed]  # once per search, not per candidate
            best = _input_range_search(lambda lo, hi: sum(p.error(s, lo, hi, other) for p, s, other in others),
                                       ranges[quantizer], families[quantizer])
            if best is not ranges[quantizer]:  # a range no candidate beat keeps its scale and zero point
                quantizer.set_range(*best)
                ranges[quantizer] = best
    return [side for side, *_ in searched]


def hessian_search(qmodel: nn.Module, batches: list[torch.Tensor], *, fixed_inputs: set[str] = frozenset(),
                   images: int = 32, rows: int = 512, rounds: int = 2, seed: int = 0, products: bool = True,
                   progress: bool = True) -> list[str]:
    """Refine the calibrated ranges of every quantized layer of ``qmodel`` by PTQ4ViT's Hessian-guided search,
    and (``products``) those of its attention matmuls' inputs.

    ``fixed_inputs`` names layers whose input range must stay (RepQ-ViT's reparameterised ones,
    which share one scale derived from per-channel ranges); their weight ranges are still searched.
    Inputs quantized per channel (``QuantConfig.a_per_channel``) keep their ranges too: the search
    scales one per-tensor range.
    Returns the names of the layers searched and of the matmul input quantizers searched; a layer or
    product whose output never reached the loss (no gradient) keeps its ranges and is left out.
    """
    from tqdm.auto import tqdm

    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    fixed_inputs = set(fixed_inputs) | {n for n, m in layers.items() if m.input_quantizer.scheme.per_channel}
    generator = torch.Generator().manual_seed(seed)
    samples = _collect(qmodel, layers, batches, images, rows, generator)
    found = {}
    if products and (matmul_quantizers := _matmul_quantizers(qmodel)):
        found = _collect_products(qmodel, matmul_quantizers, batches, images, rows, generator)
    searched = list(samples)
    with tqdm(total=len(samples) + len(found), desc="hessian search", unit="layer", disable=not progress,
              file=sys.stderr) as bar:
        for name in samples:
            _search_layer(layers[name], *samples[name], rounds, search_input=name not in fixed_inputs)
            bar.update()
        feeds: dict[nn.Module, list[tuple[_Product, int]]] = {}
        prepared = {}
        for key in list(found):  # popped: of each sample's B, only the product's copy of the groups read stays
            product = prepared[key] = _Product(*(matmul_quantizers[name] for name in key), *found.pop(key))
            for side, quantizer in enumerate(product.quantizers):
                if _searchable(quantizer):
                    feeds.setdefault(quantizer, []).append((product, side))
        for key, product in prepared.items():
            searched += [key[side] for side in _search_product(product, feeds, rounds)]
            bar.update()
    return searched
