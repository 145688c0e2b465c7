"""Concatenations of a depthwise conv's NHWC output (MambaOut's gated block) quantized on one grid, the conv float."""
import copy
import warnings
from dataclasses import replace

import numpy as np
import torch
from timm.models.mambaout import GatedConvBlock

from leanvit.compress.quant import FakeQuantizer, QScheme, QuantConfig, export, quantize
from leanvit.compress.quant.concat import concat_counterpart, nhwc_concats
from leanvit.deploy import get_engine

torch.set_num_threads(1)


class _Concatenating(torch.nn.Module):
    """Concatenates ``x`` with its conv's output, both NHWC or both NCHW; ``twice`` the result with ``x`` too."""

    def __init__(self, depthwise=True, nhwc=True, twice=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4 if depthwise else 1)
        self.nhwc, self.twice = nhwc, twice

    def forward(self, x):  # x: NHWC
        c = self.conv(x.permute(0, 3, 1, 2))
        out = torch.cat((x, c.permute(0, 2, 3, 1)), dim=-1) if self.nhwc else torch.cat((x.permute(0, 3, 1, 2), c), 1)
        return torch.cat((out, x), dim=-1) if self.twice else out


def test_nhwc_concats_name_the_modules_every_concatenation_of_which_reads_a_depthwise_output_as_nhwc():
    """Found in one forward by storage, per module: not a dense conv's output, not one concatenated as NCHW, not in
    a module with another concatenation too (all its calls are routed)."""
    net = torch.nn.ModuleDict({"gated": GatedConvBlock(4, conv_ratio=1.0), "plain": _Concatenating(),
                               "dense": _Concatenating(depthwise=False), "nchw": _Concatenating(nhwc=False),
                               "twice": _Concatenating(twice=True)}).eval()
    net.forward = lambda x: [m(x) for m in net.values()]
    assert nhwc_concats(net, torch.randn(1, 5, 5, 4)) == {"gated": ("gated.conv",), "plain": ("plain.conv",)}


class _TinyMambaOut(torch.nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, dim, 3, stride=2, padding=1)
        self.block = GatedConvBlock(dim)
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.block(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2)))


def test_int8_nhwc_concats_run_the_concatenation_int8_and_fold_the_permute_on_openvino(tmp_path):
    """``int8_nhwc_concats`` (the OpenVINO recipe at 8 bits): the gated block's concatenation reads one quantizer
    for both inputs and its depthwise conv stays float, named in the report; OpenVINO then concatenates uint8 and
    runs no Transpose for the conv's output (with the option off, it concatenates f32 after a Transpose), and
    computes what was simulated."""
    torch.manual_seed(0)
    calib, x = torch.randn(16, 3, 16, 16), torch.randn(1, 3, 16, 16)
    config = QuantConfig.recipe("mse", "w8a8", target="vnni", engine="openvino")
    assert config.int8_nhwc_concats
    assert not QuantConfig.recipe("mse", "w8a8", engine="onnxruntime").int8_nhwc_concats
    model = _TinyMambaOut().eval()
    qmodels = {flag: quantize(model, calib, replace(config, int8_nhwc_concats=flag), progress=False)
               for flag in (False, True)}
    report = qmodels[True].quant_report
    assert list(report.int8_concats) == ["block"] and "one grid" in report.int8_concats["block"]
    assert "int8_nhwc_concats" in report.float_layers["block.conv"] and "block.conv" not in report.quantized
    assert not qmodels[False].quant_report.int8_concats and "block.conv" in qmodels[False].quant_report.quantized
    assert "int8 concatenation in block" in report.summary()

    def nodes(flag):  # (layer type, output precision) of what OpenVINO runs
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = export(qmodels[flag], tmp_path / f"model_{flag}.xml", engine="openvino", example=x)
        assert flag == any("run in float on OpenVINO: block.conv" in str(w.message) for w in caught)  # named
        assert flag == any(n.startswith("block.conv") for n in qmodels[flag].quant_report.engine_float_layers)
        runner = get_engine("openvino", threads=1).load_model_file(path)
        ops = runner.compiled.get_runtime_model().get_ordered_ops()
        return runner, [tuple(op.get_rt_info()[k].astype(str) for k in ("layerType", "outputPrecisions"))
                        for op in ops]

    (_, off), (runner, on) = nodes(False), nodes(True)
    assert ("Concatenation", "f32") in off and ("Concatenation", "u8") in on, on
    assert sum(t == "Transpose" for t, _ in on) < sum(t == "Transpose" for t, _ in off)
    with torch.no_grad():
        np.testing.assert_allclose(runner(x.numpy()), qmodels[True](x).numpy(), atol=1e-4)


class _Concatenate(_Concatenating):
    """``torch.concatenate``, which names its dim ``axis``, of ``x`` and its conv's 5x larger output."""

    def forward(self, x):
        return torch.concatenate((x, 5 * self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)), axis=-1)


