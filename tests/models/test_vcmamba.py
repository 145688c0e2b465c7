"""VCMamba: the scan against a sequential reference, the official scan orders and checkpoint names,
official checkpoints against a from-the-keys reference of the official forward, the official init,
drop-path schedule and eval preprocessing, the published sizes, export to ONNX Runtime / OpenVINO,
torch.compile and timm's model API."""
from __future__ import annotations

import importlib
import math
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import group_parameters
from timm.models._features_fx import FeatureGraphNet

from leanvit.catalog import CATALOG, get_facts
from leanvit.deploy import check_agreement, export_onnx, get_engine
from leanvit.errors import InputSizeError
from leanvit.models.layers import linear_recurrence, selective_scan
from leanvit.models.vcmamba import PlainMamba2d, VCMambaBlock, checkpoint_filter_fn, snake_scan_orders
from leanvit.profile import count_macs, count_params
from drop_path import drop_prob, shared_rate
from random_weights import random_like

#: A tiny VCMamba with every part of the real one: a 3x3 token grid (odd, so the scan pads at
#: several levels of its reduction), two FFN blocks then two Mamba blocks in the last stage.
TINY = dict(embed_dims=(16, 16, 32, 48), depths=(1, 1, 1, 4), num_mamba=2, img_size=96)



