"""FcaFormer: published size, official checkpoints, the attention maths, timm's API, export, compile.

Weights are randomised (``_randomize``) wherever outputs are compared: at its official init the
network's signal all but vanishes (trunc-normal 0.02 convs, layer scales of 1e-6), which would let a
broken mapping or export agree with anything.
"""
from __future__ import annotations

import argparse
import itertools
import math
import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from timm.models._features_fx import FeatureGraphNet

from leanvit.catalog import CATALOG, get_facts
import leanvit.models.fcaformer as fca
from leanvit.errors import InputSizeError, LeanvitError
from leanvit.profile import count_macs, count_params

from drop_path import drop_prob, shared_rate

VARIANTS = [f.name for f in CATALOG.values() if f.family == 'FcaFormer']

#: a few-block FcaFormer with a non-square grid (6x4 then 3x2 tokens) and cab_max_d=2 < depth - 1,
#: so the cross-token window slides
TINY = dict(
    img_size=(96, 64), embed_dims=(16, 24, 32, 48), depths=(1, 1, 4, 2), num_heads=(2, 3),
    cab_max_d=2, num_classes=10,
)


def _tiny(**kwargs) -> fca.FcaFormer:
    torch.manual_seed(0)
    return _randomize(timm.create_model("fcaformer_l1", **{**TINY, **kwargs}).eval())


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fan-in scaled weights, and norms, BN statistics, layer scales and biases all away from init."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(t.shape, generator=g)
        if leaf == "running_var":
            t.copy_(noise.abs() * 0.5 + 0.5)
        elif leaf == "weight" and t.ndim > 1:
            t.copy_(noise / math.sqrt(t[0].numel()))
        elif leaf in ("weight", "gamma", "cross_scale"):
            t.copy_(1 + 0.2 * noise)
        else:  # biases, running means, position and cross-token logit biases
            t.copy_(0.2 * noise)
    return model


