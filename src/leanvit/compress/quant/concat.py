"""Concatenations of a depthwise conv's NHWC output, run as int8 on OpenVINO (``QuantConfig.int8_nhwc_concats``).

MambaOut's gated block convolves part of its tokens depthwise in NCHW, permutes the result back to NHWC and
concatenates it with the rest: ``cat((i, conv(c).permute(0, 2, 3, 1)), -1)``. OpenVINO lays the conv's output
out channels-last already, yet runs that permute through its generic Transpose kernel and then the concat and
everything after it in a transposed layout, with reorders before the next fully-connected layer. When the
concat's inputs are quantized on one grid and the conv writes float, OpenVINO folds the permute into the reorder
converting the conv's f32 output to int8 and runs the concat in int8, in the plain layout (MambaOut-femto's
INT8 model 1.24x faster paired, ``benchmarks/results/recipe-ab-nhwc-concat-epyc/``, and then 0.94x the latency
of NNCF's, which quantizes there for its gating multiply; with the conv INT8, writing int8 itself, the generic
Transpose stays). So :func:`nhwc_concats` finds the modules whose own ``torch.cat`` calls
read such a conv output, :class:`QuantConcat` gives those calls one shared input quantizer, and ``quantize``
keeps the convs float (named in its report).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .modules import Routed, _is_nhwc_view, forward_recorded, is_depthwise, shell
from .quantizer import FakeQuantizer, QScheme, RangeObserver

#: the torch functions concatenating tensors
CONCATS = (torch.cat, torch.concat, torch.concatenate)


@dataclass
class _ConcatCalls:
    cats: int = 0  #: its own concatenations
    reading: int = 0  #: those that read a depthwise conv's output as NHWC
    convs: set[str] = field(default_factory=set)  #: those convs


class _ConcatRecorder(TorchFunctionMode):
    """Counts each module's own concatenations and which of them read a depthwise conv's output as NHWC."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.calls: dict[str, _ConcatCalls] = {}
        self.outputs: dict[int, tuple[str, torch.Tensor]] = {}  #: output storage -> conv name, output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in CONCATS and self.stack:
            tensors = args[0] if args else (kwargs or {}).get("tensors", ())
            calls = self.calls.setdefault(self.stack[-1], _ConcatCalls())
            calls.cats += 1
            read = {name for t in tensors
                    for name, out in [self.outputs.get(t.untyped_storage().data_ptr(), (None, None))]
                    if name is not None and _is_nhwc_view(t, out)}
            calls.reading += bool(read)
            calls.convs |= read
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def nhwc_concats(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[str, ...]]:
    """``{module: depthwise convs}``: the modules every one of whose own ``torch.cat`` calls (none in a submodule)
    reads a depthwise conv's output permuted to NHWC, in a forward of ``example``, with those convs."""
    names = {m: n for n, m in model.named_modules()}
    recorder = _ConcatRecorder()

    def push(module, _):
        recorder.stack.append(names[module])

    def pop(module, _, out):
        recorder.stack.pop()
        if is_depthwise(module):
            recorder.outputs[out.untyped_storage().data_ptr()] = (names[module], out)  # (kept alive: no reuse)

    forward_recorded(model, example, recorder,
                      [h for m in names for h in (m.register_forward_pre_hook(push), m.register_forward_hook(pop))])

    def own(name):  # no submodule concatenates too: its calls would be routed with the module's
        return not any(other != name and (not name or other.startswith(f"{name}.")) for other in recorder.calls)
    return {name: tuple(sorted(c.convs)) for name, c in recorder.calls.items() if c.reading == c.cats and own(name)}


class QuantConcat:
    """Mixin: the float class's own forward, its ``torch.cat`` calls (:data:`CONCATS`) concatenating inputs
    quantized by one shared ``concat_quantizer`` (asymmetric, per tensor), so the engine concatenates int8.
    :func:`concat_counterpart` makes one subclass per float class; :meth:`from_float` one from a float instance,
    sharing its layers and parameters."""

    _observer: RangeObserver | None = None  #: while calibrating: every concatenated value

    @classmethod
    def from_float(cls, module: nn.Module, bits: int = 8) -> nn.Module:
        q = shell(cls, module)
        q._float_cls = type(module)
        q.concat_quantizer = FakeQuantizer(QScheme(bits, symmetric=False), axis=-1, channels=1)
        return q

    def to_float(self) -> nn.Module:
        return shell(self._float_cls, self, drop=("concat_quantizer",))

    def observe(self) -> None:
        """Start calibration: the concatenated tensors' values are recorded (as one channel: they differ in width)."""
        self._observer = RangeObserver(axis=-1)

    def calibrated(self) -> bool:
        """Whether the module concatenated anything while observing."""
        return self._observer is not None and self._observer.batches > 0

    def calibrate(self, method: str, percentile: float) -> None:
        """End calibration: fit the shared quantizer to every input observed."""
        observer, self._observer = self._observer, None
        self.concat_quantizer.set_range(*observer.range(self.concat_quantizer.scheme, method, percentile=percentile))

    def describe(self) -> str:
        return f"concatenated inputs {self.concat_quantizer.scheme} on one grid"

    def forward(self, *args, **kwargs):
        def concat(tensors, dim=0, *, axis=None, out=None):  # (torch.concatenate names its dim "axis")
            if self._observer is not None:
                for t in tensors:
                    self._observer.update(t.reshape(-1, 1))
            return torch.cat([self.concat_quantizer(t) for t in tensors], dim if axis is None else axis, out=out)
        with Routed(dict.fromkeys(CONCATS, concat)):
            return super().forward(*args, **kwargs)


@functools.cache
def concat_counterpart(cls: type[nn.Module]) -> type[QuantConcat]:
    return type(f"QuantConcat{cls.__name__}", (QuantConcat, cls), {"__module__": __name__})
