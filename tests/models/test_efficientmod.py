"""EfficientMod: published size, official checkpoints against a from-the-keys reference, timm's API,
export to ONNX Runtime / OpenVINO, torch.compile and training.

Outputs are compared with weights randomised away from init (``random_weights.randomize``): layer scales of 1e-4
make every modulation block nearly the identity, which would let a broken mapping or export agree
with almost anything.
"""
from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import group_parameters

from leanvit.catalog import CATALOG, get_facts
import leanvit.models.efficientmod as emod
from leanvit.errors import LeanvitError
from leanvit.profile import count_macs, count_params
from drop_path import drop_prob, shared_rate
from random_weights import randomize, random_like

VARIANTS = [f.name for f in CATALOG.values() if f.family == 'EfficientMod']
#: official constructor arguments (ma-xu/EfficientMod models/EfficientMod.py); per-block MLP
#: ratios there are explicit lists, alternating 1 and r from the start of every stage
OFFICIAL = {
    'efficientmod_xxs': dict(dims=(32, 64, 128, 256), depths=(2, 2, 6, 2), attn=(0, 0, 1, 2), r=6, att_ratio=(0, 0, 4, 4)),
    'efficientmod_xs': dict(dims=(32, 64, 144, 288), depths=(3, 3, 4, 2), attn=(0, 0, 3, 3), r=4, att_ratio=(4, 4, 4, 4)),
    'efficientmod_s': dict(dims=(32, 64, 144, 312), depths=(4, 4, 8, 4), attn=(0, 0, 4, 4), r=6, att_ratio=(4, 4, 4, 5)),
    'efficientmod_s_conv': dict(dims=(40, 80, 160, 344), depths=(4, 4, 12, 8), attn=(0, 0, 0, 0), r=6, att_ratio=(4, 4, 4, 4)),
}
#: a small EfficientMod, in our and in the official constructor's terms (stage 1 and 2 have both
#: r = 1 and r = 3 blocks; stages 3 and 4 have attention blocks with different MLP ratios)
TINY = dict(
    embed_dims=(8, 16, 24, 40), depths=(2, 2, 1, 1), attn_depths=(0, 0, 1, 2), mlp_ratios=(1, 3),
    attn_mlp_ratios=(4, 4, 2, 3), num_classes=10,
)
TINY_OFFICIAL = dict(dims=(8, 16, 24, 40), depths=(2, 2, 1, 1), attn=(0, 0, 1, 2), r=3, att_ratio=(4, 4, 2, 3), num_classes=10)
slow = pytest.mark.slow


@torch.no_grad()
def _tiny(**kwargs) -> emod.EfficientMod:
    torch.manual_seed(0)
    return randomize(timm.create_model('efficientmod_xxs', **{**TINY, **kwargs}).eval())


# --- the official model, written down independently from its constructor and forward ------------

