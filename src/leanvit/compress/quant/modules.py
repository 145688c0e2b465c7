"""Quantized stand-ins for ``nn.Linear`` / ``nn.Conv2d``, and BatchNorm folding.

The wrappers subclass the float layers and keep their parameters, so ``state_dict`` keys, ``.weight``
look-ups in timm code and ``isinstance`` checks all still work; they add an ``input_quantizer``
(per-tensor on the activation) and a ``weight_quantizer`` (per output channel). Quantizing the
*inputs* of the compute layers, and nothing else, is what the INT8 kernels of OpenVINO and ONNX
Runtime consume: each layer reads int8/uint8 activations and int8 weights and writes float, which
the next layer re-quantizes. A convolution may also quantize its output (``output_quantizer``,
``QuantConfig.quantize_conv_outputs``): ONNX Runtime only runs a QDQ convolution as its INT8 QLinearConv
when the output is quantized too. Either layer quantizes its output when the next layer reads it through a
reshape or transpose (``QuantConfig.producer_quantizers``), and a convolution when a float op reads it permuted
(``QuantConfig.quantize_transposed_conv_outputs``, :func:`transposed_reads`), so that OpenVINO moves it as int8.
Also here: the recorders of what a forward computes (:func:`record_matmuls`, :func:`transposed_reads`) and what the
quantized counterparts of attention (:mod:`.attention`) and of concatenations (:mod:`.concat`) share, a float
module's :func:`shell` of another class and the :class:`Routed` torch calls of its forward.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ...errors import warn
from .quantizer import FakeQuantizer, QScheme, Quantizer


class _Described:
    """The quant report's line of a quantized Linear or conv, read from its quantizers when asked, so that it stays
    true after a state dict with other grids (bits, symmetry) is loaded."""

    #: what the report says after an output quantizer's scheme: why the output is quantized, or on which grid
    output_note: str = ""

    def describe(self) -> str:
        text = f"weights {self.weight_quantizer.scheme}; inputs {self.input_quantizer.scheme}"
        if self.output_quantizer is not None:
            text += f"; outputs {self.output_quantizer.scheme}{self.output_note}"
        return text


class QuantLinear(_Described, nn.Linear):
    @classmethod
    def from_float(cls, layer: nn.Linear, weight: QScheme, act: QScheme) -> QuantLinear:
        q = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        q.weight, q.bias = layer.weight, layer.bias
        q.input_quantizer = FakeQuantizer(act, axis=-1, channels=layer.in_features)
        q.weight_quantizer = FakeQuantizer(weight, axis=0, channels=layer.out_features)
        q.output_quantizer = None  # a FakeQuantizer when the next layer reads its output reshaped
        return q

    def to_float(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        return y if self.output_quantizer is None else self.output_quantizer(y)


class QuantConv2d(_Described, nn.Conv2d):
    @classmethod
    def from_float(cls, layer: nn.Conv2d, weight: QScheme, act: QScheme) -> QuantConv2d:
        q = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                padding_mode=layer.padding_mode, device="meta")
        q.weight, q.bias = layer.weight, layer.bias
        q.input_quantizer = FakeQuantizer(act, axis=1, channels=layer.in_channels)
        q.weight_quantizer = FakeQuantizer(weight, axis=0, channels=layer.out_channels)
        q.output_quantizer = None  # a FakeQuantizer when the engine needs quantized conv outputs, or see QuantLinear
        return q

    def to_float(self) -> nn.Conv2d:
        layer = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                          padding=self.padding, dilation=self.dilation, groups=self.groups,
                          bias=self.bias is not None, padding_mode=self.padding_mode, device="meta")
        layer.weight, layer.bias = self.weight, self.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        return y if self.output_quantizer is None else self.output_quantizer(y)


QUANT_TYPES = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def quantizable_type(layer: nn.Module) -> type[nn.Module] | None:
    """The wrapper for ``layer``, if it computes exactly what ``nn.Linear`` / ``nn.Conv2d`` compute.

    A subclass with its own ``forward`` (timm's ``Conv2dSame`` pads first) would lose that behaviour in
    the wrapper, so it is left alone; timm's ``Linear`` only differs under TorchScript and qualifies.
    """
    from timm.layers import Linear as TimmLinear

    for float_type, quant_type in QUANT_TYPES.items():
        if (isinstance(layer, float_type) and not isinstance(layer, tuple(QUANT_TYPES.values()))
                and (type(layer).forward is float_type.forward or type(layer) is TimmLinear)):
            return quant_type
    return None


@torch.no_grad()
def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def image_independent_layers(model: nn.Module, first: torch.Tensor, second: torch.Tensor) -> set[str]:
    """The quantizable layers whose inputs are identical for the images ``first`` and ``second``.

    Such a layer computes a constant (XCiT's Fourier positional encoding projects a fixed grid, its first
    class-attention block's query reads the learned class token): quantizing it only adds error, and OpenVINO's
    result for a quantized constant input differs from the simulation's. Found by running both images with hooks.
    """
    inputs: dict[str, list[list[torch.Tensor]]] = {}
    run = [0]

    def hook(name):
        def record(_, args):
            if args and isinstance(args[0], torch.Tensor):
                inputs.setdefault(name, [[], []])[run[0]].append(args[0].detach().clone())
        return record

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if quantizable_type(m) is not None]
    try:
        for run[0], image in enumerate((first, second)):
            model(image)
    finally:
        for h in hooks:
            h.remove()
    return {name for name, (a, b) in inputs.items()
            if len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))}


#: the torch functions that multiply two tensors as matrices, and how many matrix products each call computes
MATMULS = {torch.matmul: 1, torch.Tensor.matmul: 1, torch.Tensor.__matmul__: 1, torch.Tensor.__rmatmul__: 1,
           torch.bmm: 1, torch.Tensor.bmm: 1, torch.baddbmm: 1, torch.Tensor.baddbmm: 1, torch.einsum: 1,
           F.scaled_dot_product_attention: 2}


@dataclass
class MatmulCalls:
    """What one module computed itself in a forward: how often it ran, and its calls of each :data:`MATMULS`."""

    runs: int = 0
    functions: Counter = field(default_factory=Counter)
    #: the bias-free ``nn.Linear`` layers (by name) whose weight the module passes to ``F.linear`` itself, outside
    #: the layer's forward (EVA's and Swin-V2's qkv, with a bias of their own)
    linears: set[str] = field(default_factory=set)

    @property
    def products(self) -> int:
        return sum(MATMULS[f] * n for f, n in self.functions.items())


class _MatmulRecorder(TorchFunctionMode):
    """Counts the calls of :data:`MATMULS` per innermost running module (``stack`` is kept by hooks), and notes
    the ``F.linear`` calls on a Linear layer's weight made outside that layer (``linears``: weight id -> name)."""

    def __init__(self, linears: dict[int, str]):
        super().__init__()
        self.stack: list[str] = []
        self.calls: dict[str, MatmulCalls] = {}
        self.linears = linears

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS and self.stack:
            self.calls[self.stack[-1]].functions[func] += 1
        elif func is F.linear and self.stack:
            layer = self.linears.get(id(args[1] if len(args) > 1 else kwargs.get("weight")))
            if layer is not None and layer != self.stack[-1]:
                self.calls[self.stack[-1]].linears.add(layer)
        return func(*args, **kwargs)


def shell(cls: type[nn.Module], module: nn.Module, drop: tuple[str, ...] = ()) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s attributes, parameters, buffers and submodules (except
    those named in ``drop``), so that ``state_dict`` keys and weights stay those of ``module``."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("_") and k not in drop})
    for name, child in module.named_children():
        if name not in drop:
            new.add_module(name, child)
    for name, param in module.named_parameters(recurse=False):
        new.register_parameter(name, param)
    for name, buffer in module.named_buffers(recurse=False):
        if name not in drop:
            new.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    return new


class Routed(TorchFunctionMode):
    """Calls ``routes[func]`` in place of each routed torch function while active."""

    def __init__(self, routes: dict):
        super().__init__()
        self.routes = routes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.routes.get(func, func)(*args, **(kwargs or {}))


@torch.no_grad()
def record_matmuls(model: nn.Module, example: torch.Tensor) -> dict[str, MatmulCalls]:
    """``{module: MatmulCalls}`` of the modules that multiply tensors as matrices themselves, in a forward of
    ``example``: found by recording the torch calls (no class-name guessing), so none is missed."""
    names = {m: n for n, m in model.named_modules()}
    recorder = _MatmulRecorder({id(m.weight): n for m, n in names.items()
                                if isinstance(m, nn.Linear) and m.bias is None})

    def push(module, _):
        recorder.stack.append(names[module])
        recorder.calls.setdefault(names[module], MatmulCalls()).runs += 1

    def pop(*_):
        recorder.stack.pop()

    forward_recorded(model, example, recorder,
                      [h for m in names for h in (m.register_forward_pre_hook(push), m.register_forward_hook(pop))])
    return {name: calls for name, calls in recorder.calls.items() if calls.functions}


def forward_recorded(model: nn.Module, example: torch.Tensor, recorder: TorchFunctionMode,
                      hooks: list[torch.utils.hooks.RemovableHandle]) -> None:
    """One forward of ``example`` under ``recorder``; the recorder's ``hooks`` are removed whatever happens."""
    try:
        with recorder:
            model(example)
    finally:
        for h in hooks:
            h.remove()


def float_matmuls(model: nn.Module, calls: dict[str, MatmulCalls],
                  quantized: tuple[type[nn.Module], ...]) -> dict[str, MatmulCalls]:
    """The recorded ``calls`` (:func:`record_matmuls`) of modules outside the ``quantized`` types in ``model``:
    the matrix products computed in float.

    The Linear and conv layers are swapped for quantized ones and the attentions for ones with quantized matmul
    inputs (names unchanged, so calls recorded before the swaps still apply); any other module multiplying
    tensors itself (with ``einsum``, or around a submodule that does too) keeps float matmuls, which the engine
    then runs in float.
    """
    modules = dict(model.named_modules())
    return {name: c for name, c in calls.items()
            if not any(isinstance(modules.get(p), quantized) for p in _self_and_parents(name))}


def _self_and_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


#: torch calls that only move values (a copy when the input is not contiguous): what they return still holds a
#: layer's output as far as a normalization reading it is concerned
_MOVES = frozenset({"reshape", "view", "flatten", "unflatten", "permute", "transpose", "contiguous", "squeeze",
                    "unsqueeze", "reshape_as", "view_as"})
#: the normalizations OpenVINO runs as MVN (or RMS), which it lets read int8 (see :func:`transposed_reads`)
_NORMS = frozenset({"layer_norm", "group_norm", "rms_norm"})


class _TransposedReads(TorchFunctionMode):
    """Notes the layers (``outputs``: output storage -> name and output) whose output a torch call reads permuted
    (through a view that is contiguous where the output is not, or the other way round: PVT-v2's tokens from a
    conv's NCHW output) other than to NHWC, outside any quantizer (``quantizing`` counts the running ones), and
    without returning a view of it (a view op passes it on); and, in ``normalized``, those a normalization reads,
    through views or copies made by :data:`_MOVES` (``moved``: storage -> name)."""

    def __init__(self):
        super().__init__()
        self.outputs: dict[int, tuple[str, torch.Tensor]] = {}
        self.moved: dict[int, str] = {}
        self.quantizing = 0
        self.found: set[str] = set()
        self.normalized: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.quantizing:
            return result
        for t in tree_flatten((args, kwargs))[0]:
            if not isinstance(t, torch.Tensor) or t.dim() < 2:
                continue
            ptr = t.untyped_storage().data_ptr()
            name, out = self.outputs.get(ptr, (None, None))
            if (name is not None and t.is_contiguous() != out.is_contiguous() and not _is_nhwc_view(t, out)
                    and not _shares_storage(result, ptr)):
                self.found.add(name)
            name = name or self.moved.get(ptr)
            if name is None:
                continue
            called = getattr(func, "__name__", "")
            if called in _NORMS:
                self.normalized.add(name)
            elif called in _MOVES and isinstance(result, torch.Tensor):
                self.moved.setdefault(result.untyped_storage().data_ptr(), name)
        return result


def _shares_storage(result, ptr: int) -> bool:
    """Whether a torch call's ``result`` (a tensor or a structure of them) is a view on the storage at ``ptr``."""
    return any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == ptr for t in tree_flatten(result)[0])


def _is_nhwc_view(t: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``t`` is the NCHW ``out`` permuted to NHWC: OpenVINO's own layout for a conv's output, which a
    reader takes as it is (an int8 transpose there would run through its generic kernel: MambaOut-femto's INT8
    model 9 % slower with those outputs quantized, ``benchmarks/results/recipe-ab-transposed-epyc/``)."""
    if out.dim() != 4:
        return False
    nhwc = out.permute(0, 2, 3, 1)
    return (t.shape, t.stride(), t.storage_offset()) == (nhwc.shape, nhwc.stride(), nhwc.storage_offset())


@torch.no_grad()
def transposed_reads(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor) -> set[str]:
    """The ``layers`` whose output some operation outside a quantizer reads permuted (PVT-v2's depthwise conv
    output, flattened and transposed into tokens for a GELU; a patch embedding's), in one forward of ``example``.

    Why: OpenVINO lays a conv's output out channels-last; a float reader of a transposed view makes it reorder
    the whole f32 tensor (PVT-v2-B0's first depthwise conv: 0.3 ms, more than the conv), while a quantized
    output crosses as int8.

    Not a layer whose output a normalization reads (through views or copies): OpenVINO would move the
    dequantization past it and normalize the int8 values with the float epsilon, so the engine departs from the
    simulation wherever the variance is near epsilon (TinyViT-5M's last stage at random init: 0.086 of the logit
    range against 0.023 without that output quantized, ``benchmarks/results/ptq-families/``)."""
    recorder = _TransposedReads()

    def written(name):
        def hook(_, __, out):
            recorder.outputs[out.untyped_storage().data_ptr()] = (name, out)  # (kept alive: no reuse of storage)
        return hook

    def enter(*_):
        recorder.quantizing += 1

    def leave(*_):
        recorder.quantizing -= 1

    hooks = [layer.register_forward_hook(written(name)) for name, layer in layers.items()]
    hooks += [h for m in model.modules() if isinstance(m, Quantizer)
              for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    forward_recorded(model, example, recorder, hooks)
    return recorder.found - recorder.normalized


def direct_consumers(
    model: nn.Module,
    example: torch.Tensor,
    is_producer: Callable[[nn.Module], bool],
    is_consumer: Callable[[nn.Module], bool],
) -> tuple[dict[str, list[str]], torch.Tensor]:
    """``({producer: [consumers]}, output)``: which consumer modules take a producer module's output
    tensor itself as their input, found by running ``example`` with hooks, so it works for any module
    structure (no graph tracing). Consumers are listed in call order."""
    produced: dict[int, str] = {}
    keep_alive, hooks = [], []  # outputs stay alive during the pass, so their ids stay unique
    found: dict[str, list[str]] = {}

    def on_output(name):
        def hook(_, __, out):
            produced[id(out)] = name
            keep_alive.append(out)
        return hook

    def on_input(name):
        def hook(_, args):
            source = produced.get(id(args[0])) if args else None
            if source is not None and name not in found.setdefault(source, []):
                found[source].append(name)
        return hook

    for name, m in model.named_modules():
        if is_producer(m):
            hooks.append(m.register_forward_hook(on_output(name)))
        elif is_consumer(m):
            hooks.append(m.register_forward_pre_hook(on_input(name)))
    try:
        output = model(example)
    finally:
        for h in hooks:
            h.remove()
    return found, output


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Fold every eval-mode BatchNorm2d that directly consumes a Conv2d's output into that conv.

    The engines fold BN into the preceding conv anyway; folding it *before* quantization makes the
    quantized weights the ones the engine runs, so their scales are the simulation's. The pairs are
    found by running ``example`` with hooks (a BN whose input tensor is a conv's output), which works
    for any module structure. A conv whose output is also read by something else (a residual add, say)
    cannot be folded: the model's output is checked after folding, and if it moved, the pairs are folded
    one at a time and each one that moves it is undone and named in a warning (that BatchNorm stays).
    Returns the names of the folded BatchNorms.
    """
    consumers, reference = direct_consumers(
        model, example,
        is_producer=lambda m: type(m) is nn.Conv2d or type(m) is QuantConv2d,
        is_consumer=lambda m: isinstance(m, nn.BatchNorm2d) and m.track_running_stats and not m.training,
    )
    # a conv output shared by two BNs cannot be folded into both
    pairs = [(conv, bns[0]) for conv, bns in consumers.items() if len(bns) == 1]
    undo = [_fold_pair(model, conv, bn) for conv, bn in pairs]
    if not pairs or output_error(model(example), reference) <= 1e-3:
        return [bn for _, bn in pairs]
    for restore in reversed(undo):
        restore()
    folded, kept = [], []
    for conv, bn in pairs:
        restore = _fold_pair(model, conv, bn)
        if output_error(model(example), reference) <= 1e-3:
            folded.append(bn)
        else:
            restore()
            kept.append(f"{bn} (after {conv})")
    warn(f"{len(kept)} BatchNorm(s) not folded: their convolution's output is also read elsewhere, so "
         f"folding would change the model. They stay as BatchNorm: {', '.join(kept)}")
    return folded


def _fold_pair(model: nn.Module, conv_name: str, bn_name: str) -> Callable[[], None]:
    """Fold BatchNorm ``bn_name`` into convolution ``conv_name``; returns the function that undoes it."""
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    saved = conv.weight, conv.bias
    conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                  bn.weight, bn.bias)
    # timm's BatchNormAct2d applies its dropout and activation after the normalisation: keep those.
    tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    model.set_submodule(bn_name, nn.Sequential(*tail) if tail else nn.Identity())

    def restore():
        conv.weight, conv.bias = saved
        model.set_submodule(bn_name, bn)
    return restore


def output_error(after, reference) -> float:
    """How far a model output moved: the largest absolute difference from ``reference`` over the largest absolute
    reference value (at least 1). Outputs are a tensor, or a tuple / dict of them; 1e-3 is float rounding."""
    leaves, spec = tree_flatten(after)
    leaves_ref, spec_ref = tree_flatten(reference)
    if spec != spec_ref:
        raise ValueError("the two outputs have different structures")
    pairs = [(a, r) for a, r in zip(leaves, leaves_ref) if isinstance(a, torch.Tensor)]
    diff = max((float((a - r).abs().max()) for a, r in pairs), default=0.0)
    return diff / max([1.0, *(float(r.abs().max()) for _, r in pairs)])