def _official_state_dict(dims, depths, heads, img_size, cab_max_d=12, num_classes=1000, seed=0) -> dict:
    """A state dict named and shaped like hkzhang-git/FcaFormer's ``FcaFormer``, random values.

    Built from the official constructor's description (module names ``patch_embed.seq``,
    ``layer_{i}``, ``Conv2d_BN`` = ``c`` + ``bn``, ...), independently of leanvit's model.
    """
    shapes: dict[str, tuple] = {}

    def conv_bn(prefix, c_in, c_out, k, groups=1):
        shapes[f"{prefix}.c.weight"] = (c_out, c_in // groups, k, k)
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{s}"] = (c_out,)
        shapes[f"{prefix}.bn.num_batches_tracked"] = ()

    def norm(prefix, c):
        shapes[f"{prefix}.weight"] = shapes[f"{prefix}.bias"] = (c,)

    def linear(prefix, c_in, c_out):
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (c_out, c_in), (c_out,)

    conv_bn("patch_embed.seq.0", 3, dims[0] // 2, 3)
    conv_bn("patch_embed.seq.2", dims[0] // 2, dims[0], 3)
    for i, (c, depth) in enumerate(zip(dims, depths)):
        grid = [math.ceil(s / 2 ** (i + 2)) for s in img_size]
        merged = math.ceil(grid[0] / 4) * math.ceil(grid[1] / 4)
        for j in range(depth):
            b = f"layer_{i}.blocks.{j}"
            if i < 2:  # ConvNeXt block
                shapes[f"{b}.dwconv.weight"], shapes[f"{b}.dwconv.bias"] = (c, 1, 7, 7), (c,)
                norm(f"{b}.norm", c)
                linear(f"{b}.pwconv1", c, 4 * c)
                linear(f"{b}.pwconv2", 4 * c, c)
                shapes[f"{b}.gamma"] = (c,)
                continue
            h = heads[i - 2]
            shapes[f"{b}.gamma_1"] = shapes[f"{b}.gamma_2"] = (c,)
            if j < depth - 1:
                shapes[f"{b}.dw_conv.weight"] = (c, 1, 7, 7)
            if j > 0:
                n = min(j, cab_max_d) * merged
                shapes[f"{b}.s_token_bias"] = (1, h, 1, n)
                norm(f"{b}.s_norm", c)
                shapes[f"{b}.s_scale_factors"] = (1, n, 1)
            norm(f"{b}.norm1", c)
            shapes[f"{b}.attention_biases"] = (h, grid[0] * grid[1])
            linear(f"{b}.qkv", c, 3 * c)
            linear(f"{b}.proj", c, c)
            conv_bn(f"{b}.local_conv", c, c, 3, groups=c)
            norm(f"{b}.norm2", c)
            norm(f"{b}.mlp.norm", c)
            linear(f"{b}.mlp.fc1", c, 4 * c)
            linear(f"{b}.mlp.fc2", 4 * c, c)
        if i < len(dims) - 1:
            n = dims[i + 1]
            conv_bn(f"layer_{i}.downsample.conv1", c, n, 1)
            conv_bn(f"layer_{i}.downsample.conv2", n, n, 3, groups=n)
            conv_bn(f"layer_{i}.downsample.conv3", n, n, 1)
    norm("norm_head", dims[-1])
    linear("head", dims[-1], num_classes)

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(shape[1] if len(shape) > 1 else 4)
    return sd


def _tiny_official(seed=0) -> dict:
    return _official_state_dict(
        TINY["embed_dims"], TINY["depths"], TINY["num_heads"], TINY["img_size"],
        cab_max_d=TINY["cab_max_d"], num_classes=TINY["num_classes"], seed=seed,
    )


def _levit_bias_idxs(h: int, w: int) -> torch.Tensor:
    """LeViT's offset indexing: offsets numbered in the order a scan over all point pairs meets them."""
    points = list(itertools.product(range(h), range(w)))
    offsets: dict = {}
    idxs = [offsets.setdefault((abs(p[0] - q[0]), abs(p[1] - q[1])), len(offsets)) for p in points for q in points]
    return torch.tensor(idxs).view(len(points), len(points))


# --- size -------------------------------------------------------------------------------------


def _check_published(name: str) -> None:
    published = get_facts(name)
    model = timm.create_model(name)
    params, macs = count_params(model), count_macs(model, (3, 224, 224))
    assert abs(params / 1e6 / published.params_m - 1) <= 0.01, (name, params)
    assert abs(macs / 1e9 / published.gmacs - 1) <= 0.05, (name, macs)


def test_l1_matches_published_params_and_macs():
    _check_published("fcaformer_l1")


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_matches_published_params_and_macs(name):
    _check_published(name)


def test_pretrained_cfg_matches_the_model():
    model = timm.create_model("fcaformer_l1").eval()
    cfg = model.pretrained_cfg
    assert cfg["fixed_input_size"] and cfg["input_size"] == (3, 224, 224)
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 224, 224))
    assert features.shape == (1, model.num_features, *cfg["pool_size"])


# --- official checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["model", "model_ema", "state_dict", "state_dict_ema"])
def test_official_checkpoint_loads_through_pretrained(tmp_path, wrapper):
    official = _tiny_official()
    # a stale persistent copy of the non-persistent index buffer must be dropped, not fail the load
    official["layer_2.blocks.0.attention_bias_idxs"] = torch.zeros(24, 24, dtype=torch.long)
    other = _tiny_official(seed=1)
    if wrapper == "model":  # the official (ConvNeXt-style) trainer's save_model
        ckpt = {"model": official, "optimizer": {}, "epoch": 299, "args": argparse.Namespace(model="fcaformer_l1")}
    elif wrapper == "model_ema":  # ... run with --model_ema true, as all four recipes are: 'model' is evaluated
        ckpt = {"model": official, "model_ema": other, "epoch": 299}
    elif wrapper == "state_dict":  # timm-style trainers
        ckpt = {"state_dict": official, "epoch": 299}
    else:
        ckpt = {"state_dict": official, "state_dict_ema": other, "epoch": 299}
    path = tmp_path / "checkpoint-best.pth"
    torch.save(ckpt, path)

    overlay = dict(file=str(path), num_classes=TINY["num_classes"])
    loaded = timm.create_model("fcaformer_l1", pretrained=True, pretrained_cfg_overlay=overlay, **TINY)
    direct = timm.create_model("fcaformer_l1", **TINY)
    direct.load_state_dict(fca.checkpoint_filter_fn(ckpt, direct))  # strict: every key used, none missing
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        out = loaded.eval()(x)
        torch.testing.assert_close(out, direct.eval()(x), rtol=0, atol=0)
    assert out.abs().max() > 1e-2  # the random official weights are really in use


def test_official_checkpoint_every_route_loads_the_evaluated_weights(tmp_path, check_every_route_loads):
    """The official evaluation (main.py --eval true --resume FILE) loads 'model' into the network it
    evaluates, not the 'model_ema' that all four recipes (--model_ema true) save beside it: timm's file and
    hub sources, the filter, load_weights and the CLI's --checkpoint (model_from_checkpoint) must all load
    'model' (timm's file loader would take the EMA)."""
    live, ema = _tiny_official(), _tiny_official(seed=1)
    ckpt = {"model": live, "optimizer": {}, "epoch": "best", "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="fcaformer_l1"), "model_ema": ema}  # the official save_model
    path = tmp_path / "checkpoint-best.pth"
    torch.save(ckpt, path)
    expected = fca.checkpoint_filter_fn(live, _tiny())
    assert any(not torch.equal(v, fca.checkpoint_filter_fn(ema, _tiny())[k]) for k, v in expected.items())

    check_every_route_loads("fcaformer_l1", path, fca.checkpoint_filter_fn, expected, "model", **TINY)


@torch.no_grad()
def _official_forward(sd: dict, x: torch.Tensor, depths, heads, cab_max_d: int) -> torch.Tensor:
    """The official network written out with functional ops on the official names (eval mode)."""
    def conv_bn(p, x, stride=1, groups=1):
        w = sd[f"{p}.c.weight"]
        x = F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, groups)
        bn = [sd[f"{p}.bn.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
        return F.batch_norm(x, *bn, training=False, eps=1e-5)

    def ln(p, x, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps)

    def lin(p, x):
        return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])

    x = conv_bn("patch_embed.seq.2", F.gelu(conv_bn("patch_embed.seq.0", x, 2)), 2)
    for i, depth in enumerate(depths):
        B, C, H, W = x.shape
        if i < 2:  # ConvNeXt blocks
            for j in range(depth):
                b = f"layer_{i}.blocks.{j}"
                y = F.conv2d(x, sd[f"{b}.dwconv.weight"], sd[f"{b}.dwconv.bias"], padding=3, groups=C)
                y = lin(f"{b}.pwconv2", F.gelu(lin(f"{b}.pwconv1", ln(f"{b}.norm", y.permute(0, 2, 3, 1), 1e-6))))
                x = x + (sd[f"{b}.gamma"] * y).permute(0, 3, 1, 2)
        else:  # FcaBlocks on tokens
            h, d = heads[i - 2], C // heads[i - 2]
            t, merged, rel = x.flatten(2).transpose(1, 2), [], _levit_bias_idxs(H, W)
            for j in range(depth):
                b = f"layer_{i}.blocks.{j}"
                q, k, v = lin(f"{b}.qkv", ln(f"{b}.norm1", t)).view(B, -1, 3, h, d).permute(2, 0, 3, 1, 4)
                logits = q @ k.transpose(-2, -1) * d ** -0.5 + sd[f"{b}.attention_biases"][:, rel]
                if j:
                    s = torch.cat(merged[-cab_max_d:], 1) * sd[f"{b}.s_scale_factors"]
                    _, ks, vs = lin(f"{b}.qkv", ln(f"{b}.s_norm", s)).view(B, -1, 3, h, d).permute(2, 0, 3, 1, 4)
                    cross_logits = q @ ks.transpose(-2, -1) * d ** -0.5 + sd[f"{b}.s_token_bias"]
                    logits, v = torch.cat([logits, cross_logits], -1), torch.cat([v, vs], 2)
                attn = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, C)
                t = t + sd[f"{b}.gamma_1"] * lin(f"{b}.proj", attn)
                y = t.transpose(1, 2).reshape(B, C, H, W)
                if f"{b}.dw_conv.weight" in sd:
                    merged.append(F.conv2d(y, sd[f"{b}.dw_conv.weight"], None, 4, 3, 1, C).flatten(2).transpose(1, 2))
                t = conv_bn(f"{b}.local_conv", y, 1, C).flatten(2).transpose(1, 2)
                mlp = lin(f"{b}.mlp.fc2", F.gelu(lin(f"{b}.mlp.fc1", ln(f"{b}.mlp.norm", ln(f"{b}.norm2", t)))))
                t = t + sd[f"{b}.gamma_2"] * mlp
            x = t.transpose(1, 2).reshape(B, C, H, W)
        if f"layer_{i}.downsample.conv1.c.weight" in sd:
            p, n = f"layer_{i}.downsample", sd[f"layer_{i}.downsample.conv2.c.weight"].shape[0]
            x = conv_bn(f"{p}.conv3", F.gelu(conv_bn(f"{p}.conv2", F.gelu(conv_bn(f"{p}.conv1", x)), 2, n)))
    return lin("head", ln("norm_head", x.mean((2, 3))))


