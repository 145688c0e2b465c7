"""MobileViG: published size, official checkpoints against a from-the-keys reference, timm's API,
export to ONNX Runtime / OpenVINO, torch.compile and distilled training.

Outputs are compared with weights randomised away from init (``random_weights.randomize``): BN statistics at
0/1 and layer scales of 1e-5 would let a broken mapping or export agree with almost anything.
"""
from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import group_parameters
from timm.models._features_fx import FeatureGraphNet

from leanvit.catalog import CATALOG, get_facts
import leanvit.models.mobilevig as mvig
from leanvit.errors import LeanvitError
from leanvit.profile import count_macs, count_params
from drop_path import drop_prob, shared_rate
from random_weights import randomize, random_like

VARIANTS = [f.name for f in CATALOG.values() if f.family == 'MobileViG']
#: official constructor arguments (SLDGroup/MobileViG models/mobilevig.py), independent of ours
OFFICIAL = {
    'mobilevig_ti': dict(local_channels=(42, 84, 168), local_blocks=(2, 2, 6), global_channels=256, global_blocks=2, emb_dims=512),
    'mobilevig_s': dict(local_channels=(42, 84, 176), local_blocks=(3, 3, 9), global_channels=256, global_blocks=3, emb_dims=512),
    'mobilevig_m': dict(local_channels=(42, 84, 224), local_blocks=(3, 3, 9), global_channels=400, global_blocks=3, emb_dims=768),
    'mobilevig_b': dict(local_channels=(42, 84, 240), local_blocks=(5, 5, 15), global_channels=464, global_blocks=5, emb_dims=768),
}
#: a small MobileViG, in our and in the official constructor's terms
TINY = dict(embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 2), head_hidden_size=24, num_classes=10)
TINY_OFFICIAL = dict(local_channels=(8, 16, 24), local_blocks=(1, 2, 1), global_channels=32, global_blocks=2, emb_dims=24, num_classes=10)
slow = pytest.mark.slow


@torch.no_grad()
def _tiny(**kwargs) -> mvig.MobileViG:
    torch.manual_seed(0)
    return randomize(timm.create_model('mobilevig_ti', **{**TINY, **kwargs}).eval())


# --- the official model, written down independently from its constructor and forward ------------

