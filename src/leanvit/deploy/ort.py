"""ONNX Runtime: the CPU execution provider, or CUDA / TensorRT providers when present."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import EngineUnavailableError, LeanvitError
from .engine import Engine, Runner, engine_onnx, existing_model_file, register_engine

#: Graph fusions turned off for QDQ models. ONNX Runtime's MatMul + Add -> Gemm fusion runs before its QDQ
#: fusions and turns every quantized Linear (DequantizeLinear -> MatMul -> Add) into a float Gemm, so a
#: W8A8 DeiT-tiny ran at half the f32 speed (26 ms against 13 ms at 224x224, 2 threads, ORT 1.31); without
#: it the QDQ MatMuls become MatMulIntegerToFloat INT8 kernels (10 ms).
QDQ_DISABLED_OPTIMIZERS = ("MatMulAddFusion",)


def onnx_facts(path) -> dict:
    """The ONNX file's opset and whether it carries quantized (DequantizeLinear) nodes, read once."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "qdq": any(node.op_type == "DequantizeLinear" for node in model.graph.node)}


class OrtRunner(Runner):
    def __init__(self, session, precision: str, info: dict):
        self.session, self.precision, self.info = session, precision, info
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


@register_engine
class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    devices = ("cpu", "cuda")
    package = "onnxruntime"
    exports = True

    def providers(self) -> list:
        import onnxruntime as ort

        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        have = ort.get_available_providers()
        if "CUDAExecutionProvider" not in have:
            raise EngineUnavailableError(
                f"onnxruntime has no CUDA provider here (available: {', '.join(have)}): "
                "pip uninstall onnxruntime && pip install onnxruntime-gpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def load_onnx(self, path, *, info: dict | None = None, optimized_path=None, profile: bool = False) -> OrtRunner:
        """Open an ONNX file directly (a QDQ model from leanvit's quantizer, for instance).

        ``optimized_path``: also write the graph ONNX Runtime runs after its fusions there (which nodes
        became INT8 kernels: :func:`leanvit.compress.quant.onnxruntime_precisions`). ``profile``: record
        every kernel's time (``runner.session.end_profiling()`` writes them, as Chrome trace JSON)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if optimized_path is not None:
            opts.optimized_model_filepath = str(optimized_path)
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "leanvit_ort_profile")
        model = onnx_facts(path)
        disabled = list(QDQ_DISABLED_OPTIMIZERS) if model["qdq"] else []
        session = ort.InferenceSession(str(path), opts, providers=self.providers(), disabled_optimizers=disabled)
        facts = {"onnxruntime": ort.__version__, "providers": session.get_providers(), "onnx": str(path),
                 "opset": model["opset"]}
        if disabled:
            facts["disabled_optimizers"] = disabled
        return OrtRunner(session, self.precision, {**facts, **(info or {})})

    def load_model_file(self, path, *, info: dict | None = None) -> OrtRunner:
        """An ONNX file: :meth:`load_onnx`."""
        path = existing_model_file(path)
        if path.suffix.lower() != ".onnx":
            raise LeanvitError(f"ONNX Runtime runs ONNX files, not {path.name}: use the .onnx file next to it, "
                               "or the openvino engine.")
        return self.load_onnx(path, info=info)

    def load(self, model: nn.Module, example: torch.Tensor, *, cache_dir=None) -> Runner:
        return self.load_onnx(engine_onnx(model, example, self.name, cache_dir=cache_dir))