def test_official_weights_reproduce_the_official_forward():
    official = _tiny_official()
    model = timm.create_model("fcaformer_l1", **TINY).eval()
    model.load_state_dict(fca.checkpoint_filter_fn({"model": official}, model))
    x = torch.randn(2, 3, 96, 64)
    expected = _official_forward(official, x, TINY["depths"], TINY["num_heads"], TINY["cab_max_d"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().max() > 0.1


def test_released_l2_checkpoint_layout_maps_onto_fcaformer_l2():
    """The only released weights (L2): every official name and shape has its place in ours."""
    model = timm.create_model("fcaformer_l2")
    official = _official_state_dict((96, 192, 320, 480), (2, 2, 7, 2), (10, 15), (224, 224))
    mapped = fca.checkpoint_filter_fn({"model": official}, model)
    ours = model.state_dict()
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_our_own_state_dict_passes_through_the_filter():
    model = _tiny()
    sd = model.state_dict()
    assert fca.checkpoint_filter_fn({"state_dict": sd}, model) is sd


# --- the maths --------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("num_cross", [0, 8])
def test_forward_cross_attention_matches_its_definition(fused, num_cross):
    """softmax([q k_x^T / sqrt(d) + B_rel(|dy|,|dx|), q k_s^T / sqrt(d) + b_s]) [v_x; v_s], with
    the cross tokens s = LayerNorm(alpha * s_in) (LSF) giving keys and values only."""
    torch.manual_seed(0)
    dim, heads, (h, w), B = 32, 4, (3, 5), 2
    attn = _randomize(fca.ForwardCrossAttention(dim, heads, (h, w), num_cross)).eval()
    attn.fused_attn = fused
    x, cross = torch.randn(B, h * w, dim), (torch.randn(B, num_cross, dim) if num_cross else None)

    d = dim // heads
    wq, (wk, wv) = attn.q.weight, attn.kv.weight.chunk(2)
    bq, (bk, bv) = attn.q.bias, attn.kv.bias.chunk(2)
    bias = attn.attention_biases[:, _levit_bias_idxs(h, w)]
    kv_in = x
    if num_cross:
        s = F.layer_norm(cross * attn.cross_scale, (dim,), attn.cross_norm.weight, attn.cross_norm.bias, 1e-5)
        kv_in = torch.cat([x, s], 1)
        bias = torch.cat([bias, attn.cross_bias[0].expand(heads, h * w, num_cross)], -1)

    def per_head(t):
        return t.view(B, -1, heads, d).transpose(1, 2)

    q, k, v = per_head(x @ wq.T + bq), per_head(kv_in @ wk.T + bk), per_head(kv_in @ wv.T + bv)
    probs = (q @ k.transpose(-2, -1) / math.sqrt(d) + bias).softmax(-1)
    expected = attn.proj((probs @ v).transpose(1, 2).reshape(B, h * w, dim))

    with torch.no_grad():
        torch.testing.assert_close(attn(x, cross), expected, rtol=1e-5, atol=1e-5)


def test_cross_tokens_come_from_the_last_cab_max_d_blocks_oldest_first():
    model = _tiny()
    stage = model.stages[2]  # 4 blocks, cab_max_d = 2, 6x4 grid -> 2x1 = 2 merged tokens per block
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args, out))) for b in stage.blocks]
    with torch.no_grad():
        model(torch.randn(2, 3, 96, 64))
    for hk in hooks:
        hk.remove()

    merged = [out[1] for _, out in seen]
    assert merged[-1] is None  # the last block merges nothing: no later block would use it
    assert all(m.shape == (2, 2, 32) for m in merged[:-1])
    assert seen[0][0][1] is None
    for i in range(1, 4):
        expected = torch.cat(merged[max(0, i - 2):i], dim=1)
        assert torch.equal(seen[i][0][1], expected), f"block {i}"
        assert stage.blocks[i].attn.cross_scale.shape == (1, expected.shape[1], 1)


