"""Attention whose two matrix products, ``q @ kᵀ`` and ``softmax @ v``, take quantized inputs.

:class:`QuantAttention` stands in for timm's ``Attention`` and computes its unfused path with
fake quantizers on q, k, the softmax output and v, all per tensor: q, k and v as signed integers,
the softmax output with the quantizer chosen by name (``SOFTMAX_QUANTIZERS``). With ``"uniform"``
(unsigned, ``[0, 1]`` on ``2^b`` levels) every matmul input is a QuantizeLinear → DequantizeLinear
pair in the exported graph, which OpenVINO and ONNX Runtime run as INT8 matmuls; ``"log2"``,
``"sulq"`` and ``"twin"`` keep more accuracy at 3-4 bits but have no engine kernel (simulation only).

Swapped are timm's ``Attention`` (and EfficientMod's, which computes the same), EfficientFormerV2's attention and
EfficientViT-B's linear attention (:func:`_quantized_classes`: one subclass each, restating the float computation
with the quantizers in place, for what a generic counterpart does not do: sharing the qkv quantizer, signed
talking-head probabilities, the ones column padded onto v computed apart);
any attention whose matrix products are one ``F.scaled_dot_product_attention`` call
(:class:`QuantScaledDotProduct`: its forward unchanged, that call computed unfused on quantized inputs; TinyViT's,
FcaFormer's cross attention, PVT-v2's, MaxViT's, ...); and any whose matrix products are plain ``@`` /
``torch.matmul`` / ``bmm`` calls, the same number per call (:class:`QuantMatrixProducts`: its forward unchanged,
each product reading its own quantizers; EfficientFormer's, LeViT's, Swin's, CaiT's talking heads, XCiT's,
EfficientViT's). Any other module multiplying matrices (``einsum``, a fused attention
around another one) keeps float matmuls, which :func:`.calibrate.quantize` reports.
"""
from __future__ import annotations

import copy
import functools
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models import efficientformer_v2, efficientvit_mit
from timm.models.vision_transformer import maybe_add_mask, resolve_self_attn_mask

from ...errors import LeanvitError
from ...models.efficientmod import Attention as EfficientModAttention
from .modules import MatmulCalls, Routed, shell
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


class QuantMatmuls:
    """Mixin: fake quantizers on the inputs of an attention's two matmuls, calibrated like layer inputs.

    A subclass also derives from the float attention class and restates its forward with the quantizers
    in place; :meth:`from_float` turns a float instance into one, sharing its layers and parameters.
    """

    QUANTIZERS = ("q_quantizer", "k_quantizer", "softmax_quantizer", "v_quantizer")
    #: what :meth:`share_qkv_quantizer` adds, which :meth:`to_float` drops
    SHARED_QKV: tuple[str, ...] = ()

    @classmethod
    def from_float(cls, attn: nn.Module, bits: int = 8, softmax: str = "uniform") -> nn.Module:
        """``attn`` with ``bits``-bit inputs to both matmuls; shares its layers and parameters."""
        q = shell(cls, attn)
        added = cls._missing_attributes(attn)
        for name, value in added.items():
            setattr(q, name, value)
        q._float_cls, q._added, q._softmax = type(attn), tuple(added), softmax
        for name, quantizer in cls._matmul_quantizers(bits, softmax).items():
            setattr(q, name, quantizer)
        return q

    @classmethod
    def _missing_attributes(cls, attn: nn.Module) -> dict:
        """Attributes the forward reads that ``attn``'s class does not have."""
        return {}

    @classmethod
    def _matmul_quantizers(cls, bits: int, softmax: str) -> dict[str, Quantizer]:
        """``{name: quantizer}`` for :attr:`QUANTIZERS`: signed q, k and v, the probabilities' by ``softmax``."""
        signed = QScheme(bits, symmetric=True)
        return {"q_quantizer": FakeQuantizer(signed, axis=-1, channels=1),
                "k_quantizer": FakeQuantizer(signed, axis=-1, channels=1),
                "softmax_quantizer": cls._probs_quantizer(softmax, bits),
                "v_quantizer": FakeQuantizer(signed, axis=-1, channels=1)}

    @classmethod
    def _probs_quantizer(cls, softmax: str, bits: int) -> Quantizer:
        """The quantizer of the left input of the second matmul (the attention probabilities)."""
        return softmax_quantizer(softmax, bits)

    def to_float(self) -> nn.Module:
        """The float module this one was made from (same class, same layers and parameters)."""
        return shell(self._float_cls, self, drop=self.QUANTIZERS + self.SHARED_QKV + self._added)

    def quantizes_softmax(self) -> bool:
        """Whether the probabilities get the softmax quantizer chosen in :meth:`from_float` (a restated
        forward knows them; :class:`QuantMatrixProducts` learns in calibration which operands they are)."""
        return True

    def share_qkv_quantizer(self) -> None:
        """Quantize q, k and v where their projections write them rather than just before the matmuls (its
        :meth:`describe` says where it did). :class:`QuantAttention` and EfficientFormerV2's attentions do;
        EfficientFormer's (one block, in its last stage, on 49 tokens at 224x224) keeps them at the matmuls."""

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


