"""BRECQ/AdaRound block reconstruction and Q-HyViT's bridge blocks, against what they promise."""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from leanvit.compress.quant import QuantConfig, export_quantized, find_bridges, find_units, quantize
from leanvit.compress.quant.modules import QuantConv2d, QuantLinear
from leanvit.errors import LeanvitError

torch.set_num_threads(1)


class ConvBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


class TinyHybrid(nn.Module):
    """A convolutional stage, a strided conv into tokens, a transformer stage: the hybrid layout."""

    def __init__(self, c=8, d=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.stage1 = nn.Sequential(ConvBlock(c), ConvBlock(c))
        self.down = nn.Conv2d(c, d, 2, stride=2)
        self.stage2 = nn.Sequential(Block(d, 2), Block(d, 2))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.down(self.stage1(self.stem(x))).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.stage2(x)).mean(1))


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    return TinyHybrid().eval()


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(1)
    return torch.randn(48, 3, 16, 16)


W4 = dict(w_bits=4, a_bits=8, batch_size=16)


@pytest.fixture(scope="module")
def rtn(hybrid, calib):
    return quantize(hybrid, calib, QuantConfig(**W4), progress=False)


@pytest.fixture(scope="module")
def reconstructed(hybrid, calib):
    return quantize(hybrid, calib, QuantConfig(**W4, reconstruct="blocks", reconstruct_iters=200), progress=False)


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}


def test_units_and_the_bridge_come_from_the_structure(rtn, calib):
    assert find_units(rtn) == ["stage1.0", "stage1.1", "stage2.0", "stage2.1"]
    assert find_bridges(rtn, calib[:2]) == ["down", "stage2.0"]  # the transition conv, then the first attention block


def test_a_plain_vit_has_no_bridge_and_says_so(tiny_vit):
    calib = torch.randn(16, 3, 32, 32)
    with pytest.warns(UserWarning, match="no bridge"):
        qmodel = quantize(tiny_vit, calib, QuantConfig(reconstruct="bridge", reconstruct_iters=5), progress=False)
    assert qmodel.quant_report.reconstructed == {}
    assert find_units(qmodel) == ["blocks.0", "blocks.1"]


class ConvAttention(nn.Module):
    """Named like attention, but a grouped convolution (Next-ViT's multi-head convolutional attention)."""

    def __init__(self, c):
        super().__init__()
        self.group_conv = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.proj(self.group_conv(x))


class Mixer(nn.Module):
    """Attention on feature maps under another name (EfficientViT-B's LiteMLA); ``linear=True``: no product of
    two activations, tokens weighed by a softmax and summed (MobileViT-v2's linear attention)."""

    def __init__(self, c, linear=False):
        super().__init__()
        self.qkv, self.proj, self.linear = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1), linear

    def forward(self, x):
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)  # (B, C, N) each
        if self.linear:
            context = (k * q[:, :1].softmax(-1)).sum(-1, keepdim=True)
            mixed = v * context
        else:
            mixed = v @ (k.transpose(1, 2) @ q).softmax(1)
        return x + self.proj(mixed.reshape(x.shape))


@pytest.mark.parametrize("linear", [False, True])
def test_a_bridge_is_found_by_what_the_blocks_compute_not_their_names(linear, calib):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Sequential(ConvAttention(8), ConvAttention(8)),
                          nn.Conv2d(8, 16, 2, stride=2), nn.Sequential(Mixer(16, linear), Mixer(16, linear)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    qmodel = quantize(model, calib, QuantConfig(**W4), progress=False)
    assert find_bridges(qmodel, calib[:2]) == ["2", "3.0"]


def test_adaround_weights_lie_on_the_grid_and_beat_round_to_nearest(hybrid, rtn, reconstructed):
    report = reconstructed.quant_report.reconstructed
    assert list(report) == ["stem", "stage1.0", "stage1.1", "down", "stage2.0", "stage2.1", "head"]  # call order
    assert "reconstructed stage2.0: output error" in reconstructed.quant_report.summary()
    learned = [n for n, outcome in report.items() if "learned)" in outcome]
    assert {"stage2.0", "stage2.1"} <= set(learned)
    moved = 0
    for name, layer in layers(reconstructed).items():
        if any(name == u or name.startswith(u + ".") for u in learned):
            assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight), name  # exactly on the grid
            moved += int((layer.weight != layers(rtn)[name].weight_quantizer(layers(rtn)[name].weight)).sum())
    assert moved > 0  # some weights were rounded the other way

    torch.manual_seed(2)
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        ref = hybrid(x)
        assert (reconstructed(x) - ref).pow(2).mean() < 0.9 * (rtn(x) - ref).pow(2).mean()  # on held-out images


