"""Post-training quantization that runs as real INT8 on OpenVINO and ONNX Runtime.

>>> from leanvit.compress.quant import QuantConfig, quantize, export
>>> qmodel = quantize(model, calib_batches, QuantConfig.from_bits("w8a8"))   # simulation in PyTorch
>>> qmodel.quant_report.float_layers                                         # what stays in float, and why
>>> export(qmodel, "model.xml", engine="openvino")                           # QDQ ONNX -> INT8 IR

The exported model's QuantizeLinear/DequantizeLinear nodes carry exactly the simulation's scales and
zero points, so the engine's INT8 kernels compute what the simulation predicts. Inside ``quantize``:
BatchNorm folding, calibration of weight and input ranges (min-max, percentile or MSE search),
RepQ-ViT reparameterisation of post-LayerNorm ranges where it helps on held-out data, an optional
per-layer choice of symmetric/asymmetric activations, optional PTQ4ViT Hessian-guided range search,
optional bias correction and optional BRECQ/AdaRound block reconstruction (all blocks, or Q-HyViT's
CNN-to-transformer bridges only). ``allocate_bits`` gives per-layer bit-widths under an average-bit
budget from logit-error or Hessian-trace sensitivity (mixed precision, simulation).
``QuantConfig(attn_bits=8)`` also quantizes the inputs of the attention matmuls (q, k, softmax, v, or each
product's two operands): uniform ones export; the log2 / shift-uniform-log2 / twin-uniform softmax quantizers
simulate 3-4 bits.
``QuantConfig.recipe("mse", "w8a8", target="auto")`` picks those INT8 ops for the CPU at hand (``TARGETS``).
"""
from __future__ import annotations

from .attention import SOFTMAX_QUANTIZERS, QuantAttention, swap_attention
from .calibrate import (
    TARGETS, QuantConfig, QuantReport, calibration_batches, correct_bias, parse_bits, quantize, quantizers,
    quantizers_disabled, resolve_target,
)
from .export import (
    check_config_deployable, check_deployable, check_engine_precisions, export, export_quantized, onnx_int8_summary,
    onnxruntime_precisions, openvino_precisions, source_modules,
)
from .hessian import hessian_search
from .mixed import allocate_bits, assign_bits, average_weight_bits, check_budget, layer_sensitivity
from .modules import QuantConv2d, QuantLinear, fold_batchnorm
from .quantizer import (
    FakeQuantizer, Log2Quantizer, QScheme, Quantizer, RangeObserver, ShiftUniformLog2Quantizer, TwinUniformQuantizer,
    choose_range, fake_quantize, qparams,
)
from .reconstruct import find_bridges, find_units, reconstruct
from .reparam import layernorm_consumers, reparameterise

__all__ = [
    "FakeQuantizer", "Log2Quantizer", "QScheme", "QuantAttention", "QuantConfig", "QuantConv2d", "QuantLinear",
    "QuantReport", "Quantizer", "RangeObserver", "SOFTMAX_QUANTIZERS", "ShiftUniformLog2Quantizer", "TARGETS",
    "TwinUniformQuantizer",
    "allocate_bits", "assign_bits", "average_weight_bits", "calibration_batches", "check_config_deployable",
    "check_budget", "check_deployable", "check_engine_precisions", "choose_range",
    "correct_bias", "export", "export_quantized", "fake_quantize", "find_bridges", "find_units", "fold_batchnorm",
    "hessian_search", "layer_sensitivity", "layernorm_consumers", "onnx_int8_summary", "onnxruntime_precisions",
    "openvino_precisions", "source_modules",
    "parse_bits", "qparams", "quantize", "quantizers", "quantizers_disabled", "reconstruct", "reparameterise",
    "resolve_target",
    "swap_attention",
]
