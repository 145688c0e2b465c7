"""Quantizer primitives, range choice, calibration and the float-layer report, against independent references."""
import copy
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leanvit.compress.quant import (
    QScheme, QuantConfig, QuantConv2d, QuantLinear, RangeObserver, choose_range, fake_quantize, fold_batchnorm,
    qparams, quantize,
)
from leanvit.compress.quant.quantizer import input_channel_weights
from leanvit.errors import LeanvitError

torch.set_num_threads(1)


def reference_fake_quant(x, scale, zero, qmin, qmax):
    """ONNX QuantizeLinear -> DequantizeLinear in NumPy: round half to even, saturate."""
    return (np.clip(np.rint(x / scale) + zero, qmin, qmax) - zero) * scale


@pytest.mark.parametrize("scheme", [QScheme(8, True), QScheme(8, False), QScheme(4, False), QScheme(6, True)])
def test_fake_quantize_matches_onnx_semantics(scheme):
    torch.manual_seed(0)
    x = torch.randn(64, 16) * 3
    scale, zero = qparams(x.min().view(1), x.max().view(1), scheme)
    out = fake_quantize(x, scale[0], zero[0], scheme)
    ref = reference_fake_quant(x.numpy(), scale.item(), zero.item(), scheme.qmin, scheme.qmax)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)
    assert fake_quantize(torch.zeros(1), scale[0], zero[0], scheme).item() == 0.0  # zero is exact
    assert len(torch.unique(out)) <= 2**scheme.bits


def test_per_channel_scales_follow_each_channel():
    w = torch.randn(8, 32) * torch.logspace(-2, 1, 8)[:, None]
    scheme = QScheme(8, symmetric=True, per_channel=True)
    scale, zero = qparams(w.amin(1), w.amax(1), scheme)
    np.testing.assert_allclose(scale.numpy(), (w.abs().amax(1) / 127).numpy(), rtol=1e-6)
    out = fake_quantize(w, scale, zero, scheme, axis=0)
    ref = reference_fake_quant(w.numpy(), scale.numpy()[:, None], 0, -128, 127)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)


def test_mse_range_beats_minmax_and_is_near_the_true_optimum():
    torch.manual_seed(0)
    values = torch.cat([torch.randn(20000), torch.tensor([40.0, -35.0])]).view(1, -1)  # two outliers
    lo, hi = values.amin(1), values.amax(1)
    scheme = QScheme(4, symmetric=False)

    def err(r_lo, r_hi):
        s, z = qparams(r_lo, r_hi, scheme)
        return float(((fake_quantize(values[0], s[0], z[0], scheme) - values[0]) ** 2).mean())

    m_lo, m_hi = choose_range(values, lo, hi, scheme, "mse")
    dense = min(err(lo * r, hi * r) for r in np.linspace(0.001, 1, 1000))  # brute force, 1000 ratios
    assert err(m_lo, m_hi) < 0.25 * err(lo, hi)
    assert err(m_lo, m_hi) <= dense * 1.02
    p_lo, p_hi = choose_range(values, lo, hi, scheme, "percentile", percentile=99.9)
    np.testing.assert_allclose([p_lo.item(), p_hi.item()], np.percentile(values.numpy(), [0.1, 99.9]), rtol=1e-3)


