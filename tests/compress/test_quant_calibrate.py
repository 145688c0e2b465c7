"""quantize()'s pipeline (calibrate.py): what each step takes from the config and the float model, checked on tiny
models against ranges computed here from the float activations."""
import copy

import pytest
import torch
import torch.nn as nn

from leanvit.compress.quant import QScheme, QuantConfig, choose_range, qparams, quantize, quantizers
from leanvit.compress.quant.calibrate import quantizers_disabled
from leanvit.errors import LeanvitError

torch.set_num_threads(1)


def _mlp(seed: int = 0) -> nn.Sequential:
    """Linear -> ReLU -> Linear with biases away from zero (so the hidden activations are one-sided and shifted)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        model[1].bias.uniform_(-0.5, 1.0)
        model[3].bias.uniform_(-0.5, 0.5)
    return model


def _calib() -> torch.Tensor:
    return torch.randn(32, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 + 0.3


@torch.no_grad()
def test_input_ranges_come_from_the_float_models_activations():
    """PTQ4ViT's parallel calibration: every layer's input range is set from what it receives in the float model,
    not from the activations of a model whose earlier weights are already quantized (at 2 bits, far apart)."""
    model, calib = _mlp(), _calib()
    qmodel = quantize(model, calib, QuantConfig(w_bits=2, a_method="minmax", min_images=8), progress=False)
    hidden = model[2](model[1](calib.flatten(1)))
    scale, zero = qparams(hidden.min(), hidden.max(), QScheme(8, symmetric=False))
    assert torch.allclose(qmodel[3].input_quantizer.scale, scale, rtol=1e-6)
    assert torch.equal(qmodel[3].input_quantizer.zero_point, zero)


@torch.no_grad()
@pytest.mark.parametrize("w_method, a_method", [("minmax", "percentile"), ("percentile", "minmax"), ("mse", "minmax")])
def test_weights_take_w_method_and_inputs_a_method_with_the_configs_percentile(w_method, a_method):
    model, calib = _mlp(), _calib()
    config = QuantConfig(w_method=w_method, a_method=a_method, percentile=90.0, min_images=8)
    layer = quantize(model, calib, config, progress=False)[1]
    weight_scheme, input_scheme = QScheme(8, per_channel=True), QScheme(8, symmetric=False)
    weight = model[1].weight
    lo, hi = choose_range(weight, weight.amin(1), weight.amax(1), weight_scheme, w_method, percentile=90.0)
    assert torch.allclose(layer.weight_quantizer.scale, qparams(lo, hi, weight_scheme)[0], rtol=1e-6)
    images = calib.flatten(1)  # 32 x 12 values: every one kept by the observer, so the range is exact
    lo, hi = choose_range(images.reshape(1, -1), images.min().view(1), images.max().view(1), input_scheme, a_method,
                          percentile=90.0)
    scale, zero = qparams(lo, hi, input_scheme)
    assert torch.allclose(layer.input_quantizer.scale, scale[0], rtol=1e-6)
    assert torch.equal(layer.input_quantizer.zero_point, zero[0])


def test_a_model_holding_quantizers_is_refused_even_without_its_report():
    """The report is one sign of a quantized model; its quantizers are the other (a quantized model whose report was
    dropped, or a float model holding a quantized block)."""
    qmodel = quantize(_mlp(), _calib(), QuantConfig(min_images=8), progress=False)
    del qmodel.quant_report
    with pytest.raises(LeanvitError, match="quantized already"):
        quantize(qmodel, _calib(), QuantConfig(min_images=8), progress=False)
    holder = nn.Sequential(_mlp(), nn.Sequential(copy.deepcopy(qmodel[3])))
    with pytest.raises(LeanvitError, match="quantized already"):
        quantize(holder, _calib(), QuantConfig(min_images=8), progress=False)


def test_a_skipped_classifier_passes_the_8_bit_end_to_the_last_quantized_layer(tiny_vit):
    """``edge_bits`` goes to the first and last layers that are quantized: a classifier kept float by ``skip`` is
    not one, so the layer before it gets the 8 bits instead of staying at 4."""
    config = QuantConfig.recipe("mse", "w4a4", skip=("head",), attn_bits=None)
    with pytest.warns(UserWarning, match="head"):
        report = quantize(tiny_vit, torch.randn(16, 3, 32, 32), config, progress=False).quant_report
    assert report.edge_layers == ["patch_embed.proj", "blocks.1.mlp.fc2"]
    assert report.weight_bits["blocks.1.mlp.fc2"] == 8 and report.weight_bits["blocks.1.mlp.fc1"] == 4


def test_quantizers_disabled_gives_each_quantizer_back_its_own_state():
    qmodel = quantize(_mlp(), _calib(), QuantConfig(min_images=8), progress=False)
    found = quantizers(qmodel)
    found["1.input_quantizer"].enabled = False
    with quantizers_disabled(qmodel):
        assert not any(q.enabled for q in found.values())
    assert {n for n, q in found.items() if not q.enabled} == {"1.input_quantizer"}


@torch.no_grad()
def test_double_precision_images_calibrate_as_float32():
    """Images in float64 (NumPy's default) are cast to the float32 the model computes in: the same ranges."""
    model, calib = _mlp(), _calib()
    config = QuantConfig(min_images=8)
    single = quantize(model, calib, config, progress=False)
    double = quantize(model, calib.double(), config, progress=False)
    for name, quantizer in quantizers(single).items():
        assert torch.equal(quantizer.scale, quantizers(double)[name].scale), name


def _depthwise_model() -> nn.Sequential:
    """A 1x1 conv whose output channels span three orders of magnitude, read by a depthwise conv, then a Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(),
                          nn.Linear(8 * 16, 5)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 1, 8).view(8, 1, 1, 1))
        model[0].bias.mul_(torch.logspace(-2, 1, 8))
    return model


@torch.no_grad()
def test_automatic_per_channel_inputs_are_considered_for_depthwise_convs_only():
    """Q-HyViT's granularity choice deploys only where a conv reads each input channel on its own: the Linear reading
    the same wide-ranging channels (flattened) keeps one input scale, as its INT8 kernel needs; True makes every
    input per channel, and the report lists them."""
    calib = torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    models = {}
    for per_channel, listed in (("auto", ["1"]), (True, ["0", "1", "3"]), (False, [])):
        config = QuantConfig(a_bits=4, a_per_channel=per_channel, quantize_depthwise=True, min_images=8)
        models[per_channel] = qmodel = quantize(_depthwise_model(), calib, config, progress=False)
        assert qmodel.quant_report.per_channel_inputs == listed
        for name in ("0", "1", "3"):
            quantizer = qmodel.get_submodule(name).input_quantizer
            assert quantizer.scheme.per_channel == (name in listed) and quantizer.scale.ndim == (name in listed)
    assert models[True][3].input_quantizer.scale.shape == (8 * 16,)
    scale = models["auto"][1].input_quantizer.scale  # one per channel of the depthwise conv, as wide as its input's
    assert scale.shape == (8,) and scale.max() > 100 * scale.min()


class _NormHead(nn.Module):
    """Patch embedding -> LayerNorm whose first four channels are 30x the rest -> Linear."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.fc = nn.Conv2d(3, 32, 4, 4), nn.LayerNorm(32), nn.Linear(32, 5)
        with torch.no_grad():
            self.norm.weight[:4] = 30.0
            self.norm.bias.normal_(0, 0.5)

    def forward(self, x):
        return self.fc(self.norm(self.embed(x).flatten(2).transpose(1, 2))).mean(1)


@torch.no_grad()
def test_per_channel_inputs_leave_the_layernorms_alone_and_range_every_channel():
    """RepQ-ViT turns per-channel post-LayerNorm ranges into per-tensor ones; with ``a_per_channel=True`` there is
    nothing to turn: the LayerNorm stays as it is and the Linear's input gets each channel's own range."""
    torch.manual_seed(0)
    model, calib = _NormHead().eval(), torch.randn(16, 3, 32, 32)
    assert quantize(model, calib, QuantConfig(), progress=False).quant_report.reparameterised == ["norm"]
    qmodel = quantize(model, calib, QuantConfig(a_per_channel=True), progress=False)
    assert qmodel.quant_report.reparameterised == [] and torch.equal(qmodel.norm.weight, model.norm.weight)
    tokens = model.norm(model.embed(calib).flatten(2).transpose(1, 2)).reshape(-1, 32)
    scheme = QScheme(8, symmetric=False, per_channel=True)
    lo, hi = choose_range(tokens.T.contiguous(), tokens.amin(0), tokens.amax(0), scheme, "mse")
    torch.testing.assert_close(qmodel.fc.input_quantizer.scale, qparams(lo, hi, scheme)[0])


@torch.no_grad()
def test_per_channel_inputs_when_asked_whatever_the_held_out_error_says():
    """``a_per_channel=True`` is not a candidate among others: a depthwise conv whose channels look alike (where
    the automatic choice would take one scale) still gets one per channel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(),
                          nn.Linear(8 * 4, 5)).eval()
    calib = torch.randn(16, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    config = QuantConfig(a_per_channel=True, quantize_depthwise=True, min_images=8)
    assert quantize(model, calib, config, progress=False).quant_report.per_channel_inputs == ["0", "1", "3"]
    auto = QuantConfig(a_per_channel="auto", quantize_depthwise=True, min_images=8)
    assert quantize(model, calib, auto, progress=False).quant_report.per_channel_inputs == []


def test_a_float_depthwise_stem_passes_the_8_bit_end_to_the_first_quantized_layer():
    """A depthwise conv first (float by design unless ``quantize_depthwise``) is not the first quantized layer: the
    conv after it is, and takes ``edge_bits``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1),
                          nn.Flatten(), nn.Linear(8 * 16, 5)).eval()
    report = quantize(model, torch.randn(16, 3, 4, 4), QuantConfig.recipe("mse", "w4a4"), progress=False).quant_report
    assert "0" in report.float_layers and report.edge_layers == ["1", "5"]
    assert report.weight_bits == {"1": 8, "3": 4, "5": 8}