def test_relative_position_index_is_levits():
    attn = fca.ForwardCrossAttention(16, 2, (3, 5), 0)
    assert torch.equal(attn.attention_bias_idxs, _levit_bias_idxs(3, 5))
    assert "attention_bias_idxs" not in attn.state_dict()


# --- timm API ---------------------------------------------------------------------------------


def test_features_only_channels_reductions_and_shapes():
    model = timm.create_model("fcaformer_l1", features_only=True, **TINY).eval()
    assert model.feature_info.channels() == list(TINY["embed_dims"])
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 96, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 24, 16), (2, 24, 12, 8), (2, 32, 6, 4), (2, 48, 3, 2)]

    picked = timm.create_model("fcaformer_l1", features_only=True, out_indices=(1, 3), **TINY)
    assert picked.feature_info.channels() == [24, 48]


def test_forward_intermediates():
    model = _tiny()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1:] for t in inter] == [(16, 24, 16), (24, 12, 8), (32, 6, 4), (48, 3, 2)]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last_two] == [32, 48]
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[1])


def test_fx_feature_extraction_keeps_the_size_check():
    """timm's FX feature extractor (features_only=True, feature_cls='fx') traces the model; the
    input size check is a leaf call of the graph, so the traced model still refuses other sizes."""
    model = _tiny()
    fx_features = FeatureGraphNet(model, out_indices=(0, 1, 2, 3))
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        for ours, ref in zip(fx_features(x), model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(ours, ref)
        with pytest.raises(InputSizeError, match="96x64"):
            fx_features(torch.randn(1, 3, 64, 64))


def test_prune_intermediate_layers():
    model = _tiny()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        reference = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.stages) == 2
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        headless = model(x)  # head, pooling included, is gone: the last kept stage's map
    for a, b in zip(pruned, reference):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(headless, reference[1])


