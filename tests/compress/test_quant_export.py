"""Quantized models export as QDQ ONNX / OpenVINO IR that run INT8 kernels and compute what was simulated."""
import copy
import warnings
from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from leanvit.compress.quant import (
    QuantConfig, QuantConv2d, QuantLinear, check_config_deployable, check_deployable, check_engine_precisions, export,
    export_quantized, onnx_int8_summary, onnxruntime_precisions, openvino_precisions, quantize, source_modules,
)
from leanvit.compress.quant.export import OnnxInt8Summary, _int8_summary, fuses_a_matmul, int8_saturates
from leanvit.deploy import check_agreement, get_engine
from leanvit.errors import LeanvitError

torch.set_num_threads(1)
# 7-bit weights in int8: exact on every x86 CPU, VNNI or not (see export.int8_saturates)
DEPLOY = QuantConfig(w_bits=7)


@pytest.fixture(scope="module")
def qvit(tiny_vit):
    torch.manual_seed(1)
    return quantize(tiny_vit, [torch.randn(8, 3, 32, 32) for _ in range(3)], DEPLOY, progress=False)


@pytest.fixture(scope="module")
def tests_in():
    torch.manual_seed(2)
    return [torch.randn(1, 3, 32, 32) for _ in range(8)]


@pytest.fixture(scope="module")
def vit_xml(qvit, tmp_path_factory):
    return export(qvit, tmp_path_factory.mktemp("q") / "vit.xml", engine="openvino", dynamic_batch=False)


@pytest.fixture(scope="module")
def vit_onnx(vit_xml):
    return vit_xml.with_suffix(".onnx")  # the QDQ ONNX the IR was converted from


def test_onnx_carries_the_simulation_scales_and_int8_weights(qvit, vit_onnx):
    assert onnx_int8_summary(vit_onnx).int8 == len(qvit.quant_report.quantized)
    graph = onnx.load(str(vit_onnx)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # the first Linear's weight: int8 initializer, its scale and integers from the simulation, recomputed here
    layer = qvit.blocks[0].attn.qkv
    scale = layer.weight_quantizer.scale.numpy()
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[1]) is not None
              and inits[n.input[1]].shape == scale.shape and np.array_equal(inits[n.input[1]], scale))
    ints = inits[dq.input[0]]
    assert ints.dtype == np.int8
    expected = np.clip(np.rint(layer.weight.detach().numpy() / scale[:, None]), -64, 63)  # 7-bit symmetric
    np.testing.assert_array_equal(ints.T if ints.shape != expected.shape else ints, expected)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.float32
                   and inits[n.input[0]].ndim > 1 for n in graph.node)  # no float weight left to quantize at run time


def test_int8_weights_are_the_simulations_integers_at_rounding_ties(tmp_path):
    """x * (1 / scale), as torch's fake quantization computes it, and x / scale round apart at some values next to a
    .5 tie (3 of 11.8 M trained-like weights): the export folds the weights the simulation's way, and clips them
    where it does (the full int8 range: -128 too, which a symmetric MSE range can reach)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 256)).eval()
    qmodel = quantize(model, torch.randn(16, 3, 2, 2), QuantConfig(), progress=False)  # 8-bit weights, folded
    layer = qmodel[1]
    scale = layer.weight_quantizer.scale.numpy().astype(np.float32)
    ties = []  # per output channel: a value one float32 step from a tie where the two formulas disagree
    for channel, s in enumerate(scale):
        for k in range(-120, 120):
            x = np.float32((k + 0.5) * float(s))
            for x in (x, np.nextafter(x, np.float32(1)), np.nextafter(x, np.float32(-1))):
                if np.rint(x / s) != np.rint(x * (np.float32(1) / s)):
                    ties.append((channel, x))
                    break
            else:
                continue
            break
    assert len(ties) > 20
    with torch.no_grad():
        for channel, x in ties:
            layer.weight[channel, 0] = float(x)
        scale = layer.weight_quantizer.scale
        layer.weight[:, 1], layer.weight[:, 2] = -300 * scale, 300 * scale  # clipped to both ends, -128 and 127
    with warnings.catch_warnings():  # (without VNNI: the 8-bit weights' saturation warning)
        warnings.simplefilter("ignore")
        path = export(qmodel, tmp_path / "m.onnx", engine="onnxruntime")
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    ints = next(v for v in inits.values() if v.dtype == np.int8 and v.size == 12 * 256)
    ints = ints.T if ints.shape != (256, 12) else ints
    simulated = torch.round(layer.weight_quantizer(layer.weight) / layer.weight_quantizer.scale[:, None])
    assert simulated.min() == -128 and simulated.max() == 127
    np.testing.assert_array_equal(ints, simulated.detach().numpy())


def test_onnxruntime_runs_the_simulation(qvit, vit_onnx, tests_in):
    runner = get_engine("onnxruntime", threads=1).load_onnx(vit_onnx)
    agreement = check_agreement(qvit, runner, tests_in)
    assert agreement.top1_agreement == 1.0
    assert agreement.max_abs_err < 0.02 * agreement.ref_scale


def test_onnxruntime_runs_the_linears_as_int8_kernels(qvit, vit_onnx, tiny_cnn, tmp_path):
    # ONNX Runtime's MatMul + Add -> Gemm fusion would make every quantized Linear a float Gemm; leanvit's
    # sessions turn it off for QDQ models, and the graph ONNX Runtime runs is read back to check
    ops = [op for op, _ in onnxruntime_precisions(vit_onnx).values()]
    token_linears = [n for n, m in qvit.named_modules() if isinstance(m, QuantLinear) and n != "head"]
    assert ops.count("MatMulIntegerToFloat") == len(token_linears) == 8
    # what stays float on ONNX Runtime is named: a conv's QDQ needs a quantized output to become QLinearConv
    qcnn = quantize(tiny_cnn, torch.randn(16, 3, 32, 32), DEPLOY, progress=False)
    with pytest.warns(UserWarning, match="compute layers run in float on ONNX Runtime: .*QLinearConv") as caught:
        path = export(qcnn, tmp_path / "cnn.onnx", engine="onnxruntime")
    # named by the model's layers (recorded by the exporter), with the engine's node names in brackets
    message = str(next(w.message for w in caught if "ONNX Runtime" in str(w.message)))
    precisions = onnxruntime_precisions(path, source_modules(path))
    assert all(" (" in node for node in precisions), precisions  # every node ORT runs traced to its layer
    in_float = [node.split(" (")[0] for node, (_, precision) in precisions.items() if precision == "float"]
    layers = {n for n, m in qcnn.named_modules() if isinstance(m, (QuantConv2d, QuantLinear, torch.nn.Conv2d))}
    assert in_float and set(in_float) <= layers and all(f"{name} (" in message for name in in_float), message


def test_quantized_conv_outputs_make_onnxruntime_run_int8_convs(tiny_cnn, tmp_path, tests_in):
    config = QuantConfig.recipe("mse", "w7a8", engine="onnxruntime", quantize_depthwise=True)
    assert config.quantize_conv_outputs and not QuantConfig.recipe("mse", "w8a8").quantize_conv_outputs
    with pytest.raises(LeanvitError, match="Unknown engine 'tensorrt'"):
        QuantConfig.recipe("mse", engine="tensorrt")
    torch.manual_seed(3)
    cnn = copy.deepcopy(tiny_cnn)
    for bn in (m for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # folded biases non-zero, as trained
        torch.nn.init.normal_(bn.bias, std=0.1)
    qcnn = quantize(cnn, torch.randn(16, 3, 32, 32), config, progress=False)
    convs = [m for m in qcnn.modules() if isinstance(m, QuantConv2d)]
    assert convs and all(m.output_quantizer is not None for m in convs)
    for conv in convs:  # biases snapped to the int32 grid of input scale x weight scale, as QLinearConv stores them
        ints = conv.bias.double() / (conv.input_quantizer.scale * conv.weight_quantizer.scale)
        assert torch.allclose(ints, ints.round(), rtol=1e-6, atol=1e-3)
    path = export(qcnn, tmp_path / "cnn.onnx", engine="onnxruntime")
    ops = Counter(op for op, _ in onnxruntime_precisions(path).values())
    assert ops["QLinearConv"] == len(convs) and ops["Conv"] == ops["FusedConv"] == 0
    runner = get_engine("onnxruntime", threads=1).load_onnx(path)
    agreement = check_agreement(qcnn, runner, tests_in)
    # integer requantization rounds some outputs one step away from the simulation's float rounding
    assert agreement.max_abs_err < 0.2 * agreement.ref_scale
    assert len(float_biases(path)) == 0  # (a bias snapped to 0 is dropped by the exporter: QLinearConv needs none)
    # a bias moved off the grid stays a float initializer rather than being rounded to int32 (a different result)
    with torch.no_grad():
        convs[1].bias.add_(0.3 * convs[1].input_quantizer.scale * convs[1].weight_quantizer.scale)
    assert len(float_biases(export(qcnn, tmp_path / "off_grid.onnx", engine="onnxruntime"))) == 1



class _SharedConv(torch.nn.Module):
    """One conv called twice in a forward, as CoaT's stages share their conv position encoding."""

    def __init__(self):
        super().__init__()
        self.stem, self.shared = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        torch.nn.init.normal_(self.shared.bias, std=0.1)

    def forward(self, x):
        x = self.stem(x)
        return (x + self.shared(x + self.shared(x))).mean((2, 3))


