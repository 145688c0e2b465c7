"""``quantize(model, calib_data, QuantConfig())``: post-training quantization in simulation.

The model is deep-copied, its BatchNorms are folded into the preceding convolutions, every
``nn.Linear`` / ``nn.Conv2d`` becomes a quantized wrapper, weight ranges are set from the weights and
activation ranges from the calibration batches. What is quantized follows what the engines run fast
in INT8: the inputs and weights of convolutions and matrix products. LayerNorm, softmax, GELU and
residual adds stay in float (quantizing them costs accuracy and buys no speed on OpenVINO / ONNX
Runtime); the :class:`QuantReport` lists every layer left in float, and a warning names the compute
layers among them, so nothing falls back to float silently. The attention matmuls (``q @ kᵀ``,
``softmax @ v``) stay in float unless ``QuantConfig.attn_bits`` is set: then every attention :mod:`.attention`
can compute unfused without changing it (its own counterparts, any single fused attention, any fixed set of
plain matrix products) gets quantized matmul inputs, unless that costs it more than ``attn_max_error``. Every
module left computing matrix products in float is found by recording the torch calls of one forward
(:func:`.modules.float_matmuls`) and reported.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import re
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten
from torch.utils.data import Dataset, IterableDataset

from ...errors import LeanvitError, check_range, warn
from .attention import SOFTMAX_QUANTIZERS, QuantMatmuls, own_calls, quantized_counterpart, swap_attention
from .concat import concat_counterpart, nhwc_concats
from .modules import (
    QuantConv2d, QuantLinear, float_matmuls, fold_batchnorm, image_independent_layers, is_depthwise,
    output_error, quantizable_type, record_matmuls, transposed_reads,
)
from .quantizer import (
    RANGE_METHODS, FakeQuantizer, ObservedShapeError, QScheme, Quantizer, RangeObserver, input_channel_weights,
    weight_range,
)
from .reparam import layernorm_consumers, per_channel_gain, reparameterise

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Defaults are a deployable W8A8 scheme for any engine and CPU: int8 symmetric per-output-channel weights,
    uint8 asymmetric per-tensor activations, both ranges chosen by MSE search. :meth:`recipe` (what ``leanvit
    quantize`` uses) adds the choices that pay off on one engine and CPU: for OpenVINO, the int8 producers,
    transposed conv outputs and concatenations below; on a VNNI CPU, depthwise convs and attention matmuls.
    ``skip`` holds glob patterns of layer names kept in float (e.g. ``("head",)``).
    """

    w_bits: int = 8
    a_bits: int = 8
    w_per_channel: bool = True
    a_symmetric: bool | str = False  #: or "auto": per layer, whichever scheme has the lower held-out error
    #: True: every input per channel (simulation only: most INT8 kernels need one input scale per tensor);
    #: "auto": Q-HyViT's per-layer granularity choice, per channel where that lowers the held-out output error
    #: on depthwise convolutions' inputs (each output channel reads one input channel, so its scale folds into
    #: that channel's requantization). OpenVINO runs such a conv INT8 when a conv writes its input, in f32 when
    #: a transpose does (EfficientMod's NHWC context branch; ``export`` names them), so only the low-bit
    #: ``hybrid`` recipe (simulation) turns it on
    a_per_channel: bool | str = False
    w_method: str = "mse"
    a_method: str = "mse"
    percentile: float = 99.99
    skip: tuple[str, ...] = ()
    #: ``(glob, "w8a8")`` pairs: matching layers take these bit-widths (first match wins), e.g. the patch
    #: embedding and head kept at 8 bits in a W4A4 model, as RepQ-ViT and PTQ4ViT do
    layer_bits: tuple[tuple[str, str], ...] = ()
    #: depthwise convolutions stay in float by default: without VNNI the CPU engines' INT8 depthwise kernels
    #: are no faster than their float ones (see :data:`TARGETS`, ``recipe(target="vnni")`` turns them on) and
    #: a few weights per channel make them the most rounding-sensitive convs. One with a channel multiplier
    #: (several outputs per input channel) stays float either way: no engine has an INT8 kernel for it
    quantize_depthwise: bool = False
    #: also quantize each convolution's output (uint8, per tensor) and snap conv and Linear biases to the int32
    #: grid: ONNX Runtime runs a QDQ convolution as its INT8 QLinearConv only then (else in float), and a
    #: classifier Gemm as QGemm; OpenVINO needs neither (``recipe(engine="onnxruntime")`` turns it on)
    quantize_conv_outputs: bool = False
    reparam_layernorm: bool = True  #: RepQ-ViT: per-channel post-LayerNorm ranges, deployed per tensor
    bias_correction: bool = False  #: remove each layer's mean output error (helps most below 8 bits)
    #: PTQ4ViT: refine the w_method/a_method ranges to minimise the output error weighted by the task
    #: loss's squared output gradients (a separate switch: the initial ranges still come from those methods)
    hessian_search: bool = False
    #: None, "blocks" (BRECQ + AdaRound for every block) or "bridge" (Q-HyViT: only CNN-to-transformer bridges)
    reconstruct: str | None = None
    reconstruct_iters: int = 500  #: optimiser steps per reconstructed block or layer, one calibration batch each
    reconstruct_act_scales: bool = False  #: also learn the blocks' input step sizes (LSQ) while reconstructing
    #: bits of the inputs of the attention matmuls (q, k, softmax output, v, or each product's two operands; per
    #: tensor); None keeps those matmuls in float
    attn_bits: int | None = None
    #: with 8-bit ``attn_bits``: an attention whose quantized matmul inputs alone change its output by more than
    #: this (relative RMS, on calibration images) keeps float matmuls, reported: INT8 is not worth that error
    #: (EfficientViT-B's linear attention with the padded column inside its products: 23-31 %; restated without
    #: it, 4-8 %; timm's Attention, Swin's, CaiT's: 1-3 % at random init). None keeps every attention quantized.
    attn_max_error: float | None = 0.1
    #: "uniform" (uint, what the engines run), or "log2", "sulq", "twin" (more accurate at 3-4 bits, simulation only),
    #: for the attention probabilities (of plain products: the operands that are a softmax output; warned where none is)
    softmax_quantizer: str = "uniform"
    #: with ``attn_bits``: quantize q, k and v where their projections write them, on their own grids: a
    #: timm-style attention's qkv output once (``QuantAttention.share_qkv_quantizer``), EfficientFormerV2's
    #: q and k conv outputs. OpenVINO fuses those quantizers into the INT8 projections (DeiT-tiny ~10 %
    #: faster at 224x224); ONNX Runtime runs DeiT's ~15 % slower (``benchmarks/recipe_ab.py``). ``recipe(engine="openvino")`` turns it on.
    share_qkv_quantizer: bool = False
    #: quantize a layer's input where another quantized layer writes it, when only reshapes and transposes (views)
    #: lie between them: the same integers, but OpenVINO fuses the quantizer into the writing layer, whose output is
    #: then int8, and the transposes move int8 or fold into its layout reorders (PVT-v2-B0's Linear -> transpose ->
    #: depthwise conv: its INT8 model 1.38x faster, ``benchmarks/results/recipe-ab-producers-epyc/``).
    #: ``recipe(engine="openvino")`` turns it on.
    producer_quantizers: bool = False
    #: also quantize a convolution's output (uint8, per tensor) where a float op reads it permuted other than to
    #: NHWC and no normalization reads it (:func:`transposed_reads` says why): PVT-v2's MLP flattens its depthwise
    #: conv's output into tokens for a GELU, a ViT its patch embedding's. OpenVINO fuses the quantizer into the
    #: conv and moves int8 instead of reordering f32 (PVT-v2-B0's INT8 model 1.36x faster paired,
    #: ``benchmarks/results/recipe-ab-transposed-norm-epyc/``); one more rounding step, so only
    #: ``recipe(engine="openvino")`` at 8-bit activations turns it on
    quantize_transposed_conv_outputs: bool = False
    #: quantize the inputs of a concatenation that reads a depthwise conv's output as NHWC (MambaOut's gated
    #: block), all on one grid, and keep that conv float: OpenVINO then folds the permute into its f32 -> int8
    #: conversion and concatenates int8, where otherwise it runs the permute through its generic kernel and the
    #: rest of the block in a transposed layout (:mod:`.concat` says more; MambaOut-femto's INT8 model 1.24x faster
    #: paired, ``benchmarks/results/recipe-ab-nhwc-concat-epyc/``). ``recipe(engine="openvino")`` at 8-bit
    #: activations turns it on
    int8_nhwc_concats: bool = False
    #: bit-widths of the first and the last quantized layer (stem or patch embedding, classifier: every head that
    #: timm's ``pretrained_cfg["classifier"]`` names, as a distilled model's two), e.g.
    #: "w8a8" in a W4A4 model as RepQ-ViT and PTQ4ViT do; None: like every other layer. ``layer_bits`` wins.
    edge_bits: str | None = None
    min_images: int = 16  #: fewer calibration images than this is an error
    batch_size: int = 32  #: batch size when ``calib_data`` is one tensor

    def __post_init__(self):
        # types first: a wrong one would otherwise fail later as a TypeError inside quantize(), or be misread
        for f in fields(self):  # a truthy string such as 'no' would pass for True, '8' for 8 bits
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise LeanvitError(f"{f.name} must be True or False, got {value!r}.")
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise LeanvitError(f"{f.name} must be a whole number, got {value!r}.")
        if isinstance(self.skip, str):  # one pattern, not its characters
            object.__setattr__(self, "skip", (self.skip,))
        if not (isinstance(self.skip, (tuple, list)) and all(isinstance(p, str) for p in self.skip)):
            raise LeanvitError(f"skip must be a tuple of layer-name patterns such as ('head',) (or () for none), got "
                               f"{self.skip!r} ({type(self.skip).__name__}).")
        object.__setattr__(self, "skip", tuple(self.skip))  # a list would make the frozen config unhashable
        if not isinstance(self.layer_bits, (tuple, list)):
            raise LeanvitError(f"layer_bits must be a tuple of (pattern, bits) pairs such as (('head', 'w8a8'),), got "
                               f"{self.layer_bits!r} ({type(self.layer_bits).__name__}).")
        for entry in self.layer_bits:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
                raise LeanvitError(f"layer_bits takes (pattern, bits) pairs such as ('head', 'w8a8'), got {entry!r}.")
            parse_bits(entry[1], f"layer_bits' bits for {entry[0]!r}")
        object.__setattr__(self, "layer_bits", tuple(tuple(entry) for entry in self.layer_bits))
        if self.edge_bits is not None:
            parse_bits(self.edge_bits, "edge_bits")
        parse_bits(f"w{self.w_bits}a{self.a_bits}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)):
            raise LeanvitError(f"percentile must be a number between 50 and 100 (e.g. 99.99), got {self.percentile!r} "
                               f"({type(self.percentile).__name__}).")
        check_range("percentile", self.percentile, 50.0, 100.0)  # as choose_range will, but before calibration
        for what, method in (("w_method", self.w_method), ("a_method", self.a_method)):
            if method not in RANGE_METHODS:
                raise LeanvitError(f"{what} '{method}' is not a range method; use one of {', '.join(RANGE_METHODS)}.")
        for what, value in (("a_symmetric", self.a_symmetric), ("a_per_channel", self.a_per_channel)):
            if value not in (True, False, "auto"):
                raise LeanvitError(f"{what} must be True, False or 'auto', got {value!r}.")
        check_range("min_images", self.min_images, 1, 1_000_000)
        check_range("batch_size", self.batch_size, 1, 1_000_000)
        if self.attn_bits is not None:
            if isinstance(self.attn_bits, bool) or not isinstance(self.attn_bits, int):
                raise LeanvitError(f"attn_bits must be a whole number of bits or None, got {self.attn_bits!r}.")
            check_range("attn_bits", self.attn_bits, 2, 8)
        if self.reconstruct not in (None, "blocks", "bridge"):
            raise LeanvitError(f"reconstruct must be None, 'blocks' or 'bridge', got {self.reconstruct!r}.")
        check_range("reconstruct_iters", self.reconstruct_iters, 1, 1_000_000)
        if self.reconstruct_act_scales and not self.reconstruct:
            raise LeanvitError("reconstruct_act_scales=True learns the input step sizes during block reconstruction, "
                               "but reconstruct=None turns reconstruction off: set reconstruct='blocks' or 'bridge'.")
        if self.hessian_search and self.a_per_channel is True:
            raise LeanvitError("hessian_search searches per-tensor input ranges; a_per_channel=True (simulation "
                               "only) has none. Turn one of them off.")
        if self.softmax_quantizer not in SOFTMAX_QUANTIZERS:
            raise LeanvitError(f"softmax_quantizer '{self.softmax_quantizer}' is not a softmax quantizer; use one of "
                               f"{', '.join(SOFTMAX_QUANTIZERS)} ('uniform' is the one that exports).")
        if self.attn_max_error is not None and not (isinstance(self.attn_max_error, (int, float))
                                                    and math.isfinite(self.attn_max_error)):
            raise LeanvitError(f"attn_max_error must be a finite relative error (e.g. 0.1) or None (every attention "
                               f"quantized), got {self.attn_max_error!r}.")
        if self.softmax_quantizer != "uniform" and self.attn_bits is None:
            raise LeanvitError(f"softmax_quantizer={self.softmax_quantizer!r} quantizes the attention probabilities, "
                               "but attn_bits=None keeps the attention matmuls in float: set attn_bits (--attn-bits).")

    @classmethod
    def from_bits(cls, bits: str, **kwargs) -> QuantConfig:
        """``"w8a8"``, ``"w6a6"``, ``"w4a8"`` ... (weight and activation bit-widths)."""
        w_bits, a_bits = parse_bits(bits)
        return cls(w_bits=w_bits, a_bits=a_bits, **kwargs)

    @classmethod
    def recipe(cls, name: str, bits: str = "w8a8", target: str = "generic", engine: str = "openvino",
               **overrides) -> QuantConfig:
        """A named recipe at ``bits`` (fields in ``overrides`` win); below W7A8, first and last layers at 8 bits;
        below 8-bit activations, the attention matmuls' inputs at the activation bits (``attn_bits``).

        - ``"minmax"``: the textbook baseline, min-max ranges, no reparameterisation;
        - ``"mse"``: the deployable default (MSE-searched ranges, RepQ-ViT LayerNorm reparameterisation);
        - ``"hybrid"``: the hybrid-aware method: ``"mse"`` plus a per-layer choice of symmetry and (below 8-bit
          activations, for depthwise convs) granularity,
          PTQ4ViT's Hessian-guided search, bias correction, BRECQ/AdaRound block reconstruction (a
          hybrid's bridge blocks included) and, below 8 bits, twin-uniform softmax quantization.

        ``target`` is the CPU a deployable (8-bit activation) model is for, one of :data:`TARGETS`: it decides
        which ops are worth running in INT8 there; ``engine`` the engine it is for ("openvino" or
        "onnxruntime", which needs quantized conv outputs to run convolutions in INT8).
        """
        w_bits, a_bits = parse_bits(bits)
        if target not in TARGETS:
            raise LeanvitError(f"Unknown target '{target}'; use one of {', '.join(TARGETS)}.")
        from .export import ENGINES

        if engine not in ENGINES:
            raise LeanvitError(f"Unknown engine '{engine}'; quantization recipes are for {' or '.join(ENGINES)}.")
        overrides = {"share_qkv_quantizer": engine == "openvino", "producer_quantizers": engine == "openvino",
                     **overrides}
        if engine == "onnxruntime" and a_bits == 8:
            overrides = {"quantize_conv_outputs": True, **overrides}
        if engine == "openvino" and a_bits == 8:
            overrides = {"quantize_transposed_conv_outputs": True, "int8_nhwc_concats": True, **overrides}
        if resolve_target(target) == "vnni" and a_bits == 8 and w_bits >= 7:
            overrides = {"quantize_depthwise": True, "attn_bits": 8, **overrides}
        if a_bits < 8:  # low-bit (simulation) recipes quantize the attention matmuls' inputs too, as the papers do
            overrides = {"attn_bits": a_bits, **overrides}
        # 8-bit ends help low-bit models; a W7A8 model (exact INT8 on CPUs without VNNI) keeps 7-bit weights throughout
        edges = "w8a8" if w_bits < 7 or a_bits < 8 else None
        recipes = {
            "minmax": dict(w_method="minmax", a_method="minmax", reparam_layernorm=False),
            "mse": {},
            "hybrid": dict(a_symmetric="auto", a_per_channel="auto" if a_bits < 8 else False,
                           hessian_search=True, bias_correction=True, reconstruct="blocks",
                           softmax_quantizer="uniform" if a_bits == 8 else "twin"),
        }
        if name not in recipes:
            raise LeanvitError(f"Unknown quantization recipe '{name}'; use one of {', '.join(recipes)}.")
        return cls.from_bits(bits, **{"edge_bits": edges, **recipes[name], **overrides})

    def layer_bits_for(self, layer: str) -> tuple[int, int] | None:
        """The (weight, activation) bits ``layer_bits`` gives the layer named ``layer`` (first match), or None."""
        return next((parse_bits(bits) for pattern, bits in self.layer_bits if matches(layer, pattern)), None)

    def skip_pattern(self, name: str) -> str | None:
        """The first ``skip`` pattern naming module ``name`` (or a module holding it), or None."""
        return next((p for p in self.skip if matches(name, p)), None)

    def schemes(self, layer: str) -> tuple[QScheme, QScheme]:
        """The weight and input schemes of the layer named ``layer``."""
        w_bits, a_bits = self.layer_bits_for(layer) or (self.w_bits, self.a_bits)
        return (QScheme(w_bits, symmetric=True, per_channel=self.w_per_channel),
                QScheme(a_bits, symmetric=self.a_symmetric is True, per_channel=self.a_per_channel is True))


#: The CPUs an INT8 model can be built for. "generic": depthwise convs and attention matmuls stay float, since
#: without VNNI the engines' INT8 kernels for them are no faster (efficientformerv2_s0's depthwise convs: 4.7 ms
#: INT8 against 3.8 ms f32 on OpenVINO, AVX2). "vnni": they run INT8 too, faster on VNNI/AMX CPUs (OpenVINO at
#: 224x224, 2 threads, Xeon with AVX512-VNNI: DeiT-tiny 1.55x -> 2.10x and MobileViG-Ti 1.61x -> 1.77x the f32
#: speed; benchmarks/results/ptq-smoke-vnni*). "auto": "vnni" on a CPU with VNNI or AMX, else "generic".
TARGETS = ("generic", "vnni", "auto")


def resolve_target(target: str) -> str:
    """``target`` with "auto" replaced by this machine's kind of CPU."""
    if target != "auto":
        return target
    from .export import int8_saturates

    return "generic" if int8_saturates() else "vnni"


def parse_bits(bits: str, what: str = "bits") -> tuple[int, int]:
    """``"w4a8"`` -> ``(4, 8)``: weight and activation bit-widths; ``what`` names the argument in errors."""
    if not isinstance(bits, str):
        raise LeanvitError(f"{what} must be a bit-width string such as 'w8a8', got {bits!r} ({type(bits).__name__}).")
    match = re.fullmatch(r"w(\d+)a(\d+)", bits.strip().lower())
    if not match:
        raise LeanvitError(f"Bit-widths '{bits}' not understood: write them as w8a8, w6a6, w4a8 or w4a4.")
    w_bits, a_bits = int(match[1]), int(match[2])
    if not (2 <= w_bits <= 8 and 2 <= a_bits <= 8):
        raise LeanvitError(f"Bit-widths '{bits}': weights and activations take 2 to 8 bits.")
    return w_bits, a_bits


ROOT = "(the model's own forward)"  #: how reports name the root module, whose name is ""


@dataclass
class QuantReport:
    """Which layers run quantized, which stay in float and why."""

    quantized: dict[str, str] = field(default_factory=dict)  #: layer -> "weights ...; inputs ..."
    weight_bits: dict[str, int] = field(default_factory=dict)  #: Linear / conv layer -> its weights' bits
    per_channel_inputs: list[str] = field(default_factory=list)  #: layers whose inputs are quantized per channel
    float_layers: dict[str, str] = field(default_factory=dict)  #: layer -> reason it stays in float
    folded_batchnorms: list[str] = field(default_factory=list)
    edge_layers: list[str] = field(default_factory=list)  #: first layer and classifier(s), at ``edge_bits``
    reparameterised: list[str] = field(default_factory=list)  #: LayerNorms whose consumers got RepQ-ViT scales
    reconstructed: dict[str, str] = field(default_factory=dict)  #: block or layer -> outcome of its reconstruction
    int8_concats: dict[str, str] = field(default_factory=dict)  #: module -> what its concatenations quantize
    #: compute layer -> "layer type, runtime precision" of those the engine runs in float (set by ``export``)
    engine_float_layers: dict[str, str] = field(default_factory=dict)
    calib_images: int = 0
    input_size: tuple[int, ...] = ()  #: (C, H, W) of the calibration images: the export's default input

    @property
    def float_compute_layers(self) -> dict[str, str]:
        """The float layers that do matrix products: each one is INT8 speed and scale left on the table."""
        return {k: v for k, v in self.float_layers.items()
                if "float by design" not in v and not v.startswith("constant input")}

    def summary(self) -> str:
        per_channel = len(self.per_channel_inputs)
        lines = [f"{len(self.quantized)} layers quantized, {len(self.folded_batchnorms)} BatchNorms folded, "
                 f"{len(self.reparameterised)} LayerNorms reparameterised, "
                 + (f"{per_channel} layers with per-channel inputs, " if per_channel else "")
                 + f"{self.calib_images} calibration images"]
        weight_bits = Counter(self.weight_bits.values())
        if len(weight_bits) > 1:  # mixed precision: how the layers split
            lines.append("  weights: " + ", ".join(f"{n} layers at {b} bits" for b, n in sorted(weight_bits.items())))
        lines += [f"  float {name or ROOT}: {reason}" for name, reason in self.float_layers.items()]
        lines += [f"  reconstructed {name}: {outcome}" for name, outcome in self.reconstructed.items()]
        by_what: dict[str, list[str]] = {}
        for name, what in self.int8_concats.items():
            by_what.setdefault(what, []).append(name)
        lines += [f"  int8 concatenation in {', '.join(names)}: {what}" for what, names in by_what.items()]
        return "\n".join(lines)


def calibration_batches(calib_data, min_images: int, batch_size: int = 32) -> list[torch.Tensor]:
    """The calibration images as a list of ``(B, C, H, W)`` float batches, all of one image size.

    Accepts one tensor, an iterable of tensors or of ``(images, labels)`` pairs (a DataLoader), a
    dataset of ``(image, label)`` samples (batched here), or :func:`leanvit.data.calibration_images`' result
    (its ``batches``: calibration needs no labels); ``None`` batches (all images corrupt, from
    leanvit's loaders) are skipped. The images must be the model's float input (normalised): integer
    pixels are an error.
    """
    from ...data import CalibrationImages, make_loader

    if isinstance(calib_data, CalibrationImages):  # a NamedTuple: iterating it would give its fields
        calib_data = calib_data.batches
    if isinstance(calib_data, torch.Tensor):
        calib_data = calib_data.split(batch_size)
    elif isinstance(calib_data, Dataset) and not isinstance(calib_data, IterableDataset):
        calib_data = make_loader(calib_data, batch_size)
    batches, resize = [], "calibrate at the one input size the model is deployed at (resize or crop them all to it)"
    try:
        for batch in calib_data:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            if batch is None:
                continue
            if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
                raise LeanvitError(f"Calibration batches must be (B, C, H, W) image tensors or (images, labels) "
                                   f"pairs; got {type(batch).__name__} {tuple(getattr(batch, 'shape', ()))}.")
            if not batch.is_floating_point():
                raise LeanvitError(f"The calibration images are {batch.dtype} pixels, not the model's float input: "
                                   "transform them as for inference (leanvit.data.build_transform(data_config), or "
                                   "scale to [0, 1] and normalise with the model's mean and std).")
            if not torch.isfinite(batch).all():
                raise LeanvitError(f"Calibration batch {len(batches)} holds NaN or infinite values: activation ranges "
                                   "need finite images (check the pre-processing, e.g. a std of 0).")
            batches.append(batch.float())
    except RuntimeError as e:  # a dataset's images of several sizes, which its loader cannot stack into a batch
        if "equal size" not in str(e):
            raise
        raise LeanvitError(f"The calibration images have several sizes: {resize}, e.g. with "
                           "leanvit.data.build_transform(data_config) as the dataset's transform.") from None
    sizes = list(dict.fromkeys("x".join(map(str, b.shape[1:])) for b in batches))
    if len(sizes) > 1:
        raise LeanvitError(f"The calibration images have {len(sizes)} sizes ({', '.join(sizes[:4])}): {resize}.")
    n = sum(b.shape[0] for b in batches)
    if n == 0:
        raise LeanvitError("The calibration set is empty. Pass a few hundred representative images "
                           "(e.g. leanvit.data.calibration_subset(dataset, 256)).")
    if n < min_images:
        raise LeanvitError(f"The calibration set has {n} images; at least {min_images} are needed for stable "
                           f"activation ranges (256 is a good choice). Pass more images, or lower "
                           f"QuantConfig(min_images=...) if you accept noisy ranges.")
    return batches


def _float_reason(name: str, module: nn.Module, config: QuantConfig, inside_mha: set[str],
                  multiplies: set[str]) -> str | None:
    """Why ``module`` stays in float, or None if it is quantized, holds no computation of its own, or is one of the
    modules that ``multiplies`` matrices itself (recorded: the attention step quantizes or reports those)."""
    if name in inside_mha:
        return "inside nn.MultiheadAttention, which uses its weights directly: no INT8 wrapper"
    if isinstance(module, NORM_TYPES):
        return f"normalisation ({type(module).__name__}): float by design, no INT8 kernel and accuracy-sensitive"
    if quantizable_type(module) is not None:
        pattern = config.skip_pattern(name)
        return f"kept float by QuantConfig.skip ('{pattern}')"
    params, leaf = dict(module.named_parameters(recurse=False)), not any(True for _ in module.children())
    weights = any(n.endswith("weight") and p.ndim >= 2 for n, p in params.items())
    if weights and not isinstance(module, nn.Embedding):
        own_forward = isinstance(module, (nn.Linear, nn.Conv2d))
        return f"no quantized wrapper for {type(module).__name__}" + (" (its own forward)" if own_forward else "")
    if name in multiplies:
        return None
    # a leaf's weight matrix or kernel under another name (an LSTM's weight_ih_l0): two dimensions or more of size
    # > 1, where a per-channel scale (LayerScale2d's (C, 1, 1) gamma) has one
    if leaf and any(sum(d > 1 for d in p.shape) >= 2 for p in params.values()):
        return f"no quantized wrapper for {type(module).__name__}"
    if params and leaf:
        return f"elementwise ({type(module).__name__}): float by design"
    return None  # holds no computation of its own (or only embeddings added to the tokens)


def depthwise_float_reason(module: nn.Module, config: QuantConfig) -> str | None:
    """Why ``module``, a depthwise conv, stays float under ``config``; None if it is quantized or not depthwise.

    One with a channel multiplier (several outputs per input channel: FastViT's downsampling convs) stays float
    whatever ``quantize_depthwise`` says: neither engine has an INT8 depthwise kernel for it, and their generic
    INT8 convolutions run it slower than float (one conv, AMD EPYC with VNNI, batch 1, 2
    threads: OpenVINO 1.3-1.4x, ONNX Runtime 9x; ``benchmarks/ptq_families.py --latency``, FastViT-T8).
    """
    if not is_depthwise(module):
        return None
    if module.out_channels > module.in_channels:
        return (f"depthwise convolution with a channel multiplier ({module.out_channels // module.in_channels} "
                "outputs per input channel): float by design, no engine has an INT8 kernel for it (their generic "
                "INT8 convolution runs it slower than float)")
    if not config.quantize_depthwise:
        return ("depthwise convolution: float by design, the CPU engines' INT8 depthwise kernels are no faster "
                "(QuantConfig.quantize_depthwise=True to quantize)")
    return None


def matches(layer: str, pattern: str) -> bool:
    """Whether the glob ``pattern`` names the layer ``layer`` or a module containing it (``stages.3``)."""
    parts = layer.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def edge_layers(model: nn.Module, candidates: list[str]) -> list[str]:
    """The first of the quantizable layers ``candidates`` and the classifier(s): those timm's ``pretrained_cfg``
    names (both heads of a distilled model, which registration order alone would split), else the last one."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else classifier
    heads = [n for n in candidates if any(matches(n, c) for c in classifier)]
    return list(dict.fromkeys([candidates[0], *(heads or candidates[-1:])]))


def _swap_layers(model: nn.Module, config: QuantConfig, report: QuantReport, constant: set[str],
                 kept_float: dict[str, str], multiplies: set[str]) -> dict[str, nn.Module]:
    inside_mha = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for c, _ in m.named_modules() if c}
    for name in constant:
        report.float_layers[name] = ("constant input (the same for every image, e.g. a positional encoding or a "
                                     "class token): float, quantizing it would only add error")
    report.float_layers.update(kept_float)
    constant = constant | set(kept_float)
    layers = {n: m for n, m in model.named_modules() if quantizable_type(m) is not None}
    if config.edge_bits:
        candidates = [n for n, m in layers.items() if n not in inside_mha and n not in constant
                      and depthwise_float_reason(m, config) is None and config.skip_pattern(n) is None]
        if candidates:
            report.edge_layers = edge_layers(model, candidates)
            edges = tuple((n, config.edge_bits) for n in report.edge_layers)
            config = replace(config, layer_bits=(*config.layer_bits, *edges))
    unmatched = [p for p in (*config.skip, *(p for p, _ in config.layer_bits))
                 if not any(matches(n, p) for n in layers)]
    if unmatched:
        warn(f"No layer matches the pattern(s) {', '.join(map(repr, unmatched))} (names are "
             f"case-sensitive, e.g. {', '.join(list(layers)[:3])}); they change nothing.")
    swapped = {}
    for name, module in list(model.named_modules()):
        quant_type = quantizable_type(module)
        skipped = config.skip_pattern(name) is not None
        if name in constant:
            continue
        if quant_type is not None and (depthwise := depthwise_float_reason(module, config)) is not None:
            report.float_layers[name] = depthwise
        elif quant_type is not None and name not in inside_mha and not skipped:
            swapped[name] = quant_type.from_float(module, *config.schemes(name))
            model.set_submodule(name, swapped[name])
        elif (reason := _float_reason(name, module, config, inside_mha, multiplies)) is not None:
            report.float_layers[name] = reason
    return swapped


@dataclass
class _Swapped:
    """The quantized modules :func:`quantize` swapped into its copy, by name, and what it recorded of the float
    model before the swap for the steps after it."""

    layers: dict[str, nn.Module]  #: QuantLinear / QuantConv2d
    attentions: dict[str, QuantMatmuls]  #: attentions with quantized matmul inputs (QuantConfig.attn_bits)
    concats: dict[str, nn.Module]  #: int8 NHWC concatenations (QuantConfig.int8_nhwc_concats)
    skipped: dict[str, str]  #: modules kept float by QuantConfig.skip -> the pattern naming them
    matmul_calls: dict  #: what each module multiplies itself (modules.record_matmuls)
    consumers: dict  #: LayerNorm -> the Linears it feeds, for RepQ-ViT (reparam.layernorm_consumers)


@torch.no_grad()
def quantize(model: nn.Module, calib_data, config: QuantConfig = QuantConfig(), *,
             progress: bool = True) -> nn.Module:
    """A quantized copy of ``model``, calibrated on ``calib_data``; ``model`` is left unchanged.

    The copy's ``quant_report`` attribute is a :class:`QuantReport`. Layers whose forward never ran
    on the calibration data (their weights are used by some other code path) cannot be calibrated;
    they are put back in float and listed, with a warning.
    """
    _check_float_model(model, config)
    device = next(model.parameters(), torch.empty(0)).device
    batches = [b.to(device) for b in calibration_batches(calib_data, config.min_images, config.batch_size)]
    qmodel = copy.deepcopy(model).eval()
    example = batches[0][:2]
    report = QuantReport(calib_images=sum(b.shape[0] for b in batches), input_size=tuple(batches[0].shape[1:]))
    _check_runs(qmodel, example, report)  # the float model on the user's images, before any step that runs it
    swapped = _swap_in_quantized(qmodel, config, report, batches)
    qmodel.to(device)  # the quantizers are created on the CPU; here and after each step that adds some
    observers = _observe(qmodel, swapped, batches, report, progress)
    _settle_matmuls(qmodel, swapped, config, report, batches)
    ranged = _set_ranges(qmodel, swapped, observers, config, report, example)
    qmodel.to(device)
    if config.hessian_search:
        from .hessian import hessian_search

        hessian_search(qmodel, batches, fixed_inputs=ranged, progress=progress)
    if config.bias_correction:
        correct_bias(qmodel, swapped.layers, batches)
    if config.reconstruct:  # last: it fits whole blocks to the float outputs, which later per-layer changes would undo
        from .reconstruct import reconstruct

        report.reconstructed = reconstruct(qmodel, model, batches, mode=config.reconstruct,
                                           iters=config.reconstruct_iters, act_scales=config.reconstruct_act_scales,
                                           progress=progress)
    _fit_to_engine(qmodel, swapped, config, batches, device)
    if report.float_compute_layers:
        listed = "\n".join(f"  {n or ROOT}: {r}" for n, r in report.float_compute_layers.items())
        warn(f"{len(report.float_compute_layers)} compute layers stay in float:\n{listed}")
    qmodel.quant_report = report
    refresh_report(qmodel)  # each listed module's line, from its final quantizers
    qmodel.register_load_state_dict_post_hook(refresh_report)
    return qmodel.eval()  # (the quantized modules swapped in were created in training mode)


def _check_float_model(model: nn.Module, config: QuantConfig) -> None:
    """Refuse what :func:`quantize` cannot calibrate, with the fix: a config that is not a QuantConfig, a model
    quantized already, a half-precision model."""
    if not isinstance(config, QuantConfig):  # one way to say it: a bits string or dict would skip its checks
        raise LeanvitError(f"quantize() takes a QuantConfig, got {config!r} ({type(config).__name__}): pass "
                           "QuantConfig.from_bits('w8a8'), QuantConfig.recipe('mse', 'w8a8') or QuantConfig(...).")
    if hasattr(model, "quant_report") or any(isinstance(m, Quantizer) for m in model.modules()):
        raise LeanvitError(f"This {type(model).__name__} is quantized already (it holds quantizers): pass the float "
                           "model to quantize().")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                     if p.is_floating_point() and p.dtype != torch.float32})
    if dtypes:  # calibration runs float32 batches, which a half model's layers refuse as mismatched inputs
        raise LeanvitError(f"{type(model).__name__} is in {' and '.join(dtypes)}; quantization calibrates in float32: "
                           "pass model.float() to quantize() (the quantized model simulates INT8 in float32).")


def _check_runs(qmodel: nn.Module, example: torch.Tensor, report: QuantReport) -> None:
    """Run the float model once on calibration images: a model that cannot take them fails here, named, rather
    than deep in a later step."""
    try:
        qmodel(example)
    except (AssertionError, RuntimeError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LeanvitError(f"{type(qmodel).__name__} does not run on the calibration images "
                           f"({'x'.join(map(str, report.input_size))}: {reason}). Calibrate on images of the size "
                           "and channels it takes, pre-processed as for inference.") from None


def _swap_in_quantized(qmodel: nn.Module, config: QuantConfig, report: QuantReport,
                       batches: list[torch.Tensor]) -> _Swapped:
    """Fold the BatchNorms, record what the float model computes (LayerNorm consumers, matmuls, image-independent
    layers, NHWC concatenations), then swap in the quantized layers, concatenations and attentions."""
    example = batches[0][:2]
    report.folded_batchnorms = fold_batchnorm(qmodel, example)
    consumers = layernorm_consumers(qmodel, example) if config.reparam_layernorm else {}
    matmul_calls = record_matmuls(qmodel, example)  # before any swap: what each module multiplies itself
    first = batches[0][:1]  # and an image that differs from it (the first two may be copies)
    other = next((b[i:i + 1] for b in batches for i in range(len(b)) if not torch.equal(b[i:i + 1], first)), None)
    if other is None:
        raise LeanvitError("Every calibration image is the same image: calibration needs distinct images.")
    constant = image_independent_layers(qmodel, first, other)
    # not an attention's (one routing), nor the model's own forward: a counterpart cannot replace the root in place
    concats = {n: convs for n, convs in nhwc_concats(qmodel, example).items()
               if n and n not in matmul_calls} if config.int8_nhwc_concats and config.a_bits == 8 else {}
    kept_float = {conv: f"depthwise convolution whose output {module} concatenates as NHWC: float by design, so "
                  "OpenVINO folds that permute into its int8 conversion (QuantConfig.int8_nhwc_concats)"
                  for module, convs in concats.items() for conv in convs}
    layers = _swap_layers(qmodel, config, report, constant, kept_float, set(matmul_calls))
    for name in concats:
        concats[name] = concat_counterpart(type(module := qmodel.get_submodule(name))).from_float(module, config.a_bits)
        qmodel.set_submodule(name, concats[name])
    if not layers:
        raise LeanvitError(f"{type(qmodel).__name__} has no nn.Linear or nn.Conv2d layer left to quantize "
                           f"(QuantConfig.skip={config.skip}).")
    skipped = {n: p for n, _ in qmodel.named_modules() if (p := config.skip_pattern(n)) is not None}
    attentions = {}
    if config.attn_bits is not None:
        attentions = swap_attention(qmodel, config.attn_bits, config.softmax_quantizer, matmul_calls, set(skipped))
        for name in attentions:  # its matrix products quantized: not a float layer, whatever its own weights said
            report.float_layers.pop(name, None)
    return _Swapped(layers, attentions, concats, skipped, matmul_calls, consumers)


def _observe(qmodel: nn.Module, swapped: _Swapped, batches: list[torch.Tensor], report: QuantReport,
             progress: bool) -> dict[str, RangeObserver]:
    """Observe every quantized module's inputs on the calibration batches; returns each layer's input observer.
    A layer never called (its weights are used outside its forward) is put back in float and listed.

    Ranges come from the float model's activations (PTQ4ViT's "parallel" calibration): the weight quantizers are
    off and the input quantizers only observe, so every layer sees float inputs."""
    from tqdm.auto import tqdm

    layers = swapped.layers
    for layer in layers.values():
        layer.input_quantizer.observer = RangeObserver(axis=layer.input_quantizer.axis)
    for attention in swapped.attentions.values():
        attention.observe()
    for concat in swapped.concats.values():
        concat.observe()
    try:
        with quantizers_disabled(qmodel):
            for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress, file=sys.stderr):
                qmodel(batch)
    except ObservedShapeError as e:
        raise ObservedShapeError(f"{_observed_by(e.observer, swapped)}: {e}", e.observer) from None
    finally:
        observers = {name: layer.input_quantizer.observer for name, layer in layers.items()}
        for layer in layers.values():
            layer.input_quantizer.observer = None
    for name in [n for n, o in observers.items() if o.batches == 0]:
        qmodel.set_submodule(name, layers.pop(name).to_float())
        report.float_layers[name] = "never called during calibration (its weights are used outside its forward)"
    return observers


def _observed_by(observer: RangeObserver, swapped: _Swapped) -> str:
    """Which quantizer of ``swapped`` holds ``observer``: the error that names it says where to look."""
    owners = {id(layer.input_quantizer.observer): f"the input of {name}" for name, layer in swapped.layers.items()}
    owners |= {id(getattr(attention, q).observer): f"{name}'s {q}" for name, attention in swapped.attentions.items()
               for q in attention.QUANTIZERS}
    return owners.get(id(observer), "a quantizer")


def _settle_matmuls(qmodel: nn.Module, swapped: _Swapped, config: QuantConfig, report: QuantReport,
                    batches: list[torch.Tensor]) -> None:
    """Range the observed concatenations and attentions, or put back in float those never called or (beyond
    ``attn_max_error``) too hurt by quantization; list every module still computing matrix products in float."""
    layers, attentions = swapped.layers, swapped.attentions
    for name, concat in swapped.concats.items():
        if concat.calibrated():
            concat.calibrate(config.a_method, config.percentile)
            report.int8_concats[name] = concat.describe()
        else:  # its forward never ran: its convs stay float all the same, named
            qmodel.set_submodule(name, concat.to_float())
    for name, attention in list(attentions.items()):
        if attention.calibrated():
            attention.calibrate(config.a_method, config.percentile)
            report.quantized[name] = attention.describe()
        else:  # e.g. token reduction computes attention from the module's layers, not its forward
            _attention_to_float(qmodel, name, attentions, layers, report,
                                "attention matmuls in float: forward never called during calibration")
    if config.attn_max_error is not None and config.attn_bits == 8 and attentions:
        for name, error in attention_errors(qmodel, attentions, batches[0][:4]).items():
            if error > config.attn_max_error:
                _attention_to_float(qmodel, name, attentions, layers, report, (
                    f"attention matmuls in float: quantizing their inputs changes its output by {error:.0%} "
                    f"(relative RMS on calibration images; QuantConfig.attn_max_error={config.attn_max_error})"))
    if config.softmax_quantizer != "uniform" and (uniform := [n for n, a in attentions.items()
                                                           if not a.quantizes_softmax()]):
        warn(f"softmax_quantizer={config.softmax_quantizer!r} applies to no matmul operand of "
             f"{len(uniform)} attentions (none is a softmax output; they keep uniform quantizers): "
             f"{', '.join(uniform)}")
    matmul_calls, skipped = swapped.matmul_calls, swapped.skipped
    for name, calls in float_matmuls(qmodel, matmul_calls, (QuantLinear, QuantConv2d, QuantMatmuls)).items():
        module = qmodel.get_submodule(name)
        if name in skipped:
            report.float_layers.setdefault(name, f"attention matmuls ({type(module).__name__}): kept float by "
                                                 f"QuantConfig.skip ('{skipped[name]}')")
        report.float_layers.setdefault(name, (  # nn.MultiheadAttention and bypassed attention are listed already
            f"attention matmuls ({type(module).__name__}): float by design unless QuantConfig.attn_bits is set "
            "(INT8 attention pays off on VNNI/AMX CPUs; the 'vnni' recipes set it)"
            if quantized_counterpart(module, own_calls(matmul_calls, name)) is not None else
            f"attention matmuls in float: {calls.products} matrix products in {type(module).__name__}, which has "
            "no quantized counterpart"))


def _set_ranges(qmodel: nn.Module, swapped: _Swapped, observers: dict[str, RangeObserver], config: QuantConfig,
                report: QuantReport, example: torch.Tensor) -> set[str]:
    """Reparameterise the LayerNorms where it pays (RepQ-ViT), then set every layer's weight range and input
    scheme and range; returns the layers whose input range the reparameterisation set."""
    ranged = set()
    if swapped.consumers and config.a_per_channel is not True:
        ranged = _reparameterise_layernorms(qmodel, swapped.consumers, swapped.layers, observers, config, example,
                                            report)
    for name, layer in swapped.layers.items():
        layer.weight_quantizer.set_range(*weight_range(layer.weight, layer.weight_quantizer.scheme, config.w_method,
                                                       percentile=config.percentile))
        if name not in ranged:
            scheme = _best_scheme(observers[name], layer, config)
            if scheme.per_channel != layer.input_quantizer.scheme.per_channel:
                layer.input_quantizer = FakeQuantizer(scheme, axis=1, channels=layer.in_channels)
            quantizer = layer.input_quantizer
            quantizer.scheme = scheme
            quantizer.set_range(*observers[name].range(quantizer.scheme, config.a_method,
                                                       percentile=config.percentile))
        report.quantized[name] = layer.describe()
        report.weight_bits[name] = layer.weight_quantizer.scheme.bits
        if layer.input_quantizer.scheme.per_channel:
            report.per_channel_inputs.append(name)
    return ranged


def _fit_to_engine(qmodel: nn.Module, swapped: _Swapped, config: QuantConfig, batches: list[torch.Tensor],
                   device: torch.device) -> None:
    """The engine-aware last steps, after every step that changes weights, biases or the attentions' quantizers:
    one quantizer for q, k and v; int32-grid biases and quantized conv outputs (ONNX Runtime's QLinearConv);
    int8 outputs at the producers, and on conv outputs a float op reads transposed (OpenVINO)."""
    layers = swapped.layers
    if config.share_qkv_quantizer:
        for attention in swapped.attentions.values():
            attention.share_qkv_quantizer()
    qmodel.to(device)
    if config.quantize_conv_outputs:  # after every step that changes weights or biases
        _snap_biases(layers)
        _quantize_outputs(qmodel, {n: m for n, m in layers.items() if isinstance(m, QuantConv2d)}, batches, config,
                          ", int32 bias")
    if config.producer_quantizers:  # it copies the consumers' final quantizers
        _quantize_at_producers(qmodel, layers, batches[0][:1])
    if config.quantize_transposed_conv_outputs:  # last: only outputs no other step quantized
        convs = {n: m for n, m in layers.items() if isinstance(m, QuantConv2d) and m.output_quantizer is None}
        _quantize_outputs(qmodel, {n: convs[n] for n in transposed_reads(qmodel, convs, batches[0][:1])}, batches,
                          config, " (a float op reads them transposed)")


def refresh_report(qmodel: nn.Module, incompatible_keys=None) -> None:
    """Make ``qmodel.quant_report`` describe the grids its quantizers have now: a state dict loaded into it brings
    its own (``qrange``: other bits, another symmetry), which the report, written when :func:`quantize` ran, would
    otherwise still contradict. Run after every ``load_state_dict`` of ``qmodel`` (a post-hook)."""
    report = getattr(qmodel, "quant_report", None)
    if report is None:
        return
    for sections in (report.quantized, report.int8_concats):
        for name in sections:  # every module the report lists describes itself from its quantizers
            sections[name] = qmodel.get_submodule(name).describe()
    for name in report.weight_bits:
        report.weight_bits[name] = qmodel.get_submodule(name).weight_quantizer.scheme.bits


@torch.no_grad()
def attention_errors(qmodel: nn.Module, attentions: dict[str, QuantMatmuls], images: torch.Tensor) -> dict[str, float]:
    """Each attention's output error from its own matmul quantizers alone: relative RMS against its float output,
    both computed on the inputs it receives in the float model on ``images``."""
    inputs = {}

    def keep(name):
        return lambda _, args, kwargs: inputs.setdefault(name, (args, kwargs))

    hooks = [a.register_forward_pre_hook(keep(n), with_kwargs=True) for n, a in attentions.items()]
    errors = {}
    with quantizers_disabled(qmodel):
        try:
            qmodel(images)
        finally:
            for h in hooks:
                h.remove()
        for name, (args, kwargs) in inputs.items():
            attention = attentions[name]
            reference = attention(*args, **kwargs)
            own = [getattr(attention, q) for q in attention.QUANTIZERS]
            for quantizer in own:
                quantizer.enabled = True
            output = attention(*args, **kwargs)
            for quantizer in own:
                quantizer.enabled = False
            if isinstance(output, torch.Tensor):  # (an attention returning more than a tensor is not measured)
                rms = reference.pow(2).mean().sqrt().clamp(min=1e-12)
                errors[name] = float((output - reference).pow(2).mean().sqrt() / rms)
    return errors


def _attention_to_float(qmodel: nn.Module, name: str, attentions: dict[str, QuantMatmuls],
                        layers: dict[str, nn.Module], report: QuantReport, reason: str) -> None:
    """Put attention ``name`` back in float, with the layers whose weights its forward uses itself (no longer
    routed to their quantizers: they would run float while reported quantized)."""
    attention = attentions.pop(name)
    for child in getattr(attention, "borrowed_linears", ()):
        layer = f"{name}.{child}"
        if layer not in layers:  # (already float: never called)
            continue
        attention.set_submodule(child, layers.pop(layer).to_float())
        report.float_layers[layer] = "never called (its weights are used by the float attention's own F.linear)"
    qmodel.set_submodule(name, attention.to_float())
    report.quantized.pop(name, None)
    report.float_layers[name] = reason


def _snap_biases(layers: dict[str, nn.Module]) -> None:
    """Snap conv and Linear biases to the int32 grid of input scale x weight scale: the int32 bias of ONNX
    Runtime's QLinearConv and QGemm (DequantizeLinear on input, weight and bias), simulated exactly."""
    for layer in layers.values():
        if layer.bias is not None and not layer.input_quantizer.scheme.per_channel:  # (per channel: no int32 grid)
            step = layer.input_quantizer.scale * layer.weight_quantizer.scale
            layer.bias.copy_(torch.round(layer.bias / step) * step)


def _quantize_outputs(qmodel: nn.Module, convs: dict[str, QuantConv2d], batches: list[torch.Tensor],
                      config: QuantConfig, why: str) -> None:
    """Give each of ``convs`` an output quantizer (asymmetric, per tensor, at the input bits), ranged on the
    quantized model's own outputs over the calibration batches; ``why`` is the report's note on it."""
    if not convs:
        return
    for layer in convs.values():
        quantizer = FakeQuantizer(QScheme(layer.input_quantizer.scheme.bits, symmetric=False), axis=1,
                                  channels=layer.out_channels)
        quantizer.observer = RangeObserver(axis=1)
        layer.output_quantizer = quantizer.to(batches[0].device)
    for batch in batches:
        qmodel(batch)
    for name, layer in convs.items():
        quantizer = layer.output_quantizer
        observer, quantizer.observer = quantizer.observer, None
        quantizer.set_range(*observer.range(quantizer.scheme, config.a_method, percentile=config.percentile))
        layer.output_note = why


def _quantize_at_producers(qmodel: nn.Module, layers: dict[str, nn.Module], image: torch.Tensor) -> None:
    """Give a quantized layer whose output reaches exactly one other quantized layer's per-tensor input through
    views only (a reshape, a transpose: the same storage) that input quantizer as its output quantizer.

    Why: OpenVINO fuses a quantizer that directly follows a conv or fully-connected layer into it, which then
    writes int8; a transpose in between keeps it apart, and the transpose then moves f32 through a generic kernel
    (PVT-v2's MLP transposes its Linear's output to feed a depthwise conv). Quantized at the producer, the same
    integers cross the transpose as int8, which OpenVINO folds into its layout reorder. The consumer's quantizer
    stays (a no-op re-quantization on the same grid). Views are found by storage in one forward; a producer whose
    output is also read elsewhere would change the model's output, so each is kept only if the output is unchanged.
    """
    outputs: dict[str, list[torch.Tensor]] = {}
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda _, __, out, n=name: outputs.setdefault(n, []).append(out))
             for name, layer in layers.items()]
    hooks += [layer.register_forward_pre_hook(lambda _, args, n=name: inputs.setdefault(n, []).append(args[0]))
              for name, layer in layers.items()]
    try:
        reference = qmodel(image)
    finally:
        for hook in hooks:
            hook.remove()
    written_by = {out.untyped_storage().data_ptr(): name for name, outs in outputs.items() if len(outs) == 1
                  for out in outs}
    readers: dict[str, list[str]] = {}
    for name, (x, *more) in inputs.items():
        producer = None if more else written_by.get(x.untyped_storage().data_ptr())
        out = outputs[producer][0] if producer not in (None, name) else None
        if out is not None and (x.shape, x.stride()) != (out.shape, out.stride()):  # a view, not the tensor itself
            readers.setdefault(producer, []).append(name)
    for producer, (consumer, *others) in readers.items():
        layer, quantizer = layers[producer], layers[consumer].input_quantizer
        if others or quantizer.scheme.per_channel or layer.output_quantizer is not None:
            continue
        layer.output_quantizer = copy.deepcopy(quantizer)
        if _equal_outputs(qmodel(image), reference):
            layer.output_note = f" on {consumer}'s input grid (it reads them reshaped)"
        else:  # the output is read elsewhere too
            layer.output_quantizer = None