def official_shapes(dims, depths, attn, r, att_ratio, num_classes=1000, heads=8):
    """Every (key, shape) of an official state dict, following the official module tree."""
    shapes = {}

    def lin(p, cin, cout, bias=True):
        shapes[f'{p}.weight'] = (cout, cin)
        if bias:
            shapes[f'{p}.bias'] = (cout,)

    def conv(p, cin, cout, k, groups=1):
        shapes[f'{p}.weight'] = (cout, cin // groups, k, k)
        shapes[f'{p}.bias'] = (cout,)

    def ln(p, c):
        shapes[f'{p}.weight'] = shapes[f'{p}.bias'] = (c,)

    conv('patch_embed.proj', 3, dims[0], 7), ln('patch_embed.norm', dims[0])
    for s, d in enumerate(dims):
        for j in range(depths[s]):
            p, ratio = f'layers.{s}.blocks.{j}', (1, r)[j % 2]
            ln(f'{p}.norm', d)
            lin(f'{p}.mlp.fc1', d, d * ratio), lin(f'{p}.mlp.fc2', d * ratio, d)
            lin(f'{p}.mlp.context_layer.f', d, d), lin(f'{p}.mlp.context_layer.g', d, d)
            conv(f'{p}.mlp.context_layer.context_list.0', d, d, 7, groups=d)
            shapes[f'{p}.gamma_1'] = (d,)
        for j in range(attn[s]):
            p, inner = f'layers.{s}.blocks.{depths[s] + j}', heads * max(d // heads, 32)
            ln(f'{p}.norm1', d), ln(f'{p}.norm2', d)
            lin(f'{p}.attn.qkv', d, 3 * inner, bias=False), lin(f'{p}.attn.proj', inner, d)
            lin(f'{p}.mlp.fc1', d, d * att_ratio[s]), lin(f'{p}.mlp.fc2', d * att_ratio[s], d)
        if s < len(dims) - 1:
            conv(f'layers.{s}.downsample.proj', d, dims[s + 1], 3), ln(f'layers.{s}.downsample.norm', dims[s + 1])
    ln('norm', dims[-1]), lin('head', dims[-1], num_classes)
    return shapes


def official_state_dict(seed=0, **cfg):
    g = torch.Generator().manual_seed(seed)
    return {k: random_like(k, s, g) for k, s in official_shapes(**cfg).items()}


def official_forward(sd: dict, x: torch.Tensor, heads: int = 8) -> torch.Tensor:
    """The official EfficientMod forward, functionally, straight from the official key names."""
    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[f'{p}.weight'], sd[f'{p}.bias'], 1e-5)

    def lin(x, p):
        return F.linear(x, sd[f'{p}.weight'], sd.get(f'{p}.bias'))

    def conv_nhwc(x, p, stride=1, groups=1):  # NHWC in and out, as the official code permutes
        w = sd[f'{p}.weight']
        return F.conv2d(x.permute(0, 3, 1, 2), w, sd[f'{p}.bias'], stride, w.shape[-1] // 2, 1, groups).permute(0, 2, 3, 1)

    x = ln(F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], 4, 3).permute(0, 2, 3, 1), 'patch_embed.norm')
    s = 0
    while f'layers.{s}.blocks.0.norm.weight' in sd:
        j = 0
        while f'layers.{s}.blocks.{j}.norm.weight' in sd or f'layers.{s}.blocks.{j}.norm1.weight' in sd:
            p = f'layers.{s}.blocks.{j}'
            if f'{p}.norm.weight' in sd:  # modulation block
                h = ln(x, f'{p}.norm')
                ctx = lin(h, f'{p}.mlp.context_layer.f')
                ctx = lin(F.gelu(conv_nhwc(ctx, f'{p}.mlp.context_layer.context_list.0', groups=ctx.shape[-1])), f'{p}.mlp.context_layer.g')
                h = lin(h, f'{p}.mlp.fc1')
                ratio = h.shape[-1] // x.shape[-1]
                if ratio > 1:
                    h = F.gelu(h)
                x = x + sd[f'{p}.gamma_1'] * lin(h * ctx.repeat(1, 1, 1, ratio), f'{p}.mlp.fc2')
            else:  # attention block on the flattened map
                B, H, W, C = x.shape
                t = x.reshape(B, H * W, C)
                q, k, v = lin(ln(t, f'{p}.norm1'), f'{p}.attn.qkv').reshape(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)
                attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
                t = t + lin((attn @ v).transpose(1, 2).reshape(B, H * W, -1), f'{p}.attn.proj')
                t = t + lin(F.gelu(lin(ln(t, f'{p}.norm2'), f'{p}.mlp.fc1')), f'{p}.mlp.fc2')
                x = t.reshape(B, H, W, C)
            j += 1
        if f'layers.{s}.downsample.proj.weight' in sd:
            x = ln(conv_nhwc(x, f'layers.{s}.downsample.proj', 2), f'layers.{s}.downsample.norm')
        s += 1
    return lin(ln(x, 'norm').mean((1, 2)), 'head')


# --- published size --------------------------------------------------------------------------

