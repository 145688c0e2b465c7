"""Mamba's selective scan in plain PyTorch, exportable to ONNX and runnable on any engine.

The recurrence is solved with a log-depth odd/even (Blelloch-style) reduction over whole tensors,
so there is no Python loop over tokens: the graph has O(log L) nodes, exports to ONNX and compiles.
It only ever multiplies decays ``exp(delta * A)`` in (0, 1] together, never divides by them or
exponentiates a positive sum, so long sequences and sharp decays underflow towards the exact
limit 0 instead of overflowing to inf/NaN as cumulative-sum formulations can.

On CUDA tensors, ``mamba_ssm``'s fused kernel is used when it is installed; it is never required.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

try:  # the optional fused CUDA kernel; the PyTorch path below computes the same function
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _fused_selective_scan
except ImportError:
    _fused_selective_scan = None

__all__ = ["linear_recurrence", "selective_scan"]


def linear_recurrence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``h[t] = a[t] * h[t-1] + b[t]`` (with ``h[-1] = 0``) along the last dimension.

    Each pair of consecutive steps composes into one step of the same form, so the half-length
    recurrence over pairs gives ``h`` at odd positions and one more step gives the even ones:
    log2(L) levels of element-wise work. ``a`` may broadcast against ``b``, which lets several
    recurrences share one decay tensor without materialising copies of it.
    """
    # (a loop over the levels rather than recursion, which TorchScript cannot compile)
    levels: List[Tuple[torch.Tensor, torch.Tensor, int]] = []  # per level: even steps and length
    while b.shape[-1] > 1:
        length = b.shape[-1]
        # (concatenation rather than F.pad throughout: pad fills its whole output before copying)
        if length % 2:  # append the identity step (a=1, b=0); trimmed off on the way back
            a = torch.cat((a, torch.ones_like(a[..., :1])), dim=-1)
            b = torch.cat((b, torch.zeros_like(b[..., :1])), dim=-1)
        a_even, a_odd = a[..., 0::2], a[..., 1::2]
        b_even, b_odd = b[..., 0::2], b[..., 1::2]
        levels.append((a_even, b_even, length))
        a, b = a_odd * a_even, a_odd * b_even + b_odd  # the half-length recurrence over pairs
    h = b  # h at the odd positions of the level above
    for i in range(len(levels) - 1, -1, -1):
        a_even, b_even, length = levels[i]
        h_before = torch.cat((torch.zeros_like(h[..., :1]), h[..., :-1]), dim=-1)  # h[2i - 1]
        h = torch.stack((b_even + a_even * h_before, h), dim=-1).flatten(-2)[..., :length]
    return h


def selective_scan(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None = None,
        delta_bias: torch.Tensor | None = None,
        delta_softplus: bool = False,
) -> torch.Tensor:
    """Mamba's selective SSM, with the semantics of ``mamba_ssm``'s ``selective_scan_fn``.

    With ``dt = softplus(delta + delta_bias)`` (softplus only if ``delta_softplus``)::

        h[t] = exp(dt[t] * A) * h[t-1] + dt[t] * B[t] * u[t]      # state (..., dim, N)
        y[t] = sum_n C[t, n] * h[t, :, n] + D * u[t]

    Shapes: ``u``, ``delta`` (..., dim, L); ``A`` (dim, N); ``B``, ``C`` (..., N, L), shared by
    all channels; ``D``, ``delta_bias`` (dim,). Leading dimensions broadcast, so scans that differ
    only in ``u`` and ``B`` (e.g. several scan orders over one ``delta``) share their decays.
    Computes in float32 and returns ``u``'s dtype and the broadcast shape (..., dim, L).
    """
    if not torch.jit.is_scripting():  # a static branch: TorchScript cannot compile the kernel's global
        if _fused_selective_scan is not None and u.is_cuda:
            return _fused(u, delta, A, B, C, D, delta_bias, delta_softplus)
    dtype = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(delta.unsqueeze(-2) * A.float().unsqueeze(-1))  # (..., dim, N, L)
    drive = (delta * u).unsqueeze(-2) * B.unsqueeze(-3)  # (..., dim, N, L)
    h = linear_recurrence(decay, drive)
    y = (h * C.unsqueeze(-3)).sum(-2)
    if D is not None:
        y = y + u * D.float()[:, None]
    return y.to(dtype)


def _fused(u, delta, A, B, C, D, delta_bias, delta_softplus) -> torch.Tensor:
    """The CUDA kernel takes one flat batch: broadcast the leading dimensions and fold them."""
    lead = torch.broadcast_shapes(u.shape[:-2], delta.shape[:-2], B.shape[:-2], C.shape[:-2])

    def fold(t: torch.Tensor) -> torch.Tensor:
        return t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:]).contiguous()

    y = _fused_selective_scan(
        fold(u), fold(delta), A.float(), fold(B), fold(C),
        None if D is None else D.float(), z=None,
        delta_bias=None if delta_bias is None else delta_bias.float(),
        delta_softplus=delta_softplus,
    )
    return y.view(*lead, *y.shape[-2:])
