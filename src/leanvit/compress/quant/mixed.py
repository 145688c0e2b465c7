"""Mixed precision: per-layer bit-widths under an average-bit budget, from measured sensitivity.

A layer's sensitivity is the error it causes in the model's logits when it alone is quantized at
the low bit-width (everything else float), measured on calibration images: a direct, model-agnostic
stand-in for the Hessian-trace and relevance scores of the mixed-precision literature. Layers then
go to the low bit-width cheapest first (least logit error per weight moved down) until the average
weight bit-width, weighted by each layer's number of weights, meets the budget.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from ...errors import LeanvitError
from .calibrate import QuantConfig, parse_bits, calibration_batches, quantize, quantizers_disabled


@torch.no_grad()
def layer_sensitivity(model: nn.Module, calib_data, config: QuantConfig, *, max_images: int = 64
                      ) -> dict[str, float]:
    """``{layer: mean squared logit error with only that layer quantized under config}``."""
    qmodel = quantize(model, calib_data, config, progress=False)
    batches = calibration_batches(calib_data, config.min_images, config.batch_size)
    images = torch.cat(batches)[:max_images]
    reference = model.eval()(images)
    sensitivity = {}
    with quantizers_disabled(qmodel):
        for name in qmodel.quant_report.quantized:
            layer = qmodel.get_submodule(name)
            layer.input_quantizer.enabled = layer.weight_quantizer.enabled = True
            sensitivity[name] = float((qmodel(images) - reference).pow(2).mean())
            layer.input_quantizer.enabled = layer.weight_quantizer.enabled = False
    return sensitivity


def allocate_bits(model: nn.Module, calib_data, budget: float, *, low: str = "w4a4", high: str = "w8a8",
                  config: QuantConfig = QuantConfig()) -> tuple[tuple[str, str], ...]:
    """``layer_bits`` for :class:`QuantConfig` giving an average weight bit-width of at most ``budget``.

    >>> bits = allocate_bits(model, calib, 6.0)          # W4A4 where it hurts least, W8A8 elsewhere
    >>> qmodel = quantize(model, calib, QuantConfig(layer_bits=bits))
    """
    (low_w, _), (high_w, _) = parse_bits(low), parse_bits(high)
    if not low_w <= budget <= high_w:
        raise LeanvitError(f"An average of {budget} weight bits cannot be reached with {low} and {high}: "
                           f"choose a budget between {low_w} and {high_w}.")
    low_config = replace(config, layer_bits=(("*", low),))
    sensitivity = layer_sensitivity(model, calib_data, low_config)
    sizes = {name: model.get_submodule(name).weight.numel() for name in sensitivity}
    total = sum(sizes.values())
    average, chosen = float(high_w), []
    for name in sorted(sensitivity, key=lambda n: sensitivity[n] / sizes[n]):
        if average <= budget:
            break
        chosen.append(name)
        average -= sizes[name] * (high_w - low_w) / total
    return (*((name, low) for name in chosen), ("*", high))


def average_weight_bits(qmodel: nn.Module) -> float:
    """Weight bit-width averaged over all quantized weights of ``qmodel``."""
    pairs = [(m.weight.numel(), m.weight_quantizer.scheme.bits) for m in qmodel.modules()
             if hasattr(m, "weight_quantizer")]
    return sum(n * b for n, b in pairs) / sum(n for n, _ in pairs)