@torch.no_grad()
def test_a_block_beats_round_to_nearest_on_held_out_inputs():
    """Two blocks fed the images directly, so both models' first block sees the very same input."""
    torch.manual_seed(0)
    model = nn.Sequential(ConvBlock(8), ConvBlock(8)).eval()
    calib, x = torch.randn(48, 8, 8, 8), torch.randn(64, 8, 8, 8)
    config = QuantConfig(w_bits=4, batch_size=16)
    nearest = quantize(model, calib, config, progress=False)
    learned = quantize(model, calib, replace(config, reconstruct="blocks", reconstruct_iters=200), progress=False)
    target = model[0](x)
    assert (learned[0](x) - target).pow(2).mean() < 0.9 * (nearest[0](x) - target).pow(2).mean()


@torch.no_grad()
def test_a_batchnormed_conv_is_fitted_to_its_folded_output():
    """quantize folds each BatchNorm into its conv; a conv reconstructed on its own must then match conv + BN
    (what it now computes in float), not the bare conv's output, which the float model's conv alone gives."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.05, 0.5)
        bn.weight.uniform_(0.2, 0.6), bn.bias.uniform_(-0.2, 0.2)
    model.eval()
    calib, x = torch.randn(64, 3, 8, 8), torch.randn(64, 3, 8, 8)
    config = QuantConfig(w_bits=4, batch_size=32)
    nearest = quantize(model, calib, config, progress=False)
    learned = quantize(model, calib, replace(config, reconstruct="blocks", reconstruct_iters=200), progress=False)
    assert "learned)" in learned.quant_report.reconstructed["0"]
    target = model[1](model[0](x))  # conv + BN in float
    assert (learned[0](x) - target).pow(2).mean() < (nearest[0](x) - target).pow(2).mean()


def test_bridge_mode_reconstructs_only_the_bridge(hybrid, rtn, calib):
    bridge = quantize(hybrid, calib, QuantConfig(**W4, reconstruct="bridge", reconstruct_iters=50), progress=False)
    assert list(bridge.quant_report.reconstructed) == ["down", "stage2.0"]
    for name, layer in layers(bridge).items():
        if not name.startswith(("down", "stage2.0.")):
            assert torch.equal(layer.weight, layers(rtn)[name].weight), name


def test_reconstructed_model_exports_and_onnxruntime_matches(hybrid, calib, tmp_path):
    from leanvit.compress.quant import onnx_int8_summary
    from leanvit.deploy import check_agreement, get_engine

    config = QuantConfig(w_bits=7, batch_size=16, reconstruct="blocks", reconstruct_iters=30,
                         reconstruct_act_scales=True)
    qmodel = quantize(hybrid, calib, config, progress=False)
    assert any("learned)" in outcome for outcome in qmodel.quant_report.reconstructed.values())
    path = export_quantized(qmodel, tmp_path / "hybrid.onnx", dynamic_batch=False)
    assert onnx_int8_summary(path).int8 == len(qmodel.quant_report.quantized)
    runner = get_engine("onnxruntime", threads=1).load_onnx(path)
    agreement = check_agreement(qmodel, runner, [torch.randn(1, 3, 16, 16) for _ in range(4)])
    assert agreement.top1_agreement == 1.0
    assert agreement.max_abs_err < 0.02 * agreement.ref_scale


def test_bad_reconstruction_settings_are_errors():
    with pytest.raises(LeanvitError, match="reconstruct must be"):
        QuantConfig(reconstruct="all")
    with pytest.raises(LeanvitError, match="reconstruct=None turns reconstruction off"):
        QuantConfig(reconstruct_act_scales=True)
    with pytest.raises(LeanvitError, match="reconstruct_iters"):
        QuantConfig(reconstruct="blocks", reconstruct_iters=0)


def test_the_reconstruction_loss_sums_over_channels_of_nhwc_maps_too():
    """Swin's blocks write (B, H, W, C): the loss summed over H there, scaling it H / C against the rounding
    regulariser that BRECQ balances with a per-channel sum."""
    from leanvit.compress.quant.reconstruct import _out_channels, _reconstruction_error

    torch.manual_seed(0)
    nhwc, target = torch.randn(2, 3, 5, 8), torch.zeros(2, 3, 5, 8)
    expected = nhwc.pow(2).sum(-1).mean()
    torch.testing.assert_close(_reconstruction_error(nhwc, [target], "unit", channels=8), expected)
    nchw = nhwc.permute(0, 3, 1, 2)  # a conv block's output, channels at dim 1
    torch.testing.assert_close(_reconstruction_error(nchw, [target.permute(0, 3, 1, 2)], "unit", channels=8), expected)
    tokens = nhwc.flatten(1, 2)
    torch.testing.assert_close(_reconstruction_error(tokens, [tokens * 0], "unit", channels=8), expected)
    block = quantize(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval(), torch.randn(16, 3, 5, 8),
                     QuantConfig(), progress=False)  # on NHWC maps
    assert _out_channels(block) == 8


def test_the_rounding_regulariser_waits_for_the_warm_up_then_anneals_beta_from_20_to_2():
    """AdaRound's schedule (BRECQ's LinearTempDecay): no regulariser for the first 20 % of the iterations, so the
    rounding first fits the output; then its temperature falls linearly from 20, which pushes only the ``h(V)``
    already near 0 or 1, to 2, which pushes every one of them there. Held at 20, many weights would still be
    undecided when they are frozen to the hard rounding, which the soft one then no longer resembles."""
    from leanvit.compress.quant.reconstruct import _beta

    iters = 1000
    betas = [_beta(step, iters) for step in range(iters)]
    assert betas[:200] == [None] * 200  # the warm-up
    assert betas[200] == 20.0
    assert betas[600] == pytest.approx(11.0)  # half way through the decay: half way from 20 to 2
    assert betas[-1] == pytest.approx(2.0, abs=0.05)
    decay = betas[200:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert [_beta(step, 10) for step in (0, 1, 2)] == [None, None, 20.0]  # a short run warms up 20 % as well


def test_a_learned_rounding_worse_than_round_to_nearest_is_undone(monkeypatch):
    """Reconstruction must never leave a unit worse than round-to-nearest on the calibration data: a learned
    rounding (here forced: every weight frozen one grid step below its floor) that loses is rolled back, its
    weights and learned input steps both, and the report says round-to-nearest was kept."""
    from leanvit.compress.quant.reconstruct import AdaRound

    torch.manual_seed(0)
    model = nn.Sequential(ConvBlock(8), ConvBlock(8)).eval()
    calib = torch.randn(32, 8, 8, 8)
    config = QuantConfig(w_bits=4, batch_size=16)
    nearest = quantize(model, calib, config, progress=False)
    monkeypatch.setattr(AdaRound, "hard", lambda self: self._dequantize(torch.full_like(self.floor, -1.0)))
    kept = quantize(model, calib, replace(config, reconstruct="blocks", reconstruct_iters=10,
                                          reconstruct_act_scales=True), progress=False)
    report = kept.quant_report.reconstructed
    assert list(report) == ["0", "1"]
    assert all(outcome.startswith("kept round-to-nearest") for outcome in report.values()), report
    assert "reconstructed 0: kept round-to-nearest" in kept.quant_report.summary()
    for (name, layer), plain in zip(layers(kept).items(), layers(nearest).values()):
        assert torch.equal(layer.weight, plain.weight), name
        assert torch.equal(layer.input_quantizer.scale, plain.input_quantizer.scale), name
    x = torch.randn(8, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(kept(x), nearest(x))


def test_learned_input_steps_are_kept_with_the_learned_rounding():
    """``reconstruct_act_scales`` learns the layers' input step sizes (LSQ) together with the rounding; a unit that
    keeps its learned rounding keeps those steps too (the rounding was learned for them), and the error the report
    gives is the one the final model has."""
    import re

    from leanvit.compress.quant.reconstruct import _reconstruction_error

    torch.manual_seed(0)
    model = nn.Sequential(ConvBlock(8), ConvBlock(8)).eval()
    calib = torch.randn(32, 8, 8, 8)
    config = QuantConfig(w_bits=4, a_bits=4, batch_size=16, reconstruct="blocks", reconstruct_iters=100)
    fixed = quantize(model, calib, config, progress=False)
    learned = quantize(model, calib, replace(config, reconstruct_act_scales=True), progress=False)
    report = learned.quant_report.reconstructed
    assert "learned)" in report["0"], report
    for name in ("0.conv1", "0.conv2"):  # the calibrated steps, which fixed keeps, moved
        assert not torch.equal(layers(learned)[name].input_quantizer.scale, layers(fixed)[name].input_quantizer.scale)
    # the first block reads the images themselves: its reported error recomputed from the final model
    after = float(re.search(r"-> (\S+) \(", report["0"]).group(1))
    with torch.no_grad():
        errors = [float(_reconstruction_error(learned[0](batch), [model[0](batch)], "0", 8)) for batch in calib.split(16)]
    assert sum(errors) / len(errors) == pytest.approx(after, rel=1e-3)


class ChannelMix(nn.Module):
    """A convolutional block that mixes channels with a learned matrix (``x @ self.mix``): a layer, not attention."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.mix = nn.Parameter(torch.randn(c, c) / c**0.5)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return x + (y.permute(0, 2, 3, 1) @ self.mix).permute(0, 3, 1, 2)


