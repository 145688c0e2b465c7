"""Quantized attention matmuls and the post-softmax quantizers: accuracy, equivalence, export, reporting."""
import copy
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention

import leanvit.compress.tokens as tokens
from leanvit.compress.quant.attention import QuantMatmuls
from leanvit.compress.quant import (
    FakeQuantizer, Log2Quantizer, QScheme, QuantAttention, QuantConfig, RangeObserver, ShiftUniformLog2Quantizer,
    TwinUniformQuantizer, check_deployable, export, onnx_int8_summary, openvino_precisions, quantize, quantizers,
    quantizers_disabled,
)
from leanvit.deploy import check_agreement, get_engine
from leanvit.errors import LeanvitError
from random_vit import randomised

torch.set_num_threads(1)
#: An engine's float ops (GEMM, softmax, GELU) sum in another order than PyTorch's, so a value within float error of a
#: rounding boundary can land one quantization step away and shift what follows: on the VNNI Xeon ONNX Runtime
#: differs from the simulation by 1.3 % of the logits' range with every op unfused (the AMD EPYC: under 0.1 %).
ENGINE_TOLERANCE = 0.02
DEPLOY = QuantConfig(w_bits=7, attn_bits=8)  # 7-bit weights: exact on CPUs without VNNI (see export.int8_saturates)


def attention_probs(seed: int, n: int = 197) -> torch.Tensor:
    """Softmax of random logits at ViT-B/16's 197 tokens, one row in eight peaked on one key."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, n, n, generator=g) * 1.5
    logits[:, :, ::8, 0] += 6.0
    return logits.softmax(-1)


def fitted(kind: str, bits: int, calib: torch.Tensor):
    observer = RangeObserver(axis=-1)
    observer.update(calib)
    if kind == "uniform":
        q = FakeQuantizer(QScheme(bits, symmetric=False), axis=-1, channels=1)
        q.set_range(*observer.range(q.scheme, "mse"))
        return q
    q = {"log2": Log2Quantizer, "sulq": ShiftUniformLog2Quantizer, "twin": TwinUniformQuantizer}[kind](bits)
    q.fit(observer.sample())
    return q


def attn_v_error(kind: str, bits: int) -> float:
    probs, v = attention_probs(1), torch.randn(2, 3, 197, 16, generator=torch.Generator().manual_seed(2))
    q = fitted(kind, bits, attention_probs(0))  # fitted on other images than those scored
    return float((q(probs) @ v - probs @ v).pow(2).mean())


def test_post_softmax_quantizers_beat_uniform_at_4_bits():
    uniform = attn_v_error("uniform", 4)
    for kind in ("log2", "sulq", "twin"):
        assert attn_v_error(kind, 4) < 0.75 * uniform, kind


def test_sulq_covers_the_small_values_that_3_bit_log2_clamps():
    """I&S-ViT's point: at 3 bits log2 has exponents 0..-6 only; SULQ spreads its codes over the whole range."""
    assert attn_v_error("sulq", 3) < 0.95 * attn_v_error("log2", 3)


def test_log2_levels_match_the_formula():
    bits = 3
    x = torch.tensor([1.0, 0.7, 0.5, 0.3, 0.1, 2.0**-5, 2.0**-5.6, 2.0**-6.4, 1e-4, 0.0])
    out = Log2Quantizer(bits)(x).numpy()
    code = np.clip(np.rint(-np.log2(np.maximum(x.numpy(), 1e-30))), 0, 2**bits - 1)
    expected = np.where(code < 2**bits - 1, 2.0**-code, 0.0)  # the last code is 0
    np.testing.assert_array_equal(out, expected)
    assert len(np.unique(Log2Quantizer(bits)(torch.rand(10_000)).numpy())) <= 2**bits


def test_twin_uses_two_grids_a_power_of_two_apart():
    bits = 4
    q = fitted("twin", bits, attention_probs(0))
    coarse, fine = 2.0 ** -(bits - 1), q.fine_step.item()
    m = np.log2(coarse / fine)
    assert m == round(m) and m >= 1  # softmax data wants a finer grid for the small values
    out = q(attention_probs(1)).flatten().numpy()
    small = out < 2 ** (bits - 1) * fine
    np.testing.assert_allclose(out[small] / fine, np.rint(out[small] / fine), atol=1e-4)
    np.testing.assert_allclose(out[~small] / coarse, np.rint(out[~small] / coarse), atol=1e-4)
    assert len(np.unique(out)) <= 2**bits


def test_sulq_decodes_to_shifted_powers_of_two():
    q = fitted("sulq", 3, attention_probs(0))
    eta = q.eta.item()
    levels = np.unique(q(attention_probs(1)).numpy()) + eta
    exponents = np.log2(levels)
    np.testing.assert_allclose(exponents, np.rint(exponents), atol=1e-4)
    assert len(levels) <= 2**3 and 0 < eta <= 1


@pytest.mark.parametrize("kind", ["log2", "sulq", "twin"])
def test_gradients_go_straight_through(kind):
    q = fitted(kind, 4, attention_probs(0))
    x = attention_probs(1).requires_grad_()
    q(x).mul(torch.arange(197.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(197.0).expand_as(x))


def small_attention(**kwargs) -> Attention:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, **kwargs).eval()
    attn.fused_attn = False
    return attn


@pytest.mark.parametrize("kwargs", [{}, {"qk_norm": True, "norm_layer": nn.LayerNorm, "gated": True}])
def test_quant_attention_with_quantizers_off_is_timm_attention(kwargs):
    attn = small_attention(**kwargs)
    qattn = QuantAttention.from_float(attn, 8, "sulq")
    x = torch.randn(2, 10, 32)
    with quantizers_disabled(qattn):
        out = qattn(x)
    assert torch.equal(out, attn(x))  # the unfused path, bit for bit
    attn.fused_attn = True
    torch.testing.assert_close(out, attn(x), atol=1e-6, rtol=1e-5)
    own = {k for k in qattn.state_dict() if not k.split(".")[0].endswith("_quantizer")}
    assert own == set(attn.state_dict()) and qattn.qkv.weight is attn.qkv.weight
    assert type(qattn.to_float()) is Attention and set(qattn.to_float().state_dict()) == set(attn.state_dict())


def test_efficientmod_attention_is_swapped_and_restored():
    from leanvit.models.efficientmod import Attention as EfficientModAttention
    torch.manual_seed(0)
    attn = EfficientModAttention(32, num_heads=4).eval()  # head width 32 > 32 / 4: attn_dim 128
    qattn = QuantAttention.from_float(attn, 8)
    x = torch.randn(2, 10, 32)
    with quantizers_disabled(qattn):
        torch.testing.assert_close(qattn(x), attn(x), atol=1e-6, rtol=1e-5)  # unfused vs SDPA
    own = {k for k in qattn.state_dict() if not k.split(".")[0].endswith("_quantizer")}
    assert own == set(attn.state_dict()) and qattn.qkv.weight is attn.qkv.weight
    restored = qattn.to_float()
    assert type(restored) is EfficientModAttention and set(restored.state_dict()) == set(attn.state_dict())
    assert not hasattr(restored, "scale") and dict(restored.named_children()).keys() == {"qkv", "proj"}
    torch.testing.assert_close(restored(x), attn(x), atol=0, rtol=0)


