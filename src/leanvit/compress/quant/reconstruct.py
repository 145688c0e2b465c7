"""Block reconstruction (BRECQ) with adaptive rounding (AdaRound), and Q-HyViT's bridge blocks.

Rounding each weight to its nearest grid point does not minimise the error of a layer's output:
the errors of neighbouring weights can cancel. AdaRound (Nagel et al., ICML 2020) learns per
weight whether to round down or up, relaxed as ``floor(w / s) + h(V)`` with ``h`` a rectified
sigmoid and a regulariser ``sum(1 - |2h - 1|^beta)`` whose ``beta`` anneals from 20 to 2, which
drives every ``h`` to 0 or 1. BRECQ (Li et al., ICLR 2021) learns it per block: the input is the
quantized model's activation at the block and the target the float model's block output, so the
errors of the layers inside a block compensate each other and upstream errors are corrected for.
The activation quantizers stay on while the rounding is learned, so it adapts to the inputs it
will see; optionally their step sizes are learned as well (LSQ, Esser et al., ICLR 2020, BRECQ's
activation stage).

Afterwards the weights are frozen to the hard rounding and written as grid values of the existing
scales: the weight quantizers then reproduce them exactly, and the exported int8 weights are
bit-exact with the simulation. A unit whose learned rounding does not beat round-to-nearest on the
calibration data keeps round-to-nearest, and the returned report says so.

Units are found from the module structure: the elements of ``nn.Sequential`` / ``nn.ModuleList``
containers that hold at least two quantized layers, at the deepest such level (a ViT's
``blocks[i]``, a hybrid's stage blocks); quantized layers outside every unit are reconstructed one
by one. ``mode="bridge"`` follows Q-HyViT (Lee et al., 2023), which finds the blocks where a
hybrid turns from convolutions to attention the hardest to quantize: only the first transformer
unit after a convolutional one is reconstructed, together with the quantized layers that run
between the two (a downsampling or embedding layer). A unit is a transformer one if it mixes tokens
as attention does (a product of two activations, or a softmax: found from its torch calls, not from
class names) or outputs tokens; a convolutional one if it outputs feature maps.
"""
from __future__ import annotations

import copy
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ...errors import LeanvitError, check_range, warn
from .calibrate import quantizers_disabled
from .modules import MATMULS, QuantConv2d, QuantLinear, fold_batchnorm, forward_recorded
from .quantizer import FakeQuantizer

MODES = ("blocks", "bridge")
ZETA, GAMMA = 1.1, -0.1  #: AdaRound's stretch of the sigmoid, so that h reaches 0 and 1 exactly
REG_WEIGHT = 0.01  #: weight of the rounding regulariser (BRECQ's default)
BETA = (20.0, 2.0)  #: regulariser temperature, annealed linearly after the warm-up
WARMUP = 0.2  #: fraction of the iterations without the regulariser
#: Adam's rate for the rounding variables: BRECQ's 1e-3 is for 20,000 iterations, a CPU budget allows
#: hundreds; the log step sizes' rate is BRECQ's 4e-5 on steps of ~0.1-0.5, made relative
ROUNDING_LR, STEP_LR = 1e-2, 1e-4
QUANT_LAYERS = (QuantLinear, QuantConv2d)