@pytest.mark.parametrize('name', VARIANTS)
def test_params_within_1pct_of_paper(name):
    params_m = count_params(timm.create_model(name)) / 1e6
    assert abs(params_m - get_facts(name).params_m) <= 0.01 * get_facts(name).params_m, params_m


@pytest.mark.parametrize('name', ['efficientmod_xxs'] + [pytest.param(n, marks=slow) for n in VARIANTS[1:]])
def test_macs_within_5pct_of_paper(name):
    gmacs = count_macs(timm.create_model(name), (3, 224, 224)) / 1e9
    assert abs(gmacs - get_facts(name).gmacs) <= 0.05 * get_facts(name).gmacs, gmacs


# --- official checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize('name', VARIANTS)
def test_official_keys_and_shapes_map_onto_ours(name):
    model = timm.create_model(name)
    official = {k: torch.empty(s) for k, s in official_shapes(**OFFICIAL[name]).items()}
    mapped = emod.checkpoint_filter_fn(official, model)
    ours = model.state_dict()
    assert sorted(mapped) == sorted(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)


def test_official_checkpoint_loads_through_timm(tmp_path):
    sd = official_state_dict(**TINY_OFFICIAL)
    ema = official_state_dict(seed=1, **TINY_OFFICIAL)
    path = tmp_path / 'efficientMod_tiny.pth.tar'
    torch.save({'state_dict': sd, 'state_dict_ema': ema, 'epoch': 299}, path)  # as the official CheckpointSaver
    model = timm.create_model(
        'efficientmod_xxs', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **TINY).eval()
    direct = timm.create_model('efficientmod_xxs', **TINY).eval()
    direct.load_state_dict(emod.checkpoint_filter_fn({'model': sd}, direct))
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        out, ref = model(x), official_forward(sd, x)
        assert torch.equal(out, direct(x))
    assert ref.abs().max() > 1  # a live signal, not a network that has collapsed to its biases
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_official_checkpoint_every_route_loads_the_evaluated_weights(tmp_path, check_every_route_loads):
    """The official validate.py (``--checkpoint``, ``--use-ema`` off) evaluates 'state_dict', not the
    'state_dict_ema' saved beside it: timm's file and hub sources, the filter, load_weights and the CLI's
    --checkpoint (model_from_checkpoint) must all load 'state_dict' (timm's file loader would take the EMA)."""
    live, ema = official_state_dict(**TINY_OFFICIAL), official_state_dict(seed=1, **TINY_OFFICIAL)
    ckpt = {'epoch': 299, 'arch': 'efficientMod_xxs', 'state_dict': live, 'optimizer': {}, 'version': 2,
            'args': argparse.Namespace(model='efficientMod_xxs'), 'state_dict_ema': ema, 'metric': 77.1}
    path = tmp_path / 'model_best.pth.tar'
    torch.save(ckpt, path)
    expected = emod.checkpoint_filter_fn(live, _tiny())
    assert any(not torch.equal(v, emod.checkpoint_filter_fn(ema, _tiny())[k]) for k, v in expected.items())

    check_every_route_loads('efficientmod_xxs', path, emod.checkpoint_filter_fn, expected, 'state_dict', **TINY)


# --- timm's API ----------------------------------------------------------------------------------

def test_features_only_channels_and_reductions():
    model = timm.create_model('efficientmod_xxs', features_only=True, **{k: v for k, v in TINY.items() if k != 'num_classes'})
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
        assert model.output_fmt == 'NHWC' and final.shape == (1, 3, 2, TINY['embed_dims'][-1])
        assert [tuple(t.shape[1:]) for t in inter] == [(8, 24, 16), (16, 12, 8), (24, 6, 4), (40, 3, 2)]
        normed = model.forward_intermediates(x, indices=1, norm=True, output_fmt='NHWC', intermediates_only=True)
        assert torch.equal(normed[0], final)
        only = model.forward_intermediates(x, indices=[1, 2], stop_early=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(only, inter[1:3]))
        assert model.prune_intermediate_layers([1, 2]) == [1, 2]
        assert len(model.stages) == 3 and model.num_features == TINY['embed_dims'][2]
        assert torch.equal(model(x).permute(0, 3, 1, 2), inter[2])  # norm, pooling and head are gone