def test_reset_classifier_and_pre_logits():
    model = _tiny()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        pooled = model(x)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7)
    assert pooled.shape == (2, model.num_features) == (2, 48)
    torch.testing.assert_close(pooled, pre_logits)


def test_no_weight_decay_names_the_learnt_biases_and_scales():
    model = _tiny()
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= params.keys()
    assert "stages.2.blocks.0.attn.attention_biases" in names
    assert "stages.2.blocks.3.attn.cross_bias" in names and "stages.3.blocks.1.attn.cross_scale" in names
    assert not any(n.endswith(("q.weight", "kv.weight")) for n in names)


def test_device_and_dtype_reach_every_parameter_and_buffer():
    """timm's device= / dtype= model kwargs, as the other families and timm's own models take."""
    model = timm.create_model("fcaformer_l1", device="meta", **TINY)
    assert {t.device.type for t in itertools.chain(model.parameters(), model.buffers())} == {"meta"}
    model = timm.create_model("fcaformer_l1", dtype=torch.float64, **TINY).eval()
    assert {t.dtype for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()} \
        == {torch.float64}
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 64, dtype=torch.float64)).dtype == torch.float64


def test_meta_device_model_materialises_with_its_position_index(check_meta_materialises):
    """The relative position index is not in the state dict: timm's reinit_non_persistent_buffers recomputes it."""
    check_meta_materialises("fcaformer_l1", _tiny(), (1, 3, 96, 64), **TINY)