def test_observer_keeps_exact_extremes_and_a_uniform_bounded_sample():
    torch.manual_seed(0)
    observer = RangeObserver(axis=-1, max_values=4096)
    batches = [torch.rand(16, 50, 8) + 10 * i for i in range(6)]  # a row's batch is its value // 10
    for b in batches:
        observer.update(b)
    full = torch.cat(batches).reshape(-1, 8)
    torch.testing.assert_close(observer.lo, full.amin(0))
    torch.testing.assert_close(observer.hi, full.amax(0))
    assert observer.rows.numel() <= 4096
    per_batch = torch.bincount((observer.rows[:, 0] // 10).long(), minlength=6)
    assert per_batch.sum() == 4096 // 8
    assert per_batch.min() > 50 and per_batch.max() < 125  # ~85 each: uniform over batches, not the last ones


def test_config_parses_bits_and_rejects_bad_values():
    config = QuantConfig.from_bits("W4A8")
    assert (config.w_bits, config.a_bits) == (4, 8)
    for bad in ("w8", "int8", "w8a9", "w1a8"):
        with pytest.raises(LeanvitError):
            QuantConfig.from_bits(bad)
    with pytest.raises(LeanvitError, match="range method"):
        QuantConfig(a_method="kl")
    # accepted before: a truthy string for True, a string of bits, a NaN that turned the attention-error bound off
    for bad, message in (({"w_per_channel": "no"}, "w_per_channel must be True or False, got 'no'"),
                         ({"w_bits": "8"}, "w_bits must be a whole number, got '8'"),
                         ({"attn_bits": 8.0}, "attn_bits must be a whole number of bits or None"),
                         ({"attn_max_error": float("nan")}, "attn_max_error must be a finite relative error")):
        with pytest.raises(LeanvitError, match=re.escape(message)):
            QuantConfig(**bad)


def test_wrongly_typed_config_values_are_named_at_construction(tiny_vit):
    """Each was an AttributeError from parse_bits, a misread 'w8.0a8', or a TypeError deep inside quantize()."""
    for make, message in (
            (lambda: QuantConfig(edge_bits=8), "edge_bits must be a bit-width string such as 'w8a8', got 8 (int)"),
            (lambda: QuantConfig.from_bits(8), "bits must be a bit-width string such as 'w8a8', got 8 (int)"),
            (lambda: QuantConfig.recipe("mse", 8), "bits must be a bit-width string such as 'w8a8', got 8 (int)"),
            (lambda: QuantConfig(layer_bits=(("head", 8),)), "layer_bits' bits for 'head' must be a bit-width string"),
            (lambda: QuantConfig(w_bits=8.0), "w_bits must be a whole number, got 8.0"),
            (lambda: QuantConfig(skip=None), "skip must be a tuple of layer-name patterns such as ('head',)"),
            (lambda: QuantConfig(percentile=None), "percentile must be a number between 50 and 100 (e.g. 99.99)"),
            (lambda: QuantConfig(percentile=101), "percentile must be between 50.0 and 100.0, got 101")):
        with pytest.raises(LeanvitError, match=re.escape(message)):
            make()
    listed = QuantConfig(skip=["head"], layer_bits=[["head", "w8a8"]])  # lists taken, as tuples: the config hashes
    assert (listed.skip, listed.layer_bits) == (("head",), (("head", "w8a8"),)) and hash(listed)
    for config in ("w8a8", {"w_bits": 8}):
        with pytest.raises(LeanvitError, match=re.escape("takes a QuantConfig, got") + ".*QuantConfig.from_bits"):
            quantize(tiny_vit, torch.randn(16, 3, 32, 32), config, progress=False)


def test_empty_or_small_calibration_set_is_an_error(tiny_vit):
    with pytest.raises(LeanvitError, match="empty"):
        quantize(tiny_vit, [], progress=False)
    with pytest.raises(LeanvitError, match="4 images"):
        quantize(tiny_vit, torch.randn(4, 3, 32, 32), progress=False)
    with pytest.raises(LeanvitError, match=r"\(B, C, H, W\)"):
        quantize(tiny_vit, [torch.randn(16, 32)], progress=False)
    with pytest.raises(LeanvitError, match="2 sizes \\(3x32x32, 3x48x48\\)"):
        quantize(tiny_vit, [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 48, 48)], progress=False)
    with pytest.raises(LeanvitError, match="does not run on the calibration images \\(3x48x48: "):
        quantize(tiny_vit, torch.randn(16, 3, 48, 48), progress=False)  # built for 32x32
    with pytest.raises(LeanvitError, match="does not run on the calibration images \\(1x32x32: "):
        quantize(tiny_vit, torch.randn(16, 1, 32, 32), progress=False)
    with pytest.raises(LeanvitError, match="torch.uint8 pixels, not the model's float input"):
        quantize(tiny_vit, torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), progress=False)
    with pytest.raises(LeanvitError, match="Calibration batch 0 holds NaN or infinite values"):
        quantize(tiny_vit, torch.full((16, 3, 32, 32), float("nan")), progress=False)
    from torch.utils.data import Dataset

    class TwoSizes(Dataset):  # a dataset without a resizing transform: its loader cannot stack a batch
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32 if i % 2 else 48), 0

    with pytest.raises(LeanvitError, match="The calibration images have several sizes: calibrate at the one input"):
        quantize(tiny_vit, TwoSizes(), progress=False)
    qmodel = quantize(tiny_vit, torch.randn(16, 3, 32, 32), progress=False)
    with pytest.raises(LeanvitError, match="quantized already .*: pass the float model"):
        quantize(qmodel, torch.randn(16, 3, 32, 32), progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_model_is_refused_up_front_with_the_fix(tiny_vit, dtype):
    """Not blamed on the images (the float32 batches clash with half weights) but named, with model.float()."""
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(LeanvitError, match=f"VisionTransformer is in {name}; .*pass model.float\\(\\) to quantize"):
        quantize(copy.deepcopy(tiny_vit).to(dtype), torch.randn(16, 3, 32, 32).to(dtype), progress=False)


def test_a_dataset_of_samples_is_batched():
    """What the empty-set error suggests, a dataset such as ``calibration_subset(dataset, 256)``, works as is."""
    from torch.utils.data import TensorDataset

    from leanvit.compress.quant import calibration_batches

    images = torch.randn(20, 3, 8, 8)
    batches = calibration_batches(TensorDataset(images, torch.zeros(20, dtype=torch.long)), 16, batch_size=8)
    assert [b.shape[0] for b in batches] == [8, 8, 4] and torch.equal(torch.cat(batches), images)


def test_calibration_images_result_is_taken_as_its_batches(tiny_vit):
    """calibration_images() returns a NamedTuple, whose fields (batches, labels, indices...) are no batches."""
    from torch.utils.data import TensorDataset

    from leanvit.compress.quant import calibration_batches
    from leanvit.data import calibration_images

    data = TensorDataset(torch.randn(20, 3, 32, 32), torch.arange(20) % 4)
    data.targets = (torch.arange(20) % 4).tolist()
    calib = calibration_images(data, 16, batch_size=8)
    batches = calibration_batches(calib, 16)
    assert len(batches) == 2 and torch.equal(torch.cat(batches), torch.cat(calib.batches))
    assert quantize(tiny_vit, calib, progress=False).quant_report.calib_images == 16


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(1)
    return [torch.randn(8, 3, 32, 32) for _ in range(3)]


def test_quantize_swaps_every_compute_layer_and_reports_float_ones(tiny_vit, calib):
    before = copy.deepcopy(tiny_vit.state_dict())
    qmodel = quantize(tiny_vit, calib, QuantConfig(), progress=False)
    for k, v in tiny_vit.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    float_compute = [n for n, m in qmodel.named_modules()
                     if type(m) in (nn.Linear, nn.Conv2d)]
    assert float_compute == []
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in tiny_vit.modules())
    assert len(qmodel.quant_report.quantized) == n_layers
    norms = [n for n, m in tiny_vit.named_modules() if isinstance(m, nn.LayerNorm)]
    assert set(norms) <= set(qmodel.quant_report.float_layers)
    assert qmodel.quant_report.input_size == (3, 32, 32)
    assert f"float {norms[0]}: normalisation" in qmodel.quant_report.summary()