def test_the_shared_grid_covers_every_input_and_keeps_the_concatenation_axis():
    """The one quantizer is ranged on all the concatenated values (ranged on the first input only, it clipped the
    conv's larger outputs), and the concatenation keeps the axis it was asked for under either name."""
    torch.manual_seed(0)
    module = _Concatenate().eval()
    quantized = concat_counterpart(_Concatenate).from_float(module)
    calib = torch.randn(8, 5, 5, 4)
    quantized.observe()
    with torch.no_grad():
        quantized(calib)
        quantized.calibrate("minmax", 99.99)
        reference = module(calib)
        quantizer = quantized.concat_quantizer
        top = float(quantizer.scale * (quantizer.scheme.qmax - quantizer.zero_point))
        assert abs(top - float(reference.max())) <= float(quantizer.scale)  # (the zero point rounded)
        assert float(reference[..., 4:].max()) > 2 * float(calib.max())  # the conv's output sets the range
        out = quantized(calib)
    assert out.shape == reference.shape == (8, 5, 5, 8)
    assert (out - reference).abs().max() <= float(quantizer.scale) / 2 + 1e-5
    steps = out / quantizer.scale  # every input on the grid: whole steps
    assert torch.allclose(steps, steps.round(), atol=1e-3)


class _TwoConvs(_Concatenating):
    """One concatenation, by keyword, of ``x`` and two depthwise convs' outputs as NHWC."""

    def __init__(self):
        super().__init__()
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)

    def forward(self, x):
        nchw = x.permute(0, 3, 1, 2)
        return torch.cat(tensors=(x, self.conv(nchw).permute(0, 2, 3, 1), self.conv2(nchw).permute(0, 2, 3, 1)), dim=-1)


class _AroundConcatenating(_Concatenating):
    """Concatenates a conv's NHWC output itself, around a submodule that does too."""

    def __init__(self):
        super().__init__()
        self.inner = _Concatenating()

    def forward(self, x):
        return super().forward(x) + self.inner(x)


def test_nhwc_concats_read_keyword_tensors_and_several_convs_and_no_module_around_another():
    """A ``tensors=`` keyword is read like the positional tuple, a concatenation of two convs' outputs counts once,
    and a module (the model itself too) concatenating around a submodule that concatenates is not listed."""
    net = torch.nn.ModuleDict({"two": _TwoConvs(), "around": _AroundConcatenating()}).eval()
    net.forward = lambda x: [m(x) for m in net.values()]
    assert nhwc_concats(net, torch.randn(1, 5, 5, 4)) == {"two": ("two.conv", "two.conv2"),
                                                           "around.inner": ("around.inner.conv",)}
    root = _AroundConcatenating().eval()  # the model itself: not its own concatenations either
    assert nhwc_concats(root, torch.randn(1, 5, 5, 4)) == {"inner": ("inner.conv",)}


def test_quant_concat_calibration_and_float_restore():
    """Unsigned with a zero point (OpenVINO concatenates u8), ranged by the method and percentile asked for; back
    in float, the module has its own class and parameters and no quantizer."""
    torch.manual_seed(0)
    module = _Concatenate().eval()
    quantized = concat_counterpart(_Concatenate).from_float(module)
    quantized.observe()
    assert not quantized.calibrated()
    with torch.no_grad():
        quantized(torch.randn(8, 5, 5, 4))
    assert quantized.calibrated()
    observer = copy.deepcopy(quantized._observer)
    quantized.calibrate("percentile", 90.0)
    assert quantized.concat_quantizer.scheme == QScheme(8, symmetric=False)
    expected = FakeQuantizer(quantized.concat_quantizer.scheme, axis=-1, channels=1)
    expected.set_range(*observer.range(expected.scheme, "percentile", percentile=90.0))
    assert torch.equal(quantized.concat_quantizer.scale, expected.scale)
    assert torch.equal(quantized.concat_quantizer.zero_point, expected.zero_point)
    restored = quantized.to_float()
    assert type(restored) is _Concatenate and not hasattr(restored, "concat_quantizer")
    assert restored.state_dict().keys() == module.state_dict().keys() and restored.conv.weight is module.conv.weight


class _RootConcatenating(_Concatenating):
    """The concatenation in the model's own forward, a Linear after it."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(super().forward(x))


def test_a_concatenation_in_the_models_own_forward_quantizes_as_without_the_option():
    """A counterpart cannot replace the model itself in place: its NHWC concatenation stays as it is and its depthwise
    conv is quantized as usual (it raised torch's "Cannot set the submodule without a target name!")."""
    torch.manual_seed(0)
    model = _RootConcatenating().eval()
    assert nhwc_concats(model, torch.randn(1, 5, 5, 4)) == {"": ("conv",)}
    config = QuantConfig.recipe("mse", "w8a8", target="vnni", engine="openvino")
    calib = torch.randn(16, 5, 5, 4)
    qmodels = [quantize(model, calib, replace(config, int8_nhwc_concats=flag), progress=False)
               for flag in (True, False)]
    report = qmodels[0].quant_report
    assert not report.int8_concats and "conv" in report.quantized and "conv" not in report.float_layers
    x = torch.randn(2, 5, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(qmodels[0](x), qmodels[1](x))
