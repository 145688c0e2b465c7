"""Mixed precision: per-layer bit-widths under an average-bit budget, from measured sensitivity.

Two measures of how much a layer suffers at the low bit-width:

* ``"logit"`` (the default): the mean squared error of the model's logits when that layer alone is
  quantized at the low bit-width, everything else float, on calibration images. It measures what
  the allocation trades, weights *and* inputs moved down together (``low="w4a4"``), with no model
  of the loss, at one forward pass per layer.
* ``"hessian"``: HAWQ's second-order estimate (Dong et al., NeurIPS 2020, HAWQ-V2; Yao et al.,
  ICML 2021, HAWQ-V3), ``Tr(H) / n * ||Q(W) - W||^2``, with ``H`` the Hessian of the task loss
  w.r.t. the layer's ``n`` weights, its trace estimated by Hutchinson's method (the mean of
  ``v^T H v`` over random ±1 vectors ``v``, one Hessian-vector product per draw, for all layers at
  once). The task loss is the cross entropy against the float model's own prediction, so no labels
  are needed. It sees the weights' quantization only, which is why it is not the default (with W4A4
  layers it ranked worse than the logit error on every shipped checkpoint, below chance on the DeiT:
  ``benchmarks/results/ptq-mixed``); it costs a fixed number of double-backward passes however many
  layers there are.

Layers then go to the low bit-width cheapest first (least sensitivity per weight moved down) until
the average weight bit-width, weighted by each layer's number of weights, meets the budget.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...errors import LeanvitError, check_range
from .calibrate import QuantConfig, calibration_batches, parse_bits, quantize, quantizers_disabled
from .hessian import pseudo_label_loss

SENSITIVITY_METHODS = ("logit", "hessian")
SENSITIVITY_IMAGES, HUTCHINSON_SAMPLES = 64, 16  #: calibration images each layer is scored on; Hessian draws


def hessian_traces(model: nn.Module, images: torch.Tensor, weights: dict[str, torch.Tensor], *,
                   samples: int = HUTCHINSON_SAMPLES, seed: int = 0) -> dict[str, float]:
    """``{name: Tr(H) / n}`` of the pseudo-label cross entropy (mean over ``images``) w.r.t. each of
    ``weights`` (parameters of ``model``), by Hutchinson's estimator with ``samples`` draws.

    Attention runs on PyTorch's reference kernel here: the fused ones have no second derivative.
    """
    check_range("Hutchinson samples", samples, 1, 100_000)
    generator = torch.Generator().manual_seed(seed)
    names, params = list(weights), list(weights.values())
    traces = dict.fromkeys(names, 0.0)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        loss = pseudo_label_loss(model(images), "method='hessian'") / len(images)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(samples):
            vs = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p) for p in params]
            products = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            for name, v, hv in zip(names, vs, products):
                traces[name] += float((v * hv).sum()) / samples
    return {name: traces[name] / weights[name].numel() for name in names}


def layer_sensitivity(model: nn.Module, calib_data, config: QuantConfig, *, method: str = "logit",
                      max_images: int = SENSITIVITY_IMAGES, samples: int = HUTCHINSON_SAMPLES) -> dict[str, float]:
    """``{layer: sensitivity}`` of every layer quantized under ``config`` (see the module docstring):
    the mean squared logit error with only that layer quantized (``"logit"``), or HAWQ's
    ``Tr(H) / n * ||Q(W) - W||^2`` (``"hessian"``, ``samples`` Hutchinson draws)."""
    return _sensitivity(_scoring_copy(model, calib_data, config, method), calib_data, config, method, max_images,
                        samples)


def _scoring_copy(model: nn.Module, calib_data, config: QuantConfig, method: str) -> nn.Module:
    """``model`` quantized under ``config`` for scoring its layers one by one."""
    if method not in SENSITIVITY_METHODS:
        raise LeanvitError(f"Unknown sensitivity method '{method}'; use one of {', '.join(SENSITIVITY_METHODS)}.")
    # reconstruction writes quantized values into the weights and bias correction / snapping change the biases,
    # so the float function every layer is scored against would be lost
    return quantize(model, calib_data, replace(config, reconstruct=None, reconstruct_act_scales=False,
                                               bias_correction=False, quantize_conv_outputs=False), progress=False)


def _sensitivity(qmodel: nn.Module, calib_data, config: QuantConfig, method: str, max_images: int,
                 samples: int) -> dict[str, float]:
    images = torch.cat(calibration_batches(calib_data, config.min_images, config.batch_size))[:max_images]
    images = images.to(next(qmodel.parameters(), images).device)
    layers = {name: qmodel.get_submodule(name) for name in qmodel.quant_report.quantized
              if hasattr(qmodel.get_submodule(name), "weight_quantizer")}
    if method == "hessian":
        for layer in layers.values():
            layer.weight.requires_grad_(True)  # qmodel is this function's own copy
        with quantizers_disabled(qmodel):
            traces = hessian_traces(qmodel, images, {n: m.weight for n, m in layers.items()}, samples=samples)
        with torch.no_grad():
            return {n: traces[n] * float((m.weight_quantizer(m.weight) - m.weight).pow(2).sum())
                    for n, m in layers.items()}
    with torch.no_grad(), quantizers_disabled(qmodel):
        reference = qmodel(images)
        sensitivity = {}
        for name, layer in layers.items():
            layer.input_quantizer.enabled = layer.weight_quantizer.enabled = True
            sensitivity[name] = float((qmodel(images) - reference).pow(2).mean())
            layer.input_quantizer.enabled = layer.weight_quantizer.enabled = False
    return sensitivity


def allocate_bits(model: nn.Module, calib_data, budget: float, *, low: str = "w4a4", high: str = "w8a8",
                  config: QuantConfig = QuantConfig(), method: str = "logit") -> tuple[tuple[str, str], ...]:
    """``layer_bits`` for :class:`QuantConfig` giving an average weight bit-width of at most ``budget``,
    ranked by :func:`layer_sensitivity` with ``method``. Layers that ``config.layer_bits`` already sets keep
    those widths, and ``config.edge_bits`` layers theirs (listed in the result, whose ``("*", high)`` would
    otherwise take them); both count towards the average: put the result after ``config.layer_bits``
    (``(*config.layer_bits, *bits)``).

    >>> bits = allocate_bits(model, calib, 6.0)          # W4A4 where it hurts least, W8A8 elsewhere
    >>> qmodel = quantize(model, calib, QuantConfig(layer_bits=bits))
    """
    check_budget(budget, low, high)
    scoring = replace(config, layer_bits=(("*", low),))
    qmodel = _scoring_copy(model, calib_data, scoring, method)
    sensitivity = _sensitivity(qmodel, calib_data, scoring, method, SENSITIVITY_IMAGES, HUTCHINSON_SAMPLES)
    sizes = {name: model.get_submodule(name).weight.numel() for name in sensitivity}
    pinned = {name: bits[0] for name in sensitivity if (bits := config.layer_bits_for(name)) is not None}
    edges = [name for name in qmodel.quant_report.edge_layers if name in sensitivity and name not in pinned]
    pinned.update({name: parse_bits(config.edge_bits)[0] for name in edges})
    bits = assign_bits({n: s for n, s in sensitivity.items() if n not in pinned}, sizes, budget, low=low,
                       high=high, pinned=pinned)
    return (*bits[:-1], *((name, config.edge_bits) for name in edges), bits[-1])


def assign_bits(scores: dict[str, float], sizes: dict[str, int], budget: float, *, low: str = "w4a4",
                high: str = "w8a8", pinned: dict[str, int] | None = None) -> tuple[tuple[str, str], ...]:
    """``layer_bits`` moving layers to ``low`` cheapest first (smallest ``scores[layer] / sizes[layer]``,
    ``sizes`` the weight counts) until the average weight bit-width is at most ``budget``; ``high`` elsewhere.
    ``pinned``: weight bits of layers whose width is set already (they have a size, no score); they count
    towards the average, and a budget they put out of reach is an error.

    The greedy half of :func:`allocate_bits`, for a sensitivity measured some other way (or none: random
    scores give the control an allocation must beat).
    """
    (low_w, _), (high_w, _) = check_budget(budget, low, high)
    pinned = pinned or {}
    if not scores and not pinned:
        raise LeanvitError("assign_bits got no layers: scores (and pinned) name the layers to give bit-widths to.")
    total = sum(sizes[n] for n in (*scores, *pinned))
    # the weight bits in all, a whole number: subtracting fractions of the average drifted below an exactly reachable
    # budget (12 equal layers at 6 bits: 7 moved, not 6)
    bits = sum(sizes[n] * b for n, b in pinned.items()) + high_w * sum(sizes[n] for n in scores)
    chosen = []
    for name in sorted(scores, key=lambda n: scores[n] / sizes[n]):
        if bits <= budget * total:
            break
        chosen.append(name)
        bits -= sizes[name] * (high_w - low_w)
    average = bits / total
    if bits > budget * total:
        raise LeanvitError(f"An average of {budget} weight bits cannot be reached: the {len(pinned)} layers whose "
                           f"bits are set already (layer_bits, --layer-bits) keep the average at {average:.2f} with "
                           f"every other layer at {low}. Raise the budget or set fewer layers.")
    return (*((name, low) for name in chosen), ("*", high))


def check_budget(budget: float, low: str, high: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """The parsed ``low`` and ``high`` bit-widths; an error unless ``budget`` lies between their weight bits."""
    (low_w, low_a), (high_w, high_a) = parse_bits(low), parse_bits(high)
    if low_w >= high_w:
        raise LeanvitError(f"Mixed precision moves layers from {high} down to {low}, which has as many weight bits "
                           f"or more: pass a low bit-width below {high} (e.g. low='w4a4'; leanvit quantize: --bits).")
    if not low_w <= budget <= high_w:
        raise LeanvitError(f"An average of {budget} weight bits cannot be reached with {low} and {high}: "
                           f"choose a budget between {low_w} and {high_w}.")
    return (low_w, low_a), (high_w, high_a)


def average_weight_bits(qmodel: nn.Module) -> float:
    """Weight bit-width averaged over all quantized weights of ``qmodel``."""
    pairs = [(m.weight.numel(), m.weight_quantizer.scheme.bits) for m in qmodel.modules()
             if hasattr(m, "weight_quantizer")]
    return sum(n * b for n, b in pairs) / sum(n for n, _ in pairs)