def test_head_reset_and_pre_logits():
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre.shape == (2, model.num_features) and model.head_hidden_size == model.num_features
        torch.testing.assert_close(model(x), model.head(pre))
        model.reset_classifier(0)
        assert torch.equal(model(x), pre)
        model.reset_classifier(0, '')
        assert model(x).shape == (2, 2, 2, model.num_features)
        model.reset_classifier(5, 'avg')
        assert model(x).shape == (2, 5)
    assert model.no_weight_decay() == set()


def test_unsupported_global_pool_is_a_clear_error():
    with pytest.raises(LeanvitError, match="global_pool='avg' or ''"):
        timm.create_model('efficientmod_xxs', global_pool='max')


def test_any_resolution_runs():
    """Convs and position-free attention: EfficientMod is not tied to 224 (no InputSizeError)."""
    model = _tiny()
    with torch.no_grad():
        for hw in ((32, 32), (100, 76), (256, 192)):
            assert model(torch.randn(1, 3, *hw)).shape == (1, 10)


def test_training_forward_backward():
    """No distillation head: the README's checkpoints were soft-distilled into the one head."""
    model = _tiny(drop_path_rate=0.1).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    stage3 = model.stages[3].blocks
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (
        model.stem.conv.weight, model.stages[1].blocks[1].mlp.context.conv.weight, stage3[1].attn.qkv.weight,
        model.head.weight))


# --- compile and export --------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    """Dynamo traces the whole network (no graph breaks); inductor itself runs in the slow test."""
    model = _tiny()
    x = torch.randn(2, 3, 96, 96)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
def test_torchscript_matches_eager():
    """timm's test_model_forward_torchscript: the model scripts, and the scripted one agrees."""
    model = _tiny()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


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
    check_engines(randomize(timm.create_model('efficientmod_xxs').eval()), 128)


@slow
@pytest.mark.parametrize('name', VARIANTS)
def test_onnx_ort_openvino_all(name, check_engines):
    torch.manual_seed(0)
    check_engines(randomize(timm.create_model(name).eval()), 224)


# --- the official evaluation and from-scratch training setup -------------------------------------

