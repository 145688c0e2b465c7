"""Uniform fake quantization that shares its numbers with the exported INT8 model.

A :class:`FakeQuantizer` keeps a scale and a zero point as buffers and applies
``torch.fake_quantize_per_{tensor,channel}_affine``. Those ops round half to even and clamp exactly
as ONNX's QuantizeLinear → DequantizeLinear do, and the ONNX exporter turns them into that pair, so
the simulated model and the engine's INT8 model use the same scales bit for bit. Gradients go
straight through the rounding (zero where a value was clipped), which reconstruction relies on.

Ranges are chosen from calibration statistics by :func:`choose_range`: min-max, a percentile, or a
search for the clipping ratio that minimises the squared quantization error.

Post-softmax attention (values in ``[0, 1]``, most of them tiny, a few near 1) is badly served by
uniform levels at low bit-widths; :class:`Log2Quantizer`, :class:`ShiftUniformLog2Quantizer` and
:class:`TwinUniformQuantizer` spend their levels where those values are. No engine has kernels for
them: they are for simulating low-bit attention, while uniform uint8 is what deploys.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ...errors import LeanvitError, check_range

#: smallest scale: a constant-zero channel must still give a valid (non-zero) scale
MIN_SCALE = 1e-8
RANGE_METHODS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QScheme:
    """How one tensor is quantized: bit-width, symmetry and granularity.

    Symmetric schemes are signed (``[-2^(b-1), 2^(b-1)-1]``, zero point 0), asymmetric ones are
    unsigned (``[0, 2^b-1]``) with a zero point, which at 8 bits are ONNX's int8 and uint8.
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False

    def __post_init__(self):
        check_range("quantization bits", self.bits, 2, 8)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def __str__(self) -> str:
        kind = f"int{self.bits} sym" if self.symmetric else f"uint{self.bits} asym"
        return f"{kind} per-{'channel' if self.per_channel else 'tensor'}"