def test_efficientmod_attention_quantized_in_the_model(tmp_path):
    import timm
    torch.manual_seed(0)
    model = timm.create_model("efficientmod_xxs", num_classes=10, embed_dims=(8, 16, 24, 40), depths=(1, 1, 1, 1),
                              attn_depths=(0, 0, 1, 1)).eval()
    qmodel = quantize(model, torch.randn(16, 3, 64, 64), DEPLOY, progress=False)
    names = [n for n, m in qmodel.named_modules() if isinstance(m, QuantAttention)]
    assert len(names) == 2 and set(names) <= set(qmodel.quant_report.quantized)
    assert not any("attention matmuls in float" in r for r in qmodel.quant_report.float_layers.values())
    onnx_path = export(qmodel, tmp_path / "emod.onnx", engine="onnxruntime", example=torch.randn(1, 3, 64, 64))
    layers = sum(1 for m in qmodel.modules() if hasattr(m, "weight_quantizer"))
    assert onnx_int8_summary(onnx_path).int8 == layers + 2 * 2  # q@kT and attn@v of both attention blocks
    ort = get_engine("onnxruntime", threads=1).load_onnx(onnx_path)
    agreement = check_agreement(qmodel, ort, [torch.randn(1, 3, 64, 64) for _ in range(2)])
    assert agreement.max_abs_err < ENGINE_TOLERANCE * agreement.ref_scale


MODEL_ATTENTION = {  # tiny models whose attention is their own class: learned position biases, talking heads, windows
    "efficientformer_l1": (dict(depths=(1, 1, 1, 2), embed_dims=(8, 16, 24, 32), num_vit=1), 224,
                           {"QuantMatmulAttention": 1}),
    "efficientformerv2_s0": (dict(img_size=64, depths=(1, 1, 2, 2), embed_dims=(8, 16, 24, 32), num_vit=2), 64,
                             {"QuantAttention2d": 4, "QuantAttention2dDownsample": 1}),
    "tiny_vit_5m_224": (dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                             window_sizes=(2, 2, 2, 2)), 64, {"QuantSdpaAttention": 3}),
    "swin_tiny_patch4_window7_224": (dict(img_size=64, embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=4), 64,
                                     {"QuantMatmulWindowAttention": 4}),  # shifted windows, with their mask, in blocks 1
    "levit_128s": (dict(img_size=64, embed_dim=(16, 24, 32), key_dim=8, num_heads=(1, 2, 2), depth=(1, 1, 1)), 64,
                   {"QuantMatmulAttention": 3, "QuantMatmulAttentionDownsample": 2}),
    "levit_conv_128s": (dict(img_size=64, embed_dim=(16, 24, 32), key_dim=8, num_heads=(1, 2, 2), depth=(1, 1, 1)),
                        64, {"QuantMatmulAttention": 3, "QuantMatmulAttentionDownsample": 2}),  # NCHW: v @ attnᵀ
    "pvt_v2_b0": (dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 2, 2)), 64,
                  {"QuantSdpaAttention": 4}),  # any class whose matmuls are one F.scaled_dot_product_attention
    "fcaformer_l1": (dict(img_size=64, embed_dims=(16, 24, 32, 48), depths=(1, 1, 4, 2), num_heads=(2, 3), cab_max_d=2,
                          ls_init_value=0.1), 64, {"QuantSdpaForwardCrossAttention": 6}),  # with and without cross tokens
    # any class whose matmuls are plain products: talking heads (signed probabilities), per-head cascades with
    # v @ attnᵀ (computed transposed, the probabilities on the left), linear attention (ReLU'd q, k unsigned)
    "cait_xxs24_224": (dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, depth_token_only=1), 32,
                       {"QuantMatmulTalkingHeadAttn": 2, "QuantSdpaClassAttn": 1}),
    "efficientvit_m0": (dict(img_size=64, embed_dim=(16, 24, 32), depth=(1, 1, 1), num_heads=(2, 2, 2),
                             window_size=(4, 4, 4), kernels=(5, 5, 5)), 64, {"QuantMatmulCascadedGroupAttention": 3}),
    "efficientvit_b0": (dict(widths=(8, 16, 24, 32, 48), depths=(1, 1, 1, 1, 1), head_dim=8, head_widths=(64, 80)), 64,
                        {"QuantLiteMLA": 2}),  # restated: the padded ones column apart, in float
    # qkv by F.linear on the Linear's weight, outside the layer's forward (with a bias of their own)
    "eva02_tiny_patch14_224": (dict(img_size=28, embed_dim=32, depth=2, num_heads=2), 28, {"QuantSdpaEvaAttention": 2}),
    "swinv2_tiny_window8_256": (dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4), 64,
                                {"QuantMatmulWindowAttention": 4}),  # cosine attention, shifted windows
}