def _equal_outputs(a, b) -> bool:
    """Whether two model outputs (a tensor, or a tuple / dict of them) are bit-identical."""
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    return spec_a == spec_b and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                    for x, y in zip(leaves_a, leaves_b))


def _best_scheme(observer: RangeObserver, layer: nn.Module, config: QuantConfig) -> QScheme:
    """This layer's input scheme: the configured one, or where ``config`` says "auto", the candidate with
    the lowest held-out output error (Q-HyViT's per-layer choice of symmetry and granularity).

    Symmetry: hybrid models mix inputs centred on zero (after a LayerNorm) with one-sided ones (after
    ReLU or GELU). Granularity: a depthwise conv's input channels after a BatchNorm can differ in range
    by orders of magnitude, and only there (see ``QuantConfig.a_per_channel``) a per-channel input deploys.
    """
    scheme = layer.input_quantizer.scheme
    symmetric = (False, True) if config.a_symmetric == "auto" else (scheme.symmetric,)
    per_channel = (False, True) if config.a_per_channel == "auto" and is_depthwise(layer) else (scheme.per_channel,)
    candidates = [replace(scheme, symmetric=s, per_channel=c) for s in symmetric for c in per_channel]
    if len(candidates) == 1:
        return scheme
    weights = input_channel_weights(layer)
    return min(candidates, key=lambda scheme: observer.held_out_error(scheme, config.a_method, weights,
                                                                      percentile=config.percentile))