def test_more_bits_track_the_float_model_more_closely(tiny_vit, calib):
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = tiny_vit(x)
        errs = [(quantize(tiny_vit, calib, QuantConfig(w_bits=b, a_bits=b), progress=False)(x) - ref).pow(2).mean()
                for b in (4, 6, 8)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-2 * ref.pow(2).mean()


def test_skipped_layers_stay_float_with_a_warning(tiny_vit, calib):
    with pytest.warns(UserWarning, match="head"):
        qmodel = quantize(tiny_vit, calib, QuantConfig(skip=("head",)), progress=False)
    assert type(qmodel.head) is nn.Linear
    assert "QuantConfig.skip" in qmodel.quant_report.float_layers["head"]


def test_warnings_point_at_the_callers_line_not_at_leanvit_or_torch(tiny_vit, calib):
    with pytest.warns(UserWarning, match="head") as caught:
        quantize(tiny_vit, calib, QuantConfig(skip=("head",)), progress=False)
    assert {w.filename for w in caught} == {__file__}


def test_a_skipped_attention_keeps_its_matmuls_float_and_says_so(tiny_vit, calib):
    from leanvit.compress.quant.attention import QuantMatmuls

    with pytest.warns(UserWarning, match="blocks.1.attn"):
        qmodel = quantize(tiny_vit, calib, QuantConfig(attn_bits=8, skip=("blocks.1.attn",)), progress=False)
    assert type(qmodel.blocks[1].attn.qkv) is nn.Linear and not isinstance(qmodel.blocks[1].attn, QuantMatmuls)
    assert isinstance(qmodel.blocks[0].attn, QuantMatmuls) and "blocks.1.attn" not in qmodel.quant_report.quantized
    assert "kept float by QuantConfig.skip ('blocks.1.attn')" in qmodel.quant_report.float_layers["blocks.1.attn"]


def test_skip_names_a_layer_or_a_module_holding_layers_and_patterns_matching_nothing_are_warned(tiny_vit, calib):
    with pytest.warns(UserWarning, match="blocks.1.mlp.fc1"):
        qmodel = quantize(tiny_vit, calib, QuantConfig(skip="blocks.1"), progress=False)  # one pattern, not 8 chars
    assert type(qmodel.blocks[1].mlp.fc1) is nn.Linear and type(qmodel.blocks[0].mlp.fc1) is not nn.Linear
    assert qmodel.quant_report.float_layers["blocks.1.attn.qkv"] == "kept float by QuantConfig.skip ('blocks.1')"
    with pytest.warns(UserWarning, match=r"No layer matches the pattern\(s\) 'Head', 'stage.\*'"):
        qmodel = quantize(tiny_vit, calib, QuantConfig(skip=("Head",), layer_bits=(("stage.*", "w4a4"),)),
                          progress=False)
    assert type(qmodel.head) is not nn.Linear
    assert not qmodel.training and not any(m.training for m in qmodel.modules())
    with pytest.raises(LeanvitError, match="pairs"):
        QuantConfig(layer_bits=("head", "w8a8"))


def test_identical_first_calibration_images_do_not_make_every_layer_constant(tiny_vit):
    torch.manual_seed(0)
    images = torch.randn(16, 3, 32, 32)
    images[1] = images[0]
    qmodel = quantize(tiny_vit, images, QuantConfig(), progress=False)
    assert not any("constant input" in why for why in qmodel.quant_report.float_layers.values())
    with pytest.raises(LeanvitError, match="the same image"):
        quantize(tiny_vit, images[:1].expand(16, -1, -1, -1).clone(), QuantConfig(), progress=False)


def test_layer_bits_override_the_default_first_match_first(tiny_vit, calib):
    config = QuantConfig.from_bits("w4a4", layer_bits=(("head", "w8a8"), ("patch_embed.*", "w8a6"), ("*", "w6a6")))
    qmodel = quantize(tiny_vit, calib, config, progress=False)
    bits = {name: (m.weight_quantizer.scheme.bits, m.input_quantizer.scheme.bits)
            for name, m in qmodel.named_modules() if hasattr(m, "weight_quantizer")}
    assert bits.pop("head") == (8, 8)
    assert bits.pop("patch_embed.proj") == (8, 6)
    assert set(bits.values()) == {(6, 6)}
    with pytest.raises(LeanvitError, match="w9a8"):
        QuantConfig(layer_bits=(("head", "w9a8"),))


class DirectWeights(nn.Module):
    """Uses ``fc``'s weight without calling it, and holds an nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        t = self.mha(t, t, t)[0]
        return F.linear(t, self.fc.weight).mean(1)


def test_conv_subclass_with_its_own_forward_stays_float_and_is_named():
    from timm.layers import Conv2dSame

    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
    with pytest.warns(UserWarning, match="Conv2dSame"):
        qmodel = quantize(model, torch.randn(16, 3, 8, 8), progress=False)
    assert type(qmodel[0]) is Conv2dSame and list(qmodel.quant_report.quantized) == ["2"]


class _Kernel(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return F.linear(x, self.kernel)


class _Product(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x @ self.proj


class _OwnWeights(nn.Module):
    """Compute layers whose weights are not named ``weight``: an LSTM, an ``F.linear`` on ``kernel``, a
    ``tokens @ proj`` product."""

    def __init__(self):
        super().__init__()
        self.stem, self.lstm, self.head = nn.Conv2d(3, 8, 4, 4), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 4)
        self.linear, self.product = _Kernel(), _Product()

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.product(self.linear(self.lstm(tokens)[0])).mean(1))


def test_compute_layers_are_named_whatever_their_weights_are_called():
    with pytest.warns(UserWarning, match=r"2 compute layers stay in float:\n  lstm: no quantized wrapper for LSTM\n  "
                                         r"linear: no quantized wrapper for _Kernel$"):
        report = quantize(_OwnWeights().eval(), torch.randn(16, 3, 8, 8), progress=False).quant_report
    assert set(report.float_compute_layers) == {"lstm", "linear"}
    assert report.float_layers["product"].startswith("attention matmuls (_Product): float by design unless")
    report = quantize(_OwnWeights().eval(), torch.randn(16, 3, 8, 8), QuantConfig(attn_bits=8, attn_max_error=None),
                      progress=False).quant_report  # the product quantized: listed once, as quantized
    assert "product" in report.quantized and "product" not in report.float_layers


def test_layers_that_cannot_be_calibrated_are_named():
    with pytest.warns(UserWarning) as caught:
        qmodel = quantize(DirectWeights().eval(), torch.randn(16, 3, 8, 8), progress=False)
    message = str(caught[0].message)
    assert "fc" in message and "mha" in message and "mha.out_proj" in message
    report = qmodel.quant_report
    assert list(report.quantized) == ["conv"]
    assert "never called" in report.float_layers["fc"]
    assert type(qmodel.fc) is nn.Linear


def test_batchnorm_folding_keeps_the_function(tiny_cnn):
    model = copy.deepcopy(tiny_cnn)
    for m in model.modules():  # non-trivial statistics, so a wrong fold would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        folded = fold_batchnorm(model, x)
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in tiny_cnn.modules())
    assert len(folded) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class ConvReadTwice(nn.Module):
    """conv1's output feeds its BatchNorm and a residual add: folding that BN would change the add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv1(x)
        y = self.bn1(y) + y
        y = self.bn2(self.conv2(y))
        return self.head(y.mean((2, 3)))


def test_a_conv_output_read_elsewhere_keeps_its_batchnorm_and_the_rest_fold():
    def make():
        model = ConvReadTwice().eval()
        for m in model.modules():  # not the identity, so folding bn1 would show
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        return model

    model, x = make(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match=r"bn1 \(after conv1\)"):
        folded = fold_batchnorm(model, x)
    assert folded == ["bn2"]
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    with pytest.warns(UserWarning, match="not folded"):  # this used to raise
        qmodel = quantize(make(), torch.randn(16, 3, 16, 16), progress=False)
    assert qmodel.quant_report.folded_batchnorms == ["bn2"]


def test_quantized_wrappers_keep_state_dict_keys(tiny_cnn):
    conv = next(m for m in tiny_cnn.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    q = QuantConv2d.from_float(conv, QScheme(8, True, True), QScheme(8, False))
    assert q.weight is conv.weight and q.groups == conv.groups
    assert {"weight", "input_quantizer.scale", "weight_quantizer.scale"} <= set(q.state_dict())
    linear = QuantLinear.from_float(nn.Linear(4, 3), QScheme(8, True, True), QScheme(8, False))
    assert linear.weight_quantizer.scale.shape == (3,)
    assert isinstance(linear.to_float(), nn.Linear) and not hasattr(linear.to_float(), "input_quantizer")


def test_recipes_keep_the_first_and_last_layers_at_8_bits(tiny_vit):
    calib = torch.randn(16, 3, 32, 32)
    config = QuantConfig.recipe("hybrid", "w4a4", reconstruct_iters=5)
    assert config.hessian_search and config.reconstruct == "blocks" and config.softmax_quantizer == "twin"
    assert config.attn_bits == 4  # the twin softmax quantizer has attention matmuls to act on
    with pytest.raises(LeanvitError, match="attn_bits=None keeps the attention matmuls in float"):
        QuantConfig.recipe("hybrid", "w4a4", attn_bits=None)
    assert (config.a_symmetric, config.a_per_channel) == ("auto", "auto")
    assert QuantConfig.recipe("hybrid", "w8a8").a_per_channel is False
    with pytest.raises(LeanvitError, match="a_per_channel must be True, False or 'auto'"):
        QuantConfig(a_per_channel="depthwise")
    layers = quantize(tiny_vit, calib, config, progress=False).quant_report.quantized
    assert layers["patch_embed.proj"].startswith("weights int8") and layers["head"].startswith("weights int8")
    assert layers["blocks.0.attn.qkv"].startswith("weights int4")
    minmax = QuantConfig.recipe("minmax", "w6a6", edge_bits=None)
    assert (minmax.w_method, minmax.a_method, minmax.reparam_layernorm, minmax.edge_bits) == (
        "minmax", "minmax", False, None)
    with pytest.raises(LeanvitError, match="minmax, mse, hybrid"):
        QuantConfig.recipe("best", "w8a8")


class TwoHeads(nn.Module):
    """A distilled classifier: two heads, the distillation one registered last, as timm's DeiT and EfficientFormer."""
    pretrained_cfg = {"classifier": ("head", "head_dist")}

    def __init__(self):
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head, self.head_dist = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x))).mean((2, 3))
        return (self.head(x) + self.head_dist(x)) / 2


