"""Export a quantized model as QDQ ONNX or OpenVINO IR that the engine runs with INT8 kernels.

The fake quantizers export as QuantizeLinear → DequantizeLinear pairs carrying the simulation's
scales and zero points. Two rewrites then give the canonical QDQ form the engines pattern-match:
the QuantizeLinear on each weight is evaluated here (int8 weights stored in the file, a quarter of
the size), and a Transpose between a weight's DequantizeLinear and its MatMul is folded into the
int8 weight, because ONNX Runtime only fuses ``DQ → MatMul`` into an integer kernel when the two
are adjacent; a convolution whose output is quantized too (``QuantConfig.quantize_conv_outputs``) and a
Gemm (a classifier) get their biases as int32 behind a DequantizeLinear, and a Gemm's weights an explicit
zero point, the forms ONNX Runtime fuses into QLinearConv and QGemm. The result
is checked: every quantized layer must appear as a compute node whose inputs all come from
DequantizeLinear, and the compute layers each engine runs in float (OpenVINO's runtime precisions, the
graph ONNX Runtime executes after its fusions) are reported by name.
"""
from __future__ import annotations

import platform
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ...deploy.export import DEFAULT_OPSET
from ...deploy.ov import openvino_core
from ...errors import LeanvitError, warn
from .calibrate import parse_bits, quantizers
from .modules import QuantConv2d, is_depthwise
from .quantizer import FakeQuantizer

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
OV_COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")
#: ONNX Runtime's CPU nodes after its graph fusions: the integer kernels, and the float compute ops
ORT_INT8_OPS = ("QLinearConv", "NhwcQLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger",
                "MatMulInteger", "DynamicQuantizeMatMul")
ORT_FLOAT_OPS = ("Conv", "FusedConv", "NhwcFusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Einsum",
                 "ConvTranspose")
#: why a QDQ convolution stays float on ONNX Runtime, for the warnings
ORT_CONV_NOTE = ("ONNX Runtime fuses a QDQ Conv into its INT8 QLinearConv only when the conv's output is quantized "
                 "too: quantize with QuantConfig(quantize_conv_outputs=True), or QuantConfig.recipe(..., "
                 "engine='onnxruntime')")
ENGINES = ("openvino", "onnxruntime")
ENGINE_NAMES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}


def deployable_bits(bits: int, weights: bool) -> bool:
    """Whether the engines' INT8 kernels run a quantizer of ``bits``: 8, or 7 for weights (stored as int8)."""
    return bits == 8 or (weights and bits == 7)


def check_config_deployable(config, engine: str | None = None) -> None:
    """Refuse, from ``config`` alone, what :func:`check_deployable` would refuse of the model it quantizes for
    ``engine`` (None: either): before calibrating (minutes with reconstruction or the Hessian search), not after.
    Each message names the ``QuantConfig`` field and the ``leanvit quantize`` flag that set it."""
    given = f"w{config.w_bits}a{config.a_bits}"
    widths = {b: parse_bits(b) for b in (given, *(b for _, b in config.layer_bits), *filter(None, [config.edge_bits]))}
    low = sorted(b for b, (w, a) in widths.items() if not (deployable_bits(w, True) and deployable_bits(a, False)))
    if low:
        where = [f"w_bits/a_bits (--bits {b})" if b == given else
                 f"layer_bits (--layer-bits PATTERN={b})" if any(b == lb for _, lb in config.layer_bits) else
                 "edge_bits (the first layer and the classifier)" for b in low]
        raise LeanvitError(f"{', '.join(low)} in {', '.join(where)}: layers quantized below 8 bits (7 for weights) "
                           "have no kernels on OpenVINO or ONNX Runtime; such bit-widths are simulation only. "
                           "Measure them in "
                           "simulation (QuantConfig without export; leanvit quantize: drop --out, add --eval DATA), "
                           "or export W8A8.")
    if config.attn_bits is not None and not deployable_bits(config.attn_bits, False):
        raise LeanvitError(f"attn_bits={config.attn_bits} (--attn-bits {config.attn_bits}): attention matmuls below 8 "
                           "bits have no engine kernels, they are simulation only. Export with attn_bits=8 or None "
                           "(--attn-bits 8, or no --attn-bits).")
    if config.attn_bits and config.softmax_quantizer != "uniform":
        raise LeanvitError(f"The {config.softmax_quantizer} softmax quantizer is simulation only (no engine kernel): "
                           "export with softmax_quantizer='uniform' (--softmax uniform).")
    if config.a_per_channel is True:
        raise LeanvitError("a_per_channel=True (--a-granularity channel) quantizes every layer's inputs per channel, "
                           "but INT8 kernels need one input scale per tensor (only a depthwise conv's can be per "
                           "channel): export with a_per_channel='auto' or False (--a-granularity auto or tensor).")
    if engine == "onnxruntime" and config.a_per_channel == "auto" and config.quantize_depthwise:
        raise LeanvitError("a_per_channel='auto' (--a-granularity auto) may quantize depthwise convs' inputs per "
                           "channel, which ONNX Runtime's QLinearConv cannot run (OpenVINO can): export for ONNX "
                           "Runtime with a_per_channel=False (--a-granularity tensor).")