@contextmanager
def quantizers_disabled(model: nn.Module):
    """Every fake quantizer of ``model`` is the identity inside the block: the model's float function."""
    found = list(quantizers(model).values())
    states = [q.enabled for q in found]
    for q in found:
        q.enabled = False
    try:
        yield
    finally:
        for q, state in zip(found, states):
            q.enabled = state


def _reparameterise_layernorms(qmodel, consumers, layers, observers, config, example, report) -> set[str]:
    """RepQ-ViT for each LayerNorm feeding quantized Linears; returns the layers whose input range is set.

    A LayerNorm is reparameterised only where per-channel ranges beat the per-tensor one on held-out
    calibration rows (:func:`per_channel_gain`). Each change is checked to leave the float function
    unchanged and undone if it does not (the LayerNorm's output also feeds something not rescaled).
    """
    done = set()
    with quantizers_disabled(qmodel):
        reference = qmodel(example)
    for norm_name, names in consumers.items():
        if not all(n in layers for n in names):
            continue
        norm, targets = qmodel.get_submodule(norm_name), [layers[n] for n in names]
        scheme = targets[0].input_quantizer.scheme
        if any(t.input_quantizer.scheme != scheme for t in targets):  # one LayerNorm output, one quantizer
            continue
        observer = observers[names[0]]
        if per_channel_gain(observer, targets, scheme, config.a_method, config.percentile) <= 1.0:
            continue
        lo, hi = observer.range(replace(scheme, per_channel=True), config.a_method, percentile=config.percentile)
        saved = [t.detach().clone() for t in (norm.weight, norm.bias)]
        saved_layers = [(t.weight.detach().clone(), None if t.bias is None else t.bias.detach().clone())
                        for t in targets]
        reparameterise(norm, targets, lo, hi)
        with quantizers_disabled(qmodel):
            err = output_error(qmodel(example), reference)
        if err <= 1e-3:
            done.update(names)
            report.reparameterised.append(norm_name)
            continue
        norm.weight.copy_(saved[0])
        norm.bias.copy_(saved[1])
        for target, (weight, bias) in zip(targets, saved_layers):
            target.weight.copy_(weight)
            target.bias = None if bias is None else nn.Parameter(bias)
    return done


