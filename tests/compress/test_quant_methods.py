"""RepQ-ViT LayerNorm reparameterisation and bias correction, checked against what they promise."""
import copy
from dataclasses import replace

import pytest
import torch

from leanvit.compress.quant import QuantConfig, quantize, quantizers
from leanvit.compress.quant import export as quant_export
from leanvit.compress.quant.calibrate import quantizers_disabled
from leanvit.errors import LeanvitError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def outlier_vit(tiny_vit):
    """tiny_vit whose LayerNorms scale a few channels 30x, the post-LN outliers trained ViTs have."""
    model = copy.deepcopy(tiny_vit)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                gain = torch.ones_like(norm.weight)
                gain[torch.randperm(gain.numel(), generator=generator)[:6]] = 30.0
                norm.weight.mul_(gain)
                norm.bias.normal_(0, 0.5, generator=generator)
    return model


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(4)
    return [torch.randn(8, 3, 32, 32) for _ in range(4)]


def _only(model, keep):
    for name, q in quantizers(model).items():
        q.enabled = name in keep
    return model


@torch.no_grad()
def test_reparameterisation_deploys_per_channel_ranges_per_tensor(outlier_vit, calib):
    x = torch.randn(8, 3, 32, 32)
    rep = quantize(outlier_vit, calib, QuantConfig(), progress=False)
    assert set(rep.quant_report.reparameterised) == {f"blocks.{i}.norm{j}" for i in (0, 1) for j in (1, 2)}
    with quantizers_disabled(rep):  # the float function is unchanged
        torch.testing.assert_close(rep(x), outlier_vit(x), atol=1e-4, rtol=1e-4)
    assert rep.blocks[0].attn.qkv.input_quantizer.scale.ndim == 0  # per tensor: deployable

    # with only qkv's input quantized, the reparameterised per-tensor quantizer computes exactly what a
    # per-channel quantizer on the original model computes
    keep = {"blocks.0.attn.qkv.input_quantizer"}
    per_channel = _only(quantize(outlier_vit, calib, QuantConfig(a_per_channel=True, reparam_layernorm=False),
                                 progress=False), keep)
    torch.testing.assert_close(_only(rep, keep)(x), per_channel(x), atol=1e-4, rtol=1e-4)
    # RepQ-ViT's per-tensor grid: the mean of the per-channel scales, the rounded mean of their zero points
    channels, tensor = per_channel.blocks[0].attn.qkv.input_quantizer, rep.blocks[0].attn.qkv.input_quantizer
    torch.testing.assert_close(tensor.scale, channels.scale.mean())
    assert tensor.zero_point == torch.round(channels.zero_point.float().mean())
    per_tensor = _only(quantize(outlier_vit, calib, QuantConfig(reparam_layernorm=False), progress=False), keep)
    ref = outlier_vit(x)
    assert (per_channel(x) - ref).pow(2).mean() < 0.5 * (per_tensor(x) - ref).pow(2).mean()


@torch.no_grad()
def test_reparameterisation_improves_w8a8_and_is_skipped_where_channels_look_alike(outlier_vit, tiny_vit, calib):
    x = torch.randn(16, 3, 32, 32)
    ref = outlier_vit(x)
    err = {rp: (quantize(outlier_vit, calib, QuantConfig(reparam_layernorm=rp), progress=False)(x) - ref).pow(2).mean()
           for rp in (False, True)}
    assert err[True] < 0.8 * err[False]
    plain = quantize(tiny_vit, calib, QuantConfig(), progress=False)  # random init: all channels alike
    assert plain.quant_report.reparameterised == []