@pytest.mark.parametrize("name", MODEL_ATTENTION)
def test_model_attention_quantized_and_int8_on_the_engines(name, tmp_path):
    import timm
    kwargs, size, expected = MODEL_ATTENTION[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        conv.reset_parameters()  # timm init: FcaFormer's merging gives ~1e-8 ranges OV computes otherwise
    for name_, p in model.named_parameters():  # timm starts learned position biases at zero and layer scales
        if "attention_biases" in name_:  # near it: where a restated forward adds the biases (before the softmax,
            nn.init.normal_(p)  # inside the talking heads) shows only with both at trained-like sizes
        elif name_.endswith(("ls1.gamma", "ls2.gamma", "layer_scale_1", "layer_scale_2")):
            nn.init.ones_(p)
        elif name_.endswith(("attn.q_bias", "attn.v_bias")):  # EVA's own qkv biases, added to F.linear's: zero at init
            nn.init.normal_(p)
    config = replace(DEPLOY, attn_max_error=None)  # every counterpart through the engines, however coarse
    qmodel = quantize(model, torch.randn(16, 3, size, size), config, progress=False)
    swapped = [type(m).__name__ for m in qmodel.modules() if isinstance(m, QuantMatmuls)]
    assert {k: swapped.count(k) for k in set(swapped)} == expected
    assert not any("attention matmuls in float" in r or "never called" in r
                   for r in qmodel.quant_report.float_layers.values())
    x = torch.randn(4, 3, size, size)
    with torch.no_grad(), quantizers_disabled(qmodel):
        assert torch.allclose(qmodel(x), model(x), atol=1e-5)  # the restated forwards are the float ones
    matmuls = sum(len(m.QUANTIZERS) // 2 for m in qmodel.modules() if isinstance(m, QuantMatmuls))  # 2 inputs each
    onnx_path = export(qmodel, tmp_path / f"{name}.onnx", engine="onnxruntime", example=x[:1])
    layers = sum(1 for m in qmodel.modules() if hasattr(m, "weight_quantizer"))
    assert onnx_int8_summary(onnx_path).int8 == layers + matmuls
    inputs = [torch.randn(1, 3, size, size) for _ in range(2)]
    xml = export(qmodel, tmp_path / f"{name}.xml", engine="openvino", example=x[:1])  # (FcaFormer's ORT file
    ov = get_engine("openvino", threads=1).load_model_file(xml)  # trips OpenVINO's MatMulTransformation)
    matmuls = [p for kind, p in openvino_precisions(ov.compiled).values() if kind in ("MatMul", "Subgraph")]
    assert matmuls and set(matmuls) <= {"u8", "i8"}, matmuls  # talking heads' signed mix included
    agreement = check_agreement(qmodel, ov, inputs)
    assert agreement.max_abs_err < ENGINE_TOLERANCE * agreement.ref_scale
    restored = qmodel.get_submodule(next(n for n, m in qmodel.named_modules() if isinstance(m, QuantMatmuls)))
    assert type(restored.to_float()) in {type(m) for m in model.modules()}


def test_attention_that_int8_would_spoil_stays_float_and_is_reported(tmp_path):
    import timm
    kwargs, size, _ = MODEL_ATTENTION["efficientvit_b0"]
    torch.manual_seed(0)
    model = timm.create_model("efficientvit_b0", num_classes=10, **kwargs).eval()
    bound = replace(DEPLOY, attn_max_error=0.05)  # this tiny LiteMLA's INT8 inputs: ~10 % (timm attention's: 1 %)
    with pytest.warns(UserWarning, match="quantizing their inputs changes its output by"):
        qmodel = quantize(model, torch.randn(16, 3, size, size), bound, progress=False)
    reasons = {n: r for n, r in qmodel.quant_report.float_layers.items() if "attention" in r}
    assert len(reasons) == 2 and not any(isinstance(m, QuantMatmuls) for m in qmodel.modules())
    errors = [float(r.split("by ")[1].split("%")[0]) for r in reasons.values()]
    assert all(e > 5 for e in errors) and all("attn_max_error=0.05" in r for r in reasons.values()), reasons
    assert not set(reasons) & set(qmodel.quant_report.quantized)
    with pytest.warns(UserWarning, match="compute layers run in float on OpenVINO"):  # named, and exported
        export(qmodel, tmp_path / "m.xml", engine="openvino")
    # an attention put back in float takes the layers it calls F.linear on with it (EVA-02's qkv)
    kwargs, size, _ = MODEL_ATTENTION["eva02_tiny_patch14_224"]
    model = timm.create_model("eva02_tiny_patch14_224", num_classes=10, **kwargs).eval()
    with pytest.warns(UserWarning, match="compute layers stay in float"):
        qmodel = quantize(model, torch.randn(16, 3, size, size), replace(DEPLOY, attn_max_error=0.0), progress=False)
    report = qmodel.quant_report
    assert [type(qmodel.blocks[i].attn.qkv) for i in (0, 1)] == [nn.Linear, nn.Linear]
    assert report.float_layers["blocks.0.attn.qkv"].startswith("never called (its weights are used by the float")
    assert "blocks.0.attn.qkv" not in report.quantized and "blocks.0.attn.proj" in report.quantized


def test_linear_attention_computes_its_padded_column_apart(monkeypatch):
    import timm
    import leanvit.compress.quant.attention as attention
    from leanvit.compress.quant.calibrate import attention_errors
    kwargs, size, _ = MODEL_ATTENTION["efficientvit_b0"]
    torch.manual_seed(0)
    model, calib = timm.create_model("efficientvit_b0", num_classes=10, **kwargs).eval(), torch.randn(16, 3, size, size)
    config = replace(DEPLOY, attn_max_error=None)

    def errors():
        qmodel = quantize(model, calib, config, progress=False)
        found = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantMatmuls)}
        return [type(m).__name__ for m in found.values()], list(attention_errors(qmodel, found, calib[:4]).values())

    restated, apart = errors()
    classes = attention._quantized_classes()
    monkeypatch.setattr(attention, "_quantized_classes",
                        lambda: {k: v for k, v in classes.items() if v is not attention.QuantLiteMLA})
    generic, padded = errors()  # the float forward's products, the ones column inside both right operands
    assert restated == ["QuantLiteMLA"] * 2 and generic == ["QuantMatmulLiteMLA"] * 2
    assert all(a < p / 3 for a, p in zip(apart, padded)), (apart, padded)