def test_a_layer_called_twice_exports_one_int32_bias_per_call_for_onnxruntime(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    qmodel = quantize(_SharedConv().eval(), torch.randn(16, 3, 8, 8),
                      QuantConfig.recipe("mse", "w7a8", engine="onnxruntime", quantize_depthwise=True), progress=False)
    path = export(qmodel, tmp_path / "shared.onnx", engine="onnxruntime")
    assert Counter(op for op, _ in onnxruntime_precisions(path).values())["QLinearConv"] == 3
    runner = get_engine("onnxruntime", threads=1).load_onnx(path)
    with torch.no_grad():
        np.testing.assert_allclose(runner(x.numpy()), qmodel(x).numpy(), atol=0.2 * float(qmodel(x).abs().max()))


class _StarReluMlp(torch.nn.Module):
    """A patch embedding and a bias-free Linear before MetaFormer's StarReLU (``s * relu(x) ** 2 + b``), as in
    CAFormer's attention stages."""

    def __init__(self):
        super().__init__()
        from timm.models.metaformer import StarReLU

        self.embed, self.fc1 = torch.nn.Conv2d(3, 16, 4, 4), torch.nn.Linear(16, 32, bias=False)
        self.act, self.fc2 = StarReLU(), torch.nn.Linear(32, 10)

    def forward(self, x):
        tokens = torch.nn.functional.layer_norm(self.embed(x).flatten(2).transpose(1, 2), (16,))
        return self.fc2(self.act(self.fc1(tokens))).mean(1)


def test_a_bias_free_linear_before_a_relu_runs_int8_on_onnxruntime(tmp_path):
    """ONNX Runtime ran such a MatMul in float; the export gives it a bias of zeros, which it fuses."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    qmodel = quantize(_StarReluMlp().eval(), torch.randn(16, 3, 16, 16),
                      QuantConfig.recipe("mse", "w7a8", engine="onnxruntime"), progress=False)
    path = export(qmodel, tmp_path / "star.onnx", engine="onnxruntime")
    assert onnxruntime_precisions(path, source_modules(path))["fc1 (node_linear)"] == ("MatMulIntegerToFloat", "int8")
    runner = get_engine("onnxruntime", threads=1).load_onnx(path)
    with torch.no_grad():
        np.testing.assert_allclose(runner(x.numpy()), qmodel(x).numpy(), atol=1e-5)
    # a rewrite for ONNX Runtime alone: OpenVINO's file keeps the MatMul as the exporter wrote it
    for engine, added in (("onnxruntime", 1), ("openvino", 0), (None, 0)):
        graph = onnx.load(str(export_quantized(qmodel, tmp_path / f"{engine}.onnx", engine=engine))).graph
        assert sum(n.op_type == "Add" and n.name.endswith("_zero_bias") for n in graph.node) == added

class _EinsumMixer(torch.nn.Module):
    """A Linear, then a token mixing by einsum (no INT8 wrapper: float on every engine)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        x = self.fc(x.flatten(2).transpose(1, 2))
        return torch.einsum("bnc,bmc->bnm", x, x)


def test_a_float_einsum_is_named_on_onnxruntime_and_a_dotted_name_keeps_its_tail(tmp_path):
    qmodel = quantize(_EinsumMixer().eval(), torch.randn(16, 16, 4, 4), QuantConfig.recipe("mse", "w7a8"),
                      progress=False)
    with pytest.warns(UserWarning, match=r"1 compute layers run in float on ONNX Runtime: .*einsum") as caught:
        path = export(qmodel, tmp_path / "mixer.w7a8", engine="onnxruntime")
    assert path == tmp_path / "mixer.w7a8.onnx" and path.exists()
    [(name, what)] = qmodel.quant_report.engine_float_layers.items()  # kept for report.json
    assert "einsum" in name + what and "float" in what
    assert "quantize_conv_outputs" not in str(caught[0].message)  # no conv: the QLinearConv advice would mislead


def test_a_model_files_suffix_is_swapped_whatever_its_case():
    """``export(..., "M.ONNX", engine="openvino")`` writes M.onnx and M.xml, not M.ONNX.onnx and M.ONNX.xml."""
    from pathlib import Path

    from leanvit.compress.quant.export import _with_suffix

    assert _with_suffix(Path("d/M.ONNX"), ".xml") == Path("d/M.xml")
    assert _with_suffix(Path("d/M.Xml"), ".onnx") == Path("d/M.onnx")
    assert _with_suffix(Path("d/deit.w8a8"), ".xml") == Path("d/deit.w8a8.xml")


def test_a_compute_node_counts_as_int8_only_with_its_data_and_weight_dequantized():
    """The lost-quantizer check counts these: a MatMul whose weight stays float runs in float on either engine,
    however its input is quantized; so does one whose weight alone is dequantized."""
    from onnx import TensorProto, helper

    def dq(name):  # x (uint8) -> DequantizeLinear -> name
        return helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [name], name=f"{name}_dq")

    nodes = [dq("x"), dq("w"), dq("v"),
             helper.make_node("MatMul", ["x", "w"], ["both"], name="both"),
             helper.make_node("MatMul", ["x", "float_w"], ["input_only"], name="input_only"),
             helper.make_node("Gemm", ["float_x", "v"], ["weight_only"], name="weight_only")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("float_x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2])
                               for n in ("both", "input_only", "weight_only")])
    assert _int8_summary(graph) == OnnxInt8Summary(int8=1, float=["input_only", "weight_only"])