@pytest.mark.parametrize('name', VARIANTS)
def test_eval_preprocessing_is_the_official_evaluations(name):
    """The README's top-1 comes from validate.py --checkpoint W (timm==0.6.13): --crop-pct and --interpolation
    default to None / '' and the official models register no default_cfg, so timm 0.6.13's resolve_data_config
    gives its defaults: crop_pct DEFAULT_CROP_PCT 0.875, 'bicubic', IMAGENET_DEFAULT_MEAN / STD, centre crop."""
    cfg = timm.models.get_pretrained_cfg(name)
    assert (cfg.crop_pct, cfg.crop_mode, cfg.interpolation, tuple(cfg.mean), tuple(cfg.std)) == (
        0.875, 'center', 'bicubic', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_drop_path_rates_rise_linearly_over_every_block_of_the_network():
    """Official EfficientMod.__init__: dpr = linspace(0, drop_path_rate, sum(depths) + sum(attention_depth)),
    sliced per stage in execution order (a stage's modulation blocks, then its attention blocks)."""
    model = timm.create_model('efficientmod_xxs', drop_path_rate=0.3, **TINY)
    n_blocks = sum(TINY_OFFICIAL['depths']) + sum(TINY_OFFICIAL['attn'])
    rates = []
    for stage in model.stages:
        for block in stage.blocks:
            if isinstance(block, emod.AttentionBlock):
                rates.append(shared_rate(block.drop_path1, block.drop_path2))
            else:
                rates.append(drop_prob(block.drop_path))
    assert rates == pytest.approx(torch.linspace(0, 0.3, n_blocks).tolist())


def test_fresh_layer_scales_are_the_officials():
    """Official efficientMod_* use use_layerscale=True, layerscale_value=1e-4 (gamma_1 of every modulation
    block); the attention blocks get init_values=None: no layer scale."""
    model = timm.create_model('efficientmod_xxs', **TINY)
    blocks = [b for stage in model.stages for b in stage.blocks]
    modulation = [b for b in blocks if isinstance(b, emod.EfficientModBlock)]
    assert len(modulation) == sum(TINY_OFFICIAL['depths'])
    for block in modulation:
        torch.testing.assert_close(block.ls.gamma, torch.full_like(block.ls.gamma, 1e-4), rtol=1e-6, atol=0)
    attention = [b for b in blocks if isinstance(b, emod.AttentionBlock)]
    assert len(attention) == sum(TINY_OFFICIAL['attn'])
    assert not [n for b in attention for n, _ in b.named_parameters() if 'gamma' in n]


def test_layer_norms_have_the_officials_eps():
    """Official norm_layer=nn.LayerNorm (eps 1e-5) everywhere: stem, blocks, attention blocks, downsamples, final."""
    model = timm.create_model('efficientmod_xxs', **TINY)
    norms = {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert 'stem.norm' in norms and 'norm' in norms and 'stages.3.blocks.2.norm1' in norms
    assert len(norms) == 1 + sum(TINY['depths']) + 2 * sum(TINY['attn_depths']) + 3 + 1
    assert set(norms.values()) == {1e-5}, norms


def test_forward_intermediates_unnormed_unless_asked():
    """norm=False: the last stage's map as it comes out; the final output is normed as forward_features."""
    model = _tiny()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, norm=False)
        raw = model.stages(model.stem(x))
    assert not torch.allclose(raw, model.norm(raw))
    assert torch.equal(inter[-1], raw.permute(0, 3, 1, 2)) and torch.equal(final, model.norm(raw))


def test_prune_norm_drops_the_final_norm_and_keeps_the_head():
    model = _tiny()
    x = torch.randn(1, 3, 96, 64)
    assert model.prune_intermediate_layers(4, prune_norm=True, prune_head=False) == [0, 1, 2, 3]
    assert isinstance(model.norm, torch.nn.Identity) and len(model.stages) == 4
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), model.stages(model.stem(x)))
        assert model(x).shape == (1, TINY['num_classes'])


def test_official_checkpoint_saved_from_ddp_loads_through_timm(tmp_path):
    """A checkpoint saved from the DDP-wrapped model ('module.' keys under 'state_dict') loads the same weights."""
    sd = official_state_dict(**TINY_OFFICIAL)
    path = tmp_path / 'ddp.pth.tar'
    torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}, 'epoch': 1}, path)
    model = timm.create_model(
        'efficientmod_xxs', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **TINY)
    expected = emod.checkpoint_filter_fn(sd, model)
    assert expected.keys() == model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_num_heads_reaches_the_attention_blocks():
    """num_heads=2 gives 2 heads of max(dim // 2, 32) channels, as the official forward with heads=2 computes."""
    sd = official_state_dict(**TINY_OFFICIAL, heads=2)
    model = timm.create_model('efficientmod_xxs', num_heads=2, **TINY).eval()
    model.load_state_dict(emod.checkpoint_filter_fn(sd, model))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(sd, x, heads=2), rtol=1e-4, atol=1e-4)


def test_forward_intermediates_norms_only_the_last_stage():
    model = _tiny()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        final, raw = model.forward_intermediates(x)
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(normed[:3], raw[:3]))
    assert torch.equal(normed[3], final.permute(0, 3, 1, 2)) and not torch.allclose(normed[3], raw[3])