@pytest.mark.parametrize("kernel", [nn.ReLU, nn.SiLU])
def test_linear_attention_q_and_k_signed_only_when_the_kernel_function_is(kernel):
    from timm.models.efficientvit_mit import LiteMLA
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), LiteMLA(16, 16, dim=8, kernel_func=kernel)).eval()
    qmodel = quantize(model, torch.randn(16, 3, 8, 8), replace(DEPLOY, attn_max_error=None), progress=False)
    attention = qmodel[1]
    assert type(attention).__name__ == "QuantLiteMLA"
    signed = [q.scheme.symmetric for q in (attention.q_quantizer, attention.k_quantizer)]
    assert signed == [kernel is nn.SiLU] * 2, qmodel.quant_report.quantized["1"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        with quantizers_disabled(qmodel):  # (the normaliser, summed in another order, can be small: relative bound)
            assert (qmodel(x) - model(x)).abs().max() < 1e-4 * model(x).abs().max()


def test_a_layer_reached_through_f_linear_gets_every_calibration_step():
    import timm
    kwargs, size, _ = MODEL_ATTENTION["eva02_tiny_patch14_224"]
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", num_classes=10, **kwargs).eval()
    assert model.blocks[0].attn.qkv.bias is None  # EVA adds its own q/v biases in F.linear
    qmodel = quantize(model, torch.randn(16, 3, size, size), replace(DEPLOY, w_bits=4, bias_correction=True),
                      progress=False)
    qkv = qmodel.blocks[0].attn.qkv
    assert qkv.bias is not None and qkv.bias.abs().sum() > 0  # bias correction's hook saw the layer
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(), quantizers_disabled(qmodel):
        qkv.bias.zero_()
        assert torch.allclose(qmodel(x), model(x), atol=1e-5)  # the attention's own bias still added once


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(1)
    return torch.randn(16, 3, 32, 32)


@pytest.fixture(scope="module")
def qvit(tiny_vit, calib):
    return quantize(tiny_vit, calib, DEPLOY, progress=False)


def test_8_bit_attention_stays_close_to_float(tiny_vit, qvit):
    attentions = {n: m for n, m in qvit.named_modules() if isinstance(m, QuantAttention)}
    assert set(attentions) == {"blocks.0.attn", "blocks.1.attn"}
    assert set(attentions) <= set(qvit.quant_report.quantized)
    x = torch.randn(8, 3, 32, 32)
    reference = tiny_vit(x)
    scale = reference.abs().max()
    with quantizers_disabled(qvit):  # only the attention matmuls' inputs quantized
        for attn in attentions.values():
            for name in QuantAttention.QUANTIZERS:
                getattr(attn, name).enabled = True
        err = (qvit(x) - reference).abs().max()
    assert 0 < err < 0.01 * scale
    assert (qvit(x) - reference).abs().max() < 0.1 * scale


def test_uniform_attention_exports_as_int8_matmuls(qvit, tmp_path):
    inputs = [torch.randn(1, 3, 32, 32) for _ in range(4)]
    onnx_path = export(qvit, tmp_path / "vit.onnx", engine="onnxruntime")
    layers = sum(1 for m in qvit.modules() if hasattr(m, "weight_quantizer"))
    assert onnx_int8_summary(onnx_path).int8 == layers + 2 * 2  # q@kT and attn@v of both blocks, fed by DQ
    assert onnx_int8_summary(onnx_path).float == []
    ort = get_engine("onnxruntime", threads=1).load_onnx(onnx_path)
    agreement = check_agreement(qvit, ort, inputs)
    assert agreement.top1_agreement == 1.0 and agreement.max_abs_err < ENGINE_TOLERANCE * agreement.ref_scale
    ov = get_engine("openvino", threads=1).load_model_file(onnx_path)  # OpenVINO reads the QDQ ONNX itself
    # each block's q@kT and attn@v run as two INT8 MatMul layers or, on AVX-512 CPUs, fused with the softmax into
    # one INT8 "Subgraph" (OpenVINO's snippets)
    precisions = openvino_precisions(ov.compiled)
    attention = [p for kind, p in precisions.values() if kind in ("MatMul", "Subgraph")]
    assert len(attention) in (2 * 2, 2) and set(attention) <= {"u8", "i8"}, precisions
    agreement = check_agreement(qvit, ov, inputs)
    assert agreement.top1_agreement == 1.0 and agreement.max_abs_err < ENGINE_TOLERANCE * agreement.ref_scale


def test_the_attention_probabilities_are_unsigned_and_the_engines_read_them_so(qvit, tmp_path):
    """Probabilities lie in [0, 1]: uint8 with zero point 0 spends every code on them (int8 would waste half).
    The ONNX the engines run reads them through a uint8 DequantizeLinear."""
    import onnx

    for attn in (m for m in qvit.modules() if isinstance(m, QuantAttention)):
        quantizer = attn.softmax_quantizer
        assert quantizer.scheme == QScheme(8, symmetric=False) and int(quantizer.zero_point) == 0
    graph = onnx.load(export(qvit, tmp_path / "vit.onnx", engine="onnxruntime")).graph
    softmax_outputs = {node.output[0] for node in graph.node if node.op_type == "Softmax"}
    zero_point_types = {i.name: i.data_type for i in graph.initializer}
    types = [zero_point_types[node.input[2]] for node in graph.node
             if node.op_type == "QuantizeLinear" and node.input[0] in softmax_outputs]
    assert types == [onnx.TensorProto.UINT8] * 2  # one per block


def test_twin_uniforms_fine_grid_reaches_the_end_of_its_region():
    """PTQ4ViT's R1 = [0, 2^(b-1) d1): a value just below its end takes the fine grid's top code, one past it the
    coarse grid."""
    q = TwinUniformQuantizer(4)
    q.fine_step.fill_(q.coarse_step / 8)
    fine, coarse = q.fine_step.item(), q.coarse_step
    assert q(torch.tensor([7.4 * fine, 8.4 * fine])).tolist() == pytest.approx([7 * fine, coarse])


@pytest.mark.parametrize("kind", ["log2", "sulq", "twin"])
def test_non_uniform_softmax_quantizers_are_simulation_only(tiny_vit, calib, kind):
    qmodel = quantize(tiny_vit, calib, QuantConfig(attn_bits=8, softmax_quantizer=kind), progress=False)
    assert sum(not isinstance(q, FakeQuantizer) for q in quantizers(qmodel).values()) == 2
    with pytest.raises(LeanvitError, match=r"simulation only: blocks.0.attn, blocks.1.attn\. .*'uniform'"):
        check_deployable(qmodel)


def test_bad_attention_settings_are_refused():
    with pytest.raises(LeanvitError, match="'log4'.*uniform, log2, sulq, twin"):
        QuantConfig(attn_bits=8, softmax_quantizer="log4")
    with pytest.raises(LeanvitError, match="attn_bits must be between 2 and 8"):
        QuantConfig(attn_bits=16)


class OwnAttention(nn.Module):
    """A zoo model's attention: its own class, its own matmuls."""

    def __init__(self, dim):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj((q @ k.transpose(-2, -1)).softmax(-1) @ v)


class EinsumAttention(OwnAttention):
    """Products written as ``einsum`` equations, which have no quantized counterpart."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.einsum("bnm,bmc->bnc", torch.einsum("bnc,bmc->bnm", q, k).softmax(-1), v))


class PatchedAttention(Attention):
    """A subclass with its own forward, still one fused attention: swapped generically, forward kept."""

    def forward(self, x):
        return super().forward(x) * 1.0


class Tokens(nn.Module):
    def __init__(self, *blocks):
        super().__init__()
        self.embed, self.blocks = nn.Conv2d(3, 16, 4, stride=4), nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1)


class SelfAttentionMHA(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def test_other_attention_classes_are_reported_in_float():
    torch.manual_seed(0)
    model = Tokens(Attention(16, num_heads=2), EinsumAttention(16), PatchedAttention(16, num_heads=2),
                   SelfAttentionMHA(16)).eval()
    with pytest.warns(UserWarning, match="compute layers stay in float"):
        qmodel = quantize(model, torch.randn(16, 3, 16, 16), DEPLOY, progress=False)
    report = qmodel.quant_report
    assert type(qmodel.blocks[0]) is QuantAttention and "blocks.0" in report.quantized
    assert report.float_layers["blocks.1"] == ("attention matmuls in float: 2 matrix products in EinsumAttention, "
                                               "which has no quantized counterpart")
    assert "MultiheadAttention" in report.float_layers["blocks.3.mha"]  # all of it in float, reported as before
    assert type(qmodel.blocks[2]).__name__ == "QuantSdpaPatchedAttention" and "blocks.2" in report.quantized
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), quantizers_disabled(qmodel):
        assert torch.allclose(qmodel(x), model(x), atol=1e-6)



class GlobalMixer(nn.Module):
    """Matrix products of activations in a class whose name says nothing about attention (CaiT's
    ``TalkingHeadAttn``, EfficientViT's ``LiteMLA``, XCiT's ``XCA`` are such)."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        gram = torch.bmm(x.transpose(1, 2), x) / x.shape[1]
        return self.proj(torch.einsum("bnc,bcd->bnd", x, gram.softmax(-1)))


class _RootEinsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 8)

    def forward(self, x):
        x = self.fc(x.flatten(2).transpose(1, 2))
        return torch.einsum("bnc,bmc->bnm", x, x).mean((1, 2))