def official_shapes(local_channels, local_blocks, global_channels, global_blocks, emb_dims, num_classes=1000):
    """Every (key, shape) of an official state dict, following the official module tree."""
    shapes = {}

    def conv(p, cin, cout, k=1, groups=1):
        shapes[f'{p}.weight'] = (cout, cin // groups, k, k)
        shapes[f'{p}.bias'] = (cout,)

    def bn(p, c):
        shapes.update({f'{p}.{n}': (c,) for n in ('weight', 'bias', 'running_mean', 'running_var')})
        shapes[f'{p}.num_batches_tracked'] = ()

    c0 = local_channels[0]
    conv('stem.stem.0', 3, c0 // 2, 3), bn('stem.stem.1', c0 // 2)
    conv('stem.stem.3', c0 // 2, c0, 3), bn('stem.stem.4', c0)
    i = 0
    for s, (c, n) in enumerate(zip(local_channels, local_blocks)):
        if s > 0:
            conv(f'local_backbone.{i}.conv.0', local_channels[s - 1], c, 3), bn(f'local_backbone.{i}.conv.1', c)
            i += 1
        for _ in range(n):
            p = f'local_backbone.{i}.mlp'
            conv(f'{p}.fc1', c, 4 * c), bn(f'{p}.norm1', 4 * c)
            conv(f'{p}.mid', 4 * c, 4 * c, 3, groups=4 * c), bn(f'{p}.mid_norm', 4 * c)
            conv(f'{p}.fc2', 4 * c, c), bn(f'{p}.norm2', c)
            shapes[f'local_backbone.{i}.layer_scale_2'] = (c, 1, 1)
            i += 1
    g = global_channels
    conv(f'local_backbone.{i}.conv.0', local_channels[-1], g, 3), bn(f'local_backbone.{i}.conv.1', g)
    for j in range(global_blocks):
        p = f'backbone.{j}'
        conv(f'{p}.0.fc1.0', g, g), bn(f'{p}.0.fc1.1', g)
        conv(f'{p}.0.graph_conv.nn.0', 2 * g, 2 * g), bn(f'{p}.0.graph_conv.nn.1', 2 * g)
        conv(f'{p}.0.fc2.0', 2 * g, g), bn(f'{p}.0.fc2.1', g)
        conv(f'{p}.1.fc1.0', g, 4 * g), bn(f'{p}.1.fc1.1', 4 * g)
        conv(f'{p}.1.fc2.0', 4 * g, g), bn(f'{p}.1.fc2.1', g)
    conv('prediction.1', g, emb_dims), bn('prediction.2', emb_dims)
    conv('head', emb_dims, num_classes), conv('dist_head', emb_dims, num_classes)
    return shapes


def official_state_dict(seed=0, **cfg):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.tensor(0) if k.endswith('num_batches_tracked') else random_like(k, s, g)
        for k, s in official_shapes(**cfg).items()
    }


def official_forward(sd: dict, x: torch.Tensor, K: int = 2) -> torch.Tensor:
    """The official MobileViG eval forward, functionally, straight from the official key names."""
    def conv(x, p, stride=1, groups=1):
        w = sd[f'{p}.weight']
        return F.conv2d(x, w, sd[f'{p}.bias'], stride, w.shape[-1] // 2, 1, groups)

    def bn(x, p):
        return F.batch_norm(x, sd[f'{p}.running_mean'], sd[f'{p}.running_var'], sd[f'{p}.weight'], sd[f'{p}.bias'], False, 0., 1e-5)

    x = F.gelu(bn(conv(x, 'stem.stem.0', 2), 'stem.stem.1'))
    x = F.gelu(bn(conv(x, 'stem.stem.3', 2), 'stem.stem.4'))
    i = 0
    while f'local_backbone.{i}.conv.0.weight' in sd or f'local_backbone.{i}.layer_scale_2' in sd:
        p = f'local_backbone.{i}'
        if f'{p}.conv.0.weight' in sd:
            x = bn(conv(x, f'{p}.conv.0', 2), f'{p}.conv.1')
        else:
            h = F.gelu(bn(conv(x, f'{p}.mlp.fc1'), f'{p}.mlp.norm1'))
            h = F.gelu(bn(conv(h, f'{p}.mlp.mid', groups=h.shape[1]), f'{p}.mlp.mid_norm'))
            x = x + sd[f'{p}.layer_scale_2'] * bn(conv(h, f'{p}.mlp.fc2'), f'{p}.mlp.norm2')
        i += 1
    j = 0
    while f'backbone.{j}.0.fc1.0.weight' in sd:
        p = f'backbone.{j}'
        h = bn(conv(x, f'{p}.0.fc1.0'), f'{p}.0.fc1.1')
        H, W = h.shape[-2:]
        rel = torch.zeros_like(h)  # max-relative over the tokens K, 2K, ... away, wrapping around
        for d in range(K, H, K):
            rel = torch.max(rel, h - h[:, :, (torch.arange(H) - d) % H])
        for d in range(K, W, K):
            rel = torch.max(rel, h - h[:, :, :, (torch.arange(W) - d) % W])
        h = F.gelu(bn(conv(torch.cat([h, rel], 1), f'{p}.0.graph_conv.nn.0'), f'{p}.0.graph_conv.nn.1'))
        x = x + bn(conv(h, f'{p}.0.fc2.0'), f'{p}.0.fc2.1')
        h = F.gelu(bn(conv(x, f'{p}.1.fc1.0'), f'{p}.1.fc1.1'))
        x = x + bn(conv(h, f'{p}.1.fc2.0'), f'{p}.1.fc2.1')
        j += 1
    x = F.gelu(bn(conv(x.mean((2, 3), keepdim=True), 'prediction.1'), 'prediction.2'))
    return ((conv(x, 'head') + conv(x, 'dist_head')) / 2).flatten(1)


# --- published size --------------------------------------------------------------------------

def _within(measured: float, published: float, rel: float) -> bool:
    """Within ``rel``, or equal once rounded to the digits the paper printed (0.662 -> '0.7')."""
    decimals = len(str(published).partition('.')[2])
    return abs(measured - published) <= rel * published or round(measured, decimals) == published


#: The paper's counter (util/profile.py) skips BatchNorm, so the small variants, where BN is a
#: larger share, exceed 1 % by the real count; by the paper's rule they match (next test).
_PAPER_SKIPS_BN = pytest.mark.xfail(strict=True, reason="paper's parameter counter leaves BatchNorm out")


@pytest.mark.parametrize('name', [
    pytest.param('mobilevig_ti', marks=_PAPER_SKIPS_BN),  # 5.27 M vs 5.2 M (+1.4 %)
    pytest.param('mobilevig_s', marks=_PAPER_SKIPS_BN),  # 7.28 M vs 7.2 M (+1.1 %)
    'mobilevig_m', 'mobilevig_b',
])
def test_params_within_1pct_of_paper(name):
    params_m = count_params(timm.create_model(name)) / 1e6
    assert abs(params_m - get_facts(name).params_m) <= 0.01 * get_facts(name).params_m, params_m


@pytest.mark.parametrize('name', VARIANTS)
def test_params_match_paper_by_its_counting_rule(name):
    """The official profiler counts conv weights plus in-channels per conv, and nothing else."""
    model = timm.create_model(name)
    rule = sum(m.weight.numel() + m.weight.shape[1] for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert _within(rule / 1e6, get_facts(name).params_m, 0.01), rule


@pytest.mark.parametrize('name', ['mobilevig_ti'] + [pytest.param(n, marks=slow) for n in VARIANTS[1:]])
def test_macs_match_paper(name):
    gmacs = count_macs(timm.create_model(name), (3, 224, 224)) / 1e9
    assert _within(gmacs, get_facts(name).gmacs, 0.05), gmacs


# --- official checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize('name', VARIANTS)
def test_official_keys_and_shapes_map_onto_ours(name):
    model = timm.create_model(name)
    official = {k: torch.empty(s) for k, s in official_shapes(**OFFICIAL[name]).items()}
    mapped = mvig.checkpoint_filter_fn(official, model)
    ours = model.state_dict()
    assert sorted(mapped) == sorted(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)


def test_official_checkpoint_loads_through_timm(tmp_path):
    """The evaluated 'state_dict' loads through timm's file source too, whose own loader would take the EMA."""
    sd = official_state_dict(**TINY_OFFICIAL)
    ema = official_state_dict(seed=1, **TINY_OFFICIAL)
    path = tmp_path / 'MobileViG_tiny.pth.tar'
    # as the official main.py saves it (the released files have both: its detection backbone reads the EMA)
    torch.save({'state_dict': sd, 'state_dict_ema': ema, 'epoch': 299, 'args': argparse.Namespace(model='mobilevig_ti')},
               path)
    model = timm.create_model(
        'mobilevig_ti', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **TINY).eval()
    direct = timm.create_model('mobilevig_ti', **TINY).eval()
    direct.load_state_dict(mvig.checkpoint_filter_fn({'model': sd}, direct))
    x = torch.randn(2, 3, 160, 224)  # a 5x7 global map: hops 2, 4 along H and 2, 4, 6 along W
    with torch.no_grad():
        out, ref = model(x), official_forward(sd, x)
        assert torch.equal(out, direct(x))
    assert ref.abs().max() > 1  # a live signal, not a network that has collapsed to its biases
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_checkpoint_filter_prefers_the_evaluated_weights_to_the_ema():
    """The official main.py saves both; its --eval, which gave the published top-1, loads 'state_dict'."""
    sd, ema = official_state_dict(**TINY_OFFICIAL), official_state_dict(seed=1, **TINY_OFFICIAL)
    model = timm.create_model('mobilevig_ti', **TINY)
    expected = mvig.checkpoint_filter_fn(sd, model)
    for checkpoint in ({'state_dict': sd, 'state_dict_ema': ema, 'epoch': 299}, {'model': sd, 'model_ema': ema}):
        mapped = mvig.checkpoint_filter_fn(checkpoint, model)
        assert all(torch.equal(mapped[k], v) for k, v in expected.items())
    mapped = mvig.checkpoint_filter_fn({'state_dict_ema': ema}, model)  # the EMA alone still loads
    assert torch.equal(mapped['head.weight'], mvig.checkpoint_filter_fn(ema, model)['head.weight'])


# --- timm's API ----------------------------------------------------------------------------------

def test_features_only_channels_and_reductions():
    model = timm.create_model('mobilevig_ti', features_only=True, **{k: v for k, v in TINY.items() if k != 'num_classes'})
    assert model.feature_info.channels() == list(TINY['embed_dims'])
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    outs = model(torch.randn(1, 3, 96, 64))
    assert [tuple(o.shape) for o in outs] == [(1, c, 96 // r, 64 // r) for c, r in zip(TINY['embed_dims'], (4, 8, 16, 32))]


def test_forward_intermediates_and_prune():
    model = _tiny()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == list(TINY['embed_dims'])
        assert [t.shape[-1] for t in inter] == [16, 8, 4, 2]
        only = model.forward_intermediates(x, indices=[1, 2], stop_early=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(only, inter[1:3]))
        assert model.prune_intermediate_layers([1, 2]) == [1, 2]
        assert len(model.stages) == 3 and model.num_features == TINY['embed_dims'][2]
        assert torch.equal(model(x), inter[2])  # head and pooling are gone


def test_fx_feature_extraction():
    """timm's FX feature extractor (features_only=True, feature_cls='fx') traces the model; the
    graph conv is a leaf, so the traced model still adapts its neighbours to the input size."""
    model = _tiny()
    fx_features = FeatureGraphNet(model, out_indices=(0, 1, 2, 3))
    with torch.no_grad():
        for size in ((96, 64), (64, 128)):
            x = torch.randn(1, 3, *size)
            for ours, ref in zip(fx_features(x), model.forward_intermediates(x, intermediates_only=True)):
                torch.testing.assert_close(ours, ref)
    assert timm.create_model('mobilevig_ti', features_only=True, feature_cls='fx', **TINY).feature_info.channels() \
        == list(TINY['embed_dims'])


def test_head_reset_and_pre_logits():
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        logits = model(x)
        assert torch.allclose(logits, (model.head(pre) + model.head_dist(pre)) / 2)
        model.reset_classifier(0)
        assert torch.equal(model(x), pre)
        model.reset_classifier(0, '')
        assert model(x).shape == (2, model.head_hidden_size, 2, 2)
        model.reset_classifier(5, 'avg')
        assert model(x).shape == (2, 5)
    assert model.no_weight_decay() == set()
    assert model.pretrained_cfg['classifier'] == ('head', 'head_dist')


def test_unsupported_global_pool_is_a_clear_error():
    with pytest.raises(LeanvitError, match="global_pool='avg' or ''"):
        timm.create_model('mobilevig_ti', global_pool='max')


def test_any_resolution_runs():
    """SVGA's graph follows the map size, so MobileViG is not tied to 224 (no InputSizeError)."""
    model = _tiny()
    with torch.no_grad():
        for hw in ((32, 32), (100, 76), (256, 192)):
            assert model(torch.randn(1, 3, *hw)).shape == (1, 10)


def test_distilled_training_forward_backward():
    model = _tiny(drop_path_rate=0.1).train()
    model.set_distilled_training(True)
    x = torch.randn(2, 3, 64, 64)
    out, out_dist = model(x)
    assert out.shape == out_dist.shape == (2, 10)
    (F.cross_entropy(out, torch.tensor([1, 2])) + F.cross_entropy(out_dist, torch.tensor([3, 4]))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (
        model.stem.conv1.conv.weight, model.stages[3].blocks[0].grapher.graph_conv.proj.conv.weight,
        model.head.weight, model.head_dist.weight))
    model.eval()
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(model(x), (model.head(pre) + model.head_dist(pre)) / 2)


# --- compile and export --------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    """Dynamo traces the whole network (no graph breaks); inductor itself runs in the slow test."""
    model = _tiny()
    x = torch.randn(2, 3, 96, 96)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@slow
@pytest.mark.parametrize('name', VARIANTS)
def test_torch_compile_inductor(name):
    torch.manual_seed(0)
    model = randomize(timm.create_model(name).eval())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-3)


def test_onnx_ort_openvino_smallest(check_engines):
    torch.manual_seed(0)
    check_engines(randomize(timm.create_model('mobilevig_ti').eval()), 160)


@slow
@pytest.mark.parametrize('name', VARIANTS)
def test_onnx_ort_openvino_all(name, check_engines):
    torch.manual_seed(0)
    check_engines(randomize(timm.create_model(name).eval()), 224)


# --- the official evaluation and from-scratch training setup -------------------------------------

@pytest.mark.parametrize('name', VARIANTS)
def test_eval_preprocessing_is_the_official_evaluations(name):
    """The official main.py --eval builds its val transform in util/datasets.py build_transform:
    Resize(int(224 / args.crop_pct), interpolation=3 (bicubic)), CenterCrop(224), Normalize with timm's
    IMAGENET_DEFAULT_MEAN / STD; --crop_pct defaults to 0.9 (main.py), as models/mobilevig.py's _cfg has it."""
    cfg = timm.models.get_pretrained_cfg(name)
    assert (cfg.crop_pct, cfg.crop_mode, cfg.interpolation, tuple(cfg.mean), tuple(cfg.std)) == (
        0.9, 'center', 'bicubic', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_drop_path_rates_rise_linearly_over_every_block_of_the_network():
    """Official MobileViG.__init__: dpr = linspace(0, drop_path, sum(local_blocks) + sum(global_blocks)),
    one rate per block in execution order; a global block's Grapher and FFN share theirs."""
    model = timm.create_model('mobilevig_ti', drop_path_rate=0.3, **TINY)
    n_blocks = sum(TINY_OFFICIAL['local_blocks']) + TINY_OFFICIAL['global_blocks']
    rates = []
    for stage in model.stages:
        for block in stage.blocks:
            if isinstance(block, mvig.SvgaBlock):
                rates.append(shared_rate(block.grapher.drop_path, block.ffn.drop_path))
            else:
                rates.append(drop_prob(block.drop_path))
    assert rates == pytest.approx(torch.linspace(0, 0.3, n_blocks).tolist())


def test_fresh_layer_scales_are_the_officials():
    """Official InvertedResidual: layer_scale_2 = 1e-5 * ones; the global (Grapher + FFN) blocks have none."""
    model = timm.create_model('mobilevig_ti', **TINY)
    local = [b for stage in model.stages[:-1] for b in stage.blocks]
    assert len(local) == sum(TINY_OFFICIAL['local_blocks'])
    for block in local:
        torch.testing.assert_close(block.ls.gamma, torch.full_like(block.ls.gamma, 1e-5), rtol=1e-6, atol=0)
    assert not [n for n, _ in model.stages[-1].named_parameters() if 'gamma' in n]


def test_fresh_convs_are_kaiming_normal_as_the_officials():
    """Official model_init: kaiming_normal_ (fan_in, gain sqrt(2): std sqrt(2 / fan_in)) on every conv, zero bias
    (the heads are 1x1 convs there, Linear here). Not timm's usual trunc_normal(std=.02)."""
    torch.manual_seed(0)
    model = timm.create_model('mobilevig_ti', **TINY)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    normalised = []
    for m in layers:
        fan_in = m.weight[0].numel()
        normalised.append((m.weight / (2 / fan_in) ** 0.5).flatten())
        assert m.bias is None or not m.bias.any()
        if m.weight.numel() >= 500:  # enough draws for the layer's own std to be within 15 %
            assert 0.85 < m.weight.std().item() / (2 / fan_in) ** 0.5 < 1.15
    pooled = torch.cat(normalised)
    assert pooled.numel() > 10_000 and abs(pooled.std().item() - 1) < 0.03 and abs(pooled.mean().item()) < 0.03
    assert pooled.abs().max() > 3  # a normal, not truncated at 2 std


def test_hop_is_svgas_k():
    """hop=K links every token to those K, 2K, ... away: the official forward with K=3 (a 6x5 map: hop 3 along
    each side) is what a hop=3 model computes; K=2 would add no neighbour along H's 2 and 4."""
    sd = official_state_dict(**TINY_OFFICIAL)
    model = timm.create_model('mobilevig_ti', hop=3, **TINY).eval()
    model.load_state_dict(mvig.checkpoint_filter_fn(sd, model))
    x = torch.randn(1, 3, 192, 160)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(sd, x, K=3), rtol=1e-4, atol=1e-4)


def test_mlp_ratio_widens_the_local_and_the_global_blocks():
    model = timm.create_model('mobilevig_ti', mlp_ratio=2, **TINY)
    widths = [(b.fc1.conv.out_channels if isinstance(b, mvig.InvertedResidual) else b.ffn.fc1.conv.out_channels,
               2 * dim) for s, dim in zip(model.stages, TINY['embed_dims']) for b in s.blocks]
    assert all(w == expected for w, expected in widths), widths


def test_unpooled_head_scores_every_position():
    """global_pool='': the head conv and both classifiers (1x1 convs in the official model) score each position of
    the final map, rows and columns kept in place (a 3x2 map from a 96x64 input)."""
    model = _tiny()
    model.reset_classifier(5, '')
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        out = model(x)
        hidden = model.conv_head(model.forward_features(x))
        expected = sum(F.conv2d(hidden, h.weight[..., None, None], h.bias) for h in (model.head, model.head_dist)) / 2
    assert out.shape == (2, 5, 3, 2)
    torch.testing.assert_close(out, expected)
    with pytest.raises(LeanvitError, match="global_pool='avg' or ''"):
        model.reset_classifier(5, 'max')


def test_head_dropout_follows_the_head_conv():
    """Official prediction = (pool, conv, BN, GELU, Dropout), then the classifiers: drop_rate=1 zeroes the
    pre-logits in training (the logits are then the classifiers' mean bias), and nothing in eval."""
    model = _tiny(drop_rate=1.0).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not model.forward_head(model.forward_features(x), pre_logits=True).any()
        torch.testing.assert_close(model(x), ((model.head.bias + model.head_dist.bias) / 2).expand(2, -1))
        assert model.eval().forward_head(model.forward_features(x), pre_logits=True).abs().min() > 0


def test_stop_early_returns_the_last_stage_asked_for():
    model = _tiny()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert final.shape == (1, TINY['embed_dims'][1], 12, 8) and torch.equal(final, inter[0])


def test_prune_keeping_every_stage_drops_the_head_and_a_new_one_fits():
    model = _tiny()
    x = torch.randn(1, 3, 96, 64)
    assert model.prune_intermediate_layers(4) == [0, 1, 2, 3]
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.equal(model(x), features)  # no head conv, no pooling, no classifier
        assert model.num_features == model.head_hidden_size == TINY['embed_dims'][-1]
        model.reset_classifier(3, 'avg')
        pooled = features.mean((2, 3))
        torch.testing.assert_close(model(x), (model.head(pooled) + model.head_dist(pooled)) / 2)


def test_drop_path_of_one_drops_every_residual_branch():
    """In training, a block whose drop-path rate is 1 is the identity: each residual branch goes through it."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 5)
    for block in (mvig.InvertedResidual(8, drop_path=1.), mvig.SvgaBlock(8, drop_path=1.)):
        randomize(block).train()
        assert torch.equal(block(x), x), type(block).__name__
        assert not torch.allclose(block.eval()(x), x)


def test_grad_checkpointing_recomputes_the_blocks_in_backward(check_grad_checkpointing):
    check_grad_checkpointing(_tiny, torch.randn(2, 3, 64, 64), lambda model: [s.blocks[0] for s in model.stages])


def test_layer_decay_groups_follow_the_blocks():
    """group_matcher (timm's layer-wise LR decay): the stem first, each block its own group, a stage's
    downsample with its first block, the head conv with the last block, the classifiers last."""
    model = timm.create_model('mobilevig_ti', **TINY)
    groups = group_parameters(model, model.group_matcher(), reverse=True)
    n_blocks = sum(TINY['depths'])
    assert groups['stem.conv1.conv.weight'] == 0 and groups['head.weight'] == groups['head_dist.bias'] == n_blocks + 1
    first_of_stage_1 = 1 + TINY['depths'][0]
    assert groups['stages.1.downsample.conv.weight'] == groups['stages.1.blocks.0.fc1.conv.weight'] == first_of_stage_1
    assert groups['conv_head.conv.weight'] == groups['stages.3.blocks.1.ffn.fc2.conv.weight'] == n_blocks
    assert len(set(groups.values())) == n_blocks + 2