def qparams(lo: torch.Tensor, hi: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) that map ``[lo, hi]`` onto the scheme's integer grid.

    The range is widened to contain 0 so that zero (padding, ReLU's floor) is exactly representable.
    """
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    if scheme.symmetric:
        scale = (torch.maximum(-lo, hi) / scheme.qmax).clamp(min=MIN_SCALE)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (scheme.qmax - scheme.qmin)).clamp(min=MIN_SCALE)
    zero_point = (scheme.qmin - torch.round(lo / scale)).clamp(scheme.qmin, scheme.qmax)
    return scale, zero_point.to(torch.int32)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, scheme: QScheme,
                  axis: int = 0) -> torch.Tensor:
    """``dequantize(quantize(x))``; ``scale``/``zero_point`` of shape ``()`` or ``(x.shape[axis],)``."""
    if scale.ndim == 0:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, scheme.qmin, scheme.qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis % x.ndim, scheme.qmin, scheme.qmax)


def choose_range(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: QScheme, method: str, *,
                 percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range ``(lo, hi)`` per row of ``values`` (``(channels, samples)``; one row per tensor).

    ``lo``/``hi`` are the exact extremes (``(channels,)``), which a subsample of the values can miss.
    ``"mse"`` scales the min-max range by the ratio in ``(0, 1]`` that minimises the mean squared
    error of the quantized values, per row: a grid of 20 ratios, then 20 around the best one
    (PTQ4ViT searches a 100-point linear grid; the two passes reach a finer step, 0.005, in 41 tries).
    """
    if method == "minmax":
        return lo, hi
    if method == "percentile":
        check_range("percentile", percentile, 50.0, 100.0)
        q = torch.tensor([1 - percentile / 100, percentile / 100], dtype=values.dtype, device=values.device)
        p_lo, p_hi = torch.quantile(values, q, dim=1)
        return p_lo, p_hi
    if method == "mse":
        best_err = torch.full_like(lo, float("inf"))
        best = torch.ones_like(lo)
        for ratio in torch.linspace(0.05, 1.0, 20, device=lo.device):
            best_err, best = _keep_better(values, lo, hi, scheme, ratio.expand_as(lo), best_err, best)
        centre = best
        for step in torch.linspace(-0.05, 0.05, 21, device=lo.device):
            ratio = (centre + step).clamp(0.005, 1.0)
            best_err, best = _keep_better(values, lo, hi, scheme, ratio, best_err, best)
        return lo * best, hi * best
    raise LeanvitError(f"Unknown range method '{method}'; use one of {', '.join(RANGE_METHODS)}.")


def _keep_better(values, lo, hi, scheme, ratio, best_err, best):
    """Quantization MSE per row at ``ratio`` of the range; keep the ratio where it beats ``best_err``."""
    scale, zero_point = qparams(lo * ratio, hi * ratio, scheme)
    scale, zero_point = scale[:, None], zero_point[:, None].float()
    q = torch.clamp(torch.round(values / scale) + zero_point, scheme.qmin, scheme.qmax)
    err = ((q - zero_point) * scale - values).pow_(2).mean(1)
    better = err < best_err
    return torch.where(better, err, best_err), torch.where(better, ratio, best)


class ObservedShapeError(LeanvitError):
    """Calibration fed one quantizer tensors of different sizes along the axis its observer keeps statistics on."""

    def __init__(self, message: str, observer: RangeObserver):
        super().__init__(message)
        self.observer = observer


class RangeObserver:
    """Statistics of an activation over the calibration batches, in bounded memory.

    Keeps the exact per-channel minimum and maximum, plus a uniform random sample of at most
    ``max_values`` values taken as whole rows (every channel of one position), so percentile and
    MSE choices see the same distribution as the full data without storing it: each row gets a
    random key and the rows with the largest keys over all batches are kept.
    """

    def __init__(self, axis: int, max_values: int = 2**19, seed: int = 0):
        self.axis, self.max_values = axis, max_values
        self.generator = torch.Generator().manual_seed(seed)
        self.lo = self.hi = self.rows = self.keys = None
        self.batches = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().float().movedim(self.axis, -1).reshape(-1, x.shape[self.axis])
        if self.rows is not None and rows.shape[1] != self.rows.shape[1]:
            raise ObservedShapeError(
                f"calibration fed it {self.rows.shape[1]}, then {rows.shape[1]} values along the axis its range "
                f"statistics are kept on (dimension {self.axis}: a layer input's channels, the tokens of an attention "
                "operand): a module called at several token counts, or calibration images of several sizes. "
                "Calibrate on images of one size; keep a module that runs at several token counts in float "
                "(QuantConfig(skip=[...]))", self)
        lo, hi = rows.amin(0), rows.amax(0)
        keys = torch.rand(rows.shape[0], generator=self.generator).to(rows.device)
        if self.rows is not None:
            lo, hi = torch.minimum(lo, self.lo), torch.maximum(hi, self.hi)
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        keep = max(1, self.max_values // rows.shape[1])
        if rows.shape[0] > keep:
            keys, index = keys.topk(keep)
            rows = rows[index]
        self.lo, self.hi, self.rows, self.keys = lo, hi, rows, keys
        self.batches += 1

    def held_out_error(self, scheme: QScheme, method: str, channel_weights: torch.Tensor, **kwargs) -> float:
        """Output error of ``scheme``'s range fitted on half the sampled rows, scored on the other half.

        ``channel_weights`` (:func:`input_channel_weights`) turn the input's quantization error into
        the consuming layer's output error, which is what the choice between schemes should minimise.
        """
        fit, held = self.rows[0::2], self.rows[1::2]
        lo, hi = fit.amin(0), fit.amax(0)  # the fitted half's own extremes: the exact ones would leak
        if scheme.per_channel:
            q_lo, q_hi = choose_range(fit.T.contiguous(), lo, hi, scheme, method, **kwargs)
            scale, zero = qparams(q_lo, q_hi, scheme)
            err = fake_quantize(held, scale, zero, scheme, axis=1) - held
        else:
            q_lo, q_hi = choose_range(fit.reshape(1, -1), lo.min().view(1), hi.max().view(1), scheme, method,
                                      **kwargs)
            scale, zero = qparams(q_lo, q_hi, scheme)
            err = fake_quantize(held, scale[0], zero[0], scheme) - held
        return float(err.pow(2).mean(0) @ channel_weights)

    def sample(self, limit: int = 2**17) -> torch.Tensor:
        """About ``limit`` of the sampled values as one flat tensor, plus the exact minimum and maximum,
        so that a per-tensor fit sees the true extremes that a subsample can miss."""
        rows = self.rows[: max(1, limit // self.rows.shape[1])]
        return torch.cat([rows.flatten(), self.lo.min().view(1), self.hi.max().view(1)])

    def range(self, scheme: QScheme, method: str, *, search_values: int = 2**17, **kwargs
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The range for ``scheme``; a per-tensor search scores ``search_values`` of the sampled values.

        The rows are stored in random order, so the first ones are themselves a uniform sample; a
        per-channel range uses every row, since each channel only has ``max_values / channels``.
        """
        if scheme.per_channel:
            return choose_range(self.rows.T.contiguous(), self.lo, self.hi, scheme, method, **kwargs)
        rows = self.rows[: max(1, search_values // self.rows.shape[1])]
        return choose_range(rows.reshape(1, -1), self.lo.min().view(1), self.hi.max().view(1), scheme,
                            method, **kwargs)


def input_channel_weights(layer: nn.Module) -> torch.Tensor:
    """How much an error on each input channel of ``layer`` costs at its output: ``sum_out W[out, in]^2``.

    Rounding errors of different channels are nearly independent, so the output error's energy is
    close to the sum over input channels of the input error's energy times this weight.
    """
    weight = layer.weight.detach().float()
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:  # each input channel feeds its own group's outputs
        per_pair = weight.pow(2).sum((2, 3))  # (out, in / groups): output channel by its group's input channel
        return per_pair.reshape(layer.groups, -1, per_pair.shape[1]).sum(1).flatten()
    return weight.pow(2).transpose(0, 1).flatten(1).sum(1)


def weight_range(weight: torch.Tensor, scheme: QScheme, method: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of a weight, per output channel (axis 0) or for the whole tensor."""
    values = weight.detach().float().flatten(1) if scheme.per_channel else weight.detach().float().reshape(1, -1)
    return choose_range(values, values.amin(1), values.amax(1), scheme, method, **kwargs)


class Quantizer(nn.Module):
    """What every fake quantizer shares: calibration by observation, and an off switch.

    While ``observer`` is set the quantizer only records its input; with ``enabled = False`` it is
    the identity, to compare with the float function of the same model. ``scheme`` gives the width
    of the integer codes, which decides whether an engine has a kernel for them.

    The scheme's integer grid is kept in the state dict too (``qrange``, its ``[qmin, qmax]``), and loading a state
    dict takes the saved grid: the same scale and zero point read on another grid (int8 for uint8, 4 bits for 8)
    give other values, and a fresh model built with the same config can choose another grid where the choice
    depends on the calibration data (``a_symmetric="auto"``).
    """

    def __init__(self, scheme: QScheme):
        super().__init__()
        self.register_buffer("qrange", torch.tensor([scheme.qmin, scheme.qmax], dtype=torch.int32))
        self.scheme = scheme
        self.observer: RangeObserver | None = None
        self.enabled = True

    @property
    def scheme(self) -> QScheme:
        return self._scheme

    @scheme.setter
    def scheme(self, scheme: QScheme) -> None:
        self._scheme = scheme
        self.qrange.copy_(torch.tensor([scheme.qmin, scheme.qmax]))

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``... but the float buffers (scales, steps) stay float32: torch's fake-quantize kernels
        take no half scale, and the grid is the simulated engine's, not the model's compute precision."""
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "qrange")
        if saved is None:  # saved before the grid was kept: this quantizer's own grid, as then
            state_dict[prefix + "qrange"] = self.qrange.clone()
        elif saved.shape == (2,) and saved.tolist() != self.qrange.tolist():
            qmin, qmax = saved.tolist()
            scheme = replace(self.scheme, bits=(qmax - qmin).bit_length(), symmetric=qmin < 0)
            if [scheme.qmin, scheme.qmax] != [qmin, qmax]:
                raise LeanvitError(f"{prefix}qrange is [{qmin}, {qmax}], not the integer grid of a quantization "
                                   "scheme (int<b> [-2^(b-1), 2^(b-1)-1] or uint<b> [0, 2^b-1]).")
            self.scheme = scheme
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if not self.enabled:
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return str(self.scheme)


class FakeQuantizer(Quantizer):
    """Quantize-dequantize with fixed parameters; while ``observer`` is set it only records its input.

    ``enabled = False`` makes it the identity, to compare with the float function of the same model.

    ``channels`` is the size of the quantized axis, so that per-channel buffers have their final
    shape from the start and a quantized model's ``state_dict`` loads into a fresh one.
    """

    def __init__(self, scheme: QScheme, axis: int, channels: int):
        super().__init__(scheme)
        self.axis = axis
        shape = (channels,) if scheme.per_channel else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zero_point = qparams(lo, hi, self.scheme)
        shape = self.scale.shape
        self.scale.copy_(scale.reshape(shape))
        self.zero_point.copy_(zero_point.reshape(shape))

    def grid_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``: the range the grid spans (``set_range`` of it times any ratio keeps the zero point)."""
        if self.scheme.symmetric:
            return -self.scheme.qmax * self.scale, self.scheme.qmax * self.scale
        return (self.scheme.qmin - self.zero_point) * self.scale, (self.scheme.qmax - self.zero_point) * self.scale

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.scale, self.zero_point, self.scheme, self.axis)


def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass (bit for bit), the identity's gradient in the backward pass."""
    return quantized.detach() + (x - x.detach())


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


class Log2Quantizer(Quantizer):
    """Power-of-two levels for values in ``[0, 1]``: ``2^-q`` with ``q = clamp(round(-log2 x), 0, 2^b - 1)``.

    Post-softmax values crowd near 0, where power-of-two levels are dense (FQ-ViT, Lin et al., IJCAI
    2022; RepQ-ViT's log-sqrt(2) quantizer, with a calibrated scale and half-power levels, is another, not this one).
    The last code stands for 0 rather than ``2^-(2^b - 1)``, so masked keys stay exactly 0 and everything too small
    for the other codes becomes 0 within ``b`` bits (FQ-ViT zeroes such values with a mask, one level more than
    ``b`` bits hold).
    Nothing to calibrate: the levels are fixed by the ``[0, 1]`` range.
    """

    def __init__(self, bits: int):
        super().__init__(QScheme(bits, symmetric=False))

    def fit(self, values: torch.Tensor) -> None:
        """Nothing to fit (the calibration protocol of the post-softmax quantizers)."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        code = torch.round(-torch.log2(x.detach().clamp(min=0))).clamp(0, self.scheme.qmax)
        return _straight_through(x, torch.where(code < self.scheme.qmax, torch.exp2(-code), 0.0))

    def extra_repr(self) -> str:
        return f"log2, {self.scheme.bits} bits"


class ShiftUniformLog2Quantizer(Quantizer):
    """I&S-ViT's shift-uniform-log2 quantizer, SULQ (Zhong et al., 2023, arXiv:2311.10126).

    A log2 quantizer spends its codes on the exponents ``0 .. 2^b - 1`` and clamps every smaller
    value; at 3-4 bits that cuts off much of the softmax's range. SULQ shifts the input by ``eta``,
    takes ``log2`` and quantizes that *uniformly* over its whole calibrated range ``[lo, lo + s(2^b - 1)]``,
    so no part of the domain is clamped; the value decodes to ``2^round(lo + s q) - eta``, a power
    of two again (a bit shift in hardware). ``eta`` is searched on calibration data for the least
    squared error, with ``lo`` and ``s`` the min-max range of ``log2(x + eta)``.
    """

    #: candidate shifts: 2^0 .. 2^-12, finer where softmax values live
    ETAS = tuple(2.0**-i for i in range(13))

    def __init__(self, bits: int):
        super().__init__(QScheme(bits, symmetric=False))
        self.register_buffer("eta", torch.tensor(1.0))
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("step", torch.tensor(1.0))

    def _decode(self, x, eta, lo, step):
        code = torch.round((torch.log2(x.clamp(min=0) + eta) - lo) / step).clamp(0, self.scheme.qmax)
        return torch.exp2(torch.round(lo + step * code)) - eta

    @torch.no_grad()
    def fit(self, values: torch.Tensor) -> None:
        """Choose ``eta`` (and with it ``lo`` and ``s``) for the least squared error on ``values``."""
        values = values.float().clamp(min=0)
        best = None
        for eta in self.ETAS:
            logs = torch.log2(values + eta)
            lo, step = logs.min(), ((logs.max() - logs.min()) / self.scheme.qmax).clamp(min=MIN_SCALE)
            err = _mse(self._decode(values, eta, lo, step), values)
            if best is None or err < best[0]:
                best = err, eta, lo, step
        _, eta, lo, step = best
        self.eta.fill_(eta)
        self.lo.copy_(lo)
        self.step.copy_(step)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return _straight_through(x, self._decode(x.detach(), self.eta, self.lo, self.step))

    def extra_repr(self) -> str:
        return f"shift-uniform-log2, {self.scheme.bits} bits"


class TwinUniformQuantizer(Quantizer):
    """PTQ4ViT's twin uniform quantizer for post-softmax values (Yuan et al., ECCV 2022).

    Two uniform ``(b-1)``-bit grids, the top bit of the code choosing one: a fine step ``d1`` for the
    many small values in ``R1 = [0, 2^(b-1) d1)`` and a coarse step ``d2 = 2^-(b-1)`` over ``[0, 1]``
    for the few large ones. ``d2 = 2^m d1`` keeps the two grids a bit shift apart, so an integer
    kernel can align them; ``m`` is searched on calibration data for the least squared error
    (PTQ4ViT searches with a Hessian-guided metric; the squared error of the values is its
    data-free proxy).
    """

    MAX_SHIFT = 24  #: m in 0 .. MAX_SHIFT; m = 0 is one uniform (b-1)-bit grid

    def __init__(self, bits: int):
        super().__init__(QScheme(bits, symmetric=False))
        self.register_buffer("fine_step", torch.tensor(self.coarse_step))

    @property
    def coarse_step(self) -> float:
        return 2.0 ** -(self.scheme.bits - 1)

    def _decode(self, x, fine_step):
        levels = 2 ** (self.scheme.bits - 1)
        fine = torch.round(x / fine_step).clamp(0, levels - 1) * fine_step
        coarse = torch.round(x / self.coarse_step).clamp(0, levels - 1) * self.coarse_step
        return torch.where(x < levels * fine_step, fine, coarse)

    @torch.no_grad()
    def fit(self, values: torch.Tensor) -> None:
        """Choose ``m`` (the fine step ``d2 / 2^m``) for the least squared error on ``values``."""
        values = values.float()
        steps = [self.coarse_step * 2.0**-m for m in range(self.MAX_SHIFT + 1)]
        self.fine_step.fill_(min(steps, key=lambda step: _mse(self._decode(values, step), values)))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return _straight_through(x, self._decode(x.detach(), self.fine_step))

    def extra_repr(self) -> str:
        return f"twin uniform, {self.scheme.bits} bits"