def test_onnxruntime_recipe_runs_the_classifier_as_qgemm(tiny_vit, tmp_path, tests_in):
    # ONNX Runtime fuses a QDQ Gemm into QGemm only with an explicit weight zero point and an int32 bias
    vit = copy.deepcopy(tiny_vit)
    torch.nn.init.normal_(vit.head.bias, std=0.5)  # as trained: timm initialises the classifier bias to zero
    torch.manual_seed(4)
    qvit = quantize(vit, torch.randn(16, 3, 32, 32), QuantConfig.recipe("mse", "w7a8", engine="onnxruntime"),
                    progress=False)
    ints = qvit.head.bias.double() / (qvit.head.input_quantizer.scale * qvit.head.weight_quantizer.scale)
    assert ints.abs().min() > 1 and torch.allclose(ints, ints.round(), rtol=1e-6, atol=1e-3)  # snapped, not zeroed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # (the generic target keeps the attention matmuls float, and says so)
        path = export(qvit, tmp_path / "vit.onnx", engine="onnxruntime")
    assert not any("head (" in str(w.message) for w in caught), [str(w.message) for w in caught]
    precisions = onnxruntime_precisions(path, source_modules(path))
    assert [p for node, p in precisions.items() if node.startswith("head (")] == [("QGemm", "int8")], precisions
    assert float_biases(path) == []
    agreement = check_agreement(qvit, get_engine("onnxruntime", threads=1).load_onnx(path), tests_in)
    assert agreement.top1_agreement == 1.0 and agreement.max_abs_err < 0.02 * agreement.ref_scale
    # OpenVINO still runs the classifier with its weights' own zero point as an INT8 FullyConnected
    runner = get_engine("openvino", threads=1).load_model_file(export(qvit, tmp_path / "vit.xml", engine="openvino"))
    head = [p for name, (_, p) in openvino_precisions(runner.compiled, source_modules(tmp_path / "vit.onnx")).items()
            if name.startswith("head (")]
    assert head and set(head) <= {"u8", "i8"}
    # a classifier bias off the int32 grid stays float, and ONNX Runtime's float Gemm is named
    with torch.no_grad():
        qvit.head.bias.add_(0.3 * qvit.head.input_quantizer.scale * qvit.head.weight_quantizer.scale)
    with pytest.warns(UserWarning, match=r"run in float on ONNX Runtime: .*head \("):
        assert len(float_biases(export(qvit, tmp_path / "off_grid.onnx", engine="onnxruntime"))) == 1