def test_wrong_input_size_names_the_expected_one():
    model = _tiny()
    with pytest.raises(InputSizeError, match="96x64") as err:
        model(torch.randn(1, 3, 64, 96))
    assert isinstance(err.value, LeanvitError) and isinstance(err.value, ValueError)
    with pytest.raises(InputSizeError, match="224x224"):
        timm.create_model("fcaformer_l1")(torch.randn(1, 3, 256, 256))


# --- training ---------------------------------------------------------------------------------


def test_training_step_reaches_every_parameter():
    model = _tiny(drop_path_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1).train()
    loss = F.cross_entropy(model(torch.randn(3, 3, 96, 64)), torch.tensor([0, 1, 2]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 96, 64)
    grads = []
    for enable in (False, True):
        model = _tiny().train()
        model.set_grad_checkpointing(enable)
        model(x).sum().backward()
        grads.append(model.stages[2].blocks[0].attn.attention_biases.grad)
    torch.testing.assert_close(grads[0], grads[1])


# --- compile and export -----------------------------------------------------------------------


def test_torch_compile_captures_the_whole_graph():
    """fullgraph=True fails on any graph break; Inductor itself is exercised in the slow test."""
    model = _tiny()
    x = torch.randn(2, 3, 96, 64)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_matches_eager():
    """timm's test_model_forward_torchscript: blocks without cross tokens script too (their LSF
    parameters are None), and the scripted model agrees with eager."""
    model = _tiny()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_compiles_with_inductor(name):
    torch._dynamo.reset()
    model = _randomize(timm.create_model(name).eval())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-4)


def _check_onnx_engines(model, x_export, batches, path, dynamic_batch):
    from leanvit.deploy import check_agreement, export_onnx, get_engine

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # export_onnx warns when it falls back to the TorchScript exporter
        onnx_path = export_onnx(model, x_export, path, dynamic_batch=dynamic_batch)
    runners = {
        "onnxruntime": get_engine("onnxruntime", threads=2).load_onnx(onnx_path),
        "openvino": get_engine("openvino", threads=2, precision="f32").load_model_file(onnx_path),
    }
    inputs = [torch.randn(b, *x_export.shape[1:]) for b in batches]
    for engine, runner in runners.items():
        agreement = check_agreement(model, runner, inputs)
        assert agreement.ref_scale > 0.1, engine  # real logits, not a vanished signal
        assert agreement.max_abs_err <= 1e-3, (engine, agreement)
        assert agreement.top1_agreement == 1.0, (engine, agreement)


def test_onnx_dynamic_batch_on_onnxruntime_and_openvino(tmp_path):
    """One dynamic-batch export, run at batch 1 and 3 on both engines."""
    _check_onnx_engines(_tiny(), torch.randn(2, 3, 96, 64), (1, 3), tmp_path / "tiny.onnx", dynamic_batch=True)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic_batch", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_exports_to_onnxruntime_and_openvino(tmp_path, name, dynamic_batch):
    model = _randomize(timm.create_model(name).eval())
    example = torch.randn(2 if dynamic_batch else 1, 3, 224, 224)
    batches = (1, 2) if dynamic_batch else (1, 1)
    _check_onnx_engines(model, example, batches, tmp_path / f"{name}.onnx", dynamic_batch)


# --- the official evaluation and from-scratch training setup ----------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_eval_preprocessing_is_the_official_evaluations(name):
    """The official main.py --eval true builds its val transform in datasets.py build_transform: --crop_pct None
    -> 224 / 256, Resize(int(224 / crop_pct), BICUBIC), CenterCrop(224), and --imagenet_default_mean_and_std
    (default True) -> timm's IMAGENET_DEFAULT_MEAN / STD; no recipe script changes any of them."""
    cfg = timm.models.get_pretrained_cfg(name)
    assert (cfg.crop_pct, cfg.crop_mode, cfg.interpolation, tuple(cfg.mean), tuple(cfg.std)) == (
        224 / 256, "center", "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_an_image_size_not_a_multiple_of_32_runs():
    """Stride-2 3x3 convs with padding 1 give ceil(size / 2): 100x76 -> 7x5 then 4x3 tokens."""
    model = _tiny(img_size=(100, 76))
    assert model.stages[2].blocks[0].attn.resolution == (7, 5) and model.stages[3].blocks[0].attn.resolution == (4, 3)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 100, 76)).shape == (1, TINY["num_classes"])


