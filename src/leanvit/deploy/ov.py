"""OpenVINO on the CPU, with the inference precision set explicitly and read back.

OpenVINO's CPU plugin runs float models in bf16 on CPUs with AVX-512 BF16 or AMX unless
``INFERENCE_PRECISION_HINT`` says otherwise, so leanvit always sets it and reports what the
compiled model says it uses.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn as nn

from ..errors import LeanvitError
from .engine import Engine, Runner, engine_onnx, existing_model_file, register_engine
from .export import cached_openvino_ir

_OV_PRECISION = {"f32": "f32", "bf16": "bf16", "fp16": "f16"}


@functools.cache
def openvino_core():
    """The process's one ``openvino.Core``, kept until exit.

    Why one: each Core loads its own CPU plugin, and the plugin replaces the calling thread's signal stack
    when it is created and puts one back when it is destroyed; Cores created and destroyed out of order
    (one per compiled model) left the main thread on a freed signal stack, and the next signal it handled
    (a child process's SIGCHLD) killed the process with SIGSEGV. One Core also loads the plugin once.
    """
    import openvino as ov

    return ov.Core()


def cpu_supports_bf16() -> bool:
    return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoRunner(Runner):
    def __init__(self, compiled, precision: str, info: dict):
        self.compiled, self.precision, self.info = compiled, precision, info
        self.request = compiled.create_infer_request()
        self.input_dtype = compiled.input(0).get_element_type().to_dtype()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The logits, copied once out of OpenVINO's buffer (the next call overwrites it).

        ``infer({0: x})`` passed the input through OpenVINO's data dispatcher and copied every output into a dict
        (``share_outputs=False``) before this copy: ~4 us a call that only OpenVINO's rows paid. The input is
        shared, or copied as the dispatcher did where OpenVINO cannot share it (another dtype, not C-contiguous,
        read-only)."""
        import openvino as ov

        if x.dtype != self.input_dtype or not (x.flags.c_contiguous and x.flags.writeable):
            x = np.array(x, dtype=self.input_dtype, order="C")
        self.request.set_input_tensor(0, ov.Tensor(x, shared_memory=True))
        self.request.infer(share_outputs=True)
        return self.request.get_output_tensor(0).data.copy()


@register_engine
class OpenVinoEngine(Engine):
    name = "openvino"
    package = "openvino"
    precisions = ("f32", "bf16")
    exports = True

    def compile_config(self) -> dict:
        """The CPU plugin settings; ``benchmarks/harness_check.py`` passes the same to benchmark_app."""
        return {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": _OV_PRECISION[self.precision],
        }

    def load_model_file(self, path, *, info: dict | None = None) -> OpenVinoRunner:
        """Compile an IR (``.xml``) or ONNX file directly (an INT8 model from a quantizer, say)."""
        import openvino as ov

        if self.precision == "bf16" and not cpu_supports_bf16():
            raise LeanvitError(
                "OpenVINO bf16 needs a CPU with AVX-512 BF16 or AMX; this one has neither. Use f32."
            )
        compiled = openvino_core().compile_model(str(existing_model_file(path)), "CPU", self.compile_config())
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        used = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        facts = {
            "openvino": ov.__version__,
            "model_file": str(path),
            "inference_precision": used,
            "num_streams": str(compiled.get_property("NUM_STREAMS")),
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        }
        precision = {"f32": "f32", "bf16": "bf16", "f16": "fp16"}.get(used, used)
        return OpenVinoRunner(compiled, precision, {**facts, **(info or {})})

    def load(self, model: nn.Module, example: torch.Tensor, *, cache_dir=None) -> Runner:
        return self.load_model_file(cached_openvino_ir(engine_onnx(model, example, self.name, cache_dir=cache_dir)))