def check_deployable(qmodel: nn.Module, engine: str | None = None) -> None:
    """Raise, naming the layers, if some quantizer has no INT8 kernel behind it on ``engine`` (None: on
    OpenVINO or ONNX Runtime, whichever runs it)."""
    found = quantizers(qmodel)
    if not found:
        raise LeanvitError("This model has no quantizers: quantize it first with "
                           "leanvit.quantize(model, calib, config).")
    non_uniform = sorted(n.rsplit(".", 1)[0] for n, q in found.items() if not isinstance(q, FakeQuantizer))
    if non_uniform:
        raise LeanvitError(
            f"Attention softmax quantizers without an engine kernel are simulation only: {', '.join(non_uniform[:8])}"
            f"{', ...' if len(non_uniform) > 8 else ''}. Use QuantConfig(softmax_quantizer='uniform') to export.")
    low_bits = sorted({n.rsplit(".", 1)[0] for n, q in found.items()
                       if not deployable_bits(q.scheme.bits, n.endswith("weight_quantizer"))})
    if low_bits:
        raise LeanvitError(
            f"{len(low_bits)} layers are quantized below 8 bits ({', '.join(low_bits[:8])}"
            f"{', ...' if len(low_bits) > 8 else ''}); OpenVINO and ONNX Runtime have no kernels for them. "
            "Such bit-widths are simulation-only: export a W8A8 (or W7A8) model, QuantConfig.from_bits('w8a8').")
    per_channel = sorted(n.rsplit(".", 1)[0] for n, q in found.items()
                         if q.scheme.per_channel and n.endswith("input_quantizer"))
    not_depthwise = [n for n in per_channel if not is_depthwise(qmodel.get_submodule(n))]
    if not_depthwise:
        raise LeanvitError(
            f"{len(not_depthwise)} layers quantize their inputs per channel ({', '.join(not_depthwise[:8])}"
            f"{', ...' if len(not_depthwise) > 8 else ''}); their INT8 kernels need one input scale per tensor "
            "(only a depthwise conv's can be per channel). Use QuantConfig(a_per_channel='auto') or False.")
    if per_channel and engine == "onnxruntime":
        raise LeanvitError(
            f"{len(per_channel)} depthwise convs quantize their inputs per channel ({', '.join(per_channel[:8])}"
            f"{', ...' if len(per_channel) > 8 else ''}); ONNX Runtime's QLinearConv needs one input scale per "
            "tensor (OpenVINO runs them in INT8). Quantize for ONNX Runtime with QuantConfig(a_per_channel=False), "
            "as QuantConfig.recipe(..., engine='onnxruntime') does.")