@torch.no_grad()
def test_bias_correction_zeroes_the_mean_output_error(tiny_vit, calib):
    config = QuantConfig(w_bits=4, a_bits=8, bias_correction=True)
    corrected = quantize(tiny_vit, calib, config, progress=False)
    plain = quantize(tiny_vit, calib, QuantConfig(w_bits=4, a_bits=8), progress=False)

    def mean_error(model):  # the patch embedding sees the images themselves: no upstream layer changes them
        errors = [(model.patch_embed.proj(x) - tiny_vit.patch_embed.proj(x)).mean((0, 2, 3)) for x in calib]
        return torch.stack(errors).mean(0).abs().max()

    assert mean_error(plain) > 1e-3
    assert mean_error(corrected) < 1e-5
    assert not torch.equal(corrected.head.bias, plain.head.bias)


def test_auto_activation_scheme_picks_uint8_after_relu_and_exports(tmp_path):
    from leanvit.compress.quant import onnx_int8_summary
    from leanvit.deploy import check_agreement, get_engine

    torch.manual_seed(5)
    nn = torch.nn
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    calib = torch.randn(64, 3, 4, 4)
    qmodel = quantize(model, calib, QuantConfig(w_bits=7, a_symmetric="auto"), progress=False)
    assert not qmodel[3].input_quantizer.scheme.symmetric  # one-sided input: the full uint8 grid
    path = quant_export(qmodel, tmp_path / "m.onnx", engine="onnxruntime")
    assert onnx_int8_summary(path).int8 == 2
    runner = get_engine("onnxruntime", threads=1).load_onnx(path)
    agreement = check_agreement(qmodel, runner, [torch.randn(1, 3, 4, 4) for _ in range(4)])
    assert agreement.max_abs_err < 1e-2 * agreement.ref_scale


def test_assign_bits_moves_the_cheapest_layers_per_weight_first_until_the_budget():
    from leanvit.compress.quant import assign_bits

    scores, sizes = {"a": 1.0, "b": 10.0, "c": 0.5}, {"a": 100, "b": 100, "c": 200}  # per weight: c < a < b
    assert assign_bits(scores, sizes, 8.0) == (("*", "w8a8"),)
    assert assign_bits(scores, sizes, 6.0) == (("c", "w4a4"), ("*", "w8a8"))  # c is half the weights: 8 -> 6
    assert assign_bits(scores, sizes, 5.5) == (("c", "w4a4"), ("a", "w4a4"), ("*", "w8a8"))
    assert assign_bits(scores, sizes, 4.0, low="w4a8") == (("c", "w4a8"), ("a", "w4a8"), ("b", "w4a8"), ("*", "w8a8"))
    with pytest.raises(LeanvitError, match="between 4 and 8"):
        assign_bits(scores, sizes, 3.5)
    # a: pinned at 8 bits (layer_bits): it counts towards the average, and only b and c can move
    sizes["a"] = 200
    assert assign_bits({"b": 10.0, "c": 0.5}, sizes, 6.0, pinned={"a": 8}) == (
        ("c", "w4a4"), ("b", "w4a4"), ("*", "w8a8"))  # (200 * 8 + 300 * 4) / 500 = 5.6
    with pytest.raises(LeanvitError, match="keep the average at 5.60"):
        assign_bits({"b": 10.0, "c": 0.5}, sizes, 5.0, pinned={"a": 8})
    # equal layers (a ViT's 12 qkv): an exactly reachable budget moves exactly enough (7 and 10 moved before: the
    # running average drifted below the budget by float error)
    equal = {f"qkv{i}": 1.0 + i for i in range(12)}
    for budget, moved in ((6.0, 6), (5.0, 9)):
        assert len(assign_bits(equal, dict.fromkeys(equal, 100), budget)) - 1 == moved
    assert len(assign_bits({c: 1.0 for c in "abcde"}, dict.fromkeys("abcde", 10), 5.6)) - 1 == 3
    with pytest.raises(LeanvitError, match="no layers"):  # was a ZeroDivisionError
        assign_bits({}, {}, 6.0)
    with pytest.raises(LeanvitError, match="down to w8a8, which has as many weight bits or more"):  # low, high swapped
        assign_bits(scores, sizes, 6.0, low="w8a8", high="w4a4")