def test_per_tensor_weights_run_the_classifier_as_qgemm_too(tmp_path):
    """With ``w_per_channel=False`` the Gemm's explicit weight zero point is a scalar, as its scale is: a
    one-element one made ONNX Runtime run the classifier as a float Gemm."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3)).eval()
    torch.nn.init.normal_(model[2].bias, std=0.5)
    config = QuantConfig.recipe("mse", "w7a8", engine="onnxruntime", w_per_channel=False)
    qmodel = quantize(model, torch.randn(16, 3, 8, 8), config, progress=False)
    assert qmodel[2].weight_quantizer.scale.numel() == 1
    path = export(qmodel, tmp_path / "m.onnx", engine="onnxruntime")
    assert onnxruntime_precisions(path, source_modules(path))["2 (node_linear)"] == ("QGemm", "int8")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(get_engine("onnxruntime", threads=1).load_onnx(path)(x.numpy()), qmodel(x).numpy(),
                                   atol=1e-5)


def float_biases(path) -> list[str]:
    """The Conv / Gemm nodes of an ONNX file whose bias is a float initializer (not int32 behind a
    DequantizeLinear)."""
    graph = onnx.load(str(path)).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return [n.name for n in graph.node
            if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] in floats]


def test_openvino_runs_int8_kernels_and_the_simulation(qvit, vit_xml, tests_in):
    runner = get_engine("openvino", threads=1).load_model_file(vit_xml)
    precisions = openvino_precisions(runner.compiled)
    layers = {name: p for name, (kind, p) in precisions.items() if kind != "Subgraph"}
    assert len(layers) >= len(qvit.quant_report.quantized)
    assert set(layers.values()) <= {"u8", "i8"}, precisions
    named = openvino_precisions(runner.compiled, source_modules(vit_xml.with_suffix(".onnx")))
    layer_names = {n for n, m in qvit.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    assert {n.split(" (")[0] for n, (kind, _) in named.items() if kind != "Subgraph"} <= layer_names, named
    # what export's check reports as float (from the compiled model given): none of the quantized layers, u8 or i8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the float attention matmuls, named)
        found = check_engine_precisions(qvit, vit_xml, "openvino", compiled=runner.compiled)
    assert not {n.split(" (")[0] for n in found} & set(qvit.quant_report.quantized), found
    # DEPLOY keeps the attention matmuls float: where OpenVINO fuses them (AVX-512 CPUs) the fused layers say so
    assert {p for kind, p in precisions.values() if kind == "Subgraph"} <= {"f32"}, precisions
    agreement = check_agreement(qvit, runner, tests_in)
    assert agreement.top1_agreement == 1.0
    # float accumulation order differs, which can move a value across a rounding step in the next layer
    assert agreement.max_abs_err < 0.02 * agreement.ref_scale


def small_cnn():
    """Stem conv + BN + ReLU6, depthwise conv + BN, pointwise conv, pool, head: the ops of a mobile CNN."""
    torch.manual_seed(3)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


def test_cnn_with_folded_batchnorm_exports(tmp_path):
    model = small_cnn()
    by_default = quantize(model, torch.randn(16, 3, 32, 32), DEPLOY, progress=False).quant_report
    assert by_default.float_layers["3"].startswith("depthwise") and "3" not in by_default.float_compute_layers
    assert len(by_default.quantized) == 3
    qcnn = quantize(model, torch.randn(16, 3, 32, 32), QuantConfig(w_bits=7, quantize_depthwise=True), progress=False)
    assert len(qcnn.quant_report.folded_batchnorms) == 2
    path = export_quantized(qcnn, tmp_path / "cnn.onnx", dynamic_batch=False)
    assert onnx_int8_summary(path) == OnnxInt8Summary(int8=4, float=[])
    runner = get_engine("onnxruntime", threads=1).load_onnx(path)
    agreement = check_agreement(qcnn, runner, [torch.randn(1, 3, 32, 32) for _ in range(4)])
    assert agreement.top1_agreement == 1.0
    assert agreement.max_abs_err < 0.02 * agreement.ref_scale


def test_per_channel_depthwise_inputs_run_int8_on_openvino_and_are_refused_for_onnxruntime(tmp_path):
    """Q-HyViT's granularity choice: a depthwise conv whose input channels differ widely in range takes
    per-channel input ranges, which OpenVINO runs in INT8 (the scale folds into each channel's requantization)."""
    torch.manual_seed(6)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.GELU(),
                          nn.Conv2d(16, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.logspace(-2, 1, 16))  # channel ranges over three decades,
        model[4].weight.copy_(torch.logspace(2, -1, 16))  # rescaled by the next BatchNorm, as trained models do
    calib, tests = torch.randn(32, 3, 16, 16), [torch.randn(1, 3, 16, 16) for _ in range(4)]
    config = QuantConfig(w_bits=7, quantize_depthwise=True, a_per_channel="auto")
    qcnn = quantize(model, calib, config, progress=False)
    assert qcnn[3].input_quantizer.scheme.per_channel and qcnn[3].input_quantizer.scale.shape == (16,)
    assert not any(qcnn[i].input_quantizer.scheme.per_channel for i in (0, 6, 9))
    assert "inputs uint8 asym per-channel" in qcnn.quant_report.quantized["3"]
    assert "1 layers with per-channel inputs" in qcnn.quant_report.summary()
    per_tensor = quantize(model, calib, replace(config, a_per_channel=False), progress=False)
    with torch.no_grad():
        x = torch.randn(16, 3, 16, 16)
        err = [(q(x) - model(x)).pow(2).mean().item() for q in (qcnn, per_tensor)]
    assert err[0] < 0.7 * err[1], err
    xml = export(qcnn, tmp_path / "dw.xml", engine="openvino", dynamic_batch=False)
    runner = get_engine("openvino", threads=1).load_model_file(xml)
    precisions = openvino_precisions(runner.compiled, source_modules(xml.with_suffix(".onnx")))
    assert len(precisions) == 4 and {p for _, p in precisions.values()} <= {"u8", "i8"}, precisions
    agreement = check_agreement(qcnn, runner, tests)
    assert agreement.max_abs_err < 0.02 * agreement.ref_scale
    with pytest.raises(LeanvitError, match="3.*QLinearConv needs one input scale per tensor"):
        export(qcnn, tmp_path / "dw.onnx", engine="onnxruntime")
    check_deployable(qcnn)  # no engine named: a file OpenVINO can run in INT8 is not refused


class _ChannelsLast(torch.nn.Module):
    """A Linear applied over channels (NHWC), its output back to NCHW: EfficientMod's context branch."""

    def __init__(self, channels):
        super().__init__()
        self.fc = torch.nn.Linear(channels, channels)

    def forward(self, x):
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_a_per_channel_depthwise_input_openvino_runs_in_float_is_named_with_the_fix(tmp_path):
    nn = torch.nn
    model = nn.Sequential(_ChannelsLast(8), nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.GELU(), nn.Conv2d(8, 8, 1)).eval()
    with torch.no_grad():
        model[0].fc.weight.mul_(torch.logspace(-2, 1, 8)[:, None])
    qmodel = quantize(model, torch.randn(32, 8, 12, 12), QuantConfig(w_bits=7, quantize_depthwise=True,
                                                                     a_per_channel="auto"), progress=False)
    assert qmodel[1].input_quantizer.scheme.per_channel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xml = export(qmodel, tmp_path / "m.xml", engine="openvino", dynamic_batch=False)
    runner = get_engine("openvino", threads=1).load_model_file(xml)
    in_float = [n for n, (_, p) in openvino_precisions(runner.compiled, source_modules(xml.with_suffix(".onnx"))).items()
                if p not in ("u8", "i8")]
    said = " ".join(str(w.message) for w in caught)
    if in_float:  # OpenVINO 2026.4 runs it in f32: the warning says which layer, why, and the fix
        assert in_float[0].startswith("1 (") and "1 quantize their inputs per channel" in said
        assert "a_per_channel=False" in said and "--a-granularity tensor" in said  # the CLI's fix as well
    else:
        assert "run in float" not in said


def test_bit_widths_without_engine_kernels_are_refused(tiny_vit, tmp_path):
    calib = torch.randn(16, 3, 32, 32)
    w4a4 = quantize(tiny_vit, calib, QuantConfig.from_bits("w4a4"), progress=False)
    with pytest.raises(LeanvitError, match="below 8 bits.*blocks.0.attn.qkv"):
        export(w4a4, tmp_path / "m.xml", engine="openvino")
    w8a7 = quantize(tiny_vit, calib, QuantConfig.from_bits("w8a7"), progress=False)  # 7 bits: weights only
    with pytest.raises(LeanvitError, match="below 8 bits"):
        export(w8a7, tmp_path / "m.xml", engine="openvino")
    with pytest.raises(LeanvitError, match="below 8 bits"):
        check_config_deployable(QuantConfig.from_bits("w8a7"))
    check_config_deployable(QuantConfig.from_bits("w7a8"))
    per_channel = quantize(tiny_vit, calib, QuantConfig(a_per_channel=True), progress=False)
    for engine in ("onnxruntime", "openvino", None):  # a Linear's per-channel inputs: no engine's INT8 kernel
        with pytest.raises(LeanvitError, match=r"only a depthwise conv's can be per channel"):
            export_quantized(per_channel, tmp_path / "m.onnx", engine=engine)
    with pytest.raises(LeanvitError, match="no quantizers"):
        export(tiny_vit, tmp_path / "m.onnx", engine="onnxruntime")
    with pytest.raises(LeanvitError, match="engine 'tensorrt'"):
        export(w4a4, tmp_path / "m.onnx", engine="tensorrt")


def test_configs_without_engine_kernels_are_refused_before_calibrating():
    """``leanvit quantize --out`` refuses these from the config alone, before minutes of calibration, naming the
    field and the flag: 7 bits is deployable for weights only, ``layer_bits`` widths count as ``--bits`` does, and
    per-channel depthwise inputs are refused for ONNX Runtime alone."""
    for bits in ("w6a8", "w2a8"):  # (7 bits for weights is no licence for fewer)
        with pytest.raises(LeanvitError, match=rf"^{bits} in w_bits/a_bits \(--bits {bits}\): layers quantized below"):
            check_config_deployable(QuantConfig.from_bits(bits))
    with pytest.raises(LeanvitError, match=r"^w4a8 in layer_bits \(--layer-bits PATTERN=w4a8\)"):
        check_config_deployable(QuantConfig(w_bits=7, layer_bits=(("head", "w8a8"), ("blocks.0.*", "w4a8"))))
    check_config_deployable(QuantConfig(layer_bits=(("head", "w7a8"),)))
    with pytest.raises(LeanvitError, match=r"^w6a6 in edge_bits \(the first layer and the classifier\)"):
        check_config_deployable(QuantConfig(edge_bits="w6a6"))  # (the Python API's: no recipe sets edges this low)
    check_config_deployable(QuantConfig(edge_bits="w8a8"))
    with pytest.raises(LeanvitError, match=r"^attn_bits=7 \(--attn-bits 7\)"):
        check_config_deployable(QuantConfig(attn_bits=7))
    check_config_deployable(QuantConfig(attn_bits=8))
    with pytest.raises(LeanvitError, match=r"^The log2 softmax quantizer is simulation only"):
        check_config_deployable(QuantConfig(attn_bits=8, softmax_quantizer="log2"))
    with pytest.raises(LeanvitError, match=r"^a_per_channel=True \(--a-granularity channel\)"):
        check_config_deployable(QuantConfig(a_per_channel=True), "openvino")
    auto = QuantConfig(a_per_channel="auto", quantize_depthwise=True)
    with pytest.raises(LeanvitError, match=r"^a_per_channel='auto' .* QLinearConv cannot run"):
        check_config_deployable(auto, "onnxruntime")
    for engine in ("openvino", None):  # OpenVINO runs them in INT8: no engine chosen yet is no reason to refuse
        check_config_deployable(auto, engine)
    check_config_deployable(replace(auto, quantize_depthwise=False), "onnxruntime")  # no depthwise conv quantized


def test_an_export_that_loses_a_quantized_layer_is_an_error(qvit, tmp_path):
    """The graph's INT8 compute nodes are counted against the layers the report says are quantized: one fewer in
    the graph (here, one more in the report) is a float layer the exporter dropped, not a model to ship."""
    lost = copy.deepcopy(qvit)
    lost.quant_report.quantized["blocks.9.mlp.fc9"] = "weights int8 sym per-channel; inputs uint8 asym per-tensor"
    with pytest.raises(RuntimeError, match="lost some quantizers"):
        export_quantized(lost, tmp_path / "m.onnx")


def test_an_export_example_of_another_size_or_rank_is_refused(qvit, tmp_path):
    """It was timm's assertion or an unpacking error from inside the exporter; calibrated at 32x32."""
    for example, shape in ((torch.zeros(1, 3, 64, 64), "1x3x64x64"), (torch.zeros(3, 32, 32), "3x32x32")):
        with pytest.raises(LeanvitError, match=f"The export example is {shape}; pass example=torch.zeros"
                                               r"\(1, 3, 32, 32\), one image of the calibration size"):
            export(qvit, tmp_path / "m.onnx", engine="onnxruntime", example=example)


@pytest.mark.skipif(not int8_saturates(), reason="this CPU has VNNI/AMX: 8-bit weights are exact")
def test_8bit_weights_on_a_cpu_without_vnni_warn(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2)).eval()
    w8 = quantize(model, torch.randn(16, 3, 8, 8), progress=False)
    with pytest.warns(UserWarning, match="VNNI"):
        export_quantized(w8, tmp_path / "m.onnx", dynamic_batch=False)


