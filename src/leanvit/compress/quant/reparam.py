"""RepQ-ViT's scale reparameterisation: per-channel post-LayerNorm quantization that deploys per tensor.

The inputs of ``qkv`` and ``fc1`` come straight from a LayerNorm, and their channels have very different
ranges (a few channels carry large outliers), so one scale per tensor wastes most of the grid on them.
Per-channel scales fix that but no INT8 kernel takes them. RepQ-ViT (Li et al., ICCV 2023) moves the
per-channel part into the float weights around the quantizer: with per-channel ``(s_c, z_c)`` and
their mean ``(s, z)``, ``r_c = s_c / s``,

    LayerNorm:  gamma' = gamma / r,   beta' = beta / r + s (z_c - z)
    Linear:     W' = W * r (per input column),   b' = b - W' s (z_c - z)

and the per-tensor quantization of the new LayerNorm output gives exactly the integers the
per-channel one gave, while the float function of the model is unchanged. The Linear's weights are
quantized after the change.

Whether per-channel ranges help is decided per LayerNorm, on data they were not fitted to
(:func:`per_channel_gain`): on a model whose channels all look alike the per-channel ranges only fit
noise, and the per-tensor range is kept.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from .modules import direct_consumers
from .quantizer import FakeQuantizer, QScheme, RangeObserver, input_channel_weights, qparams


@torch.no_grad()
def layernorm_consumers(model: nn.Module, example: torch.Tensor) -> dict[str, list[str]]:
    """``{LayerNorm: [Linear layers whose input is its output tensor]}``, found by running ``example``.

    Only affine LayerNorms over the last dimension qualify; the caller checks that each change keeps
    the model's function, which catches a LayerNorm output that also feeds something else.
    """
    found, _ = direct_consumers(
        model, example,
        is_producer=lambda m: (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1
                               and m.elementwise_affine and m.bias is not None),
        is_consumer=lambda m: isinstance(m, nn.Linear),
    )
    return found


@torch.no_grad()
def reparameterise(norm: nn.LayerNorm, layers: list[nn.Linear], lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Fold the per-channel input ranges ``lo``/``hi`` of ``layers`` into ``norm`` and their weights.

    Sets the layers' input quantizers to the equivalent per-tensor scale and zero point; their
    weight quantizers must be calibrated afterwards.
    """
    quantizer: FakeQuantizer = layers[0].input_quantizer
    scheme = replace(quantizer.scheme, per_channel=True)
    scales, zeros = qparams(lo, hi, scheme)
    scale = scales.mean()
    zero = torch.round(zeros.float().mean()).clamp(scheme.qmin, scheme.qmax)
    ratio = scales / scale
    shift = scale * (zeros.float() - zero)
    norm.weight.div_(ratio)
    norm.bias.div_(ratio).add_(shift)
    for layer in layers:
        layer.weight.mul_(ratio)
        correction = layer.weight @ shift
        if layer.bias is None:
            layer.bias = nn.Parameter(-correction)
        else:
            layer.bias.sub_(correction)
        layer.input_quantizer.scale.fill_(scale)
        layer.input_quantizer.zero_point.fill_(int(zero))


@torch.no_grad()
def per_channel_gain(observer: RangeObserver, layers: list[nn.Linear], scheme: QScheme, method: str,
                     percentile: float) -> float:
    """Held-out output error of a per-tensor input range over that of per-channel ranges.

    Above 1, per-channel ranges generalise better to data they were not fitted to and the
    LayerNorm is worth reparameterising.
    """
    weights = sum(input_channel_weights(layer) for layer in layers)
    per_tensor = observer.held_out_error(replace(scheme, per_channel=False), method, weights, percentile=percentile)
    per_channel = observer.held_out_error(replace(scheme, per_channel=True), method, weights, percentile=percentile)
    return per_tensor / max(per_channel, 1e-30)