def test_matmuls_in_the_models_own_forward_are_named_so():
    with pytest.warns(UserWarning, match=r"\(the model's own forward\): attention matmuls in float"):
        qmodel = quantize(_RootEinsum().eval(), torch.randn(16, 3, 4, 4), DEPLOY, progress=False)
    assert "float (the model's own forward): attention matmuls in float" in qmodel.quant_report.summary()


def test_float_matmuls_are_found_whatever_the_class_is_called(tmp_path):
    torch.manual_seed(0)
    model = Tokens(GlobalMixer(16), Attention(16, num_heads=2)).eval()
    with pytest.warns(UserWarning, match="1 compute layers stay in float:\n  blocks.0: attention matmuls in float"):
        qmodel = quantize(model, torch.randn(16, 3, 16, 16), DEPLOY, progress=False)
    assert qmodel.quant_report.float_layers["blocks.0"] == (
        "attention matmuls in float: 2 matrix products in GlobalMixer, which has no quantized counterpart")
    assert "blocks.0.proj" in qmodel.quant_report.quantized and "blocks.1" in qmodel.quant_report.quantized
    # without attn_bits the attention timm can quantize stays float too: listed as a choice, not warned about
    with pytest.warns(UserWarning) as caught:
        qmodel = quantize(model, torch.randn(16, 3, 16, 16), QuantConfig(), progress=False)
    report = qmodel.quant_report
    assert report.float_layers["blocks.1"].startswith("attention matmuls (Attention): float by design unless "
                                                      "QuantConfig.attn_bits is set")
    assert list(report.float_compute_layers) == ["blocks.0"]
    assert [str(w.message).count("\n  ") for w in caught] == [1]
    # the engine's side sees both, named by module: bmm, einsum, and timm's fused attention, whose decomposed
    # attn @ v OpenVINO fuses with the softmax into one Subgraph on AVX-512 CPUs
    with pytest.warns(UserWarning, match="compute layers run in float on OpenVINO") as caught:
        export(qmodel, tmp_path / "m.xml", engine="openvino")
    in_float = {name.split(" (")[0] for name in str(caught[-1].message).split(": ", 1)[1].split(", ")}
    assert in_float == {"blocks.0", "blocks.1"}

class FusedAttention(nn.Module):
    """An attention of its own making whose matmuls are one ``F.scaled_dot_product_attention``, masked."""

    def __init__(self, dim, mask):
        super().__init__()
        self.qkv, self.proj, self.mask = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), mask
        self.bias = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
        if self.mask == "causal":
            x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mask == "scaled":  # its own scale, not 1 / sqrt(head dim)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, scale=0.3)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias if self.mask == "bias" else self.bias > 0)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class NestedFusedAttention(FusedAttention):
    """One fused attention of its own around a module with matmuls: neither may take the other's."""

    def __init__(self, dim):
        super().__init__(dim, "bias")
        self.inner = OwnAttention(dim)

    def forward(self, x):
        return super().forward(self.inner(x))


class NestedProducts(OwnAttention):
    """Plain products of its own around a fused attention: the same, the other way round."""

    def __init__(self, dim):
        super().__init__(dim)
        self.inner = FusedAttention(dim, "bias")

    def forward(self, x):
        return super().forward(self.inner(x))


def test_attention_around_other_matmuls_stays_float():
    torch.manual_seed(0)
    model = Tokens(NestedFusedAttention(16), NestedProducts(16)).eval()
    with pytest.warns(UserWarning, match="compute layers stay in float"):
        qmodel = quantize(model, torch.randn(16, 3, 16, 16), DEPLOY, progress=False)
    assert [type(m) for m in qmodel.blocks] == [NestedFusedAttention, NestedProducts]
    assert [type(m.inner).__name__ for m in qmodel.blocks] == ["QuantMatmulOwnAttention", "QuantSdpaFusedAttention"]
    assert set(qmodel.quant_report.float_compute_layers) == {"blocks.0", "blocks.1"}


@pytest.mark.parametrize("mask", ["bias", "bool", "causal", "scaled"])
def test_any_fused_attention_gets_quantized_matmul_inputs(mask, tmp_path):
    torch.manual_seed(0)
    model = Tokens(FusedAttention(16, mask), FusedAttention(16, mask)).eval()
    qmodel = quantize(model, torch.randn(16, 3, 16, 16), DEPLOY, progress=False)
    assert [type(m).__name__ for m in qmodel.blocks] == ["QuantSdpaFusedAttention"] * 2
    assert not qmodel.quant_report.float_compute_layers
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), quantizers_disabled(qmodel):  # the class's own forward, the call unfused
        assert torch.allclose(qmodel(x), model(x), atol=1e-5)
    path = export(qmodel, tmp_path / "m.onnx", engine="onnxruntime", example=x[:1])
    assert onnx_int8_summary(path).int8 == 5 + 2 * 2
    agreement = check_agreement(qmodel, get_engine("onnxruntime", threads=1).load_onnx(path), [x[:1], x[1:2]])
    assert agreement.max_abs_err < ENGINE_TOLERANCE * agreement.ref_scale
    assert type(qmodel.blocks[0].to_float()) is FusedAttention


class CascadedHeads(nn.Module):
    """Plain products in every arrangement the engines care about, a fixed number per call: q @ kᵀ; v @ attnᵀ
    (probabilities on the right: computed transposed); ReLU'd kᵀ @ v (unsigned on the left); ``__rmatmul__``."""

    def __init__(self, dim):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        heads = (v.transpose(-2, -1) @ attn.transpose(-2, -1)).transpose(-2, -1)
        linear = q.relu() @ torch.matmul(k.relu().transpose(-2, -1), v) / x.shape[1]
        return self.proj(torch.cat([heads, torch.Tensor.__rmatmul__(linear.transpose(-2, -1), heads)], -1))


class ChunkedAttention(OwnAttention):
    """Attention within chunks of 4 tokens: as many products as the input has chunks."""

    def forward(self, x):
        return torch.cat([super(ChunkedAttention, self).forward(c) for c in x.split(4, dim=1)], 1)