def int8_saturates() -> bool:
    """True on x86 CPUs without VNNI or AMX, whose INT8 dot products go through saturating 16-bit sums.

    (``vpmaddubsw``: two u8 x s8 products can exceed int16, which NNCF's "overflow fix" and ONNX
    Runtime's ``reduce_range`` avoid with 7-bit weights.)
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


@contextmanager
def _int8_weights(qmodel: nn.Module):
    """Export 7-bit weights in an int8 container: the exporter only maps the full int8/uint8 ranges.

    Each such weight is replaced by its quantized values for the export, so quantizing it again over
    the full int8 range gives the same integers.
    """
    saved = []
    for layer in qmodel.modules():
        q = getattr(layer, "weight_quantizer", None)
        if isinstance(q, FakeQuantizer) and q.scheme.bits < 8:
            saved.append((layer, layer.weight, q.scheme))
            layer.weight = nn.Parameter(q(layer.weight).detach(), requires_grad=False)
            q.scheme = replace(q.scheme, bits=8)
    try:
        yield
    finally:
        for layer, weight, scheme in saved:
            layer.weight, layer.weight_quantizer.scheme = weight, scheme


def _example(qmodel: nn.Module, example: torch.Tensor | None, dynamic_batch: bool) -> torch.Tensor:
    """The export input; a batch of 2 for a dynamic batch, since ``torch.export`` specialises a size-1 dim."""
    report = getattr(qmodel, "quant_report", None)
    size = tuple(report.input_size) if report is not None and report.input_size else None
    if example is None:
        if size is None:
            raise LeanvitError("Pass example=torch.zeros(1, C, H, W): the model carries no calibration input size.")
        example = torch.zeros(1, *size)
    if not isinstance(example, torch.Tensor) or example.ndim != 4 or (size and tuple(example.shape[1:]) != size):
        shape = "x".join(map(str, getattr(example, "shape", ()))) or type(example).__name__
        wanted = f"torch.zeros(1, {', '.join(map(str, size))})" if size else "torch.zeros(1, C, H, W)"
        raise LeanvitError(f"The export example is {shape}; pass example={wanted}" + (
            ", one image of the calibration size: the activation ranges were chosen at that size (or leave "
            "example out)" if size else "") + ".")
    return example[:1].expand(2, *example.shape[1:]).contiguous() if dynamic_batch else example


def export_quantized(qmodel: nn.Module, path: str | Path, example: torch.Tensor | None = None, *,
                     opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, engine: str | None = None) -> Path:
    """Write ``qmodel`` as a QDQ ONNX file at ``path``, with int8 weights; returns ``path``.

    ``example`` defaults to one image of the calibration size. A dynamic batch goes through the
    TorchScript exporter (with the deploy module's warning): ``torch.export`` cannot yet trace
    fake-quantize ops with a symbolic batch size. Every quantizer must have an INT8 kernel behind it on
    ``engine`` (None: on OpenVINO or ONNX Runtime, whichever runs the file; :func:`check_deployable`).
    """
    _check_exportable(qmodel, engine)
    return _write_qdq(qmodel, Path(path), example, opset=opset, dynamic_batch=dynamic_batch, engine=engine)


def cached_export_quantized(qmodel: nn.Module, example: torch.Tensor, engine: str, *,
                            cache_dir: str | Path | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """:func:`export_quantized` for ``engine`` at ``example``'s shape (static batch), kept in the export cache.

    What ``Engine.load`` runs for a quantized model, so it gets the file :func:`export` writes (7-bit weights in
    int8, every quantizer checked for a kernel), not the float exporter's failure, and reuses it as the float path
    does. Keyed as a float export (:func:`~leanvit.deploy.export.export_key`: the quantizers' scales, zero points
    and integer grids are buffers in the state dict) plus ``engine``, whose rewrites differ.
    """
    from ...deploy.export import cached_file, export_key

    _check_exportable(qmodel, engine)  # every load: a cache hit still refuses or warns as an export does
    key = export_key(qmodel, example, dynamic_batch=False, opset=opset)
    return cached_file(f"{key}-qdq-{engine}", lambda path: _write_qdq(qmodel, path, example, opset=opset,
                                                                      dynamic_batch=False, engine=engine),
                       cache_dir=cache_dir)


def _check_exportable(qmodel: nn.Module, engine: str | None) -> None:
    """:func:`check_deployable`, and the warning about 8-bit weights on a CPU whose INT8 sums saturate."""
    check_deployable(qmodel, engine)
    if int8_saturates() and any(n.endswith("weight_quantizer") and q.scheme.bits == 8
                                for n, q in quantizers(qmodel).items()):
        warn(
            "This CPU has no VNNI/AMX: its INT8 kernels add pairs of u8 x s8 products in 16 bits, which saturate "
            "with 8-bit weights, so the engine's results can differ from the simulation's. Quantize with "
            "7-bit weights (QuantConfig.from_bits('w7a8'), stored as int8) to run exactly what was simulated.")


def _write_qdq(qmodel: nn.Module, path: Path, example: torch.Tensor | None, *, opset: int, dynamic_batch: bool,
               engine: str | None) -> Path:
    """The export itself, once :func:`_check_exportable` passed: QDQ ONNX rewritten into the engines' forms."""
    import onnx

    from ...deploy.export import export_onnx

    with _int8_weights(qmodel):
        export_onnx(qmodel, _example(qmodel, example, dynamic_batch), path, opset=opset, dynamic_batch=dynamic_batch)
    model = onnx.load(str(path))
    _fold_weight_quantizers(model.graph)
    _quantize_biases(model.graph)
    if engine == "onnxruntime":
        _zero_bias_before_relu(model.graph)
    onnx.save(model, str(path))
    summary = _int8_summary(model.graph)
    report = getattr(qmodel, "quant_report", None)
    if report is not None and summary.int8 < len(report.quantized):
        raise RuntimeError(
            f"The exported graph has {summary.int8} compute nodes fed by quantized inputs and weights, but "
            f"{len(report.quantized)} layers were quantized: the exporter lost some quantizers (float compute "
            f"nodes: {', '.join(summary.float[:10])}). Please report this model.")
    return path


def _with_suffix(path: Path, suffix: str) -> Path:
    """``path`` ending in ``suffix``: a model file's suffix swapped, any other dotted tail kept (``deit.w8a8``)."""
    return path.with_suffix(suffix) if path.suffix.lower() in (".onnx", ".xml") else path.with_name(path.name + suffix)


def export(qmodel: nn.Module, path: str | Path, engine: str = "openvino", example: torch.Tensor | None = None, *,
           dynamic_batch: bool = False, check: bool = True) -> Path:
    """Deployable INT8 model for ``engine``: QDQ ONNX (``onnxruntime``) or OpenVINO IR (``.xml`` + ``.bin``).

    The OpenVINO IR is converted from the QDQ ONNX (kept next to it). ``check``: run
    :func:`check_engine_precisions` on it (OpenVINO: compiles it once); ``False`` leaves that to the caller,
    who may have compiled it anyway.
    """
    if engine not in ENGINES:
        raise LeanvitError(f"Cannot export a quantized model for engine '{engine}'; "
                           f"choose one of {', '.join(ENGINES)}.")
    from ...deploy import get_engine

    get_engine(engine)  # not installed: say how to install it before writing anything
    path = Path(path)
    out = onnx_path = export_quantized(qmodel, _with_suffix(path, ".onnx"), example, dynamic_batch=dynamic_batch,
                                       engine=engine)
    if engine == "openvino":
        import openvino as ov

        out = _with_suffix(path, ".xml")
        ov.save_model(ov.convert_model(str(onnx_path)), str(out), compress_to_fp16=False)
    if check:
        check_engine_precisions(qmodel, out, engine)
    return out


def check_engine_precisions(qmodel: nn.Module, path: str | Path, engine: str, compiled=None) -> dict[str, str]:
    """The compute layers of ``qmodel``'s export ``path`` (from :func:`export`) that ``engine`` runs in float:
    named in a warning, kept in ``qmodel.quant_report.engine_float_layers`` and returned (layer -> "type,
    precision"). ``compiled``: the OpenVINO model compiled already, rather than compiling it again."""
    onnx_path = _with_suffix(Path(path), ".onnx")
    modules = source_modules(onnx_path)
    if engine == "onnxruntime":
        precisions = onnxruntime_precisions(onnx_path, modules)
        in_float = [name for name, (_, precision) in precisions.items() if precision != "int8"]
        unfused = any(isinstance(m, QuantConv2d) and m.output_quantizer is None for m in qmodel.modules())
        note = f" ({ORT_CONV_NOTE})" if unfused else ""
    else:
        if compiled is None:
            compiled = openvino_core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        precisions = openvino_precisions(compiled, modules)
        in_float = [name for name, (_, precision) in precisions.items() if precision not in ("i8", "u8")]
        layers = dict(qmodel.named_modules())
        per_channel = [n for n in (name.split(" (")[0] for name in in_float)
                       if (q := getattr(layers.get(n), "input_quantizer", None)) is not None and q.scheme.per_channel]
        note = (f" ({', '.join(per_channel)} quantize their inputs per channel, which OpenVINO runs in INT8 when a "
                "conv writes them but not after a transpose: leanvit quantize --a-granularity tensor, or "
                "QuantConfig(a_per_channel=False) from Python, keeps them INT8)"
                if per_channel else "")
    found = {name: ", ".join(precisions[name]) for name in in_float}
    if (report := getattr(qmodel, "quant_report", None)) is not None:
        report.engine_float_layers = found
    if in_float:
        warn(f"{len(in_float)} compute layers run in float on {ENGINE_NAMES[engine]}: {', '.join(in_float)}{note}")
    return found


#: how the ONNX exporter names the nodes of torch's matrix products
MATMUL_OPS = ("matmul", "bmm", "einsum", "scaled_dot_product_attention")


def openvino_precisions(compiled, modules: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """``{layer: (layer type, runtime precision)}`` of the compute layers of a compiled OpenVINO model.

    The runtime precision is what the CPU plugin chose after its low-precision transformations: ``u8``
    or ``i8`` means the layer runs an INT8 kernel. On AVX-512 CPUs the plugin fuses an attention's
    matmuls and softmax into one ``Subgraph`` (its snippets); such a subgraph is listed too, so
    attention matmuls left in float are not missed there. With ``modules`` (:func:`source_modules` of
    the ONNX file the model came from) a layer is named ``"module (layer)"``.
    """
    found = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = info["layerType"].astype(str)
        fused = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        if layer_type in OV_COMPUTE_LAYERS or (layer_type == "Subgraph" and fuses_a_matmul(fused)):
            name = op.get_friendly_name()  # e.g. "node_conv2d_3/WithoutBiases" for the ONNX node "node_conv2d_3"
            # a Subgraph is named after its last op, which may be the next layer's input quantizer: its matmuls
            # say which module it computes
            matmuls = [f for f in fused.split(",") if fuses_a_matmul(f)] if layer_type == "Subgraph" else []
            label = _label(name, (*matmuls, name, name.split("/")[0], *fused.split(",")), modules or {})
            found[label] = (layer_type, info["runtimePrecision"].astype(str).lower())
    return found


def fuses_a_matmul(original_names: str) -> bool:
    """Whether an OpenVINO ``Subgraph`` fused from the ops ``original_names`` (comma-separated) holds a matmul:
    one of them is one (the exporter names a matrix product after its torch op, and the ``attn @ v`` of a
    decomposed ``F.scaled_dot_product_attention`` after that), not just named after one, like the elementwise
    "node_MatMul_13/DequantizationMultiply" the plugin splits off an INT8 FullyConnected (MambaOut's MLPs)."""
    return any(op in name.rsplit("/", 1)[-1].lower() for name in original_names.split(",") for op in MATMUL_OPS)


def onnxruntime_precisions(path: str | Path, modules: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """``{node: (op type, "int8" or "float")}`` of the compute nodes ONNX Runtime's CPU provider runs for the
    ONNX file at ``path``, read from the graph it executes after its fusions: a QDQ node it could not fuse
    into an integer kernel shows up here as a float op fed by DequantizeLinear. With ``modules``
    (:func:`source_modules` of ``path``) a node is named ``"module (node)"``."""
    import tempfile

    import onnx

    from ...deploy import get_engine

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        get_engine("onnxruntime", threads=1).load_onnx(path, optimized_path=optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
    # ORT's NCHWc layout pass renames a conv after the torch op it came from ("conv2d_3" -> "conv2d_3_nchwc")
    return {_label(node.name or node.output[0], (node.name, node.name.removesuffix("_nchwc"), *node.output),
                   modules or {}):
            (node.op_type, "int8" if node.op_type in ORT_INT8_OPS else "float")
            for node in graph.node if node.op_type in ORT_INT8_OPS + ORT_FLOAT_OPS}


def source_modules(path: str | Path) -> dict[str, str]:
    """``{ONNX node, tensor or torch op name: the PyTorch module it was exported from}`` for the ONNX file at ``path``.

    Read from the scopes ``torch.onnx``'s exporter records on each node, so that warnings can name the
    model's layers rather than the engine's nodes; empty for a file without them (the TorchScript
    exporter's, used for a dynamic batch).
    """
    import ast

    import onnx

    modules = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes and len(scopes := ast.literal_eval(scopes)) > 1:  # [..., module, op]
            modules.update(dict.fromkeys((node.name, *node.output, scopes[-1]), scopes[-2]))
    return modules


def _label(name: str, candidates: tuple[str, ...], modules: dict[str, str]) -> str:
    """``"module (name)"``: the module of the first of ``candidates`` (an engine node's names) in ``modules``."""
    module = next((modules[c] for c in candidates if c in modules), None)
    return f"{module} ({name})" if module else name


@dataclass
class OnnxInt8Summary:
    int8: int  #: compute nodes whose data and weight inputs both come from DequantizeLinear
    float: list[str]  #: the other compute nodes (e.g. attention matmuls left in float)


def onnx_int8_summary(path: str | Path) -> OnnxInt8Summary:
    """Count the QDQ-fed compute nodes of an ONNX graph, which ONNX Runtime / OpenVINO turn into INT8 kernels."""
    import onnx

    return _int8_summary(onnx.load(str(path), load_external_data=False).graph)


def _int8_summary(graph) -> OnnxInt8Summary:
    producer = {out: node.op_type for node in graph.node for out in node.output}
    int8, in_float = 0, []
    for node in graph.node:
        if node.op_type in COMPUTE_OPS:
            if all(producer.get(name) == "DequantizeLinear" for name in node.input[:2]):
                int8 += 1
            else:
                in_float.append(node.name or node.output[0])
    return OnnxInt8Summary(int8, in_float)


def _constants(graph) -> dict:
    """``{name: TensorProto}`` of the graph's constant values: initializers, Constant nodes and their aliases."""
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:  # the TorchScript exporter also writes constants as nodes and Identity aliases
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
        elif node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    return consts


def _consumers(graph) -> dict[str, list]:
    """``{value name: [nodes reading it]}``."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _qdq_nodes(graph, op_types: tuple[str, ...]):
    """``(index, node, input's DequantizeLinear, weight's DequantizeLinear)`` for each ``op_types`` node whose two
    first inputs are dequantized, last node first: inserting a node next to the one yielded keeps the indices
    still to come valid."""
    producer = {out: node for node in graph.node for out in node.output}
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if node.op_type in op_types and len(node.input) >= 2:
            dq_x, dq_w = (producer.get(name) for name in node.input[:2])
            if dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear":
                yield index, node, dq_x, dq_w


def _quantize_biases(graph) -> None:
    """Store the bias of each QDQ Conv whose output is quantized, and of each QDQ Gemm, as int32 behind a
    DequantizeLinear (scale: input scale x weight scale, per output channel): the forms ONNX Runtime fuses into
    QLinearConv and QGemm. Only biases on that grid, where ``QuantConfig.quantize_conv_outputs`` snaps them,
    are rewritten: exactly what was simulated."""
    from onnx import helper, numpy_helper

    consts, consumers = _constants(graph), _consumers(graph)
    taken = {init.name for init in graph.initializer}
    for index, node, dq_x, dq_w in _qdq_nodes(graph, ("Conv", "Gemm")):
        if not (len(node.input) > 2 and node.input[2] in consts and dq_x.input[1] in consts
                and dq_w.input[1] in consts):
            continue
        if node.op_type == "Conv" and [c.op_type for c in consumers.get(node.output[0], [])] != ["QuantizeLinear"]:
            continue  # QLinearConv needs a quantized output; QGemm may write float
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            continue  # (Gemm) QGemm adds its int32 bias unscaled, to the product of an untransposed input
        bias = numpy_helper.to_array(consts[node.input[2]]).astype(np.float64)
        step = (numpy_helper.to_array(consts[dq_x.input[1]]).astype(np.float32)
                * numpy_helper.to_array(consts[dq_w.input[1]]).astype(np.float32))  # as the simulation computes it
        if bias.ndim != 1 or step.size not in (1, bias.size):
            continue
        step = np.broadcast_to(step.reshape(-1), bias.shape).astype(np.float32)
        if not np.allclose(bias / step, np.rint(bias / step), rtol=1e-6, atol=1e-3):
            continue  # a bias off that grid (not snapped by the quantizer) would change the result as int32
        name = f"{node.input[2]}_int32"
        if name in taken:  # a layer called more than once (CoaT's shared conv position encoding): one int32 bias each
            name = f"{name}_{index}"
        taken.add(name)
        graph.initializer.extend([numpy_helper.from_array(np.rint(bias / step).astype(np.int32), name),
                                  numpy_helper.from_array(step, f"{name}_scale")])
        graph.node.insert(index, helper.make_node("DequantizeLinear", [name, f"{name}_scale"], [f"{name}_dq"],
                                                  name=f"{node.name or node.output[0]}_bias_dq", axis=0))
        node.input[2] = f"{name}_dq"
    _drop_unused(graph)  # the float biases replaced, unless another node reads them too


def _zero_bias_before_relu(graph) -> None:
    """Give a QDQ MatMul with no bias an Add of zeros when a ReLU that no quantizer absorbs reads it (a bias-free
    Linear before CAFormer's StarReLU, ``s * relu(x) ** 2 + b``): ONNX Runtime otherwise runs that MatMul in float,
    and with the Add fuses both into its INT8 MatMulIntegerToFloat (the zeros become its bias)."""
    from onnx import helper, numpy_helper

    consts, consumers = _constants(graph), _consumers(graph)
    for index, node, _, dq_w in _qdq_nodes(graph, ("MatMul",)):
        readers = consumers.get(node.output[0], [])
        if not (dq_w.input[0] in consts and len(readers) == 1 and readers[0].op_type == "Relu"
                and any(c.op_type != "QuantizeLinear" for c in consumers.get(readers[0].output[0], []))):
            continue
        columns = consts[dq_w.input[0]].dims[-1]
        zeros, biased = f"{node.output[0]}_zero_bias", f"{node.output[0]}_biased"
        graph.initializer.append(numpy_helper.from_array(np.zeros(columns, np.float32), zeros))
        graph.node.insert(index + 1, helper.make_node("Add", [node.output[0], zeros], [biased],
                                                      name=f"{node.name or node.output[0]}_zero_bias"))
        readers[0].input[list(readers[0].input).index(node.output[0])] = biased


def _fold_weight_quantizers(graph) -> None:
    """Replace ``QuantizeLinear(constant weight)`` by its int8 result, and fold a following Transpose."""
    from onnx import helper, numpy_helper

    consts = _constants(graph)
    consumers = _consumers(graph)

    removed, reshaped = set(), set()  # (reshaped: the dequantized weights now written transposed)
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        if len(q.input) < 3 or not all(name in consts for name in q.input[:3]):
            continue
        x, scale, zero = (numpy_helper.to_array(consts[name]) for name in q.input[:3])
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        per_axis = scale.ndim == 1
        if per_axis:  # per-axis: broadcast the scale and zero point along ``axis``
            shape = [1] * x.ndim
            shape[axis % x.ndim] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        info = np.iinfo(zero.dtype)
        # x * (1 / scale) in float32, as torch's fake_quantize computes it: x / scale rounds differently at a few
        # values next to a .5 tie (3 of 11.8 M weights in a check), one integer off the simulation
        inverse = (np.float32(1) / scale.astype(np.float32)).astype(np.float32)
        ints = np.clip(np.rint(x.astype(np.float32) * inverse) + zero.astype(np.int32), info.min, info.max
                       ).astype(zero.dtype)
        (dq,) = consumers[q.output[0]]
        dq_axis = axis
        users = consumers.get(dq.output[0], [])
        perms = {tuple(next((a.ints for a in user.attribute if a.name == "perm"), (1, 0))) for user in users
                 if user.op_type == "Transpose"}
        # one Transpose, or one per call of a layer called several times (the same perm): fold it into the weight
        if users and ints.ndim == 2 and all(user.op_type == "Transpose" for user in users) and len(perms) == 1:
            (perm,) = perms
            ints = ints.transpose(perm)
            dq_axis = perm.index(axis % 2)
            transposed = {user.output[0] for user in users}
            removed.update(id(user) for user in users)
            users = [node for name in transposed for node in consumers.get(name, [])]
            for node in users:
                node.input[:] = [dq.output[0] if name in transposed else name for name in node.input]
            reshaped.add(dq.output[0])
        name = f"{q.input[0]}_quantized"
        graph.initializer.append(numpy_helper.from_array(ints, name))
        dq.input[0] = name
        if zero.dtype == np.int8 and not zero.any():
            # Symmetric. The exporter shares one all-zero constant between layers of equal width, and OpenVINO
            # then fails to recognise the weights' dequantization (f32 FC): no zero point at all, except before
            # a Gemm, which ONNX Runtime fuses into its INT8 QGemm only with a named one (a constant of its own).
            if any(user.op_type == "Gemm" for user in users):
                dq.input[2] = f"{name}_zero_point"
                graph.initializer.append(numpy_helper.from_array(np.zeros(scale.size if per_axis else (), np.int8),
                                                                 dq.input[2]))
            else:
                del dq.input[2:]
        del dq.attribute[:]
        if per_axis:
            dq.attribute.append(helper.make_attribute("axis", dq_axis))
        removed.add(id(q))
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    # their recorded shapes are the untransposed ones: ONNX Runtime warned "Error merging shape info" for each
    for v in [v for v in graph.value_info if v.name in reshaped]:
        graph.value_info.remove(v)
    _drop_unused(graph)


def _drop_unused(graph) -> None:
    """Remove the initializers no node reads any more (those a rewrite here replaced), with their graph input
    entries, the constants and aliases (Constant, Identity) nothing reads, and the shapes of values no node writes:
    dead weight in the file, and ONNX Runtime prints "Removing initializer ... It is not used by any node" for each
    such initializer when it opens it."""
    from onnx import AttributeProto

    def read(g) -> set[str]:  # (a subgraph, If's or Loop's, can read the outer graph's values)
        names = {o.name for o in g.output}
        for node in g.node:
            names.update(node.input)
            for a in node.attribute:
                for sub in ([a.g] if a.type == AttributeProto.GRAPH else a.graphs):
                    names |= read(sub)
        return names

    while True:  # (an alias of an alias is dead once the first goes)
        used = read(graph)
        kept = [n for n in graph.node if n.op_type not in ("Constant", "Identity") or set(n.output) & used]
        if len(kept) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(kept)
    dead = {t.name for t in graph.initializer if t.name not in used}
    for items in (graph.initializer, graph.input):
        kept = [t for t in items if t.name not in dead]
        if len(kept) < len(items):
            del items[:]
            items.extend(kept)
    produced = {name for n in graph.node for name in n.output}
    for v in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(v)