@torch.no_grad()
def test_mixed_precision_meets_the_budget_and_beats_the_opposite_choice(tiny_vit, calib):
    from leanvit.compress.quant import allocate_bits, assign_bits, average_weight_bits, layer_sensitivity

    with pytest.raises(LeanvitError, match="between 4 and 8"):
        allocate_bits(tiny_vit, calib, 3.0, low="w4a4", high="w8a8")
    bits = allocate_bits(tiny_vit, calib, 6.0, low="w4a4", high="w8a8")
    chosen = quantize(tiny_vit, calib, QuantConfig(layer_bits=bits), progress=False)
    assert 4.0 < average_weight_bits(chosen) <= 6.0
    pins = (("head", "w8a8"), ("blocks.1.mlp.*", "w8a8"))  # set by the user: kept, and within the budget
    pinned = allocate_bits(tiny_vit, calib, 6.0, low="w4a4", high="w8a8", config=QuantConfig(layer_bits=pins))
    both = quantize(tiny_vit, calib, QuantConfig(layer_bits=(*pins, *pinned)), progress=False)
    assert 4.0 < average_weight_bits(both) <= 6.0 and not {"head", "blocks.1.mlp.fc1"} & {n for n, _ in pinned}
    low = sum(layer_bits == "w4a4" for _, layer_bits in bits)
    assert f"{low} layers at 4 bits" in chosen.quant_report.summary()
    # the opposite: the layers that hurt most per weight go to 4 bits first, until the same budget
    sensitivity = layer_sensitivity(tiny_vit, calib, QuantConfig.from_bits("w4a4"))
    sizes = {n: tiny_vit.get_submodule(n).weight.numel() for n in sensitivity}
    worst = assign_bits({n: -s for n, s in sensitivity.items()}, sizes, 6.0)
    assert {n for n, _ in worst[:-1]} != {n for n, _ in bits[:-1]}
    opposite = quantize(tiny_vit, calib, QuantConfig(layer_bits=worst), progress=False)
    assert 4.0 < average_weight_bits(opposite) <= 6.0
    x = torch.randn(16, 3, 32, 32)
    ref = tiny_vit(x)
    assert (chosen(x) - ref).pow(2).mean() < 0.5 * (opposite(x) - ref).pow(2).mean()


def test_mixed_precision_keeps_the_recipes_8_bit_edges(tiny_vit, calib):
    """A W4A4 recipe puts the patch embedding and the head at 8 bits; the allocation's closing ("*", high) must
    not take them back to whatever the budget needs (the CLI's --bits w4a4 --avg-bits N)."""
    from leanvit.compress.quant import allocate_bits, average_weight_bits

    config = QuantConfig.recipe("mse", "w4a4")
    bits = allocate_bits(tiny_vit, calib, 4.2, low="w4a4", high="w8a8", config=config)
    qmodel = quantize(tiny_vit, calib, replace(config, layer_bits=(*config.layer_bits, *bits)), progress=False)
    weight_bits = qmodel.quant_report.weight_bits
    assert qmodel.quant_report.edge_layers == ["patch_embed.proj", "head"]
    assert weight_bits["patch_embed.proj"] == weight_bits["head"] == 8
    assert 4.0 < average_weight_bits(qmodel) <= 4.2