def test_batches_of_only_corrupt_images_are_skipped():
    """leanvit's loaders give None for a batch whose every image failed to decode (an (images, labels) pair whose
    images are None likewise): skipped, the other batches calibrate."""
    from leanvit.compress.quant import calibration_batches

    images = torch.randn(16, 3, 4, 4)
    batches = calibration_batches([images[:8], None, (None, None), (images[8:], torch.zeros(8))], 16)
    assert len(batches) == 2 and torch.equal(torch.cat(batches), images)


class _Gain(nn.Module):
    """A per-channel scale, shaped (C, 1, 1) as timm's LayerScale2d."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        return x * self.gamma


def test_elementwise_modules_with_parameters_are_listed_as_float_by_design():
    """Every module left computing in float is named: a per-channel scale as elementwise (float by design, so not
    among the compute layers that a warning names), not as a compute layer, nor left out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _Gain(8), nn.Flatten(), nn.Linear(8 * 16, 5)).eval()
    report = quantize(model, torch.randn(16, 3, 4, 4), QuantConfig(min_images=8), progress=False).quant_report
    assert report.float_layers == {"1": "elementwise (_Gain): float by design"}
    assert report.float_compute_layers == {}


@torch.no_grad()
@pytest.mark.parametrize("bits", [4, 8])
def test_automatic_symmetry_picks_int_for_zero_centred_inputs_and_uint_after_a_relu(bits):
    """Q-HyViT's per-layer choice goes both ways: normalised images (centred on zero) get the signed grid, the
    ReLU's one-sided output the unsigned one."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    qmodel = quantize(model, torch.randn(64, 3, 4, 4), QuantConfig(a_bits=bits, a_symmetric="auto"), progress=False)
    assert qmodel[1].input_quantizer.scheme == QScheme(bits, symmetric=True)
    assert qmodel[1].input_quantizer.qrange.tolist() == [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]
    assert qmodel[3].input_quantizer.scheme == QScheme(bits, symmetric=False)
    assert qmodel.quant_report.quantized["1"].endswith(f"inputs int{bits} sym per-tensor")


@torch.no_grad()
def test_conv_outputs_are_quantized_unsigned_at_the_layers_input_bits():
    """``quantize_conv_outputs`` gives each conv an output grid like its input's: uint at the activation bits (here
    the layer's own, from ``layer_bits``), ranged on the quantized model's outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 4, 5)).eval()
    config = QuantConfig(a_bits=6, quantize_conv_outputs=True, layer_bits=(("2", "w8a4"),), min_images=8)
    qmodel = quantize(model, torch.randn(16, 3, 4, 4), config, progress=False)
    assert qmodel[0].output_quantizer.scheme == QScheme(6, symmetric=False)
    assert qmodel[2].output_quantizer.scheme == QScheme(4, symmetric=False)
    assert qmodel[0].output_quantizer.qrange.tolist() == [0, 63]