class AdaRound(nn.Module):
    """A weight quantizer with learned rounding: ``s * (clamp(floor(w / s) + h(V) + z) - z)`` per weight."""

    def __init__(self, quantizer: FakeQuantizer, weight: torch.Tensor):
        super().__init__()
        self.scheme = quantizer.scheme
        shape = (-1,) + (1,) * (weight.ndim - 1) if quantizer.scale.ndim else ()
        self.register_buffer("scale", quantizer.scale.reshape(shape))
        self.register_buffer("zero_point", quantizer.zero_point.reshape(shape).float())
        scaled = weight.detach().float() / self.scale
        self.register_buffer("floor", scaled.floor())
        rest = scaled - self.floor
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(V) = rest: starts at w

    def soft(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()

    def _dequantize(self, up: torch.Tensor) -> torch.Tensor:
        ints = torch.clamp(self.floor + up + self.zero_point, self.scheme.qmin, self.scheme.qmax)
        return (ints - self.zero_point) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # the layer passes its weight; V replaces it
        return self._dequantize(self.soft())

    def hard(self) -> torch.Tensor:
        """The frozen weights: each rounded up where ``V >= 0``, exactly on the grid."""
        return self._dequantize((self.v >= 0).float())


class LearnedStep(nn.Module):
    """An input quantizer whose step size is learned (LSQ) through a straight-through rounding; the
    zero point stays, so the result deploys like any other scale."""

    def __init__(self, quantizer: FakeQuantizer):
        super().__init__()
        self.scheme, self.axis = quantizer.scheme, quantizer.axis
        self.log_scale = nn.Parameter(quantizer.scale.log())
        self.register_buffer("zero_point", quantizer.zero_point.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        if self.log_scale.ndim:
            shape[self.axis] = -1
        scale, zero = self.log_scale.exp().reshape(shape), self.zero_point.reshape(shape)
        scaled = x / scale
        ints = torch.clamp(scaled + (scaled.round() - scaled).detach() + zero, self.scheme.qmin, self.scheme.qmax)
        return (ints - zero) * scale


def _inside(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


def find_units(qmodel: nn.Module) -> list[str]:
    """The reconstruction units: elements of ``nn.Sequential`` / ``nn.ModuleList`` holding two or more
    quantized layers, deepest first (an element holding a unit is not one)."""
    layers = [n for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)]
    candidates = [f"{name}.{child}" if name else child for name, module in qmodel.named_modules()
                  if isinstance(module, (nn.Sequential, nn.ModuleList)) for child in module._modules]
    candidates = [c for c in candidates if sum(_inside(n, c) for n in layers) >= 2]
    return [c for c in candidates if not any(_inside(other, c) for other in candidates)]


@torch.no_grad()
def _call_order(qmodel: nn.Module, example: torch.Tensor) -> tuple[list[str], list[str], dict[str, object]]:
    """``(units, items in order of first call, first output of each)``: items are the units and the
    quantized layers outside every unit; what never runs on ``example`` is left out."""
    units = find_units(qmodel)
    loose = [n for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)
             and not any(_inside(n, u) for u in units)]
    order, outputs = [], {}

    def hook(name):
        def record(_, __, out):
            if name not in outputs:
                order.append(name)
                outputs[name] = out
        return record

    handles = [qmodel.get_submodule(n).register_forward_hook(hook(n)) for n in units + loose]
    try:
        with quantizers_disabled(qmodel):
            qmodel(example)
    finally:
        for h in handles:
            h.remove()
    return units, order, outputs


#: the torch calls by which attention mixes tokens by their content: products of two activations, and the softmax
#: (linear attentions such as MobileViT-v2's weigh tokens by a softmax, then sum them elementwise)
MIXING = {*MATMULS, F.softmax, torch.softmax, torch.Tensor.softmax}


class _MixingRecorder(TorchFunctionMode):
    """Notes the running unit (``running``, kept by hooks) whenever a :data:`MIXING` call is made on activations:
    a call on a parameter (``x @ self.weight``) is a layer, not attention."""

    def __init__(self):
        super().__init__()
        self.running: list[str] = []
        self.mixing: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in MIXING and self.running and not any(isinstance(a, nn.Parameter) for a in args):
            self.mixing.add(self.running[-1])
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def _mixing_units(qmodel: nn.Module, units: list[str], example: torch.Tensor) -> set[str]:
    """The ``units`` that mix tokens as attention does, found from the torch calls they make, whatever their
    classes are called (EfficientViT-B's ``LiteMLA``, EdgeNeXt's ``CrossCovarianceAttn``; and Next-ViT's
    ``ConvAttention`` is a grouped convolution)."""
    recorder = _MixingRecorder()

    def push(module, _):
        recorder.running.append(names[module])

    def pop(*_):
        recorder.running.pop()

    names = {qmodel.get_submodule(name): name for name in units}
    with quantizers_disabled(qmodel):
        forward_recorded(qmodel, example, recorder, [h for m in names for h in (
            m.register_forward_pre_hook(push), m.register_forward_hook(pop))])
    return recorder.mixing


def _kind(module: nn.Module, output, mixes_tokens: bool) -> str | None:
    """``"transformer"`` (mixes tokens as attention does, see :func:`_mixing_units`; or token tensors out),
    ``"conv"`` (feature maps out) or None."""
    if mixes_tokens or any(isinstance(m, nn.MultiheadAttention) for m in module.modules()):  # (its fused fast path)
        return "transformer"
    ndim = output.ndim if isinstance(output, torch.Tensor) else None
    return {3: "transformer", 4: "conv"}.get(ndim)


def find_bridges(qmodel: nn.Module, example: torch.Tensor) -> list[str]:
    """Q-HyViT's bridge: each transformer unit that directly follows a convolutional one, preceded by
    the quantized layers that run between the two; in call order. Empty for a plain ViT or CNN."""
    units, order, outputs = _call_order(qmodel, example)
    mixing = _mixing_units(qmodel, units, example)
    bridges, between, previous = [], [], None
    for name in order:
        if name not in units:
            between.append(name)
            continue
        kind = _kind(qmodel.get_submodule(name), outputs[name], name in mixing)
        if kind == "transformer" and previous == "conv":
            bridges += [*between, name]
        between, previous = [], kind
    return bridges


def _tensors(output, unit: str) -> list[torch.Tensor]:
    found = [output] if isinstance(output, torch.Tensor) else [
        t for t in (output if isinstance(output, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
    if not found:
        raise LeanvitError(f"Cannot reconstruct '{unit}': it returns {type(output).__name__}, not tensors. "
                           f"Use QuantConfig(reconstruct=None).")
    return found


def _reconstruction_error(output, target: list[torch.Tensor], unit: str, channels: int | None = None) -> torch.Tensor:
    """Squared error summed over channels and averaged over positions, BRECQ's reconstruction loss (the balance
    its rounding regulariser's weight assumes). Channels are the last dim of tokens and of an NHWC map (a map whose
    last dim, not dim 1, is the ``channels`` the unit's last layer writes: Swin's blocks), else dim 1."""
    def channel_dim(o: torch.Tensor) -> int:
        return -1 if o.ndim != 4 or (o.shape[-1] == channels and o.shape[1] != channels) else 1
    return sum((o - t).pow(2).sum(channel_dim(o)).mean() for o, t in zip(_tensors(output, unit), target))


def _out_channels(unit: nn.Module) -> int | None:
    """The channels the last quantized layer of ``unit`` writes (its output's, unless something follows it)."""
    last = next((m for m in reversed(list(unit.modules())) if isinstance(m, QUANT_LAYERS)), None)
    return getattr(last, "out_features", None) or getattr(last, "out_channels", None)


class _Stop(Exception):
    """Ends a forward pass once the unit's input or output is captured."""


def _run_until_captured(model: nn.Module, hook, batch: torch.Tensor) -> None:
    try:
        model(batch)
    except _Stop:
        pass
    finally:
        hook.remove()


@torch.no_grad()
def _capture(qmodel: nn.Module, reference: nn.Module, name: str, batches: list[torch.Tensor]) -> list[tuple]:
    """``(args, kwargs, float target)`` of the unit's first call per batch: the arguments from the
    quantized model (everything before it quantized), the target from the float model."""
    calls = []
    for batch in batches:
        found = {}

        def take_input(_, args, kwargs):
            found["input"] = (args, kwargs)
            raise _Stop

        def take_output(_, __, out):
            found["target"] = [t.detach() for t in _tensors(out, name)]
            raise _Stop

        _run_until_captured(qmodel, qmodel.get_submodule(name).register_forward_pre_hook(take_input, with_kwargs=True),
                            batch)
        _run_until_captured(reference, reference.get_submodule(name).register_forward_hook(take_output), batch)
        if len(found) == 2:
            calls.append((*found["input"], found["target"]))
    return calls


@torch.no_grad()
def _mean_error(unit: nn.Module, calls: list[tuple], name: str, channels: int | None) -> float:
    return sum(float(_reconstruction_error(unit(*args, **kwargs), target, name, channels))
               for args, kwargs, target in calls) / len(calls)


def _beta(step: int, iters: int) -> float | None:
    """The regulariser's temperature at ``step``; None during the warm-up, when it is off."""
    start = WARMUP * iters
    if step < start:
        return None
    return BETA[1] + (BETA[0] - BETA[1]) * max(0.0, 1 - (step - start) / max(1.0, iters - start))


def _reconstruct_unit(unit: nn.Module, name: str, calls: list[tuple], iters: int, act_scales: bool,
                      generator: torch.Generator) -> str:
    """Learn the rounding (and optionally the input steps) of ``unit``'s layers; returns what happened."""
    layers = [m for m in unit.modules() if isinstance(m, QUANT_LAYERS)]
    channels = _out_channels(unit)
    before = _mean_error(unit, calls, name, channels)
    saved = [(m.weight.detach().clone(), m.weight_quantizer, m.input_quantizer, m.input_quantizer.scale.clone())
             for m in layers]
    rounders = [AdaRound(m.weight_quantizer, m.weight) for m in layers]
    steps = [LearnedStep(m.input_quantizer) for m in layers] if act_scales else []
    for i, m in enumerate(layers):
        m.weight_quantizer = rounders[i]
        if steps:
            m.input_quantizer = steps[i]
    groups = [{"params": [r.v for r in rounders], "lr": ROUNDING_LR}]
    if steps:
        groups.append({"params": [s.log_scale for s in steps], "lr": STEP_LR})
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.Adam(groups)
    try:
        for step in range(iters):
            args, kwargs, target = calls[int(torch.randint(len(calls), (), generator=generator))]
            with torch.enable_grad():
                loss = _reconstruction_error(unit(*args, **kwargs), target, name, channels)
                if (beta := _beta(step, iters)) is not None:
                    loss = loss + REG_WEIGHT * sum(r.regulariser(beta) for r in rounders)
                grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
    finally:
        for m, (_, weight_q, input_q, _) in zip(layers, saved):
            m.weight_quantizer, m.input_quantizer = weight_q, input_q
    with torch.no_grad():
        for m, rounder in zip(layers, rounders):
            m.weight.copy_(rounder.hard())
        for m, learned in zip(layers, steps):
            m.input_quantizer.scale.copy_(learned.log_scale.exp())
        after = _mean_error(unit, calls, name, channels)
        if after < before:
            return f"output error {before:.4g} -> {after:.4g} (round-to-nearest -> learned)"
        for m, (weight, _, input_q, scale) in zip(layers, saved):
            m.weight.copy_(weight)
            input_q.scale.copy_(scale)
    return f"kept round-to-nearest: learned rounding gave output error {after:.4g} >= {before:.4g}"


def reconstruct(qmodel: nn.Module, float_model: nn.Module, batches: list[torch.Tensor], *, mode: str = "blocks",
                iters: int = 500, act_scales: bool = False, seed: int = 0, progress: bool = True) -> dict[str, str]:
    """Reconstruct ``qmodel``'s units in call order against ``float_model`` (the model it was quantized from);
    returns ``{unit or layer: what happened}``.

    ``mode="blocks"`` reconstructs every unit and every quantized layer outside them, ``"bridge"`` only
    the CNN-to-transformer bridges (:func:`find_bridges`), with a warning where there are none.
    Each step runs ``iters`` optimiser iterations on one calibration batch each.
    """
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise LeanvitError(f"Unknown reconstruction mode '{mode}'; use one of {', '.join(MODES)} (or None).")
    check_range("reconstruction iterations", iters, 1, 1_000_000)
    example = batches[0][:2]
    if mode == "bridge":
        names = find_bridges(qmodel, example)
        if not names:
            warn(f"reconstruct='bridge': {type(qmodel).__name__} has no convolutional block followed by a "
                 f"transformer block, so there is no bridge and nothing was reconstructed. Use "
                 f"reconstruct='blocks' to reconstruct every block.")
            return {}
    else:
        names = _call_order(qmodel, example)[1]
    # the targets are the function qmodel computes in float: its BatchNorms are folded into their convs
    # (quantize does so first), so a conv reconstructed alone must match the conv + BN output, not the bare conv's
    reference = copy.deepcopy(float_model).eval()
    with warnings.catch_warnings():  # (quantize has named the BatchNorms it could not fold)
        warnings.simplefilter("ignore")
        fold_batchnorm(reference, example)
    generator = torch.Generator().manual_seed(seed)
    done = {}
    for name in tqdm(names, desc="reconstructing", unit="unit", disable=not progress, file=sys.stderr):
        calls = _capture(qmodel, reference, name, batches)
        if not calls:
            done[name] = "not reconstructed: not called on the calibration batches"
            continue
        done[name] = _reconstruct_unit(qmodel.get_submodule(name), name, calls, iters, act_scales, generator)
    return done