class _NormActHead(torch.nn.Module):
    """Patch embedding -> LayerNorm with outlier channels -> in-place Hardswish -> Linear (EfficientViT's head)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 32, 4, 4)
        self.norm = torch.nn.LayerNorm(32)
        self.act = torch.nn.Hardswish(inplace=True)
        self.fc = torch.nn.Linear(32, 10)
        with torch.no_grad():
            self.norm.weight[:4] = 30.0  # outliers: per-channel ranges win, so the change is attempted

    def forward(self, x):
        return self.fc(self.act(self.norm(self.embed(x).flatten(2).transpose(1, 2)))).mean(1)


@torch.no_grad()
def test_a_rejected_reparameterisation_is_undone_in_full(calib):
    """The in-place activation makes the LayerNorm's output tensor the Linear's input, so the LayerNorm is tried
    and must be rolled back (the activation is not linear): the Linear's bias has to come back too."""
    torch.manual_seed(0)
    model = _NormActHead().eval()
    q = quantize(model, calib, QuantConfig(), progress=False)
    assert q.quant_report.reparameterised == []
    x = torch.randn(8, 3, 32, 32)
    with quantizers_disabled(q):
        torch.testing.assert_close(q(x), model(x), atol=1e-4, rtol=1e-4)


def test_assign_bits_ranks_by_score_per_weight_and_needs_fewer_bits_below():
    """The cheapest layer is the one losing least per weight moved down: a big layer with a larger score but a
    smaller score per weight goes first (by score alone the small one would, and the big one after it). A low
    bit-width with as many weight bits as the high one moves nothing: an error."""
    from leanvit.compress.quant import assign_bits, check_budget

    scores, sizes = {"big": 4.0, "small": 1.0}, {"big": 400, "small": 10}  # per weight: big 0.01, small 0.1
    assert assign_bits(scores, sizes, 7.9) == (("big", "w4a4"), ("*", "w8a8"))
    with pytest.raises(LeanvitError, match="down to w8a4, which has as many weight bits or more"):
        check_budget(8.0, "w8a4", "w8a8")


class _TwoLayers(torch.nn.Module):
    """A Linear reading inputs with one outlier channel (an 4-bit input grid rounds the rest away), then a head."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = torch.nn.Linear(12, 16), torch.nn.Linear(16, 10)

    def forward(self, x):
        x = x.flatten(1) * torch.tensor([30.0] + [1.0] * 11)
        return self.head(torch.relu(self.fc(x)))


@torch.no_grad()
def test_logit_sensitivity_quantizes_the_layers_weights_and_inputs_together():
    """A layer's "logit" sensitivity is the logits' mean squared error with its weights and its inputs quantized,
    everything else float: what moving that layer to the low bit-width costs (at W8A4 mostly the inputs')."""
    from leanvit.compress.quant import layer_sensitivity

    torch.manual_seed(0)
    model, calib = _TwoLayers().eval(), torch.randn(32, 3, 2, 2)
    config = QuantConfig(w_bits=8, a_bits=4)
    sensitivity = layer_sensitivity(model, calib, config)
    qmodel = quantize(model, calib, config, progress=False)
    for name in ("fc", "head"):
        _only(qmodel, {f"{name}.input_quantizer", f"{name}.weight_quantizer"})
        assert sensitivity[name] == pytest.approx(float((qmodel(calib) - model(calib)).pow(2).mean()), rel=1e-5)


def test_layers_are_scored_against_the_float_function_whatever_else_the_config_does(tiny_vit, calib):
    """Bias correction, reconstruction and conv output quantizers change the scored copy's biases, weights or
    outputs, away from the float function each layer is measured against: the scores are those without them."""
    from leanvit.compress.quant import layer_sensitivity

    config = QuantConfig(w_bits=4, a_bits=8)
    plain = layer_sensitivity(tiny_vit, calib, config, max_images=8)
    for changes in (dict(bias_correction=True), dict(quantize_conv_outputs=True),
                    dict(reconstruct="blocks", reconstruct_iters=2, reconstruct_act_scales=True)):
        assert layer_sensitivity(tiny_vit, calib, replace(config, **changes), max_images=8) == plain, changes


class _NormHead(torch.nn.Module):
    """Patch embedding -> LayerNorm with outlier channels -> Linear(s) read straight from it -> mean."""

    def __init__(self, linears=("fc",), bias=True, norm_bias=True, act=False):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 32, 4, 4)
        self.norm = torch.nn.LayerNorm(32, bias=norm_bias)
        self.act = torch.nn.Hardswish(inplace=True) if act else torch.nn.Identity()
        self.names = linears
        for name in linears:
            setattr(self, name, torch.nn.Linear(32, 10, bias=bias))
        with torch.no_grad():
            self.norm.weight[:4] = 30.0  # outliers: per-channel ranges win, so the change is attempted
            if norm_bias:
                self.norm.bias.normal_(0, 0.5)

    def forward(self, x):
        t = self.act(self.norm(self.embed(x).flatten(2).transpose(1, 2)))
        return sum(getattr(self, name)(t) for name in self.names).mean(1)