def tiny(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('vcmamba_s', **{**TINY, **kwargs}).eval()


def randomize_(model: nn.Module) -> nn.Module:
    """Weights far from their init (layer scales ~1, BN statistics off 0/1), so that a misplaced
    tensor or a skipped branch changes the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith('running_var'):
                t.uniform_(0.5, 1.5)
            elif name.endswith('ls2.gamma'):
                t.uniform_(0.2, 1.0)
            else:
                t.add_(0.1 * torch.randn_like(t))
    return model


# --- the selective scan --------------------------------------------------------------------------

def sequential_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """The SSM recurrence one token at a time, in float64 (mamba_ssm's reference semantics)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(*u.shape[:-1], A.shape[-1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[..., t, None] * A) * h + (delta[..., t] * u[..., t])[..., None] * B[..., None, :, t]
        ys.append((h * C[..., None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    return y if D is None else y + u * D.double()[:, None]


def realistic_inputs(batch: int, dim: int, d_state: int, length: int, seed: int = 0):
    """Magnitudes of a trained Mamba: dt from 1e-3 up to a few units, A from -1 to -64, so decays
    exp(dt * A) span 1 - 1e-3 down to exp(-300) (underflow in float32)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, length, generator=g)
    delta = 3 * torch.randn(batch, dim, length, generator=g)
    dt_bias = torch.log(torch.expm1(torch.logspace(-3, -1, dim)))  # softplus(dt_bias) in [1e-3, 0.1]
    A = -torch.logspace(0, 6, d_state, base=2.0).repeat(dim, 1)
    B = torch.randn(batch, d_state, length, generator=g)
    C = torch.randn(batch, d_state, length, generator=g)
    D = torch.randn(dim, generator=g)
    return u, delta, A, B, C, D, dt_bias


@pytest.mark.parametrize('length', [1, 2, 7, 49, 196])
def test_linear_recurrence_matches_sequential(length):
    g = torch.Generator().manual_seed(length)
    a, b = torch.rand(3, 5, length, generator=g), torch.randn(3, 5, length, generator=g)
    expected, h = [], torch.zeros(3, 5, dtype=torch.float64)
    for t in range(length):
        h = a[..., t].double() * h + b[..., t].double()
        expected.append(h)
    torch.testing.assert_close(linear_recurrence(a, b), torch.stack(expected, -1).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('length', [49, 196])
def test_selective_scan_matches_sequential_at_realistic_magnitudes(length):
    u, delta, A, B, C, D, dt_bias = realistic_inputs(2, 24, 16, length)
    y = selective_scan(u, delta, A, B, C, D, delta_bias=dt_bias, delta_softplus=True)
    assert torch.isfinite(y).all()
    expected = sequential_scan(u, delta, A, B, C, D, delta_bias=dt_bias, delta_softplus=True)
    torch.testing.assert_close(y, expected.float(), rtol=1e-4, atol=1e-5)


def test_selective_scan_gradients_match_sequential():
    inputs = [t.double().requires_grad_() for t in realistic_inputs(1, 6, 4, 49)]
    expected_y = sequential_scan(*inputs[:6], delta_bias=inputs[6], delta_softplus=True)
    expected = torch.autograd.grad(expected_y.square().sum(), inputs)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    y = selective_scan(*inputs32[:6], delta_bias=inputs32[6], delta_softplus=True)
    grads = torch.autograd.grad(y.square().sum(), inputs32)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want.float(), rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_selective_scan_computes_bf16_inputs_in_float32_and_returns_bf16():
    """Mixed precision (bench's eager bf16, autocast training) hands the scan bf16 tensors: a bf16 recurrence over 49
    steps drifts, so it computes in float32 and gives back the input's dtype."""
    u, delta, A, B, C, D, _ = (t.bfloat16().float() for t in realistic_inputs(1, 6, 4, 49))
    expected = selective_scan(u, delta, A, B, C, D, delta_softplus=True)
    y = selective_scan(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), D, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.bfloat16().float(), rtol=0, atol=0)


def test_selective_scan_broadcasts_shared_decays():
    """Four scans sharing delta and C in one call equal four separate scans."""
    u, delta, A, B, C, D, dt_bias = realistic_inputs(2, 8, 4, 49)
    us = torch.stack([u, u.flip(-1), u.roll(3, -1), 2 * u], dim=1)
    Bs = torch.stack([B, B + 1, B.flip(-1), -B], dim=1)
    y = selective_scan(us, delta.unsqueeze(1), A, Bs, C.unsqueeze(1), D, delta_bias=dt_bias, delta_softplus=True)
    for k in range(4):
        expected = selective_scan(us[:, k], delta, A, Bs[:, k], C, D, delta_bias=dt_bias, delta_softplus=True)
        torch.testing.assert_close(y[:, k], expected)


def test_fused_kernel_gets_flat_batches_and_cpu_tensors_stay_on_the_pytorch_path(monkeypatch):
    """On CUDA the scan calls mamba_ssm's selective_scan_fn, which takes one flat batch ((batch, dim, L) u and delta,
    (batch, N, L) B and C), float32 A / D / delta_bias and applies the softplus itself: the wrapper must broadcast the
    four scans' shared delta and C, fold the leading dimensions, pass D, delta_bias and delta_softplus on, and unfold
    the result. No GPU here: a stand-in kernel with that signature (the sequential reference) checks what it gets;
    and CPU tensors never reach it (the real kernel is CUDA-only), mamba_ssm installed or not."""
    scan_module = importlib.import_module('leanvit.models.layers.selective_scan')
    calls = []

    def kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        assert u.dim() == delta.dim() == B.dim() == C.dim() == 3
        assert all(t.is_contiguous() for t in (u, delta, B, C)) and z is None and A.dtype == torch.float32
        assert u.shape == delta.shape and B.shape == C.shape and B.shape[0] == u.shape[0]
        calls.append(tuple(u.shape))
        return sequential_scan(u, delta, A, B, C, D, delta_bias, delta_softplus).float()

    monkeypatch.setattr(scan_module, '_fused_selective_scan', kernel)
    u, delta, A, B, C, D, dt_bias = realistic_inputs(2, 8, 4, 49)
    us = torch.stack([u, u.flip(-1), u.roll(3, -1), 2 * u], dim=1)  # (2, 4, 8, 49): four scans of one delta and C
    Bs = torch.stack([B, B + 1, B.flip(-1), -B], dim=1)
    args = (us, delta.unsqueeze(1), A, Bs, C.unsqueeze(1))
    expected = selective_scan(*args, D, delta_bias=dt_bias, delta_softplus=True)
    assert calls == []  # CPU tensors: the PyTorch path
    torch.testing.assert_close(scan_module._fused(*args, D, dt_bias, True), expected, rtol=1e-4, atol=1e-5)
    assert calls == [(8, 8, 49)]
    args = (us, delta.abs().unsqueeze(1), A, Bs, C.unsqueeze(1))  # no softplus: dt >= 0 for decays <= 1
    torch.testing.assert_close(scan_module._fused(*args, None, None, False), selective_scan(*args),
                               rtol=1e-4, atol=1e-5)


# --- scan orders and the Mamba mixer -------------------------------------------------------------

def test_snake_scan_orders_match_the_official_loops():
    # Worked out by hand from PlainMamba2D.get_permute_order (official model/plain_mamba_layer.py):
    # raster indices visited, and the move into each token (0 start, 1 right, 2 left, 3 up, 4 down).
    orders, directions = snake_scan_orders(2, 3)
    assert orders.tolist() == [[0, 1, 2, 5, 4, 3], [3, 4, 5, 2, 1, 0], [0, 3, 4, 1, 2, 5], [5, 2, 1, 4, 3, 0]]
    assert directions.tolist() == [[0, 1, 1, 4, 2, 2], [0, 1, 1, 3, 2, 2], [0, 4, 1, 3, 1, 4], [0, 3, 2, 4, 2, 3]]
    orders, directions = snake_scan_orders(3, 2)
    assert orders.tolist() == [[0, 1, 3, 2, 4, 5], [5, 4, 2, 3, 1, 0], [0, 2, 4, 5, 3, 1], [1, 3, 5, 4, 2, 0]]
    assert directions.tolist() == [[0, 1, 4, 2, 4, 1], [0, 2, 3, 1, 3, 2], [0, 4, 4, 1, 3, 3], [0, 4, 4, 2, 3, 3]]


def test_mixer_matches_the_official_formulation():
    """One scan per order with explicit permutations, as the official forward does: only the
    scanned input is permuted (dt, B, C stay in raster order) and dt_proj's bias counts twice."""
    torch.manual_seed(0)
    height, width = 3, 4
    mixer = randomize_(PlainMamba2d(8, (height, width), d_state=4)).eval()
    x = torch.randn(2, 8, height, width)
    with torch.no_grad():
        xc = mixer.act(mixer.conv_dw(mixer.in_proj(x))).flatten(2).transpose(1, 2)  # (B, L, E)
        dt, B, C = mixer.x_proj(xc).split([mixer.dt_rank, 4, 4], dim=-1)
        dt, B, C = mixer.dt_proj(dt).transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)
        y = 0
        for order, direction in zip(*snake_scan_orders(height, width)):
            y_scan = sequential_scan(
                xc[:, order].transpose(1, 2), dt, -torch.exp(mixer.A_log), B + mixer.direction_Bs[direction].t(), C,
                mixer.D, delta_bias=mixer.dt_proj.bias, delta_softplus=True,
            )
            y = y + y_scan[..., order.argsort()]
        y = F.relu(mixer.norm(y.float().transpose(1, 2)))
        expected = mixer.out_proj(y.transpose(1, 2).reshape(2, -1, height, width))
        torch.testing.assert_close(mixer(x), expected, rtol=1e-4, atol=1e-5)


# --- published sizes ----------------------------------------------------------------------------

def norm_flops(model: nn.Module, input_size: tuple) -> int:
    """FLOPs fvcore adds for norms in eval mode: 2 per BatchNorm output element, 5 per LayerNorm."""
    total = 0

    def hook(module, args, out):
        nonlocal total
        total += out.numel() * (2 if isinstance(module, nn.BatchNorm2d) else 5)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]
    with torch.no_grad():
        model(torch.zeros(1, *input_size))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize('name', [f.name for f in CATALOG.values() if f.family == 'VCMamba'])
def test_param_count_matches_readme(name):
    params = count_params(timm.create_model(name))
    assert abs(params / (get_facts(name).params_m * 1e6) - 1) <= 0.01


_S_MACS_NOTE = (
    "The README's 1.1 G for VCMamba-S is fvcore's count, which includes BatchNorm: its convs and "
    "linears alone are 1.04 G (-5.3 %); test_macs_reproduce_readme_count checks the 1.1."
)


@pytest.mark.parametrize('name', [
    pytest.param('vcmamba_s', marks=pytest.mark.xfail(strict=True, reason=_S_MACS_NOTE)),
    pytest.param('vcmamba_m', marks=pytest.mark.slow),
    pytest.param('vcmamba_b', marks=pytest.mark.slow),
])
def test_macs_match_readme(name):
    macs = count_macs(timm.create_model(name), (3, 224, 224))
    assert abs(macs / (get_facts(name).gmacs * 1e9) - 1) <= 0.05


@pytest.mark.parametrize('name', [
    'vcmamba_s', pytest.param('vcmamba_m', marks=pytest.mark.slow), pytest.param('vcmamba_b', marks=pytest.mark.slow),
])
def test_macs_reproduce_readme_count(name):
    """The README counts with fvcore (matmuls and convs, plus norms), to one decimal."""
    model = timm.create_model(name).eval()
    total = count_macs(model, (3, 224, 224)) + norm_flops(model, (3, 224, 224))
    assert round(total / 1e9, 1) == get_facts(name).gmacs


# --- official checkpoints -----------------------------------------------------------------------

def official_state_dict(model: nn.Module) -> dict:
    """``model``'s weights under the official names, from the official constructor (model/mambacnn.py
    and model/plain_mamba_layer.py): ``patch_embed`` is the stem Sequential, ``network`` alternates
    stages (FFN then PlainMambaLayer blocks) and Embedding downsamples, ``pos_embed`` is top-level."""
    sd = {}

    def put(prefix: str, module: nn.Module):
        sd.update({f'{prefix}.{k}': v for k, v in module.state_dict().items()})

    put('patch_embed.0', model.stem.conv1.conv)
    put('patch_embed.1', model.stem.conv1.bn)
    put('patch_embed.3', model.stem.conv2.conv)
    put('patch_embed.4', model.stem.conv2.bn)
    for s, stage in enumerate(model.stages):
        if s > 0:
            put(f'network.{2 * s - 1}.proj', stage.downsample.conv.conv)
            put(f'network.{2 * s - 1}.norm', stage.downsample.conv.bn)
        blocks = list(stage.blocks) + list(stage.mamba_blocks or [])
        for j, block in enumerate(blocks):
            p = f'network.{2 * s}.{j}'
            for official, ours in [('fc1', 'fc1.conv'), ('norm1', 'fc1.bn'), ('mid', 'mid.conv'),
                                   ('mid_norm', 'mid.bn'), ('fc2', 'fc2.conv'), ('norm2', 'fc2.bn')]:
                put(f'{p}.mlp.{official}', block.mlp.get_submodule(ours))
            if isinstance(block, VCMambaBlock):
                put(f'{p}.norm', block.norm1)
                put(f'{p}.norm2', block.norm2)
                mamba = block.mamba
                for official, ours in [('in_conv.0', mamba.in_proj.conv), ('in_conv.1', mamba.in_proj.bn),
                                       ('conv2d', mamba.conv_dw), ('x_proj', mamba.x_proj), ('dt_proj', mamba.dt_proj),
                                       ('norm', mamba.norm), ('out_conv.1', mamba.out_proj.conv),
                                       ('out_conv.2', mamba.out_proj.bn)]:
                    put(f'{p}.mamba.{official}', ours)
                for name in ('A_log', 'D', 'direction_Bs'):
                    sd[f'{p}.mamba.{name}'] = getattr(mamba, name).detach()
            else:
                sd[f'{p}.layer_scale_2'] = block.ls2.gamma.detach().reshape(-1, 1, 1)
    sd['pos_embed'] = model.stages[-1].pos_embed.detach()
    put('norm', model.norm)
    put('head', model.head)
    put('dist_head', model.head_dist)
    return {k: v.clone() for k, v in sd.items()}


# The official model written down independently of ours, from Wertyuui345/VCMamba at f8795a0:
# model/mambacnn.py (EfficientFormer, FFN, Mlp, Embedding, stem) and model/plain_mamba_layer.py
# (PlainMambaLayer, PlainMamba2D).

#: official constructor arguments (EfficientFormer_width / EfficientFormer_depth, vit_num), independent of ours
OFFICIAL = {
    'vcmamba_s': dict(widths=(32, 64, 144, 288), layers=(4, 4, 12, 8), vit_num=4),  # 'S2', 'S2'
    'vcmamba_m': dict(widths=(48, 96, 224, 448), layers=(4, 4, 12, 6), vit_num=4),  # 'l1', 'l3'
    'vcmamba_b': dict(widths=(64, 128, 320, 512), layers=(4, 4, 12, 6), vit_num=4),  # 'l3', 'l3'
}
#: TINY in the official constructor's terms
TINY_OFFICIAL = dict(widths=(16, 16, 32, 48), layers=(1, 1, 1, 4), vit_num=2)


def official_grid(img_size: int) -> int:
    """The token grid the official network produces: the stem's two and the three Embeddings' 3x3
    stride-2 pad-1 convs, by torch.nn.Conv2d's output-size formula. At 224 it is the official
    ``num_patches = resolution // 2 ** (sum(downsamples) + 1)`` = 7 (mambacnn.py line 409)."""
    for _ in range(5):
        img_size = math.floor((img_size + 2 * 1 - 3) / 2) + 1
    return img_size


def official_shapes(widths, layers, vit_num, grid=7, num_classes=1000, d_state=16, expand=2):
    """Every (key, shape) of an official state dict, following the official module tree; ``grid`` is the token
    grid's side, or its (height, width) for a non-square one (which the official constructors do not build)."""
    shapes = {}

    def conv(p, cin, cout, k=1, groups=1, bias=True):
        shapes[f'{p}.weight'] = (cout, cin // groups, k, k)
        if bias:
            shapes[f'{p}.bias'] = (cout,)

    def bn(p, c):
        shapes.update({f'{p}.{n}': (c,) for n in ('weight', 'bias', 'running_mean', 'running_var')})
        shapes[f'{p}.num_batches_tracked'] = ()

    def mlp(p, c):  # Mlp(mid_conv=True)
        conv(f'{p}.fc1', c, 4 * c), conv(f'{p}.fc2', 4 * c, c), conv(f'{p}.mid', 4 * c, 4 * c, 3, groups=4 * c)
        bn(f'{p}.mid_norm', 4 * c), bn(f'{p}.norm1', 4 * c), bn(f'{p}.norm2', c)

    conv('patch_embed.0', 3, widths[0] // 2, 3), bn('patch_embed.1', widths[0] // 2)
    conv('patch_embed.3', widths[0] // 2, widths[0], 3), bn('patch_embed.4', widths[0])
    for i, (c, n) in enumerate(zip(widths, layers)):
        for j in range(n):
            p = f'network.{2 * i}.{j}'
            if i == 3 and n - j <= vit_num:  # PlainMambaLayer
                e, rank = expand * c, math.ceil(c / 16)
                bn(f'{p}.norm', c), bn(f'{p}.norm2', c)
                conv(f'{p}.mamba.in_conv.0', c, e), bn(f'{p}.mamba.in_conv.1', e)
                conv(f'{p}.mamba.conv2d', e, e, 7, groups=e)
                shapes[f'{p}.mamba.x_proj.weight'] = (rank + 2 * d_state, e)
                shapes[f'{p}.mamba.dt_proj.weight'], shapes[f'{p}.mamba.dt_proj.bias'] = (e, rank), (e,)
                shapes[f'{p}.mamba.A_log'], shapes[f'{p}.mamba.D'] = (e, d_state), (e,)
                shapes[f'{p}.mamba.norm.weight'] = shapes[f'{p}.mamba.norm.bias'] = (e,)
                conv(f'{p}.mamba.out_conv.1', e, c), bn(f'{p}.mamba.out_conv.2', c)
                shapes[f'{p}.mamba.direction_Bs'] = (5, d_state)
            else:  # FFN
                shapes[f'{p}.layer_scale_2'] = (c, 1, 1)
            mlp(f'{p}.mlp', c)
        if i < 3:
            conv(f'network.{2 * i + 1}.proj', c, widths[i + 1], 3), bn(f'network.{2 * i + 1}.norm', widths[i + 1])
    shapes['pos_embed'] = (1, widths[3], *(grid if isinstance(grid, tuple) else (grid, grid)))
    shapes['norm.weight'] = shapes['norm.bias'] = (widths[3],)
    for head in ('head', 'dist_head'):
        shapes[f'{head}.weight'], shapes[f'{head}.bias'] = (num_classes, widths[3]), (num_classes,)
    return shapes


def random_official_state_dict(seed=0, **cfg) -> dict:
    """Random official weights (``random_weights.random_like``: BN statistics, norm scales and layer scales
    away from init); A_log near its S4D-real value so the four scans decay at different rates."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_shapes(**cfg).items():
        if k.endswith('num_batches_tracked'):
            sd[k] = torch.tensor(0)
        elif k.endswith('A_log'):
            sd[k] = torch.log(torch.arange(1., shape[1] + 1)).repeat(shape[0], 1) + 0.2 * torch.randn(shape, generator=g)
        else:
            sd[k] = random_like(k, shape, g)
    return sd


def official_permute_orders(H: int, W: int):
    """PlainMamba2D.get_permute_order (plain_mamba_layer.py lines 148-297), loop for loop: the four
    snake orders, their inverses and the move into each token ([start, right, left, up, down])."""

    def by_rows(i, j, j_d, di, vertical):  # o1 (down the rows) and o2 (up the rows)
        o, d = [], []
        while 0 <= i < H:
            o.append(i * W + j)
            if j_d == 'right' and j < W - 1:
                j, move = j + 1, 1
            elif j_d == 'left' and j > 0:
                j, move = j - 1, 2
            else:
                i, move, j_d = i + di, vertical, 'left' if j_d == 'right' else 'right'
            d.append(move)
        return o, [0] + d[:-1]

    def by_cols(i, j, i_d, dj, horizontal):  # o3 (rightwards over the columns) and o4 (leftwards)
        o, d = [], []
        while 0 <= j < W:
            o.append(i * W + j)
            if i_d == 'down' and i < H - 1:
                i, move = i + 1, 4
            elif i_d == 'up' and i > 0:
                i, move = i - 1, 3
            else:
                j, move, i_d = j + dj, horizontal, 'up' if i_d == 'down' else 'down'
            d.append(move)
        return o, [0] + d[:-1]

    scans = [
        by_rows(0, 0, 'right', 1, 4),
        by_rows(H - 1, W - 1, 'left', -1, 3) if H % 2 == 1 else by_rows(H - 1, 0, 'right', -1, 3),
        by_cols(0, 0, 'down', 1, 1),
        by_cols(H - 1, W - 1, 'up', -1, 2) if W % 2 == 1 else by_cols(0, W - 1, 'down', -1, 2),
    ]
    orders = [o for o, _ in scans]
    inverses = [[o.index(idx) for idx in range(H * W)] for o in orders]
    return orders, inverses, [d for _, d in scans]


def official_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The official VCMamba eval forward (EfficientFormer.forward with if_abs_pos_embed=True and the
    distillation head), functionally and in float64, straight from the official key names."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    x = x.double()

    def conv(x, p, stride=1, groups=1):
        w = sd[f'{p}.weight']
        return F.conv2d(x, w, sd.get(f'{p}.bias'), stride, w.shape[-1] // 2, 1, groups)

    def bn(x, p):  # nn.BatchNorm2d's default eps
        return F.batch_norm(x, sd[f'{p}.running_mean'], sd[f'{p}.running_var'], sd[f'{p}.weight'], sd[f'{p}.bias'],
                            False, 0., 1e-5)

    def mlp(x, p):  # Mlp(mid_conv=True, act_layer=nn.GELU): fc1, norm1, act, mid, mid_norm, act, fc2, norm2
        h = F.gelu(bn(conv(x, f'{p}.fc1'), f'{p}.norm1'))
        h = F.gelu(bn(conv(h, f'{p}.mid', groups=h.shape[1]), f'{p}.mid_norm'))
        return bn(conv(h, f'{p}.fc2'), f'{p}.norm2')

    def plain_mamba_2d(x, p):  # PlainMamba2D.forward (no stride conv, no layer scale)
        batch, _, H, W = x.shape
        x = bn(conv(x, f'{p}.in_conv.0'), f'{p}.in_conv.1')
        E = x.shape[1]
        x_conv = F.silu(conv(x, f'{p}.conv2d', groups=E)).flatten(2).transpose(1, 2)  # (B, L, E)
        A, D = -torch.exp(sd[f'{p}.A_log']), sd[f'{p}.D']
        N, rank = A.shape[1], sd[f'{p}.dt_proj.weight'].shape[1]
        dt, B, C = torch.split(F.linear(x_conv, sd[f'{p}.x_proj.weight']), [rank, N, N], dim=-1)
        dt = F.linear(dt, sd[f'{p}.dt_proj.weight'], sd[f'{p}.dt_proj.bias']).permute(0, 2, 1)  # (B, E, L)
        B, C = B.permute(0, 2, 1), C.permute(0, 2, 1)  # (B, N, L), in raster order for every scan
        y = 0
        for o, inv_o, d in zip(*official_permute_orders(H, W)):
            dB = sd[f'{p}.direction_Bs'][list(d)].t()  # (N, L)
            y_o = sequential_scan(x_conv[:, o, :].permute(0, 2, 1), dt, A, B + dB, C, D,
                                  delta_bias=sd[f'{p}.dt_proj.bias'], delta_softplus=True)
            y = y + y_o.permute(0, 2, 1)[:, inv_o, :]
        out = F.layer_norm(y, (E,), sd[f'{p}.norm.weight'], sd[f'{p}.norm.bias'], 1e-5)
        out = out.transpose(1, 2).unflatten(2, (H, W))
        return bn(conv(F.relu(out), f'{p}.out_conv.1'), f'{p}.out_conv.2')  # out_conv: ReLU, conv, BN

    x = F.relu(bn(conv(x, 'patch_embed.0', 2), 'patch_embed.1'))
    x = F.relu(bn(conv(x, 'patch_embed.3', 2), 'patch_embed.4'))
    idx = 0
    while True:
        j, mamba_started = 0, False
        while f'network.{idx}.{j}.mlp.fc1.weight' in sd:
            p = f'network.{idx}.{j}'
            if f'{p}.mamba.A_log' in sd:  # PlainMambaLayer; the position embedding before the first one
                if not mamba_started:
                    x, mamba_started = x + sd['pos_embed'], True
                x = x + plain_mamba_2d(bn(x, f'{p}.norm'), f'{p}.mamba')
                x = x + mlp(bn(x, f'{p}.norm2'), f'{p}.mlp')
            else:  # FFN: layer-scaled MLP, no norm before it
                x = x + sd[f'{p}.layer_scale_2'] * mlp(x, f'{p}.mlp')
            j += 1
        if f'network.{idx + 1}.proj.weight' not in sd:
            break
        x = bn(conv(x, f'network.{idx + 1}.proj', 2), f'network.{idx + 1}.norm')  # Embedding
        idx += 2
    tokens = x.flatten(2).transpose(1, 2)
    tokens = F.layer_norm(tokens, (tokens.shape[-1],), sd['norm.weight'], sd['norm.bias'], 1e-5)  # nn.LayerNorm
    pooled = tokens.mean(-2)
    out = (F.linear(pooled, sd['head.weight'], sd['head.bias'])
           + F.linear(pooled, sd['dist_head.weight'], sd['dist_head.bias'])) / 2
    return out.float()


def test_official_permute_orders_port_matches_the_hand_worked_orders():
    """The port of the official loops gives the orders worked out by hand (test above)."""
    orders, inverses, directions = official_permute_orders(2, 3)
    assert orders == [[0, 1, 2, 5, 4, 3], [3, 4, 5, 2, 1, 0], [0, 3, 4, 1, 2, 5], [5, 2, 1, 4, 3, 0]]
    assert directions == [[0, 1, 1, 4, 2, 2], [0, 1, 1, 3, 2, 2], [0, 4, 1, 3, 1, 4], [0, 3, 2, 4, 2, 3]]
    assert all([o[i] for i in inv] == list(range(6)) for o, inv in zip(orders, inverses))


@pytest.mark.parametrize('name', [f.name for f in CATALOG.values() if f.family == 'VCMamba'])
def test_official_keys_and_shapes_map_onto_ours(name):
    model = timm.create_model(name)
    official = {k: torch.empty(s) for k, s in official_shapes(**OFFICIAL[name]).items()}
    mapped = checkpoint_filter_fn({'model': official}, model)
    ours = model.state_dict()
    assert sorted(mapped) == sorted(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)


def test_official_checkpoint_loads_through_timm(tmp_path):
    """Random official weights, saved as the official main.py saves them, load through timm's file source
    and compute what the official forward (written from the official code, above) computes."""
    # names the official constructor gives VCMamba-S (depths 4, 4, 12, 8; the last 4 blocks Mamba)
    names = official_shapes(**OFFICIAL['vcmamba_s'])
    for key in ['patch_embed.4.running_var', 'network.5.proj.weight', 'network.6.3.layer_scale_2',
                'network.6.4.norm.weight', 'network.6.7.norm2.weight', 'network.6.4.mamba.in_conv.1.weight',
                'network.6.7.mamba.out_conv.2.running_mean', 'network.6.5.mamba.direction_Bs',
                'network.4.11.mlp.mid_norm.bias', 'pos_embed', 'norm.weight', 'dist_head.bias']:
        assert key in names, key

    sd = random_official_state_dict(**OFFICIAL['vcmamba_s'], grid=official_grid(64))
    ema = random_official_state_dict(seed=1, **OFFICIAL['vcmamba_s'], grid=official_grid(64))
    path = tmp_path / 'VCMamba-S.pth'
    torch.save({'model': sd, 'model_ema': ema, 'epoch': 299}, path)  # the layout of the official main.py
    model = timm.create_model(
        'vcmamba_s', img_size=64, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, ref = model(x), official_forward(sd, x)
    assert ref.abs().max() > 1 and (ref[0] - ref[1]).abs().max() > 0.2  # a live signal that depends on the image
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# 3x3 and 4x4 token grids (100 is no multiple of 32), and 3x4: rows and columns of different lengths
@pytest.mark.parametrize('img_size', [96, 100, (96, 128)])
def test_tiny_official_weights_compute_the_official_forward(img_size):
    """Two FFN blocks then two Mamba blocks in the last stage; odd and even grids (the snake scans' ends), and a
    non-square one, where a grid built, or a scan run, with height and width swapped shows (on a square grid it
    cannot). The official constructors build square maps only; non-square sizes are this implementation's extension,
    run here through the official forward, whose scan orders take any height and width."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    grid = (official_grid(height), official_grid(width))
    sd = random_official_state_dict(**TINY_OFFICIAL, grid=grid, num_classes=100)
    model = timm.create_model('vcmamba_s', **{**TINY, 'img_size': img_size, 'num_classes': 100}).eval()
    model.load_state_dict(checkpoint_filter_fn({'model': sd}, model))
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, ref = model(x), official_forward(sd, x)
    assert ref.abs().max() > 1 and (ref[0] - ref[1]).abs().max() > 0.2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_image_size_not_a_multiple_of_32_runs():
    """At 100x100 the stride-2 convs give 50, 25, 13, 7, 4: the position embedding and the scans are 4x4.
    (The official constructors fix resolution=224; their num_patches = resolution // 32 would be 3 here and
    not fit the 4x4 map, so other sizes are this implementation's extension, checked against the official
    forward at 100 above.)"""
    model = timm.create_model('vcmamba_s', img_size=100).eval()
    assert model.stages[-1].pos_embed.shape == (1, 288, official_grid(100), official_grid(100)) == (1, 288, 4, 4)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 100, 100)).shape == (1, 1000)
    assert timm.create_model('vcmamba_s').stages[-1].pos_embed.shape == (1, 288, 7, 7)  # the official 224 // 32


# --- what the outputs cannot show: the official init, norms, drop-path schedule, preprocessing ---

def test_norm_eps_are_the_officials():
    """Every norm is a default nn.BatchNorm2d / nn.LayerNorm in the official code: eps 1e-5 (the final
    norm, mambacnn.py line 452 with norm_layer=nn.LayerNorm; PlainMamba2D.norm, plain_mamba_layer.py line 134)."""
    model = tiny()
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]
    assert len([m for m in norms if isinstance(m, nn.LayerNorm)]) == 3  # the final norm and two mixers'
    assert all(m.eps == 1e-5 for m in norms), {type(m).__name__: m.eps for m in norms if m.eps != 1e-5}
    assert model.norm.eps == 1e-5


def test_init_values_are_the_officials():
    """The values the official constructors set (and that EfficientFormer.cls_init_weights leaves):
    FFN layer scales 1e-5 (layer_scale_init_value, mambacnn.py lines 280, 377); S4D-real A = -(1..N) and
    D = 1 (plain_mamba_layer.py lines 121-131); every Linear, dt_proj included, truncated normal std 0.02
    with a zero bias (cls_init_weights, mambacnn.py lines 462, 477-481, overrides PlainMamba2D's dt init:
    it does not check _no_reinit); the position embedding and direction_Bs truncated normal std 0.02;
    norms at identity."""
    torch.manual_seed(0)
    model = timm.create_model('vcmamba_s')
    stage = model.stages[-1]
    for block in [b for s in model.stages for b in s.blocks]:
        assert torch.equal(block.ls2.gamma, torch.full_like(block.ls2.gamma, 1e-5))
    assert len(stage.mamba_blocks) == 4
    for block in stage.mamba_blocks:
        mamba = block.mamba
        assert torch.equal(mamba.A_log, torch.log(torch.arange(1., 17.)).repeat(576, 1))
        assert torch.equal(mamba.D, torch.ones(576))
        assert torch.equal(mamba.dt_proj.bias, torch.zeros(576))
        for w in (mamba.dt_proj.weight, mamba.x_proj.weight):
            assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
        assert mamba.direction_Bs.shape == (5, 16) and 0.01 < mamba.direction_Bs.std().item() < 0.03
        assert torch.equal(mamba.norm.weight, torch.ones(576)) and torch.equal(mamba.norm.bias, torch.zeros(576))
    assert abs(stage.pos_embed.std().item() - 0.02) < 0.001 and abs(stage.pos_embed.mean().item()) < 0.001
    for head in (model.head, model.head_dist):
        assert abs(head.weight.std().item() - 0.02) < 0.001 and torch.equal(head.bias, torch.zeros(1000))
    assert torch.equal(model.norm.weight, torch.ones(288)) and torch.equal(model.norm.bias, torch.zeros(288))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    # the MLPs' 1x1 convs truncated normal std 0.02, zero bias, before their depthwise mid conv exists (Mlp,
    # mambacnn.py lines 230, 240-244; plain_mamba_layer.py 410, 420-424): mid keeps PyTorch's default; the stem
    # LeCun normal (std sqrt(1 / fan_in)), zero bias (segm_init_weights, lines 97-106, applied at 465)
    mlps = [b.mlp for s in model.stages for b in s.blocks] + [b.mlp for b in stage.mamba_blocks]
    for mlp in mlps:
        for conv in (mlp.fc1.conv, mlp.fc2.conv):
            assert abs(conv.weight.std().item() - 0.02) < 0.002
            assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
        assert mlp.mid.conv.bias.abs().sum() > 0
    for conv in (model.stem.conv1.conv, model.stem.conv2.conv):
        fan_in = conv.weight[0].numel()
        assert abs(conv.weight.std().item() / fan_in ** -0.5 - 1) < 0.15
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))


def official_drop_path_rates(drop_path_rate: float, layers) -> list:
    """meta_blocks (mambacnn.py lines 335-337): rate * (block_idx + sum(layers[:index])) / (sum(layers) - 1),
    one rate per block in execution order, the Mamba blocks' (both branches) included."""
    return [drop_path_rate * (j + sum(layers[:i])) / (sum(layers) - 1) for i in range(len(layers)) for j in range(layers[i])]


@pytest.mark.parametrize('name, kwargs', [
    ('vcmamba_s', {}),  # the official VCMamba-S recipe: --drop-path 0.2 (model/scripts/vcmamba-eff-s-multi.sh)
    ('vcmamba_s', dict(TINY, drop_path_rate=0.3)),
])
def test_drop_path_rates_follow_the_official_rule(name, kwargs):
    model = timm.create_model(name, **kwargs)
    layers = kwargs.get('depths', OFFICIAL[name]['layers'])
    rate = kwargs.get('drop_path_rate', 0.2)
    rates = []
    for stage in model.stages:
        for block in stage.blocks:
            assert block.drop_path1 is None
            rates.append(drop_prob(block.drop_path2))
        for block in stage.mamba_blocks or []:
            rates.append(shared_rate(block.drop_path1, block.drop_path2))
    assert rates == pytest.approx(official_drop_path_rates(rate, layers), abs=1e-6)


@pytest.mark.parametrize('name', [f.name for f in CATALOG.values() if f.family == 'VCMamba'])
def test_eval_preprocessing_is_the_officials(name):
    """main.py --eval's val transform (model/datasets.py build_transform): Resize(int(224 / 0.875) = 256,
    bicubic), CenterCrop(224), ToTensor, Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)."""
    cfg = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
    assert cfg['mean'] == pytest.approx((0.485, 0.456, 0.406)) and cfg['std'] == pytest.approx((0.229, 0.224, 0.225))
    assert cfg['input_size'] == (3, 224, 224)
    resize, crop, _, normalize = timm.data.create_transform(**cfg).transforms
    assert resize.size == 256 and resize.interpolation.value == 'bicubic'
    assert tuple(crop.size) == (224, 224)
    assert normalize.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert normalize.std.tolist() == pytest.approx([0.229, 0.224, 0.225])


def test_official_checkpoint_file_loads_the_evaluated_weights_as_the_hub_does(tmp_path):
    """timm's file loader takes 'model_ema' before the filter sees the file; the hub source passes the whole
    checkpoint, and the filter takes 'model'. Both sources must load the same weights of one file."""
    model = randomize_(tiny())
    official = official_state_dict(model)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in official.items()}
    path = tmp_path / 'VCMamba-S.pth'
    torch.save({'model': official, 'model_ema': ema, 'epoch': 299}, path)  # the official main.py's layout
    via_file = timm.create_model('vcmamba_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    via_dict = timm.create_model(
        'vcmamba_s', pretrained=True, pretrained_cfg_overlay=dict(state_dict=torch.load(path)), **TINY)
    for loaded in (via_file, via_dict):
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize('name', [f.name for f in CATALOG.values() if f.family == 'VCMamba'])
def test_eval_crop_is_the_official_evaluations(name):
    """The README's top-1 comes from main.py --resume W --eval, whose val transform resizes to
    input_size / --eval-crop-ratio (default 0.875, not changed by any script) and center-crops."""
    cfg = timm.models.get_pretrained_cfg(name)
    assert (cfg.crop_pct, cfg.crop_mode, cfg.interpolation) == (0.875, 'center', 'bicubic')


@pytest.mark.parametrize('wrapper', ['model', 'state_dict', 'state_dict_ema', 'model_ema', None])
def test_checkpoint_filter_unwraps_and_renames(wrapper):
    model = randomize_(tiny())
    official = official_state_dict(model)
    mapped = checkpoint_filter_fn({wrapper: official, 'epoch': 3} if wrapper else official, tiny())
    ours = model.state_dict()
    assert mapped.keys() == ours.keys()
    for k, v in ours.items():
        assert torch.equal(mapped[k], v), k


def test_checkpoint_filter_prefers_the_evaluated_weights_to_the_ema():
    """The official main.py saves both; its --eval, which gave the published top-1, loads 'model'."""
    model = randomize_(tiny())
    official = official_state_dict(model)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in official.items()}
    for checkpoint in ({'model': official, 'model_ema': ema, 'epoch': 299}, {'state_dict': official, 'state_dict_ema': ema}):
        mapped = checkpoint_filter_fn(checkpoint, tiny())
        assert all(torch.equal(mapped[k], v) for k, v in model.state_dict().items())
    mapped = checkpoint_filter_fn({'model_ema': ema}, tiny())  # the EMA alone still loads
    assert torch.equal(mapped['norm.weight'], model.norm.weight + 1)