class QuantAttention(QuantMatmuls, Attention):
    """timm ``Attention`` computed unfused, with quantized inputs to ``q @ kᵀ`` and ``softmax @ v``.

    q is quantized after the ``head_dim ** -0.5`` scaling and k after its transpose, so that in the
    exported graph each DequantizeLinear feeds its MatMul directly, the pattern the engines fuse.
    Also stands in for EfficientMod's attention: plain multi-head self-attention (no qkv bias, no
    norms) whose head width may exceed ``dim / heads``, given the attributes it lacks.
    """

    SHARED_QKV = ("qkv_quantizer", "qkv_gain", "qk_scale")

    @classmethod
    def from_float(cls, attn: nn.Module, bits: int = 8, softmax: str = "uniform") -> nn.Module:
        q = super().from_float(attn, bits, softmax)
        q.qkv_quantizer = q.qk_scale = None  # set by share_qkv_quantizer
        q.register_buffer("qkv_gain", None)
        return q

    @classmethod
    def _missing_attributes(cls, attn: nn.Module) -> dict:
        if isinstance(attn, Attention):  # timm's, or a subclass keeping its forward
            return {}
        return dict(fused_attn=False, q_norm=nn.Identity(), k_norm=nn.Identity(), norm=nn.Identity(),
                    attn_drop=nn.Identity(), proj_drop=nn.Identity(), gate=None, scale=attn.head_dim ** -0.5,
                    attn_dim=attn.num_heads * attn.head_dim)

    @torch.no_grad()
    def share_qkv_quantizer(self) -> None:
        """Quantize the qkv projection's output once, on the calibrated q, k and v quantizers' integer grids.

        Why: OpenVINO fuses a quantizer that directly follows a fully-connected layer into it, which then
        writes int8 instead of float, and the head split's reshape and transposes move int8 (DeiT-tiny at
        224x224: about 10 % faster; ``tests`` check the graph, ``benchmarks/recipe_ab.py`` the time). One per-tensor
        step ``s`` (v's) serves all three: the q and k channels are first multiplied by ``a_q``, ``a_k`` that
        bring their own steps to ``s``, and ``q @ kT`` is scaled by ``scale / (a_q a_k)`` instead of ``scale``,
        so the integers, and the products, are those of the separate quantizers (up to float rounding).
        The q, k and v quantizers stay, re-scaled to the same grids, so each matmul still reads a
        DequantizeLinear (a no-op re-quantization), the pattern every engine's fusion looks for.
        Not done with q/k norms (they sit between the projection and the quantizers).
        """
        if not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            return
        step = self.v_quantizer.scale.clone()
        gain_q = step * self.scale / self.q_quantizer.scale
        gain_k = step / self.k_quantizer.scale
        channels = self.num_heads * self.head_dim
        self.qkv_gain = torch.cat([gain_q.expand(channels), gain_k.expand(channels), step.new_ones(channels)])
        self.qk_scale = float(self.scale / (gain_q * gain_k))
        self.qkv_quantizer = FakeQuantizer(self.v_quantizer.scheme, axis=-1, channels=1)
        self.qkv_quantizer.scale.copy_(step)
        self.q_quantizer.scale.copy_(step * self.qk_scale)
        self.k_quantizer.scale.copy_(step)

    def describe(self) -> str:
        shared = "; q, k, v quantized once at the qkv output" if self.qkv_quantizer is not None else ""
        return super().describe() + shared

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv, scale = self.qkv(x), self.scale
        if self.qkv_quantizer is not None:
            qkv, scale = self.qkv_quantizer(qkv * self.qkv_gain), self.qk_scale
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.q_quantizer(q * scale) @ self.k_quantizer(k.transpose(-2, -1))
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.softmax_quantizer(attn) @ self.v_quantizer(v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class _QuantAttention2dHeads(QuantMatmuls):
    """EfficientFormerV2's attentions: per-head q, k and v from 1x1 conv projections, v also through a local conv."""

    SHARED_QKV = ("q_proj_quantizer", "k_proj_quantizer")

    @classmethod
    def from_float(cls, attn: nn.Module, bits: int = 8, softmax: str = "uniform") -> nn.Module:
        q = super().from_float(attn, bits, softmax)
        q.q_proj_quantizer = q.k_proj_quantizer = None  # set by share_qkv_quantizer
        return q

    @torch.no_grad()
    def share_qkv_quantizer(self) -> None:
        """Quantize q and k at their projections' outputs, on their matmul quantizers' grids.

        Why: as in :meth:`QuantAttention.share_qkv_quantizer`, OpenVINO fuses a quantizer that directly
        follows a conv into it, and the head split's reorders then move int8 instead of f32. A per-tensor
        quantizer commutes with the reshape and transpose, so the integers are unchanged and the matmul
        quantizers stay as no-op re-quantizations. v keeps its quantizer at the matmul: it also feeds the
        local depthwise conv, which OpenVINO runs in f32 once it reads v's signed grid (and, with it, the
        matmul: in a one-off check on efficientformerv2_s0, 5 convs and 5 matmuls fell back).
        """
        self.q_proj_quantizer = copy.deepcopy(self.q_quantizer)
        self.k_proj_quantizer = copy.deepcopy(self.k_quantizer)

    def describe(self) -> str:
        shared = "; q, k quantized at their projections" if self.q_proj_quantizer is not None else ""
        return super().describe() + shared

    def _heads(self, x: torch.Tensor, queries: int) -> tuple[torch.Tensor, ...]:
        """Per-head q (B, h, queries, d), kᵀ (B, h, d, N) and v (B, h, N, d), and v's local conv."""
        B, heads = x.shape[0], self.num_heads
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.q_proj_quantizer is not None:
            q, k = self.q_proj_quantizer(q), self.k_proj_quantizer(k)
        q = q.reshape(B, heads, -1, queries).permute(0, 1, 3, 2)
        k = k.reshape(B, heads, -1, self.N)
        return q, k, v.reshape(B, heads, -1, self.N).permute(0, 1, 3, 2), self.v_local(v)


class QuantAttention2d(_QuantAttention2dHeads, efficientformer_v2.Attention2d):
    """EfficientFormerV2's attention with quantized matmul inputs.

    Its talking-head 1x1 conv mixes the probabilities across heads after the softmax, so the left
    input of ``attn @ v`` is signed: it gets a symmetric uniform quantizer whatever ``softmax`` says
    (OpenVINO runs that matmul in f32 when the input has a zero point).
    """

    @classmethod
    def _probs_quantizer(cls, softmax: str, bits: int) -> Quantizer:
        return FakeQuantizer(QScheme(bits, symmetric=True), axis=-1, channels=1)

    def quantizes_softmax(self) -> bool:  # signed mixtures of probabilities: never the softmax quantizer asked for
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        B, (q, k, v, v_local) = x.shape[0], self._heads(x, self.N)
        attn = (self.q_quantizer(q) @ self.k_quantizer(k)) * self.scale
        attn = self.talking_head1(attn + self.get_attention_biases(x.device))
        attn = self.talking_head2(attn.softmax(dim=-1))
        x = (self.softmax_quantizer(attn) @ self.v_quantizer(v)).transpose(2, 3)
        x = x.reshape(B, self.dh, self.resolution[0], self.resolution[1]) + v_local
        if self.upsample is not None:
            x = self.upsample(x)
        return self.proj(self.act(x))


class QuantAttention2dDownsample(_QuantAttention2dHeads, efficientformer_v2.Attention2dDownsample):
    """EfficientFormerV2's downsampling attention (queries at half resolution) with quantized matmul inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, (q, k, v, v_local) = x.shape[0], self._heads(x, self.N2)
        attn = (self.q_quantizer(q) @ self.k_quantizer(k)) * self.scale
        attn = (attn + self.get_attention_biases(x.device)).softmax(dim=-1)
        x = (self.softmax_quantizer(attn) @ self.v_quantizer(v)).transpose(2, 3)
        x = x.reshape(B, self.dh, self.resolution2[0], self.resolution2[1]) + v_local
        return self.proj(self.act(x))


class QuantLiteMLA(QuantMatmuls, efficientvit_mit.LiteMLA):
    """EfficientViT-B's linear attention with quantized inputs to ``kᵀ @ v`` and ``q @ (kᵀv)``.

    The float forward pads v with a column of ones so that one product also yields the normaliser ``q · Σk``;
    that column dwarfs the others (v's values are far below 1; its sum over tokens is far above the rest of
    ``kᵀv``), so one per-tensor step per operand left the output 23-31 % off, and the engines do not run the
    per-column alternative (ONNX Runtime 1.32 refuses a per-column zero point on a 4-D right input; OpenVINO 2026.4
    runs it away from the simulation). Here the padded column is computed apart, in float: ``Σk`` as a sum over
    tokens and ``q · Σk`` as an element-wise product and sum (a matrix-vector product), so the two matmuls see
    only the unpadded values. Same function; q and k are unsigned, on the left, when the kernel function keeps them
    non-negative (the default ReLU), else signed.
    """

    QUANTIZERS = ("q_quantizer", "k_quantizer", "v_quantizer", "kv_quantizer")

    @classmethod
    def _matmul_quantizers(cls, bits: int, softmax: str) -> dict[str, Quantizer]:
        unsigned, signed = QScheme(bits, symmetric=False), QScheme(bits, symmetric=True)
        return {"q_quantizer": FakeQuantizer(unsigned, axis=-1, channels=1),
                "k_quantizer": FakeQuantizer(unsigned, axis=-1, channels=1),
                "v_quantizer": FakeQuantizer(signed, axis=-1, channels=1),
                "kv_quantizer": FakeQuantizer(signed, axis=-1, channels=1)}

    def quantizes_softmax(self) -> bool:
        return False  # (no softmax)

    def calibrate(self, method: str, percentile: float) -> None:
        for quantizer in (self.q_quantizer, self.k_quantizer):  # unsigned after ReLU, not after every kernel_func
            _sign_as_observed(quantizer)
        super().calibrate(method, percentile)

    def describe(self) -> str:
        return (f"kT@v: {self.k_quantizer.scheme} x {self.v_quantizer.scheme}; "
                f"q@kv: {self.q_quantizer.scheme} x {self.kv_quantizer.scheme}; padded column in float")

    def _attn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = v.dtype
        q, k, v = q.float(), k.float(), v[..., :-1].float()  # (v as the forward padded it)
        kv = self.k_quantizer(k.transpose(-1, -2)) @ self.v_quantizer(v)
        out = self.q_quantizer(q) @ self.kv_quantizer(kv)
        normaliser = (q * k.sum(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True)  # q @ Σk, the padded column
        return (out / (normaliser + self.eps)).to(dtype)


class _KeptForward(QuantMatmuls):
    """Base of the counterparts that run the float class's own forward with some torch calls routed to quantized
    versions (``routes``), so that no forward is restated and none can drift from timm's.

    Also routed: ``F.linear`` on the weight of a bias-free child Linear layer, which the forward calls itself
    rather than the layer, to add a bias of its own (EVA's and Swin-V2's qkv): the layer is called instead and
    that bias added, so the layer is calibrated, quantized and reached by every hook (bias correction, Hessian
    search) like any other instead of left float as never called.
    """

    #: child Linear layers (names relative to this module) whose weight the forward passes to ``F.linear``
    borrowed_linears: tuple[str, ...] = ()

    def borrow_linears(self, names: tuple[str, ...]) -> None:
        """Route ``F.linear`` on these child layers' weights to their quantizers (:attr:`borrowed_linears`)."""
        self.borrowed_linears, self._added = tuple(names), self._added + ("borrowed_linears",)

    def routes(self) -> dict:
        """``{torch function: replacement}`` for one call of the forward."""
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        routes = self.routes()
        # looked up per call: export swaps layers' weight tensors (a layer left float computes the same routed)
        layers = {id(layer.weight): layer for layer in map(self.get_submodule, self.borrowed_linears)}
        if layers:
            def linear(input, weight, bias=None):
                layer = layers.get(id(weight))
                if layer is None:
                    return F.linear(input, weight, bias)
                out = layer(input)  # (this mode is off inside its handler: the layer's own F.linear is not routed)
                return out if bias is None else out + bias
            routes[F.linear] = linear
        with Routed(routes):
            return super().forward(*args, **kwargs)


class QuantScaledDotProduct(_KeptForward):
    """Mixin for any attention whose matrix products are one ``F.scaled_dot_product_attention`` per call
    (FcaFormer's, PVT-v2's, CoAtNet's and MaxViT's, EVA's and the rotary ViTs'): the class's own forward runs
    unchanged, with that call computed unfused on quantized inputs. :func:`quantized_counterpart` makes one
    subclass per float class."""

    def routes(self) -> dict:
        return {F.scaled_dot_product_attention: self.quantized_sdpa}

    def quantized_sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """``F.scaled_dot_product_attention``'s result, from quantized ``q * scale``, ``kᵀ``, probabilities, v."""
        if enable_gqa:
            raise LeanvitError(f"{type(self).__name__}: grouped-query attention is not quantized; leave it float "
                               "(QuantConfig.attn_bits=None).")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        attn = self.q_quantizer(q * scale) @ self.k_quantizer(k.transpose(-2, -1))
        if is_causal:
            attn = attn.masked_fill(torch.ones(attn.shape[-2:], dtype=torch.bool, device=attn.device).triu(1),
                                    float("-inf"))
        if attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        attn = F.dropout(attn.softmax(dim=-1), dropout_p) if dropout_p else attn.softmax(dim=-1)
        return self.softmax_quantizer(attn) @ self.v_quantizer(v)


#: the torch functions computing a softmax, whose outputs :class:`QuantMatrixProducts` gives the softmax quantizer
SOFTMAX_FUNCTIONS = (torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax)
#: the torch functions computing a plain product of two tensors, which :class:`QuantMatrixProducts` quantizes
PLAIN_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm,
                 torch.Tensor.bmm)