@torch.no_grad()
def test_reparameterisation_of_layernorms_and_linears_without_a_bias(calib):
    """RepQ-ViT's shift goes into the Linear's bias: a bias-free Linear gets one (``-W' s (z_c - z)``), and the
    float function stays; rolled back (an in-place activation between them), it is bias-free again. A LayerNorm
    without a bias has none to take the shift: it is not reparameterised, and quantizing still works."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    for act, reparameterised in ((False, ["norm"]), (True, [])):
        model = _NormHead(bias=False, act=act).eval()
        q = quantize(model, calib, QuantConfig(), progress=False)
        assert q.quant_report.reparameterised == reparameterised
        assert (q.fc.bias is None) == act
        with quantizers_disabled(q):
            torch.testing.assert_close(q(x), model(x), atol=1e-4, rtol=1e-4)
    q = quantize(_NormHead(norm_bias=False).eval(), calib, QuantConfig(), progress=False)
    assert q.quant_report.reparameterised == [] and q.norm.bias is None


def test_a_layernorm_read_by_linears_quantizing_their_inputs_differently_is_not_reparameterised(calib):
    """One LayerNorm output, one per-tensor quantizer after the change: where its readers' input grids differ
    (``layer_bits``), the one scale set for all would be another layer's, so the LayerNorm is left as it is."""
    model = _NormHead(linears=("q", "k")).eval()
    assert quantize(model, calib, QuantConfig(), progress=False).quant_report.reparameterised == ["norm"]
    mixed = quantize(model, calib, QuantConfig(layer_bits=(("q", "w8a6"),)), progress=False)
    assert mixed.quant_report.reparameterised == []