# --- export and compile -------------------------------------------------------------------------

def _export_checked(model: nn.Module, example: torch.Tensor, path) -> None:
    """Export with dynamic batch through torch.export (no silent fallback to TorchScript)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        export_onnx(model, example, path, dynamic_batch=True)
    assert not [w for w in caught if 'TorchScript exporter' in str(w.message)], [str(w.message) for w in caught]


def _check_engines(model: nn.Module, onnx_path, size: int, batches=(1, 3)) -> None:
    inputs = [torch.randn(b, 3, size, size) for b in batches]
    for runner in (get_engine('onnxruntime', threads=1).load_onnx(onnx_path),
                   get_engine('openvino', threads=1).load_model_file(onnx_path)):
        agreement = check_agreement(model, runner, inputs)
        assert agreement.max_abs_err <= 1e-3 and agreement.top1_agreement == 1.0, agreement


def test_tiny_exports_and_runs_on_onnxruntime_and_openvino(tmp_path):
    model = randomize_(tiny())
    path = tmp_path / 'vcmamba.onnx'
    _export_checked(model, torch.randn(1, 3, 96, 96), path)
    _check_engines(model, path, 96)


@pytest.mark.slow
@pytest.mark.parametrize('name', [f.name for f in CATALOG.values() if f.family == 'VCMamba'])
def test_variant_exports_and_runs_on_onnxruntime_and_openvino(name, tmp_path):
    model = timm.create_model(name).eval()
    example = torch.randn(1, 3, 224, 224)
    _export_checked(model, example, tmp_path / 'dynamic.onnx')
    _check_engines(model, tmp_path / 'dynamic.onnx', 224, batches=(1, 2))
    for engine in ('onnxruntime', 'openvino'):  # batch-1 static export, through the engines' cache
        runner = get_engine(engine, threads=2).load(model, example, cache_dir=tmp_path)
        agreement = check_agreement(model, runner, [example])
        assert agreement.max_abs_err <= 1e-3 and agreement.top1_agreement == 1.0, (engine, agreement)


def test_tiny_compiles_without_graph_breaks():
    model = randomize_(tiny())
    x = torch.randn(2, 3, 96, 96)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize('name', [f.name for f in CATALOG.values() if f.family == 'VCMamba'])
def test_variant_compiles_with_inductor(name):
    torch._dynamo.reset()
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)


# --- training and the timm model API ------------------------------------------------------------

def test_distilled_training_forward_backward():
    model = tiny(drop_path_rate=0.1).train()
    model.set_distilled_training(True)
    out, out_dist = model(torch.randn(2, 3, 96, 96))
    assert out.shape == out_dist.shape == (2, 1000)
    (F.cross_entropy(out, torch.tensor([1, 2])) + F.cross_entropy(out_dist, torch.tensor([3, 4]))).backward()
    mamba = model.stages[-1].mamba_blocks[0].mamba
    for p in (mamba.A_log, mamba.D, mamba.direction_Bs, mamba.dt_proj.bias, model.stages[-1].pos_embed, model.stem.conv1.conv.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_eval_averages_the_two_heads():
    model = randomize_(tiny())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        pooled = model.forward_features(x).mean((2, 3))
        torch.testing.assert_close(model(x), (model.head(pooled) + model.head_dist(pooled)) / 2)
        model.set_distilled_training(True)  # only changes training mode
        torch.testing.assert_close(model(x), (model.head(pooled) + model.head_dist(pooled)) / 2)


def test_features_only_channels_reductions_and_shapes():
    model = timm.create_model('vcmamba_s', features_only=True, **TINY).eval()
    assert model.feature_info.channels() == [16, 16, 32, 48]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    features = model(torch.randn(2, 3, 96, 96))
    assert [tuple(f.shape) for f in features] == [(2, 16, 24, 24), (2, 16, 12, 12), (2, 32, 6, 6), (2, 48, 3, 3)]
    model = timm.create_model('vcmamba_s', features_only=True, out_indices=(1, 3), **TINY).eval()
    assert [f.shape[1] for f in model(torch.randn(1, 3, 96, 96))] == [16, 48]


def test_forward_intermediates_and_prune():
    model = randomize_(tiny())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [tuple(t.shape) for t in intermediates] == [(2, 16, 24, 24), (2, 16, 12, 12), (2, 32, 6, 6), (2, 48, 3, 3)]
        last = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(last[0], final)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], intermediates[1])
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.stages) == 2 and model.num_features == 16
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[1], intermediates[1])


@pytest.mark.filterwarnings('ignore:NOTE. The nodes obtained by tracing:UserWarning')  # drop path in training
def test_fx_feature_extraction_keeps_the_size_check():
    """timm's FX feature extractor (features_only=True, feature_cls='fx') traces the model (the
    Mamba mixer is a leaf); the size check is a leaf call, so the traced model still refuses other sizes."""
    model = randomize_(tiny())
    fx_features = FeatureGraphNet(model, out_indices=(0, 1, 2, 3))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        for ours, ref in zip(fx_features(x), model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(ours, ref)
        with pytest.raises(InputSizeError, match='96x96'):
            fx_features(torch.randn(1, 3, 64, 64))


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
def test_torchscript_matches_eager():
    """timm's test_model_forward_torchscript: the model (scan included) scripts and agrees."""
    model = randomize_(tiny())
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_reset_classifier_gives_pooled_features():
    model = tiny()
    model.reset_classifier(0)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, model.num_features) == (2, 48)
        torch.testing.assert_close(out, model.forward_head(model.forward_features(x), pre_logits=True))
    model.reset_classifier(10)
    assert model(x).shape == (2, 10)