def test_drop_path_rates_rise_linearly_over_every_block_of_the_network():
    """Official FcaFormer.__init__: dpr = linspace(0, drop_path_rate, sum(depths)), sliced per stage; an
    FcaBlock's attention and MLP residuals share its rate."""
    model = timm.create_model("fcaformer_l1", drop_path_rate=0.3, **TINY)
    rates = []
    for stage in model.stages:
        for block in stage.blocks:
            if isinstance(block, fca.FcaBlock):
                rates.append(shared_rate(block.drop_path1, block.drop_path2))
            else:
                rates.append(drop_prob(block.drop_path))
    assert rates == pytest.approx(torch.linspace(0, 0.3, sum(TINY["depths"])).tolist())


def test_fresh_layer_scales_are_the_officials():
    """Official layer_scale_init_value 1e-6 (hard-coded for every layer, and main.py's default): CxBlock's gamma,
    FcaBlock's gamma_1 and gamma_2."""
    model = timm.create_model("fcaformer_l1", **TINY)
    gammas = {n: p for n, p in model.named_parameters() if n.endswith("gamma")}
    assert len(gammas) == sum(TINY["depths"][:2]) + 2 * sum(TINY["depths"][2:])
    for name, gamma in gammas.items():
        torch.testing.assert_close(gamma, torch.full_like(gamma, 1e-6), rtol=1e-6, atol=0, msg=name)


def test_norms_have_the_officials_eps():
    """Official: CxBlock's channels-last LayerNorm(eps=1e-6); FcaBlock's norm1 / s_norm / norm2 / mlp.norm and
    norm_head are nn.LayerNorm (1e-5); every Conv2d_BN's BatchNorm2d is 1e-5."""
    model = timm.create_model("fcaformer_l1", **TINY)
    norms = {n: m.eps for n, m in model.named_modules()
             if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d, timm.layers.LayerNorm2d))}
    expected = {n: 1e-6 if re.fullmatch(r"stages\.[01]\.blocks\.\d+\.norm", n) else 1e-5 for n in norms}
    assert "head.norm" in norms and "stages.2.blocks.1.attn.cross_norm" in norms and "stages.2.blocks.0.mlp.norm" in norms
    assert sum(v == 1e-6 for v in expected.values()) == sum(TINY["depths"][:2])
    assert norms == expected


def test_intermediates_and_features_refuse_a_transposed_input():
    """64x96 for a 96x64 model gives as many tokens (4x6 vs 6x4) and would run, wrongly, without the check."""
    x = torch.randn(1, 3, 64, 96)
    with pytest.raises(InputSizeError, match="96x64"):
        _tiny().forward_intermediates(x)
    with pytest.raises(InputSizeError, match="96x64"):
        timm.create_model("fcaformer_l1", features_only=True, **TINY)(x)


def test_stop_early_returns_the_last_stage_asked_for():
    model = _tiny()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[2], stop_early=True)
    assert final.shape == (1, TINY["embed_dims"][2], 6, 4) and torch.equal(final, inter[0])


def test_prune_keeping_every_stage_drops_the_head_and_a_new_one_fits():
    model = _tiny()
    x = torch.randn(1, 3, 96, 64)
    assert model.prune_intermediate_layers(4) == [0, 1, 2, 3]
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.equal(model(x), features)  # no norm, no pooling, no classifier
        model.reset_classifier(3, "avg")
        torch.testing.assert_close(model(x), model.head.fc(features.mean((2, 3))))
    model = _tiny()
    model.prune_intermediate_layers([0, 1])
    model.reset_classifier(3, "avg")  # sized for the kept stage's 24 channels
    with torch.no_grad():
        assert model(x).shape == (1, 3)