def test_any_plain_matmuls_get_quantized_inputs_in_engine_friendly_order(tmp_path):
    torch.manual_seed(0)
    model = Tokens(CascadedHeads(16), CascadedHeads(16)).eval()
    qmodel = quantize(model, torch.randn(16, 3, 16, 16), DEPLOY, progress=False)
    assert [type(m).__name__ for m in qmodel.blocks] == ["QuantMatmulCascadedHeads"] * 2
    assert not qmodel.quant_report.float_compute_layers
    assert qmodel.quant_report.quantized["blocks.0"] == "; ".join([
        "matmul 0: a int8 sym per-tensor x b int8 sym per-tensor",
        "matmul 1: (bT @ aT)T, a int8 sym per-tensor x b softmax uint8 asym per-tensor",
        "matmul 2: a uint8 asym per-tensor x b int8 sym per-tensor",
        "matmul 3: a uint8 asym per-tensor x b int8 sym per-tensor",
        "matmul 4: a int8 sym per-tensor x b int8 sym per-tensor"])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), quantizers_disabled(qmodel):  # the class's own forward
        assert torch.allclose(qmodel(x), model(x), atol=1e-5)
    path = export(qmodel, tmp_path / "m.onnx", engine="onnxruntime", example=x[:1])
    assert onnx_int8_summary(path).int8 == 5 + 2 * 5
    xml = export(qmodel, tmp_path / "m.xml", engine="openvino", example=x[:1])
    ov = get_engine("openvino", threads=1).load_model_file(xml)
    matmuls = [p for kind, p in openvino_precisions(ov.compiled).values() if kind in ("MatMul", "Subgraph")]
    # 10 products, or 8 nodes where OpenVINO fuses q @ kᵀ, the softmax and the transposed product into a Subgraph
    assert len(matmuls) in (8, 10) and set(matmuls) <= {"u8", "i8"}, matmuls
    agreement = check_agreement(qmodel, ov, [x[:1], x[1:2]])
    assert agreement.max_abs_err < ENGINE_TOLERANCE * agreement.ref_scale
    assert type(qmodel.blocks[0].to_float()) is CascadedHeads and not hasattr(qmodel.blocks[0].to_float(), "transposed")


class TalkingHeads(OwnAttention):
    """Probabilities mixed across heads after the softmax (CaiT's): signed, no softmax output."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj(torch.stack([attn, attn.flip(0)]).diff(dim=0)[0] @ v)


def test_efficientformerv2_talking_heads_keep_uniform_probabilities_and_say_so():
    """Its probabilities are mixed across heads after the softmax (signed): the softmax quantizer asked for applies
    to its 4 Attention2d blocks' products nowhere, and the warning names them (it named none)."""
    import timm

    torch.manual_seed(0)
    kwargs, size, _ = MODEL_ATTENTION["efficientformerv2_s0"]
    model = timm.create_model("efficientformerv2_s0", num_classes=4, **kwargs).eval()
    with pytest.warns(UserWarning, match=r"softmax_quantizer='sulq' applies to no matmul operand of 4 attentions "
                                         r".*: stages\.2\.blocks"):
        qmodel = quantize(model, torch.randn(16, 3, size, size), replace(DEPLOY, attn_bits=4, softmax_quantizer="sulq"),
                          progress=False)
    assert {type(m).__name__ for m in qmodel.modules() if hasattr(m, "softmax_quantizer")} == {
        "QuantAttention2d", "QuantAttention2dDownsample"}


@pytest.mark.parametrize("kind", ["log2", "twin"])
def test_plain_matmuls_give_softmax_outputs_the_softmax_quantizer(kind):
    torch.manual_seed(0)
    model = Tokens(CascadedHeads(16), TalkingHeads(16)).eval()
    with pytest.warns(UserWarning, match=rf"softmax_quantizer='{kind}' applies to no matmul operand of 1 attentions "
                                         r"\(none is a softmax output.*\): blocks.1$"):
        qmodel = quantize(model, torch.randn(16, 3, 16, 16), replace(DEPLOY, attn_bits=4, softmax_quantizer=kind),
                          progress=False)
    cascaded, talking = qmodel.blocks
    assert cascaded.softmax_fed == ["", "b", "", "", ""] and talking.softmax_fed == ["", ""]
    special = {n: type(q).__name__ for n, q in quantizers(qmodel).items() if not isinstance(q, FakeQuantizer)}
    assert special == {"blocks.0.matmul1_b_quantizer": {"log2": "Log2Quantizer", "twin": "TwinUniformQuantizer"}[kind]}
    assert "matmul 1: (bT @ aT)T, a int4 sym per-tensor x b softmax " in qmodel.quant_report.quantized["blocks.0"]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        uniform = quantize(model, torch.randn(16, 3, 16, 16), replace(DEPLOY, attn_bits=4), progress=False)
        assert not torch.equal(qmodel(x), uniform(x))  # the probabilities' quantizer is another one
        with quantizers_disabled(qmodel):
            assert torch.allclose(qmodel(x), model(x), atol=1e-5)
    with pytest.raises(LeanvitError, match=r"simulation only: blocks\.0\. "):
        check_deployable(qmodel)


def test_plain_matmuls_beyond_those_recorded_are_refused():
    torch.manual_seed(0)
    qmodel = quantize(Tokens(ChunkedAttention(16)).eval(), torch.randn(16, 3, 16, 16), DEPLOY, progress=False)
    assert qmodel.blocks[0].PRODUCTS == 2 * 4  # 16 tokens
    with pytest.raises(LeanvitError, match="more than the 8 matrix products recorded before quantization"):
        qmodel(torch.randn(1, 3, 24, 24))


class KeptForward(Attention):
    """A subclass keeping timm's forward (a renamed class)."""


def test_attention_subclass_keeping_the_forward_is_quantized_as_it_is():
    torch.manual_seed(0)
    model = Tokens(KeptForward(16, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm)).eval()
    qmodel = quantize(model, torch.randn(16, 3, 16, 16), DEPLOY, progress=False)
    assert type(qmodel.blocks[0]) is QuantAttention
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), quantizers_disabled(qmodel):  # its own q/k norms kept, not replaced
        assert torch.allclose(qmodel(x), model(x), atol=1e-6)
    assert type(qmodel.blocks[0].to_float()) is KeptForward


def test_attention_bypassed_by_token_reduction_stays_float(tiny_vit, calib):
    model = copy.deepcopy(tiny_vit)
    tokens.apply(model, tokens.from_spec("tome:2"))
    with pytest.warns(UserWarning, match="blocks.0.attn: attention matmuls in float: forward never called"):
        qmodel = quantize(model, calib, DEPLOY, progress=False)
    assert not any(isinstance(m, QuantAttention) for m in qmodel.modules())
    assert qmodel.quant_report.float_layers["blocks.0.attn"].startswith("attention matmuls in float: forward never")
    assert "blocks.0.attn.qkv" in qmodel.quant_report.quantized