def test_no_weight_decay_lists_ssm_parameters_and_position_embedding():
    model = tiny()
    skip = model.no_weight_decay()
    expected = {'stages.3.pos_embed'} | {
        f'stages.3.mamba_blocks.{i}.mamba.{n}' for i in range(2) for n in ('A_log', 'D', 'direction_Bs')
    }
    assert skip == expected


def test_fine_groups_follow_execution_order_one_per_block():
    """Layer-wise LR decay ranks parameters by these groups: each block gets its own, in the order
    the blocks run (the Mamba blocks after the stage's FFN blocks, the position embedding with the
    first Mamba block it feeds, each downsample with its stage's first block, as timm does)."""
    model = tiny()
    group_of = {}
    for gid, names in group_parameters(model, model.group_matcher(), reverse=False).items():
        group_of.update(dict.fromkeys(names, gid))
    execution = ['stem'] + [
        f'stages.{i}.{kind}.{j}'
        for i, stage in enumerate(model.stages)
        for kind in ('blocks', 'mamba_blocks') if getattr(stage, kind) is not None
        for j in range(len(getattr(stage, kind)))
    ]
    groups = []
    for prefix in execution:
        ids = {g for n, g in group_of.items() if n.startswith(prefix + '.')}
        assert len(ids) == 1, (prefix, ids)
        groups.append(ids.pop())
    assert groups == sorted(set(groups)), list(zip(execution, groups))  # strictly increasing
    assert group_of['norm.weight'] == groups[-1]  # timm's MATCH_PREV_GROUP: with the last block
    assert group_of['stages.3.pos_embed'] == groups[execution.index('stages.3.mamba_blocks.0')]
    for i in (1, 2, 3):
        assert group_of[f'stages.{i}.downsample.conv.conv.weight'] == groups[execution.index(f'stages.{i}.blocks.0')]
    assert set(group_parameters(model, model.group_matcher(coarse=True))) == set(range(len(model.stages) + 2))


def test_meta_device_model_materialises_with_its_scan_orders(check_meta_materialises):
    """The scan orders are not in the state dict: timm's reinit_non_persistent_buffers recomputes them."""
    check_meta_materialises('vcmamba_s', randomize_(tiny()), (1, 3, 96, 96), **TINY)


def test_wrong_input_size_names_the_expected_one():
    model = tiny()
    with pytest.raises(InputSizeError, match='96x96'):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(InputSizeError, match='96x96'):
        model.forward_intermediates(torch.randn(1, 3, 96, 128))
    assert timm.create_model('vcmamba_s').pretrained_cfg['fixed_input_size']


def test_official_checkpoint_loads_without_the_distillation_head():
    """distillation=False has no head_dist: the official file's dist_head weights are dropped, not an error."""
    model = randomize_(tiny())
    official = official_state_dict(model)
    plain = timm.create_model('vcmamba_s', distillation=False, **TINY)
    plain.load_state_dict(checkpoint_filter_fn({'model': official}, plain))
    plain.load_state_dict(checkpoint_filter_fn(model.state_dict(), plain))  # this implementation's names too
    assert torch.equal(plain.head.weight, model.head.weight)