def test_unpooled_head_scores_every_position():
    """global_pool='': timm's NormMlpClassifierHead norms the map (LayerNorm2d) and classifies each position."""
    model = _tiny(global_pool="")
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        out, features = model(x), model.forward_features(x)
    normed = F.layer_norm(features.permute(0, 2, 3, 1), (48,), model.head.norm.weight, model.head.norm.bias, 1e-5)
    fc = model.head.fc
    expected = (normed @ fc.weight.flatten(1).T + fc.bias).permute(0, 3, 1, 2)
    assert out.shape == (2, TINY["num_classes"], 3, 2)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("rate", ["drop_rate", "proj_drop_rate", "attn_drop_rate", None])
def test_each_dropout_rate_reaches_the_network(rate):
    """In training only the dropout asked for makes two passes differ (batch-norm statistics are deterministic)."""
    model = _tiny(**({rate: 0.5} if rate else {})).train()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(x)
        torch.manual_seed(2)
        assert torch.equal(model(x), first) == (rate is None)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_dropout_only_in_training(fused):
    torch.manual_seed(0)
    attn = _randomize(fca.ForwardCrossAttention(32, 4, (3, 5), 8, attn_drop=0.5))
    attn.fused_attn = fused
    x, cross = torch.randn(2, 15, 32), torch.randn(2, 8, 32)
    with torch.no_grad():
        evaluated = attn.eval()(x, cross)
        assert not torch.allclose(attn.train()(x, cross), evaluated)
        attn.attn_drop.p = 0.
        torch.testing.assert_close(attn.eval()(x, cross), evaluated)


def test_drop_path_of_one_drops_both_residual_branches():
    """In training, an FcaBlock at drop-path rate 1 is its non-residual part alone: the local conv of its input
    (the token merge still reads that input)."""
    torch.manual_seed(0)
    block = _randomize(fca.FcaBlock(16, 2, (4, 4), num_cross=0, merge_tokens=True, drop_path=1.)).train()
    block.local_conv.eval()  # running statistics, as in the reference below
    x = torch.randn(2, 16, 16)
    grid = x.transpose(1, 2).reshape(2, 16, 4, 4)
    with torch.no_grad():
        out, merged = block(x)
        torch.testing.assert_close(out, block.local_conv(grid).flatten(2).transpose(1, 2))
        torch.testing.assert_close(merged, block.token_merge(grid).flatten(2).transpose(1, 2))


def test_grad_checkpointing_recomputes_the_stages_in_backward(check_grad_checkpointing):
    """In forward and in forward_intermediates."""
    check_grad_checkpointing(_tiny, torch.randn(2, 3, 96, 64), lambda model: list(model.stages),
                             forwards=(lambda model, x: model(x), lambda model, x: model.forward_intermediates(x)[0]))


def test_layer_decay_groups_follow_the_blocks():
    """group_matcher (timm's layer-wise LR decay): the stem first, each block its own group, a stage's
    downsample with its first block, the head's norm with the last block, the classifier last."""
    model = timm.create_model("fcaformer_l1", **TINY)
    groups = group_parameters(model, model.group_matcher(), reverse=True)
    n_blocks = sum(TINY["depths"])
    assert groups["patch_embed.conv1.conv.weight"] == 0 and groups["head.fc.weight"] == n_blocks + 1
    assert groups["stages.2.downsample.conv1.conv.weight"] == groups["stages.2.blocks.0.attn.q.weight"] == 3
    assert groups["head.norm.weight"] == groups["stages.3.blocks.1.mlp.fc2.weight"] == n_blocks
    assert len(set(groups.values())) == n_blocks + 2


def test_mlp_ratio_reaches_every_fca_block():
    model = timm.create_model("fcaformer_l1", mlp_ratio=2, **TINY)
    fcs = [b.mlp.fc1 for stage in model.stages[2:] for b in stage.blocks]
    assert len(fcs) == sum(TINY["depths"][2:]) and all(fc.out_features == 2 * fc.in_features for fc in fcs)
