"""Attention whose two matrix products, ``q @ kᵀ`` and ``softmax @ v``, take quantized inputs.

:class:`QuantAttention` stands in for timm's ``Attention`` and computes its unfused path with
fake quantizers on q, k, the softmax output and v, all per tensor: q, k and v as signed integers,
the softmax output with the quantizer chosen by name (``SOFTMAX_QUANTIZERS``). With ``"uniform"``
(unsigned, ``[0, 1]`` on ``2^b`` levels) every matmul input is a QuantizeLinear → DequantizeLinear
pair in the exported graph, which OpenVINO and ONNX Runtime run as INT8 matmuls; ``"log2"``,
``"sulq"`` and ``"twin"`` keep more accuracy at 3-4 bits but have no engine kernel (simulation only).

Swapped are exact ``Attention`` instances and the zoo's attention classes that compute the same
thing (:func:`_timm_equivalent`); any other attention (token-reduction patches, attention with biases or
cross tokens) would lose its behaviour, so it keeps float matmuls and :func:`swap_attention` reports it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.vision_transformer import maybe_add_mask, resolve_self_attn_mask

from ...errors import LeanvitError
from .quantizer import (
    FakeQuantizer, Log2Quantizer, QScheme, Quantizer, RangeObserver, ShiftUniformLog2Quantizer, TwinUniformQuantizer,
)

SOFTMAX_QUANTIZERS = ("uniform", "log2", "sulq", "twin")
_NON_UNIFORM = {"log2": Log2Quantizer, "sulq": ShiftUniformLog2Quantizer, "twin": TwinUniformQuantizer}


def softmax_quantizer(kind: str, bits: int) -> Quantizer:
    """The quantizer of the attention probabilities named ``kind`` (one of ``SOFTMAX_QUANTIZERS``)."""
    if kind == "uniform":
        return FakeQuantizer(QScheme(bits, symmetric=False), axis=-1, channels=1)
    if kind not in _NON_UNIFORM:
        raise LeanvitError(f"Unknown softmax quantizer '{kind}'; use one of {', '.join(SOFTMAX_QUANTIZERS)} "
                           "('uniform' is the one the engines run in INT8).")
    return _NON_UNIFORM[kind](bits)


def _shell(cls: type[nn.Module], module: nn.Module, drop: tuple[str, ...] = ()) -> nn.Module:
    """A ``cls`` instance sharing ``module``'s attributes, parameters and submodules (except ``drop``),
    so that ``state_dict`` keys and weights stay those of ``module``."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    for name, child in module.named_children():
        if name not in drop:
            new.add_module(name, child)
    for name, param in module.named_parameters(recurse=False):
        new.register_parameter(name, param)
    for name, buffer in module.named_buffers(recurse=False):
        new.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    return new


def _timm_equivalent() -> dict[type[nn.Module], dict]:
    """Attention classes that compute timm's ``Attention`` exactly, with the attributes they lack.

    EfficientMod's attention is plain multi-head self-attention (no qkv bias, no norms) whose head
    width may exceed ``dim / heads``; with these defaults :class:`QuantAttention`'s forward is its own.
    """
    from ...models.efficientmod import Attention as EfficientModAttention
    return {EfficientModAttention: dict(fused_attn=False, q_norm=nn.Identity(), k_norm=nn.Identity(),
                                        norm=nn.Identity(), attn_drop=nn.Identity(), proj_drop=nn.Identity(),
                                        gate=None)}