@torch.no_grad()
def correct_bias(qmodel: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor]) -> None:
    """Empirical bias correction: remove each layer's mean output error over the calibration data.

    The error of a layer is its quantized output minus its float output on the same input (the
    input it receives in the quantized model); quantization shifts the mean of that error away from
    zero per output channel, which the bias absorbs (Nagel et al., 2019; NNCF's fast bias correction).
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(layer, args, out):
            layer.input_quantizer.enabled = layer.weight_quantizer.enabled = False
            err = out - layer.forward(args[0])  # forward(), not __call__: this hook must not run again
            layer.input_quantizer.enabled = layer.weight_quantizer.enabled = True
            channels = err.ndim - 1 if isinstance(layer, nn.Linear) else 1
            sums[name] = sums.get(name, 0) + err.sum([d for d in range(err.ndim) if d != channels])
            counts[name] = counts.get(name, 0) + err.numel() // err.shape[channels]
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        for batch in batches:
            qmodel(batch)
    finally:
        for h in handles:
            h.remove()
    for name, layer in layers.items():
        if name not in counts:
            continue
        shift = sums[name] / counts[name]
        if layer.bias is None:
            layer.bias = nn.Parameter(-shift)
        else:
            layer.bias.sub_(shift)


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every fake quantizer in ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}