def test_both_heads_of_a_distilled_model_are_edges():
    layers = quantize(TwoHeads().eval(), torch.randn(16, 3, 8, 8), QuantConfig.recipe("mse", "w4a4"),
                      progress=False).quant_report.quantized
    assert [n for n, text in layers.items() if text.startswith("weights int8")] == ["stem", "head", "head_dist"]
    assert layers["body"].startswith("weights int4")


def test_depthwise_convs_with_a_channel_multiplier_stay_float():
    """No engine has an INT8 kernel for a depthwise conv writing several channels per input channel (FastViT's
    downsampling): it stays float and is said to, even where depthwise convs are quantized; plain ones are."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 4, 1)).eval()
    report = quantize(model, torch.randn(16, 3, 12, 12), QuantConfig.recipe("mse", "w8a8", target="vnni"),
                      progress=False).quant_report
    assert "2" not in report.quantized and "4" in report.quantized
    assert report.float_layers["2"].startswith("depthwise convolution with a channel multiplier (2 outputs per")
    assert "float by design" in report.float_layers["2"] and "2" not in report.float_compute_layers


def test_recipes_keep_deployable_bit_widths_whole():
    """W7A8 (exact INT8 on CPUs without VNNI) and W8A8 keep every layer at their width: no 8-bit ends."""
    assert QuantConfig.recipe("mse", "w7a8").edge_bits is None and QuantConfig.recipe("hybrid", "w8a8").edge_bits is None
    assert QuantConfig.recipe("mse", "w6a6").edge_bits == "w8a8"


def test_the_target_cpu_decides_which_ops_run_int8():
    """A VNNI target quantizes depthwise convs and attention matmuls of deployable models; "auto" is this CPU."""
    from leanvit.compress.quant import resolve_target
    from leanvit.compress.quant.export import int8_saturates

    generic, vnni = QuantConfig.recipe("mse", "w8a8"), QuantConfig.recipe("mse", "w8a8", target="vnni")
    assert (generic.quantize_depthwise, generic.attn_bits) == (False, None)
    assert (vnni.quantize_depthwise, vnni.attn_bits) == (True, 8)
    # the shared qkv quantizer is for OpenVINO, which fuses it; ONNX Runtime runs it slower
    for_ort = QuantConfig.recipe("mse", target="vnni", engine="onnxruntime")
    assert vnni.share_qkv_quantizer and not for_ort.share_qkv_quantizer
    assert QuantConfig.recipe("mse", "w8a8", target="vnni", attn_bits=None).attn_bits is None  # overrides win
    # low-bit models are simulation only: no CPU to suit, attention matmuls at the activation bits on any target
    assert QuantConfig.recipe("mse", "w4a4", target="vnni").attn_bits == 4
    assert QuantConfig.recipe("mse", "w4a4").attn_bits == 4
    assert resolve_target("auto") == ("generic" if int8_saturates() else "vnni")
    assert QuantConfig.recipe("mse", "w8a8", target="auto") == QuantConfig.recipe(
        "mse", "w8a8", target=resolve_target("auto"))
    with pytest.raises(LeanvitError, match="generic, vnni, auto"):
        QuantConfig.recipe("mse", "w8a8", target="arm")


def test_input_channel_weights_of_a_grouped_conv_are_each_channels_own():
    conv = nn.Conv2d(4, 2, 1, groups=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0, 0.0, 3.0]).view(2, 2, 1, 1))
    assert input_channel_weights(conv).tolist() == [1.0, 0.0, 0.0, 9.0]


class _TwoOutputs(nn.Module):
    """A conv + BatchNorm whose model returns a tuple (a detector's, a multi-head model's)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn(self.conv(x)).mean((2, 3))
        return self.head(x), x


