"""ONNX Runtime: the CPU execution provider, or CUDA / TensorRT providers when present."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..errors import EngineUnavailableError
from .engine import Engine, Runner, register_engine
from .export import cached_onnx


class OrtRunner(Runner):
    def __init__(self, session, precision: str, info: dict):
        self.session, self.precision, self.info = session, precision, info
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


@register_engine
class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    package = "onnxruntime"

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

    def load_onnx(self, path, *, info: dict | None = None) -> OrtRunner:
        """Open an ONNX file directly (a QDQ model from leanvit's quantizer, for instance)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), opts, providers=self.providers())
        facts = {"onnxruntime": ort.__version__, "providers": session.get_providers(), "onnx": str(path)}
        return OrtRunner(session, self.precision, {**facts, **(info or {})})

    def load(self, model: nn.Module, example: torch.Tensor, *, cache_dir=None) -> Runner:
        return self.load_onnx(cached_onnx(model, example, cache_dir=cache_dir))