def test_int8_saturation_is_read_from_the_cpu_flags_and_warned_for_8bit_weights_only(monkeypatch, tmp_path):
    """Whether the INT8 sums saturate is read from /proc/cpuinfo on x86 (VNNI or AMX: they do not; other CPUs, or
    no cpuinfo: assumed not), and only 8-bit weights are warned about there: W7A8, what the warning recommends,
    runs exactly what was simulated."""
    import importlib

    module = importlib.import_module("leanvit.compress.quant.export")  # (the package's `export` is the function)

    def cpu(machine, flags):
        class CpuInfo:
            def __init__(self, path):
                assert str(path) == "/proc/cpuinfo"

            def read_text(self):
                if flags is None:
                    raise OSError("no /proc")
                return flags

        monkeypatch.setattr(module.platform, "machine", lambda: machine)
        monkeypatch.setattr(module, "Path", CpuInfo)
        return int8_saturates()

    assert cpu("x86_64", "flags : fpu sse avx2 fma")
    assert cpu("AMD64", "flags : avx2")
    for flags in ("flags : avx2 avx512f avx512_vnni", "flags : avx2 avx_vnni", "flags : avx2 amx_int8"):
        assert not cpu("x86_64", flags)
    assert not cpu("x86_64", None) and not cpu("aarch64", "flags : asimd")
    monkeypatch.undo()

    monkeypatch.setattr(module, "int8_saturates", lambda: True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2)).eval()
    for w_bits, warned in ((8, True), (7, False)):
        qmodel = quantize(model, torch.randn(16, 3, 8, 8), QuantConfig(w_bits=w_bits), progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_quantized(qmodel, tmp_path / f"w{w_bits}.onnx")
        assert any("no VNNI/AMX" in str(w.message) for w in caught) == warned, [str(w.message) for w in caught]


def test_an_export_gives_7bit_weights_back_as_they_were(tmp_path):
    """The export swaps each 7-bit weight for its quantized values at 8 bits (the exporter's int8 container): the
    model must get its float weights, trainable, and its 7-bit schemes back, else a later export, fine-tuning or
    saved checkpoint sees another model (its weights rounded, "int8" in what it reports)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2)).eval()
    qmodel = quantize(model, torch.randn(16, 3, 8, 8), DEPLOY, progress=False)
    layers = [qmodel[0], qmodel[2]]
    weights = [layer.weight for layer in layers]
    saved = [w.detach().clone() for w in weights]
    export_quantized(qmodel, tmp_path / "m.onnx")
    for layer, weight, values in zip(layers, weights, saved):
        assert layer.weight is weight and weight.requires_grad and torch.equal(weight.detach(), values)
        assert layer.weight_quantizer.scheme.bits == 7
    assert not torch.equal(saved[1], layers[1].weight_quantizer(saved[1]))  # (off the grid: a swap would show)


def _w8_linear():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2)).eval()
    return quantize(model, torch.randn(16, 3, 8, 8), progress=False)  # (8-bit weights)


def _opset(path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def test_an_export_writes_the_opset_asked_for_and_caches_each_opset_apart(tmp_path):
    from leanvit.compress.quant.export import cached_export_quantized

    qmodel, x = _w8_linear(), torch.zeros(1, 3, 8, 8)
    with warnings.catch_warnings():  # (without VNNI: the 8-bit weights' saturation warning)
        warnings.simplefilter("ignore")
        assert _opset(export_quantized(qmodel, tmp_path / "m18.onnx", opset=18)) == 18
        for opset in (18, 20):
            assert _opset(cached_export_quantized(qmodel, x, "onnxruntime", cache_dir=tmp_path, opset=opset)) == opset


def test_a_cached_export_is_kept_per_engine_and_a_hit_is_checked_as_an_export_is(monkeypatch, tmp_path):
    """Each engine gets its own cached file (their rewrites differ: ONNX Runtime's alone gives a bias-free Linear
    before a ReLU its zeros), and a cache hit still checks the model as an export does: here, the warning about
    8-bit weights on a CPU whose INT8 sums saturate."""
    import importlib

    from leanvit.compress.quant.export import cached_export_quantized

    qmodel, x = _w8_linear(), torch.zeros(1, 3, 8, 8)
    monkeypatch.setattr(importlib.import_module("leanvit.compress.quant.export"), "int8_saturates", lambda: True)
    paths = []
    for engine in ("onnxruntime", "openvino", "onnxruntime"):
        with pytest.warns(UserWarning, match="no VNNI/AMX"):  # a miss, a miss, a hit
            paths.append(cached_export_quantized(qmodel, x, engine, cache_dir=tmp_path))
    assert paths[0] == paths[2] != paths[1]


def test_dynamic_batch_export(qvit, tmp_path):
    with pytest.warns(UserWarning, match="TorchScript"):  # torch.export cannot trace fake-quant with a symbolic batch
        path = export(qvit, tmp_path / "dyn.onnx", engine="onnxruntime", dynamic_batch=True)
    runner = get_engine("onnxruntime", threads=1).load_onnx(path)
    assert onnx_int8_summary(path).int8 == len(qvit.quant_report.quantized)
    agreement = check_agreement(qvit, runner, [torch.randn(5, 3, 32, 32)])
    assert agreement.n == 5 and agreement.top1_agreement == 1.0


class _LinearCalledTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = torch.nn.Conv2d(3, 8, 4, 4), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.fc(torch.relu(self.fc(tokens))).mean(1))


def test_dynamic_batch_export_of_a_linear_called_twice(tmp_path):
    """The TorchScript exporter transposes the Linear's weight once per call: both Transposes fold into the int8
    weight (an error before: "the exporter lost some quantizers")."""
    torch.manual_seed(0)
    qmodel = quantize(_LinearCalledTwice().eval(), torch.randn(16, 3, 8, 8), progress=False)
    with pytest.warns(UserWarning, match="TorchScript"):
        path = export_quantized(qmodel, tmp_path / "twice.onnx", dynamic_batch=True)
    assert onnx_int8_summary(path).int8 == 4  # the conv, fc twice, the head
    assert not [n for n in onnx.load(str(path)).graph.node if n.op_type == "Transpose" and "fc" in n.name]
    x = torch.randn(3, 3, 8, 8)
    runner = get_engine("onnxruntime", threads=1).load_onnx(path)
    with torch.no_grad():  # (loose: a CPU without VNNI saturates 8-bit weights' products)
        np.testing.assert_allclose(runner(x.numpy()), qmodel(x).numpy(), atol=0.05 * float(qmodel(x).abs().max()))


class _FourierPositions(torch.nn.Module):
    """Tokens plus a projection of a fixed grid of Fourier features (XCiT's positional encoding)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 16, 8, 8)
        self.token_projection = torch.nn.Conv2d(8, 16, 1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.embed(x)
        grid = torch.arange(tokens.shape[-1], dtype=x.dtype).expand(tokens.shape[-2], -1)
        features = torch.stack([torch.sin(grid * f) for f in range(1, 9)]).expand(x.shape[0], -1, -1, -1)
        return self.head((tokens + self.token_projection(features)).mean((2, 3)))


def test_layers_with_constant_inputs_stay_float_and_match_on_the_engine(tmp_path, tests_in):
    torch.manual_seed(0)
    model = _FourierPositions().eval()
    qmodel = quantize(model, torch.randn(16, 3, 32, 32), DEPLOY, progress=False)
    report = qmodel.quant_report
    assert set(report.quantized) == {"embed", "head"}
    assert report.float_layers["token_projection"].startswith("constant input")
    assert "token_projection" not in report.float_compute_layers  # no INT8 speed left on the table: no warning
    runner = get_engine("openvino", threads=1).load_model_file(export(qmodel, tmp_path / "m.xml", engine="openvino"))
    agreement = check_agreement(qmodel, runner, tests_in)
    assert agreement.max_abs_err < 0.02 * agreement.ref_scale



def test_openvino_elementwise_subgraphs_are_not_taken_for_float_matmuls():
    # original op names of runtime Subgraphs as OpenVINO 2026.4 reported them (MambaOut-femto, DeiT-tiny, Hiera)
    assert not fuses_a_matmul("Subtract_10002,node_MatMul_13/DequantizationMultiply,FakeQuantize_1378144")
    assert fuses_a_matmul("node_matmul,node_matmul/DequantizationMultiply,node_softmax,node_fake_quantize_5,"
                          "node_matmul_1,")
    assert fuses_a_matmul("/blocks.0/attn/MatMul_1,/blocks.0/attn/Softmax")  # TorchScript exporter's names
    assert fuses_a_matmul("Multiply_12919,Add_15940,Softmax_12922,node_scaled_dot_product_attention,node_transpose_1,")
    assert not fuses_a_matmul("node_scaled_dot_product_attention/DequantizationMultiply")  # elementwise, split off


class _TransposedMlp(torch.nn.Module):
    """PVT-v2's MLP: a Linear on tokens, its output transposed to feed a depthwise conv, then back to tokens;
    with ``residual`` the Linear's output is also added to the result (read elsewhere than through the view)."""

    def __init__(self, dim=16, hidden=32, residual=False):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, dim, 1)
        self.fc1, self.fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
        self.dwconv = torch.nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.residual = residual

    def forward(self, x):
        B, _, H, W = x.shape
        h = self.fc1(self.stem(x).flatten(2).transpose(1, 2))
        y = self.dwconv(h.transpose(1, 2).view(B, -1, H, W)).flatten(2).transpose(1, 2)
        return self.fc2(torch.nn.functional.gelu(y + h if self.residual else y))


def test_a_float_attention_subgraph_is_named_after_its_matmuls_module():
    """OpenVINO names a fused Subgraph after its last op; when that is the next layer's input quantizer, the
    module named must still be the attention whose matmuls it runs."""
    from types import SimpleNamespace

    from leanvit.compress.quant.export import openvino_precisions

    class Any(str):  # an ov.OVAny as rt_info holds it
        def astype(self, _):
            return str(self)

    fused = "node_matmul_4,node_softmax_2,node_matmul_5,node_fake_quantize_per_tensor_affine_9"
    op = SimpleNamespace(get_friendly_name=lambda: "node_fake_quantize_per_tensor_affine_9", get_rt_info=lambda: {
        "layerType": Any("Subgraph"), "originalLayersNames": Any(fused), "runtimePrecision": Any("FP32")})
    compiled = SimpleNamespace(get_runtime_model=lambda: SimpleNamespace(get_ordered_ops=lambda: [op]))
    modules = {"node_matmul_4": "blocks.0.attn", "node_matmul_5": "blocks.0.attn",
               "node_fake_quantize_per_tensor_affine_9": "blocks.0.attn.proj.input_quantizer"}
    assert openvino_precisions(compiled, modules) == {
        "blocks.0.attn (node_fake_quantize_per_tensor_affine_9)": ("Subgraph", "fp32")}


def test_inputs_read_through_a_transpose_are_quantized_where_they_are_written(tmp_path):
    """``producer_quantizers`` (the OpenVINO recipe): a layer reading another's output through a transpose gets
    it quantized by the writer on its own grid, so OpenVINO's transpose moves int8; the simulation is unchanged.
    Not where the output is also read elsewhere (the model would change)."""
    torch.manual_seed(0)
    calib, x = torch.randn(16, 3, 6, 6), torch.randn(1, 3, 6, 6)
    config = QuantConfig.recipe("mse", "w8a8", target="vnni", engine="openvino")
    assert config.producer_quantizers and not QuantConfig.recipe("mse", engine="onnxruntime").producer_quantizers
    config = replace(config, quantize_transposed_conv_outputs=False)  # (the dwconv's output: the next test)
    for residual in (False, True):
        model = _TransposedMlp(residual=residual).eval()
        q = quantize(model, calib, config, progress=False)
        plain = quantize(model, calib, replace(config, producer_quantizers=False), progress=False)
        with torch.no_grad():
            assert torch.equal(q(x), plain(x))
        assert (q.fc1.output_quantizer is None) == residual and q.dwconv.output_quantizer is None
        assert ("on dwconv's input grid" in q.quant_report.quantized["fc1"]) != residual
    model = _TransposedMlp().eval()
    xmls = {flag: export(quantize(model, calib, replace(config, producer_quantizers=flag), progress=False),
                         tmp_path / f"mlp_{flag}.xml", engine="openvino", example=x) for flag in (False, True)}
    compiled = {flag: get_engine("openvino", threads=1).load_model_file(xml) for flag, xml in xmls.items()}

    def transposes(runner):  # the runtime precision of each Transpose OpenVINO kept as its own node
        return [op.get_rt_info()["outputPrecisions"].astype(str) for op in runner.compiled.get_runtime_model()
                .get_ordered_ops() if op.get_rt_info()["layerType"].astype(str) == "Transpose"]

    assert "f32" in transposes(compiled[False]) and "f32" not in transposes(compiled[True])
    np.testing.assert_allclose(compiled[True](x.numpy()), compiled[False](x.numpy()), atol=1e-5)


class _PvtBlock(torch.nn.Module):
    """A patch embedding (conv, flattened into tokens, plus a position embedding) and a pre-norm residual PVT-v2
    MLP (Linear, transposed into a depthwise conv, back to tokens for a GELU)."""

    def __init__(self, dim=16, hidden=32, tokens=64):
        super().__init__()
        from timm.models.pvt_v2 import MlpWithDepthwiseConv

        self.proj, self.norm = torch.nn.Conv2d(3, dim, 1), torch.nn.LayerNorm(dim)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.mlp = MlpWithDepthwiseConv(dim, hidden)

    def forward(self, x):
        tokens = self.proj(x).flatten(2).transpose(1, 2) + self.pos
        return tokens + self.mlp(self.norm(tokens), x.shape[2:])


def test_conv_outputs_a_float_op_reads_transposed_are_quantized(tmp_path):
    """``quantize_transposed_conv_outputs`` (the OpenVINO recipe at 8 bits): a conv output that a float op reads
    transposed (the patch embedding's, by the position embedding's add; the MLP's depthwise conv's, by the
    GELU) is quantized where the conv writes it, so OpenVINO moves it as int8: no f32 transpose or reorder left."""
    torch.manual_seed(0)
    calib, x = torch.randn(16, 3, 8, 8), torch.randn(1, 3, 8, 8)
    config = QuantConfig.recipe("mse", "w8a8", target="vnni", engine="openvino")
    assert config.quantize_transposed_conv_outputs
    assert not QuantConfig.recipe("mse", "w8a8", engine="onnxruntime").quantize_transposed_conv_outputs
    assert not QuantConfig.recipe("mse", "w6a6", engine="openvino").quantize_transposed_conv_outputs
    model = _PvtBlock().eval()
    qmodels = {flag: quantize(model, calib, replace(config, quantize_transposed_conv_outputs=flag), progress=False)
               for flag in (False, True)}
    for name in ("proj", "mlp.dwconv"):
        assert qmodels[True].get_submodule(name).output_quantizer is not None
        assert qmodels[False].get_submodule(name).output_quantizer is None
        assert "(a float op reads them transposed)" in qmodels[True].quant_report.quantized[name]
    runners = {flag: get_engine("openvino", threads=1).load_model_file(
        export(q, tmp_path / f"block_{flag}.xml", engine="openvino", example=x)) for flag, q in qmodels.items()}

    def f32_moves(runner):  # the Transpose / Reorder nodes OpenVINO runs on f32 data
        return [op.get_friendly_name() for op in runner.compiled.get_runtime_model().get_ordered_ops()
                if op.get_rt_info()["layerType"].astype(str) in ("Transpose", "Reorder")
                and op.get_rt_info()["outputPrecisions"].astype(str) == "f32"]

    assert f32_moves(runners[False]) and not f32_moves(runners[True]), f32_moves(runners[True])
    with torch.no_grad():
        np.testing.assert_allclose(runners[True](x.numpy()), qmodels[True](x).numpy(), atol=1e-4)


def test_transposed_reads_name_the_layers_a_non_view_op_reads_transposed():
    """Found in one forward by storage: a view op only passes the output on; a read as written, a quantizer's read
    and a read as NHWC (OpenVINO's own layout for a conv's output) do not count."""
    from leanvit.compress.quant.modules import transposed_reads
    from leanvit.compress.quant.quantizer import FakeQuantizer, QScheme

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            convs = (torch.nn.Conv2d(3, 4, 1) for _ in range(5))
            self.plain, self.tokens, self.quantized, self.last, self.nhwc = convs
            self.quantizer = FakeQuantizer(QScheme(8), axis=-1, channels=4)

        def forward(self, x):
            a = torch.nn.functional.gelu(self.plain(x))  # read as written
            b = torch.nn.functional.gelu(self.tokens(x).flatten(2).transpose(1, 2))  # read transposed
            c = self.quantizer(self.quantized(x).flatten(2).transpose(1, 2))  # read transposed by a quantizer
            channels_last = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
            d = torch.nn.functional.gelu(self.last(channels_last).flatten(2).transpose(1, 2))  # channels-last: tokens
            e = torch.nn.functional.gelu(self.nhwc(x).permute(0, 2, 3, 1))  # read as NHWC
            return a.sum() + b.sum() + c.sum() + d.sum() + e.sum()

    net = Net().eval()
    layers = {n: getattr(net, n) for n in ("plain", "tokens", "quantized", "last", "nhwc")}
    assert transposed_reads(net, layers, torch.randn(1, 3, 4, 4)) == {"tokens", "last"}


def test_transposed_reads_leave_out_outputs_a_normalization_reads():
    """OpenVINO would move their dequantization past its MVN, normalizing int8 values with the float epsilon
    (the engine off the simulation): a layer norm reading a copy made by a transpose + contiguous, a group norm
    reading a view, both vetoing an output another op reads transposed."""
    from leanvit.compress.quant.modules import transposed_reads

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.normed, self.grouped = (torch.nn.Conv2d(3, 4, 1) for _ in range(3))

        def forward(self, x):
            a = torch.nn.functional.gelu(self.tokens(x).flatten(2).transpose(1, 2))
            b = self.normed(x).flatten(2).transpose(1, 2)
            b = torch.nn.functional.gelu(b) + torch.nn.functional.layer_norm(b.contiguous(), (4,))
            c = self.grouped(x)
            c = torch.nn.functional.gelu(c.flatten(2).transpose(1, 2)).sum() + torch.nn.functional.group_norm(c, 1)
            return a.sum() + b.sum() + c.sum()

    net = Net().eval()
    layers = {n: getattr(net, n) for n in ("tokens", "normed", "grouped")}
    assert transposed_reads(net, layers, torch.randn(1, 3, 4, 4)) == {"tokens"}


def test_an_int32_bias_leaves_no_float_initializer_behind(tiny_vit, tmp_path, capfd):
    """The float bias an int32 one replaced stayed in the file, and ONNX Runtime printed "Removing initializer
    'head.bias'. It is not used by any node" on opening it: now it goes, with any other initializer left unread."""
    import onnxruntime as ort

    vit = copy.deepcopy(tiny_vit)
    torch.nn.init.normal_(vit.head.bias, std=0.5)
    torch.manual_seed(5)
    qvit = quantize(vit, torch.randn(16, 3, 32, 32), QuantConfig.recipe("minmax", "w7a8", engine="onnxruntime"),
                    progress=False)
    for dynamic_batch in (False, True):  # (the torch.export and TorchScript exporters)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_quantized(qvit, tmp_path / f"vit{dynamic_batch}.onnx", dynamic_batch=dynamic_batch,
                                    engine="onnxruntime")
        graph = onnx.load(str(path)).graph
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        # the rewrite happened, to the simulation's integers (bias / (input scale x weight scale), rounded)
        step = (qvit.head.input_quantizer.scale * qvit.head.weight_quantizer.scale).double()
        np.testing.assert_array_equal(inits["head.bias_int32"],
                                      torch.round(qvit.head.bias.detach().double() / step).numpy())
        onnx.checker.check_model(str(path))  # (nodes in order: each int32 bias dequantized before it is read)
        read = {name for node in graph.node for name in node.input}
        assert [t.name for t in graph.initializer if t.name not in read] == []
        assert [i.name for i in graph.input] == ["input"]
        produced = {name for node in graph.node for name in node.output}
        assert [v.name for v in graph.value_info if v.name not in produced] == []  # no shape of a value nobody writes
        options = ort.SessionOptions()
        options.log_severity_level = 2  # warnings: where ONNX Runtime names each unused initializer
        capfd.readouterr()
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        assert "Removing initializer" not in capfd.readouterr().err


def test_an_initializer_only_a_subgraph_reads_is_kept():
    """The unused initializers dropped after the rewrites are those no node reads, an If's or Loop's branches
    included: they can read the outer graph's values, and dropping one leaves a file no engine opens."""
    from onnx import TensorProto, helper

    from leanvit.compress.quant.export import _drop_unused

    def branch(name, value):
        return helper.make_graph([helper.make_node("Identity", [value], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1])])

    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", "a"), else_branch=branch("else", "b"))],
        "g", [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), name) for name in ("a", "b", "unused")])
    _drop_unused(graph)
    assert [t.name for t in graph.initializer] == ["a", "b"]


def test_a_weight_folded_with_its_transpose_keeps_no_stale_shape(vit_onnx, capfd):
    """Folding a Transpose into an int8 weight left its DequantizeLinear's recorded shape untransposed: ONNX Runtime
    printed "Error merging shape info for output" for every Linear on opening the file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 2
    capfd.readouterr()
    ort.InferenceSession(str(vit_onnx), options, providers=["CPUExecutionProvider"])
    assert "Error merging shape info" not in capfd.readouterr().err