class QuantMatrixProducts(_KeptForward):
    """Mixin for any attention whose matrix products are plain products of two tensors (``@``, ``torch.matmul``,
    ``bmm``; :data:`PLAIN_MATMULS`), the same number in every call: CaiT's talking heads, XCiT's and EdgeNeXt's
    cross-covariance attention, ConViT's gated positional attention, CrossViT's, EfficientViT's linear and cascaded
    group attentions, Swin-V2's cosine attention. Its forward runs unchanged and the ``i``-th product of a call
    reads the ``i``-th pair of quantizers (``matmul{i}_a_quantizer`` on the left operand, ``_b_`` on the right).

    Which operands are non-negative (probabilities, ReLU'd features) is learned in calibration: such an operand
    is quantized unsigned with zero point 0 when it is on the left. On the right it would have to be signed, a
    bit lost (OpenVINO's INT8 matmul takes unsigned values on the left only), so when the left one is signed,
    ``a @ b`` is computed as ``(bᵀ @ aᵀ)ᵀ`` (``transposed``; EfficientViT's ``v @ attnᵀ``).
    Also learned in calibration: which operands are a softmax's output, or a view of it (``softmax_fed``); those
    get the softmax quantizer named in :meth:`from_float`, the others stay uniform (talking heads' mixed
    probabilities, ConViT's gated sum of two softmaxes, linear attention's features are no softmax output).
    :func:`quantized_counterpart` makes one subclass per float class and number of products (``PRODUCTS``).
    """

    PRODUCTS = 0
    #: while observing: per product, how many calls had each operand ("a", "b") share storage with a softmax output
    _softmax_seen: list[Counter] | None = None

    @classmethod
    def _missing_attributes(cls, attn: nn.Module) -> dict:
        # set by calibrate: per product, whether computed transposed, and which operands ("a", "b") are softmax outputs
        return {"transposed": [False] * cls.PRODUCTS, "softmax_fed": [""] * cls.PRODUCTS}

    @classmethod
    def _matmul_quantizers(cls, bits: int, softmax: str) -> dict[str, Quantizer]:
        return {name: FakeQuantizer(QScheme(bits, symmetric=True), axis=-1, channels=1) for name in cls.QUANTIZERS}

    def _operands(self, i: int) -> tuple[FakeQuantizer, FakeQuantizer]:
        return getattr(self, f"matmul{i}_a_quantizer"), getattr(self, f"matmul{i}_b_quantizer")

    def observe(self) -> None:
        super().observe()
        self._softmax_seen = [Counter() for _ in range(self.PRODUCTS)]

    def calibrate(self, method: str, percentile: float) -> None:
        """Choose each product's operand order and signedness from the observed ranges and give the operands that
        were a softmax output in every call the softmax quantizer, then fit the ranges."""
        for i in range(self.PRODUCTS):
            a, b = self._operands(i)
            self.transposed[i] = _observed_negative(a) and not _observed_negative(b)
            _sign_as_observed(b if self.transposed[i] else a)  # the left one
            calls = a.observer.batches  # (one update per call)
            self.softmax_fed[i] = "".join(s for s in "ab" if self._softmax_seen[i][s] == calls)
            if self._softmax != "uniform":
                for side in self.softmax_fed[i]:
                    self._use_softmax_quantizer(i, side)
        self._softmax_seen = None
        super().calibrate(method, percentile)

    def _use_softmax_quantizer(self, i: int, side: str) -> None:
        """The named softmax quantizer in place of operand ``side`` of product ``i``, with its observations."""
        name = f"matmul{i}_{side}_quantizer"
        quantizer = softmax_quantizer(self._softmax, getattr(self, name).scheme.bits)
        quantizer.observer = getattr(self, name).observer
        setattr(self, name, quantizer)

    def _note_softmax_operands(self, i: int, operands: tuple[torch.Tensor, ...], outputs: list[torch.Tensor]) -> None:
        """While observing: count which of product ``i``'s operands share storage with a softmax output."""
        storages = {o.untyped_storage().data_ptr() for o in outputs}
        self._softmax_seen[i].update(s for s, t in zip("ab", operands) if t.untyped_storage().data_ptr() in storages)

    def quantizes_softmax(self) -> bool:
        return any(self.softmax_fed)

    def describe(self) -> str:
        def operand(i, side):
            quantizer = getattr(self, f"matmul{i}_{side}_quantizer")
            return f"{side} {'softmax ' if side in self.softmax_fed[i] else ''}{quantizer.extra_repr()}"

        def product(i):
            text = f"{operand(i, 'a')} x {operand(i, 'b')}"
            return f"(bT @ aT)T, {text}" if self.transposed[i] else text
        return "; ".join(f"matmul {i}: {product(i)}" for i in range(self.PRODUCTS))

    def routes(self) -> dict:
        calls = iter(range(self.PRODUCTS))
        observing = self._softmax_seen is not None
        softmax_outputs = []  # (held for the call: their storage cannot be reused by an operand)

        def product(a, b):
            i = next(calls, None)
            if i is None:
                raise LeanvitError(f"{type(self).__name__} computed more than the {self.PRODUCTS} matrix products "
                                   "recorded before quantization (its forward depends on its input); leave its "
                                   "attention float (QuantConfig.attn_bits=None).")
            if observing:
                self._note_softmax_operands(i, (a, b), softmax_outputs)
            return self.quantized_product(i, a, b)

        def softmax(func):
            def run(*args, **kwargs):
                softmax_outputs.append(out := func(*args, **kwargs))
                return out
            return run

        routes = {func: product for func in PLAIN_MATMULS}
        routes[torch.Tensor.__rmatmul__] = lambda b, a: product(a, b)
        if observing:
            routes.update({func: softmax(func) for func in SOFTMAX_FUNCTIONS})
        return routes

    def quantized_product(self, i: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` from quantized operands, the ``i``-th product of the call."""
        a_quantizer, b_quantizer = self._operands(i)
        if self.transposed[i] and a.ndim >= 2 and b.ndim >= 2:  # (a vector has no transpose: b stays right)
            # contiguous, as a @ b would be: the forward may view() it
            return (b_quantizer(b.transpose(-2, -1)) @ a_quantizer(a.transpose(-2, -1))).transpose(-2, -1).contiguous()
        return a_quantizer(a) @ b_quantizer(b)


def _observed_negative(quantizer: FakeQuantizer) -> bool:
    return bool(quantizer.observer.lo.min() < 0)


def _sign_as_observed(quantizer: FakeQuantizer) -> None:
    """A signed (symmetric) scheme where the calibration data had negative values, else unsigned (zero point 0)."""
    quantizer.scheme = QScheme(quantizer.scheme.bits, symmetric=_observed_negative(quantizer))


@functools.cache
def _scaled_dot_product_counterpart(cls: type[nn.Module]) -> type[QuantScaledDotProduct]:
    return type(f"QuantSdpa{cls.__name__}", (QuantScaledDotProduct, cls), {"__module__": __name__})


@functools.cache
def _matrix_products_counterpart(cls: type[nn.Module], products: int) -> type[QuantMatrixProducts]:
    quantizers = tuple(f"matmul{i}_{side}_quantizer" for i in range(products) for side in "ab")
    return type(f"QuantMatmul{cls.__name__}", (QuantMatrixProducts, cls),
                {"__module__": __name__, "PRODUCTS": products, "QUANTIZERS": quantizers})


def own_calls(calls: dict[str, MatmulCalls], name: str) -> MatmulCalls | None:
    """Module ``name``'s recorded matmul calls, or None when one of its submodules multiplies matrices too
    (while ``name`` computes its fused attention quantized, a submodule's would be routed there as well)."""
    return None if any(n.startswith(f"{name}.") for n in calls) else calls.get(name)


def one_fused_attention(calls: MatmulCalls | None) -> bool:
    """Whether a module's own matrix products (:func:`.modules.record_matmuls`) are one
    ``F.scaled_dot_product_attention`` per call."""
    return calls is not None and calls.functions == Counter({F.scaled_dot_product_attention: calls.runs})


def plain_products(calls: MatmulCalls | None) -> int:
    """How many plain matrix products (:data:`PLAIN_MATMULS`) a module computes per call, when those are all its
    own matrix products and their number is the same in every call; else 0."""
    if calls is None or not calls.functions or any(f not in PLAIN_MATMULS for f in calls.functions):
        return 0
    total = sum(calls.functions.values())
    return total // calls.runs if total % calls.runs == 0 else 0


def _quantized_classes() -> dict[type[nn.Module], type[QuantMatmuls]]:
    """The float attention classes with a quantized counterpart, and that counterpart."""
    return {Attention: QuantAttention, EfficientModAttention: QuantAttention,
            efficientformer_v2.Attention2d: QuantAttention2d,
            efficientformer_v2.Attention2dDownsample: QuantAttention2dDownsample,
            efficientvit_mit.LiteMLA: QuantLiteMLA}


def quantized_counterpart(module: nn.Module, calls: MatmulCalls | None = None) -> type[QuantMatmuls] | None:
    """The class with quantized matmul inputs standing in for ``module``'s: for the classes in
    :func:`_quantized_classes` and their subclasses that keep the float ``forward``; else, when the module's
    recorded ``calls`` are one fused attention each (:func:`one_fused_attention`), a
    :class:`QuantScaledDotProduct` subclass of its class; else, when they are a fixed number of plain products
    (:func:`plain_products`), a :class:`QuantMatrixProducts` subclass; else None."""
    if isinstance(module, QuantMatmuls):
        return None
    known = next((q for f, q in _quantized_classes().items()
                  if isinstance(module, f) and type(module).forward is f.forward), None)
    if known is None and one_fused_attention(calls):
        return _scaled_dot_product_counterpart(type(module))
    if known is None and (products := plain_products(calls)):
        return _matrix_products_counterpart(type(module), products)
    return known


def swap_attention(model: nn.Module, bits: int, softmax: str = "uniform",
                   calls: dict[str, MatmulCalls] | None = None, skip: set[str] = frozenset()) -> dict[str, QuantMatmuls]:
    """Replace every attention of ``model`` that has a :func:`quantized_counterpart` with that counterpart
    (in place), given each module's recorded matmul ``calls``; returns the swapped modules. Attentions named in
    ``skip`` and any other module computing matmuls keep them in float: :func:`.modules.float_matmuls` finds
    those."""
    swapped, calls = {}, calls or {}
    for name, module in list(model.named_modules()):
        if name and name not in skip and (quant_cls := quantized_counterpart(module, own := own_calls(calls, name))) is not None:
            swapped[name] = quant_cls.from_float(module, bits, softmax)
            if own is not None and own.linears and isinstance(swapped[name], _KeptForward):
                swapped[name].borrow_linears(tuple(sorted(n.removeprefix(f"{name}.") for n in own.linears
                                                          if n.startswith(f"{name}."))))
            model.set_submodule(name, swapped[name])
    return swapped