@torch.no_grad()
def test_automatic_symmetry_scores_the_candidates_at_the_configs_percentile():
    """The held-out error that picks a grid fits each candidate's range the way the layer's range will be set: with
    ``a_method="percentile"`` at the config's percentile (at the default 99.99 instead, the 4-bit uint grid wins
    here, and the layer's 75th-percentile range is then set on a grid chosen for another range)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    config = QuantConfig(a_bits=4, a_symmetric="auto", a_method="percentile", percentile=75.0)
    qmodel = quantize(model, torch.randn(64, 3, 4, 4), config, progress=False)
    assert qmodel[1].input_quantizer.scheme == QScheme(4, symmetric=True)


class _WithMultiheadAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Conv2d(3, 8, 2, 2), nn.Linear(8, 4)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.mha(tokens, tokens, tokens)[0].mean(1))


def test_the_linear_inside_a_multihead_attention_is_named_with_the_reason():
    """nn.MultiheadAttention uses its out_proj's weights itself: the report says so, not that QuantConfig.skip (which
    names nothing here) kept it."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="mha.out_proj"):
        report = quantize(_WithMultiheadAttention().eval(), torch.randn(16, 3, 4, 4), QuantConfig(min_images=8),
                          progress=False).quant_report
    assert report.float_layers["mha.out_proj"].startswith("inside nn.MultiheadAttention, which uses its weights")
    assert set(report.quantized) == {"embed", "head"}