class QuantAttention(Attention):
    """timm ``Attention`` computed unfused, with quantized inputs to ``q @ kᵀ`` and ``softmax @ v``.

    q is quantized after the ``head_dim ** -0.5`` scaling and k after its transpose, so that in the
    exported graph each DequantizeLinear feeds its MatMul directly, the pattern the engines fuse.
    """

    QUANTIZERS = ("q_quantizer", "k_quantizer", "softmax_quantizer", "v_quantizer")

    @classmethod
    def from_float(cls, attn: Attention, bits: int = 8, softmax: str = "uniform") -> QuantAttention:
        """``attn`` with ``bits``-bit q, k, v and softmax output; shares its layers and parameters.

        ``attn`` is a timm ``Attention`` or one of the classes in :func:`_timm_equivalent`."""
        q = _shell(cls, attn)
        q._float_cls, q._added = type(attn), ()
        if type(attn) is not Attention:
            added = {**_timm_equivalent()[type(attn)], "scale": attn.head_dim ** -0.5,
                     "attn_dim": attn.num_heads * attn.head_dim}
            for name, value in added.items():
                setattr(q, name, value)
            q._added = tuple(added)
        signed = QScheme(bits, symmetric=True)
        q.q_quantizer = FakeQuantizer(signed, axis=-1, channels=1)
        q.k_quantizer = FakeQuantizer(signed, axis=-1, channels=1)
        q.softmax_quantizer = softmax_quantizer(softmax, bits)
        q.v_quantizer = FakeQuantizer(signed, axis=-1, channels=1)
        return q

    def to_float(self) -> nn.Module:
        """The float module this one was made from (same class, same layers and parameters)."""
        float_attn = _shell(self._float_cls, self, drop=self.QUANTIZERS + self._added)
        for name in self._added:  # the attributes from_float gave a timm-equivalent class
            float_attn.__dict__.pop(name, None)
        return float_attn

    def observe(self) -> None:
        """Start calibration: every quantizer records its input and passes it on unchanged."""
        for name in self.QUANTIZERS:
            getattr(self, name).observer = RangeObserver(axis=-1)

    def calibrated(self) -> bool:
        """Whether the forward ran while observing (token reduction, for one, computes attention itself)."""
        return all(getattr(self, name).observer.batches > 0 for name in self.QUANTIZERS)

    def calibrate(self, method: str, percentile: float) -> None:
        """End calibration: fit every quantizer to what it observed (uniform ones by ``method``)."""
        for name in self.QUANTIZERS:
            quantizer = getattr(self, name)
            observer, quantizer.observer = quantizer.observer, None
            if isinstance(quantizer, FakeQuantizer):
                quantizer.set_range(*observer.range(quantizer.scheme, method, percentile=percentile))
            else:
                quantizer.fit(observer.sample())

    def describe(self) -> str:
        """The report entry: what each matmul's inputs are quantized to."""
        return (f"q@kT: {self.q_quantizer.scheme} x {self.k_quantizer.scheme}; "
                f"attn@v: {self.softmax_quantizer.extra_repr()} x {self.v_quantizer.scheme}")

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.q_quantizer(q * self.scale) @ self.k_quantizer(k.transpose(-2, -1))
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.softmax_quantizer(attn) @ self.v_quantizer(v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, (Attention, nn.MultiheadAttention)) or "attention" in type(module).__name__.lower()


def swap_attention(model: nn.Module, bits: int, softmax: str = "uniform"
                   ) -> tuple[dict[str, QuantAttention], dict[str, str]]:
    """Replace every timm ``Attention`` of ``model`` (in place) by a :class:`QuantAttention`.

    Returns the swapped modules and ``{name: reason}`` for the attention modules left with float
    matmuls: any other module of an attention class (found by class name, innermost ones only).
    """
    swapped, others, equivalent = {}, [], _timm_equivalent().keys()
    for name, module in list(model.named_modules()):
        exact = isinstance(module, Attention) and type(module).forward is Attention.forward
        if name and (exact or type(module) in equivalent):
            swapped[name] = QuantAttention.from_float(module, bits, softmax)
            model.set_submodule(name, swapped[name])
        elif _is_attention(module) and not isinstance(module, QuantAttention):
            others.append(name)
    inner = [*others, *swapped]
    innermost = [n for n in others if not any(o.startswith(f"{n}.") for o in inner)]
    return swapped, {n: f"attention matmuls in float: {type(model.get_submodule(n)).__name__}" for n in innermost}