def test_a_model_returning_a_tuple_folds_its_batchnorms_and_quantizes():
    torch.manual_seed(0)
    model = _TwoOutputs().eval()
    model.bn.running_var.uniform_(0.5, 2.0)
    qmodel = quantize(model, torch.randn(16, 3, 8, 8), QuantConfig(), progress=False)
    assert qmodel.quant_report.folded_batchnorms == ["bn"]
    assert isinstance(qmodel(torch.randn(2, 3, 8, 8)), tuple)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_on_the_gpu_quantizes_there(tiny_vit, tiny_cnn):
    """Every quantizer a recipe adds (inputs, attention operands, per-channel inputs, conv outputs) lives on the
    model's device, so the quantized model runs there; at 8 bits it computes what the CPU's copy does."""
    for model, size in ((tiny_vit, 32), (tiny_cnn, 16)):
        calib = torch.randn(32, 3, size, size)
        for config in (QuantConfig.recipe("hybrid", "w4a4", reconstruct_iters=5),
                       QuantConfig.recipe("mse", "w8a8", engine="onnxruntime"), QuantConfig.recipe("mse", "w8a8")):
            gpu = quantize(copy.deepcopy(model).cuda(), calib, config, progress=False)
            assert {t.device.type for t in (*gpu.parameters(), *gpu.buffers())} == {"cuda"}
            with torch.no_grad():
                out = gpu(calib[:4].cuda()).cpu()
                if config.a_bits == 8:
                    ref = quantize(model, calib, config, progress=False)(calib[:4])
                    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
                                  nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="reflect"),
                                  nn.Conv2d(4, 6, (3, 1), stride=(1, 2), padding=(1, 0), padding_mode="circular")])