class MapAttention(nn.Module):
    """nn.MultiheadAttention over a feature map's positions, the map given back: attention with a 4-D output."""

    def __init__(self, c):
        super().__init__()
        self.pre, self.post = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.mha = nn.MultiheadAttention(c, 2, batch_first=True)

    def forward(self, x):
        t = self.pre(x).flatten(2).transpose(1, 2)
        t = self.mha(t, t, t, need_weights=False)[0]
        return x + self.post(t.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("conv, attention", [(ChannelMix, Mixer), (ConvBlock, MapAttention)])
def test_a_product_with_a_weight_is_no_attention_and_multihead_attention_always_is(conv, attention, calib):
    """A product of an activation with a parameter is a layer's: the block stays convolutional (feature maps out).
    A block holding nn.MultiheadAttention is a transformer one even when it gives feature maps back (whatever torch
    calls its fused kernel makes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Sequential(conv(8), conv(8)),
                          nn.Conv2d(8, 16, 2, stride=2), nn.Sequential(attention(16), attention(16)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    qmodel = quantize(model, calib, QuantConfig(**W4), progress=False)
    assert find_bridges(qmodel, calib[:2]) == ["2", "3.0"]


def test_learned_input_steps_take_lsqs_straight_through_gradients():
    """LSQ (Esser et al.): the forward is fake quantization at the learned step; the rounding is passed straight
    through, so an input inside the grid gets its output's gradient and the step ``s`` the gradient
    ``round(x / s) - x / s`` per unclamped value (the clamped ones: their grid end ``q - z``), times ``s`` for the
    log step learned. Without the straight-through term the inputs get no gradient and the step only ``q - z``."""
    from leanvit.compress.quant.quantizer import FakeQuantizer, QScheme
    from leanvit.compress.quant.reconstruct import LearnedStep

    torch.manual_seed(0)
    quantizer = FakeQuantizer(QScheme(4, symmetric=False), axis=-1, channels=1)
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(2.0))
    step = LearnedStep(quantizer)
    s, z, scheme = quantizer.scale, quantizer.zero_point.float(), quantizer.scheme
    x = torch.randn(600) * 1.5
    x = x[(torch.round(x / s) + z - scheme.qmin) * (torch.round(x / s) + z - scheme.qmax) != 0][:500]  # not at an end
    x, g = x.requires_grad_(), torch.randn(500)
    out = step(x)
    torch.testing.assert_close(out, quantizer(x.detach()))
    dx, dlog = torch.autograd.grad((out * g).sum(), (x, step.log_scale))
    ints = torch.round(x.detach() / s) + z
    inside = (ints >= scheme.qmin) & (ints <= scheme.qmax)
    assert 0 < inside.sum() < 500
    torch.testing.assert_close(dx, g * inside)
    scaled = x.detach() / s
    per_value = torch.where(inside, torch.round(scaled) - scaled, ints.clamp(scheme.qmin, scheme.qmax) - z)
    torch.testing.assert_close(dlog, (g * per_value).sum() * s, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_adaround_starts_at_the_weights_and_its_hard_rounding_is_round_to_nearest(symmetric):
    """AdaRound's ``h(V)`` starts at each weight's fractional part of a step, so the relaxed weights are the float
    ones (clamped to the grid as the quantizer clamps) and the hard rounding (up where ``V >= 0``) is round-to-nearest,
    around the zero point: what the weight quantizer gives. Its regulariser ``sum(1 - |2h - 1|^beta)`` is 1 per weight
    at ``h = 1/2`` (``V = 0``) and 0 once the stretched sigmoid has pushed ``h`` to exactly 0 or 1."""
    from leanvit.compress.quant.quantizer import FakeQuantizer, QScheme
    from leanvit.compress.quant.reconstruct import AdaRound

    torch.manual_seed(0)
    weight = torch.randn(8, 16, 3, 3)
    quantizer = FakeQuantizer(QScheme(4, symmetric=symmetric, per_channel=True), axis=0, channels=8)
    bound = weight.flatten(1).abs().amax(1)
    quantizer.set_range(-0.6 * bound, 0.4 * bound)  # both ends clip some weights
    rounder = AdaRound(quantizer, weight)
    scale, zero = quantizer.scale.view(-1, 1, 1, 1), quantizer.zero_point.view(-1, 1, 1, 1)
    lo, hi = (quantizer.scheme.qmin - zero) * scale, (quantizer.scheme.qmax - zero) * scale  # the grid's ends
    assert ((weight < lo) | (weight > hi)).any()
    with torch.no_grad():
        torch.testing.assert_close(rounder(weight), torch.minimum(torch.maximum(weight, lo), hi))
        assert torch.equal(rounder.hard(), quantizer.quantize(weight))
        rounder.v.zero_()
        assert float(rounder.regulariser(2.0)) == pytest.approx(weight.numel())
        rounder.v.copy_(torch.randn_like(weight).sign() * 20)
        assert float(rounder.regulariser(2.0)) == 0.0 and torch.equal(rounder(weight), rounder.hard())


@pytest.mark.parametrize("axis, shape", [(-1, (4, 5, 6)), (1, (2, 6, 3, 3))])
def test_learned_steps_of_a_per_channel_input_start_as_its_quantizer(axis, shape):
    """A per-channel input quantizer (``a_per_channel``: a token's last dim, a map's dim 1) learns one step per
    channel, each applied along its channel: at the start, the quantizer's own output."""
    from leanvit.compress.quant.quantizer import FakeQuantizer, QScheme
    from leanvit.compress.quant.reconstruct import LearnedStep

    torch.manual_seed(0)
    quantizer = FakeQuantizer(QScheme(4, symmetric=False, per_channel=True), axis=axis, channels=6)
    quantizer.set_range(-torch.linspace(0.1, 1, 6), torch.linspace(0.5, 5, 6))
    x = torch.randn(shape) * torch.linspace(0.2, 3, 6).view((-1,) + (1,) * (-axis - 1 if axis < 0 else len(shape) - 2))
    torch.testing.assert_close(LearnedStep(quantizer)(x), quantizer(x))


class Twice(nn.Module):
    """A Linear in a container element of its own (one quantized layer: no unit), run twice; then a block of two."""

    def __init__(self):
        super().__init__()
        self.parts = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
                                    nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))])

    def forward(self, x):
        once = self.parts[0]
        return self.parts[1](once(once(x.flatten(1))))


def test_a_container_element_with_one_layer_is_no_unit_and_a_layer_run_twice_comes_once():
    """A unit is an element holding two or more quantized layers (whose errors can compensate each other); a layer
    alone is reconstructed as a layer, once, in the order of its first call."""
    from leanvit.compress.quant.reconstruct import _call_order

    torch.manual_seed(0)
    calib = torch.randn(16, 2, 2, 2)
    qmodel = quantize(Twice().eval(), calib, QuantConfig(), progress=False)
    assert find_units(qmodel) == ["parts.1"]
    assert _call_order(qmodel, calib[:2])[1] == ["parts.0.0", "parts.1"]


def test_the_reconstruction_error_sums_over_the_tensors_a_unit_returns_as_a_list():
    from leanvit.compress.quant.reconstruct import _reconstruction_error

    a, b = torch.ones(2, 3, 4), torch.full((2, 5), 2.0)
    error = _reconstruction_error([a, b], [torch.zeros(2, 3, 4), torch.zeros(2, 5)], "unit")
    assert float(error) == pytest.approx(4 * 1.0 + 5 * 4.0)  # squares summed over channels, averaged elsewhere