@torch.no_grad()
def test_bias_correction_gives_a_bias_free_layer_the_correction():
    """A Linear without a bias gets one holding minus its mean output error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(16, 10)).eval()
    calib = torch.randn(32, 3, 2, 2)
    plain = quantize(model, calib, QuantConfig(w_bits=4, a_bits=8), progress=False)
    corrected = quantize(model, calib, QuantConfig(w_bits=4, a_bits=8, bias_correction=True), progress=False)
    assert plain[1].bias is None and corrected[1].bias is not None
    mean_error = lambda q: (q[1](calib.flatten(1)) - model[1](calib.flatten(1))).mean(0).abs().max()  # noqa: E731
    assert mean_error(plain) > 1e-3 and mean_error(corrected) < 1e-5


@torch.no_grad()
def test_edge_layers_count_towards_the_budget_at_their_weight_bits(tiny_vit, calib):
    """Edge layers at ``edge_bits="w8a4"`` hold 8-bit weights: counted at their 4 activation bits, the allocation
    stopped too early and the model came out above the budget (6.08 bits for 6, 4.33 for 4.3)."""
    from leanvit.compress.quant import allocate_bits, average_weight_bits

    config = QuantConfig.recipe("mse", "w4a4", edge_bits="w8a4")
    for budget in (4.3, 6.0):
        bits = allocate_bits(tiny_vit, calib, budget, low="w4a4", high="w8a8", config=config)
        qmodel = quantize(tiny_vit, calib, replace(config, layer_bits=(*config.layer_bits, *bits)), progress=False)
        assert qmodel.quant_report.weight_bits["head"] == 8 and average_weight_bits(qmodel) <= budget


@torch.no_grad()
def test_the_per_channel_gain_weighs_the_errors_by_every_reader_of_the_layernorm():
    """q, k and v as three Linears read one LayerNorm: an input channel's error costs what it costs at all their
    outputs, so the gain is that of one Linear stacking their rows (not of the first reader alone)."""
    from leanvit.compress.quant.quantizer import QScheme, RangeObserver
    from leanvit.compress.quant.reparam import per_channel_gain

    torch.manual_seed(0)
    observer = RangeObserver(axis=-1)
    observer.update(torch.randn(64, 16, 8) * torch.logspace(-1, 1, 8))
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    a.weight[:, 4:] = 0.0  # a reads the small channels only, b all of them, the large ones strongly
    b.weight[:, 4:] *= 10
    both = torch.nn.Linear(8, 8)
    both.weight.copy_(torch.cat([a.weight, b.weight]))
    scheme = QScheme(4, symmetric=False)
    gain = per_channel_gain(observer, [a, b], scheme, "mse", 99.99)
    assert gain == pytest.approx(per_channel_gain(observer, [both], scheme, "mse", 99.99), rel=1e-5)
    assert gain != pytest.approx(per_channel_gain(observer, [a], scheme, "mse", 99.99), rel=1e-2)


def test_allocate_bits_ranks_the_layers_by_the_method_asked():
    """``"hessian"`` sees the weights' error alone, ``"logit"`` the inputs' too: ``fc``'s inputs have an outlier channel
    that a 4-bit input grid ruins, so the logit error moves ``head`` down first and the Hessian one ``fc``. Each
    allocation is the greedy one on that method's scores at the low bit-width."""
    from leanvit.compress.quant import allocate_bits, assign_bits, layer_sensitivity

    torch.manual_seed(0)
    model, calib = _TwoLayers().eval(), torch.randn(32, 3, 2, 2)
    sizes = {"fc": 12 * 16, "head": 16 * 10}
    allocations = {}
    for method in ("logit", "hessian"):
        scores = layer_sensitivity(model, calib, QuantConfig(w_bits=4, a_bits=4), method=method)
        allocations[method] = allocate_bits(model, calib, 7.0, method=method)
        assert allocations[method] == assign_bits(scores, sizes, 7.0), method
    assert allocations == {"logit": (("head", "w4a4"), ("*", "w8a8")), "hessian": (("fc", "w4a4"), ("*", "w8a8"))}


@torch.no_grad()
def test_logit_sensitivity_is_measured_on_the_first_max_images():
    from leanvit.compress.quant import layer_sensitivity

    torch.manual_seed(0)
    model, calib = _TwoLayers().eval(), torch.randn(32, 3, 2, 2)
    config = QuantConfig(w_bits=8, a_bits=4)
    sensitivity = layer_sensitivity(model, calib, config, max_images=8)
    qmodel = quantize(model, calib, config, progress=False)
    for name in ("fc", "head"):
        _only(qmodel, {f"{name}.input_quantizer", f"{name}.weight_quantizer"})
        expected = float((qmodel(calib[:8]) - model(calib[:8])).pow(2).mean())
        assert sensitivity[name] == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_per_channel_ranges_that_fit_exactly_win_without_dividing_by_zero():
    """Channels each taking two values (0 and its own level) quantize exactly on per-channel min-max grids: a held-out
    per-channel error of 0, against which the per-tensor error wins nothing (a gain above 1, not a division error)."""
    from leanvit.compress.quant.quantizer import QScheme, RangeObserver
    from leanvit.compress.quant.reparam import per_channel_gain

    torch.manual_seed(0)
    observer = RangeObserver(axis=-1)
    observer.update((torch.rand(64, 16, 8) > 0.5).float() * torch.logspace(-1, 1, 8))
    assert per_channel_gain(observer, [torch.nn.Linear(8, 4)], QScheme(8, symmetric=False), "minmax", 99.99) > 1e6