def test_a_wrapped_conv_and_its_float_copy_compute_what_the_conv_does(conv):
    """QuantConv2d.from_float and to_float rebuild the layer from its settings: one dropped (a dilation, a reflect
    or circular padding, a stride) computes another function, or another output size, with the same weights."""
    from leanvit.compress.quant.calibrate import quantizers_disabled

    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 10)
    q = QuantConv2d.from_float(conv, QScheme(8, True, True), QScheme(8, False))
    with torch.no_grad(), quantizers_disabled(q):
        torch.testing.assert_close(q(x), conv(x))
        torch.testing.assert_close(q.to_float()(x), conv(x))


def test_timms_linear_is_wrapped_like_torchs():
    """timm's Linear only differs from nn.Linear under TorchScript: it is quantized, not reported as a float layer."""
    from timm.layers import Linear as TimmLinear

    from leanvit.compress.quant.modules import quantizable_type

    assert quantizable_type(TimmLinear(4, 3)) is QuantLinear and quantizable_type(nn.Linear(4, 3)) is QuantLinear
    assert quantizable_type(QuantLinear.from_float(nn.Linear(4, 3), QScheme(8, True, True), QScheme(8, False))) is None


class _SharedConv(nn.Module):
    """One conv read by two BatchNorms (neither can take the fold), and a BatchNorm normalising by batch statistics
    (no running ones to fold), next to a conv + BatchNorm pair that folds."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn_a, self.bn_b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.conv2, self.bn_batch = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        y = self.bn_a(y) + self.bn_b(y)
        return self.bn3(self.conv3(self.bn_batch(self.conv2(y))))


@torch.no_grad()
def test_batchnorms_that_cannot_be_folded_are_left_alone_without_a_warning():
    """Only a BatchNorm that alone reads a conv's output and has running statistics folds; the others are not even
    tried (folding the conv into one of two readers would change the other; a BatchNorm without running statistics
    has nothing to fold), so no 'not folded' warning is given for them, nor when every fold keeps the output."""
    import warnings

    torch.manual_seed(0)
    model = _SharedConv().eval()
    for bn in (model.bn_a, model.bn_b, model.bn3):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fold_batchnorm(model, x) == ["bn3"]
    assert [type(m) for m in (model.bn_a, model.bn_b, model.bn_batch)] == [nn.BatchNorm2d] * 3
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_an_output_moves_relative_to_the_reference_scale_of_at_least_one():
    """fold_batchnorm and the RepQ-ViT check accept a change within 1e-3 of it: float rounding on logits in the
    hundreds is more than 1e-3 absolute, so the difference is taken relative to the largest reference value."""
    from leanvit.compress.quant.modules import output_error

    ref = (torch.tensor([[200.0, -400.0]]), {"aux": torch.tensor([0.5])})
    moved = (torch.tensor([[200.2, -400.0]]), {"aux": torch.tensor([0.4])})
    assert output_error(moved, ref) == pytest.approx(0.2 / 400, rel=1e-4)  # largest difference / largest value
    small = torch.tensor([0.5, -0.25])
    assert output_error(small + 0.01, small) == pytest.approx(0.01)  # (divided by 1 below a scale of 1)
    with pytest.raises(ValueError, match="different structures"):
        output_error((small,), small)


def test_a_fused_attention_counts_as_two_matrix_products():
    """F.scaled_dot_product_attention computes q @ kᵀ and softmax @ v: the report names two products per call."""
    from leanvit.compress.quant.modules import record_matmuls

    class Mix(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x) @ x.transpose(-2, -1)

    calls = record_matmuls(nn.Sequential(nn.Linear(4, 4), Mix()), torch.randn(2, 3, 4))
    assert list(calls) == ["1"] and calls["1"].runs == 1 and calls["1"].products == 3


def test_a_layer_called_more_often_for_one_image_is_not_constant():
    """A layer whose calls for the two images differ in number (a loop that depends on the image) does not compute a
    constant, though its first calls read the same input."""
    from leanvit.compress.quant.modules import image_independent_layers

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            y = self.fc(torch.ones_like(x))
            if x.sum() > 0:
                y = self.fc(y * x)
            return self.head(y + x)

    found = image_independent_layers(Loop(), torch.ones(1, 4), -torch.ones(1, 4))
    assert found == set()
    assert image_independent_layers(Loop(), -torch.ones(1, 4), -2 * torch.ones(1, 4)) == {"fc"}  # one call each