def _runtime_layers(compiled, layer_type: str) -> list[str]:
    """The output precisions of the ``layer_type`` nodes OpenVINO actually runs."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == layer_type:
            layers.append(info["outputPrecisions"].astype(str))
    return layers


def test_shared_qkv_quantizer_computes_what_separate_ones_do(tiny_vit, calib, qvit, tmp_path):
    shared = quantize(tiny_vit, calib, replace(DEPLOY, share_qkv_quantizer=True), progress=False)
    x = torch.randn(2, 17, 192)
    for name in ("blocks.0.attn", "blocks.1.attn"):
        attn, separate = shared.get_submodule(name), qvit.get_submodule(name)
        assert attn.qkv_quantizer is not None and separate.qkv_quantizer is None
        assert "quantized once at the qkv output" in shared.quant_report.quantized[name]
        with torch.no_grad():
            torch.testing.assert_close(attn(x), separate(x), atol=1e-5, rtol=1e-5)  # the same integers
            restored = attn.to_float()
            assert type(restored) is Attention
            assert restored.state_dict().keys() == separate.to_float().state_dict().keys()
            assert not hasattr(restored, "qk_scale") and not hasattr(restored, "qkv_quantizer")
            with quantizers_disabled(attn):
                torch.testing.assert_close(attn(x), restored(x), atol=1e-5, rtol=1e-5)
    # OpenVINO fuses the shared quantizer into the qkv projection: the head split's transpose then moves int8
    example = torch.randn(1, 3, 32, 32)
    ov = get_engine("openvino", threads=1)
    float_transposes = {}
    for label, model in (("separate", qvit), ("shared", shared)):
        compiled = ov.load_model_file(export(model, tmp_path / f"{label}.xml", engine="openvino", example=example))
        float_transposes[label] = _runtime_layers(compiled.compiled, "Transpose").count("f32")
        agreement = check_agreement(model, compiled, [example])
        assert agreement.max_abs_err < ENGINE_TOLERANCE * agreement.ref_scale
    assert float_transposes["shared"] == float_transposes["separate"] - 2, float_transposes


def test_efficientformerv2_qk_quantized_where_the_convs_write_them(tmp_path):
    """Quantized at the q and k convs' outputs, q and k keep their integers; OpenVINO then moves the head split's
    tensors as int8 (fewer f32 reorders), keeps every layer in INT8 and runs what the simulation computes."""
    import timm

    kwargs, size, _ = MODEL_ATTENTION["efficientformerv2_s0"]
    torch.manual_seed(0)
    model = timm.create_model("efficientformerv2_s0", num_classes=10, **kwargs).eval()
    calib, x = torch.randn(16, 3, size, size), torch.randn(4, 3, size, size)
    config = replace(DEPLOY, quantize_depthwise=True)
    separate = quantize(model, calib, config, progress=False)
    shared = quantize(model, calib, replace(config, share_qkv_quantizer=True), progress=False)
    name = "stages.3.blocks.0.token_mixer"
    assert "q, k quantized at their projections" in shared.quant_report.quantized[name]
    with torch.no_grad():
        torch.testing.assert_close(shared(x), separate(x), atol=1e-6, rtol=1e-5)
        restored = shared.get_submodule(name).to_float()
        assert type(restored) is type(model.get_submodule(name))
        assert not any(hasattr(restored, n) for n in ("q_proj_quantizer", "k_proj_quantizer"))
        seen = {}  # what reaches the matmul quantizers is already on their grids: the projections' outputs quantized
        hooks = [getattr(shared.get_submodule(name), f"{n}_quantizer").register_forward_hook(
            lambda m, args, _, n=n: seen.setdefault(n, args[0] / m.scale)) for n in "qk"]
        shared(x)
        for hook in hooks:
            hook.remove()
        assert all(torch.allclose(v, v.round(), atol=1e-3) for v in seen.values()) and len(seen) == 2
    ov = get_engine("openvino", threads=1)
    float_reorders = {}
    for label, qmodel in (("separate", separate), ("shared", shared)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a layer left in float would warn
            path = export(qmodel, tmp_path / f"{label}.xml", engine="openvino", example=x[:1])
        compiled = ov.load_model_file(path)
        float_reorders[label] = _runtime_layers(compiled.compiled, "Reorder").count("f32")
        agreement = check_agreement(qmodel, compiled, [x[:1]])
        assert agreement.max_abs_err < ENGINE_TOLERANCE * agreement.ref_scale
    assert float_reorders["shared"] < float_reorders["separate"], float_reorders


def test_quant_attention_computes_timm_masks_and_norms():
    """Additive, boolean and causal masks, q/k norms and the output norm, as timm's unfused path computes them (the
    norms away from their init, where q's and k's are the same function and the output's the identity)."""
    attn = randomised(small_attention(qk_norm=True, scale_norm=True, norm_layer=nn.LayerNorm, gated=True))
    qattn = QuantAttention.from_float(attn, 8)
    x = torch.randn(2, 10, 32)
    masks = [{}, {"attn_mask": torch.randn(10, 10)}, {"attn_mask": (torch.rand(10, 10) > 0.5) | torch.eye(10).bool()},
             {"is_causal": True}]
    with torch.no_grad(), quantizers_disabled(qattn):
        outs = [qattn(x, **mask) for mask in masks]
        for out, mask in zip(outs, masks):
            assert torch.equal(out, attn(x, **mask)), mask
    assert not any(torch.allclose(outs[0], out) for out in outs[1:])  # each mask changes the output


def test_shared_qkv_quantizer_is_not_used_with_qk_norms():
    """The norms sit between the qkv projection and the q/k quantizers: no shared quantizer, the output unchanged."""
    attn = randomised(small_attention(qk_norm=True, norm_layer=nn.LayerNorm))
    qattn = QuantAttention.from_float(attn, 8)
    x = torch.randn(4, 10, 32)
    with torch.no_grad():
        qattn.observe()
        qattn(x)
        qattn.calibrate("minmax", 99.99)
        before = qattn(x)
        qattn.share_qkv_quantizer()
        assert qattn.qkv_quantizer is None and torch.equal(qattn(x), before)
    assert "quantized once" not in qattn.describe()


def test_attention_quantizers_are_ranged_by_the_method_and_percentile_asked_for():
    qattn = QuantAttention.from_float(small_attention(), 8)
    qattn.observe()
    with torch.no_grad():
        qattn(torch.randn(4, 10, 32))
    observers = {name: copy.deepcopy(getattr(qattn, name).observer) for name in QuantAttention.QUANTIZERS}
    qattn.calibrate("percentile", 90.0)
    for name, observer in observers.items():
        quantizer = getattr(qattn, name)
        expected = FakeQuantizer(quantizer.scheme, axis=-1, channels=1)
        expected.set_range(*observer.range(quantizer.scheme, "percentile", percentile=90.0))
        assert torch.equal(quantizer.scale, expected.scale), name
        assert torch.equal(quantizer.zero_point, expected.zero_point), name