def test_stop_early_returns_the_last_stage_asked_for_unnormed():
    """The final norm belongs to the last stage: stopping at stage 1 returns its map as it comes out (NHWC)."""
    model = _tiny()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert final.shape == (1, 12, 8, TINY['embed_dims'][1]) and torch.equal(final.permute(0, 3, 1, 2), inter[0])


def test_prune_keeping_every_stage_drops_the_head_and_keeps_the_norm():
    model = _tiny()
    x = torch.randn(1, 3, 96, 64)
    assert model.prune_intermediate_layers(4) == [0, 1, 2, 3]
    assert isinstance(model.head, nn.Identity) and not isinstance(model.norm, nn.Identity)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_features(x))  # normed NHWC map: no pooling, no classifier
    with pytest.raises(LeanvitError, match="global_pool='avg' or ''"):
        model.reset_classifier(5, 'max')


def test_head_dropout_before_the_classifier():
    """timm's head: pool, dropout (drop_rate), classifier; pre_logits come after the dropout."""
    model = _tiny(drop_rate=1.0).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not model.forward_head(model.forward_features(x), pre_logits=True).any()
        torch.testing.assert_close(model(x), model.head.bias.expand(2, -1))
        assert model.eval().forward_head(model.forward_features(x), pre_logits=True).abs().min() > 0


def test_drop_path_of_one_drops_every_residual_branch():
    """In training, a block whose drop-path rate is 1 is the identity: each residual branch goes through it."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 8)  # NHWC
    for block in (emod.EfficientModBlock(8, 3, drop_path=1.), emod.AttentionBlock(8, drop_path=1.)):
        randomize(block).train()
        assert torch.equal(block(x), x), type(block).__name__
        assert not torch.allclose(block.eval()(x), x)


def test_grad_checkpointing_recomputes_the_blocks_in_backward(check_grad_checkpointing):
    check_grad_checkpointing(_tiny, torch.randn(2, 3, 64, 64), lambda model: [s.blocks[0] for s in model.stages])


def test_fresh_weights_are_initialised_as_the_officials():
    """Official _init_weights tests isinstance(m, nn.Linear or nn.Conv2d), i.e. nn.Linear: linears trunc_normal
    (std .02) with zero bias; convs keep PyTorch's default, uniform within 1 / sqrt(fan_in), bias too."""
    torch.manual_seed(0)
    model = timm.create_model('efficientmod_xxs')
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.numel() > 1_000_000 and abs(weights.std().item() / 0.02 - 1) < 0.01
    assert all(m.bias is None or not m.bias.any() for m in linears)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 + sum((2, 2, 6, 2))
    for m in convs:
        bound = m.weight[0].numel() ** -0.5
        assert m.weight.abs().max() <= bound and m.bias.abs().max() <= bound and m.bias.any()
        assert abs(m.weight.std().item() / (bound / 3 ** 0.5) - 1) < 0.1  # uniform, not std .02


def test_layer_decay_groups_follow_the_blocks():
    """group_matcher (timm's layer-wise LR decay): the stem first, each block its own group, a stage's
    downsample with its first block, the final norm with the last block, the classifier last."""
    model = timm.create_model('efficientmod_xxs', **TINY)
    groups = group_parameters(model, model.group_matcher(), reverse=True)
    n_blocks = sum(TINY['depths']) + sum(TINY['attn_depths'])
    assert groups['stem.conv.weight'] == groups['stem.norm.bias'] == 0 and groups['head.weight'] == n_blocks + 1
    assert groups['stages.1.downsample.conv.weight'] == groups['stages.1.blocks.0.norm.weight'] == 1 + 2
    assert groups['norm.weight'] == groups['stages.3.blocks.2.mlp.fc2.weight'] == n_blocks
    assert len(set(groups.values())) == n_blocks + 2


def test_kernel_size_reaches_every_context_branch():
    model = timm.create_model('efficientmod_xxs', kernel_size=3, **TINY)
    convs = [b.mlp.context.conv for s in model.stages for b in s.blocks if isinstance(b, emod.EfficientModBlock)]
    assert len(convs) == sum(TINY['depths']) and all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
