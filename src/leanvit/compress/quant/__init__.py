"""Post-training quantization that runs as real INT8 on OpenVINO and ONNX Runtime.

>>> from leanvit.compress.quant import QuantConfig, quantize, export
>>> qmodel = quantize(model, calib_batches, QuantConfig.from_bits("w8a8"))   # simulation in PyTorch
>>> qmodel.quant_report.float_layers                                         # what stays in float, and why
>>> export(qmodel, "model.xml", engine="openvino")                           # QDQ ONNX -> INT8 IR

The exported model's QuantizeLinear/DequantizeLinear nodes carry exactly the simulation's scales and
zero points, so the engine's INT8 kernels compute what the simulation predicts. Inside ``quantize``:
BatchNorm folding, calibration of weight and input ranges (min-max, percentile or MSE search),
RepQ-ViT reparameterisation of post-LayerNorm ranges where it helps on held-out data, an optional
per-layer choice of symmetric/asymmetric activations, and optional bias correction. ``allocate_bits``
gives per-layer bit-widths under an average-bit budget (mixed precision, simulation).
"""
from __future__ import annotations

from .calibrate import (
    QuantConfig, QuantReport, calibration_batches, correct_bias, parse_bits, quantize, quantizers,
    quantizers_disabled,
)
from .export import check_deployable, export, export_quantized, onnx_int8_summary, openvino_precisions
from .mixed import allocate_bits, average_weight_bits, layer_sensitivity
from .modules import QuantConv2d, QuantLinear, fold_batchnorm
from .quantizer import FakeQuantizer, QScheme, RangeObserver, choose_range, fake_quantize, qparams
from .reparam import layernorm_consumers, reparameterise

__all__ = [
    "FakeQuantizer", "QScheme", "QuantConfig", "QuantConv2d", "QuantLinear", "QuantReport", "RangeObserver",
    "allocate_bits", "average_weight_bits", "calibration_batches", "check_deployable", "choose_range",
    "correct_bias", "export", "export_quantized", "fake_quantize", "fold_batchnorm", "layer_sensitivity",
    "layernorm_consumers", "onnx_int8_summary", "openvino_precisions", "parse_bits", "qparams", "quantize",
    "quantizers", "quantizers_disabled", "reparameterise",
]