class GroupedQueries(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, 4, C // 4).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, 2, C // 4).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def test_grouped_query_attention_is_refused():
    with pytest.raises(LeanvitError, match="grouped-query attention is not quantized.*attn_bits=None"):
        quantize(Tokens(GroupedQueries(16)).eval(), torch.randn(16, 3, 16, 16), DEPLOY, progress=False)


class ProductsBy(OwnAttention):
    """``product(softmax(product(q, kᵀ)), relu(v))``, written with the torch functions given."""

    def __init__(self, dim, product, softmax):
        super().__init__(dim)
        self.product, self.softmax = product, softmax

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(self.product(self.softmax(self.product(q, k.transpose(-2, -1)), -1), v.relu()))


@pytest.mark.parametrize("product, softmax", [(torch.matmul, torch.softmax), (torch.bmm, F.softmax),
                                              (torch.Tensor.bmm, torch.special.softmax),
                                              (torch.Tensor.matmul, torch.Tensor.softmax)])
def test_plain_matmuls_and_softmaxes_are_found_whichever_function_computes_them(product, softmax):
    """Every plain product function is quantized, and every softmax function's output gets the softmax quantizer;
    a product of two non-negative operands keeps its order (the probabilities on the left, unsigned)."""
    torch.manual_seed(0)
    model = Tokens(ProductsBy(16, product, softmax)).eval()
    qmodel = quantize(model, torch.randn(16, 3, 16, 16), replace(DEPLOY, attn_bits=4, softmax_quantizer="log2"),
                      progress=False)
    assert type(qmodel.blocks[0]).__name__ == "QuantMatmulProductsBy" and not qmodel.quant_report.float_compute_layers
    assert qmodel.blocks[0].softmax_fed == ["", "a"] and isinstance(qmodel.blocks[0].matmul1_a_quantizer, Log2Quantizer)
    assert qmodel.blocks[0].transposed == [False, False]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), quantizers_disabled(qmodel):
        assert torch.allclose(qmodel(x), model(x), atol=1e-6)


class SometimesSoftmax(OwnAttention):
    """Probabilities by a softmax, or by a sigmoid when asked."""

    def forward(self, x, sigmoid=False):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1)
        return self.proj((scores.sigmoid() if sigmoid else scores.softmax(-1)) @ v)


class CalledThrice(nn.Module):
    """One fused attention called twice per forward; plain products called twice, a softmax output in the first
    call only; chunked attention on 16, 8 and 8 tokens: 16 products in 3 calls, no fixed number per call."""

    def __init__(self):
        super().__init__()
        self.embed, self.fused = nn.Conv2d(3, 16, 4, stride=4), FusedAttention(16, "causal")
        self.mixed, self.chunked = SometimesSoftmax(16), ChunkedAttention(16)

    def forward(self, x):
        x = self.fused(self.fused(self.embed(x).flatten(2).transpose(1, 2)))
        x = self.mixed(x) + self.mixed(x.flip(1), sigmoid=True)
        return sum(self.chunked(t).mean(1) for t in (x, x[:, :8], x[:, 8:]))


def test_modules_called_more_than_once_per_forward():
    torch.manual_seed(0)
    model = CalledThrice().eval()
    with pytest.warns(UserWarning, match="compute layers stay in float"):
        qmodel = quantize(model, torch.randn(16, 3, 16, 16), DEPLOY, progress=False)
    assert type(qmodel.fused).__name__ == "QuantSdpaFusedAttention" and "fused" in qmodel.quant_report.quantized
    assert type(qmodel.chunked) is ChunkedAttention
    assert type(qmodel.mixed).__name__ == "QuantMatmulSometimesSoftmax"
    assert qmodel.mixed.softmax_fed == ["", ""]  # a softmax output in one call of two: no softmax quantizer
    assert list(qmodel.quant_report.float_compute_layers) == ["chunked"], qmodel.quant_report.float_compute_layers


class Pooling(nn.Module):
    """Tokens pooled by learned softmax weights: a signed matrix times a non-negative vector (which has no
    transpose)."""

    def __init__(self, dim):
        super().__init__()
        self.proj, self.logits = nn.Linear(dim, dim), nn.Parameter(torch.randn(16))

    def forward(self, x):
        return self.proj(x.transpose(1, 2) @ self.logits.softmax(-1)).unsqueeze(1)


def test_a_vector_operand_stays_on_the_right():
    torch.manual_seed(0)
    model = Tokens(Pooling(16)).eval()
    qmodel = quantize(model, torch.randn(16, 3, 16, 16), DEPLOY, progress=False)
    assert type(qmodel.blocks[0]).__name__ == "QuantMatmulPooling" and qmodel.blocks[0].transposed == [True]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), quantizers_disabled(qmodel):
        assert torch.allclose(qmodel(x), model(x), atol=1e-6)


def test_a_modules_own_calls_are_not_its_siblings():
    """Only a submodule's products make a module's own calls unknown: blocks.10 is no submodule of blocks.1."""
    from leanvit.compress.quant.attention import own_calls
    from leanvit.compress.quant.modules import MatmulCalls

    calls = {"blocks.1": MatmulCalls(), "blocks.10": MatmulCalls(), "blocks.2": MatmulCalls(), "blocks.2.inner": None}
    assert own_calls(calls, "blocks.1") is calls["blocks.1"] and own_calls(calls, "blocks.2") is None


class _AttentionTwice(nn.Module):
    """One attention run on all the 16 tokens, then on the first half of them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.attn = Attention(8, num_heads=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(x).mean(1) + self.attn(x[:, : x.shape[1] // 2]).mean(1))


def test_an_attention_called_at_two_token_counts_is_named_with_the_fix():
    """Its operands' statistics are kept per token position: a second token count is a user error naming the
    module and the way out (it was torch's size-mismatch RuntimeError from inside the observer)."""
    torch.manual_seed(0)
    calib = torch.randn(8, 3, 8, 8)
    with pytest.raises(LeanvitError, match=r"^attn's k_quantizer: calibration fed it 16, then 8 values .* in float "
                                           r"\(QuantConfig\(skip=\[\.\.\.\]\)\)$"):
        quantize(_AttentionTwice().eval(), calib, QuantConfig(attn_bits=8, min_images=8), progress=False)
    config = QuantConfig(attn_bits=8, skip=["attn"], min_images=8)
    report = quantize(_AttentionTwice().eval(), calib, config, progress=False).quant_report
    assert "attn" in report.float_layers and "attn" not in report.quantized and "embed" in report.quantized
