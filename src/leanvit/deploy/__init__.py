"""Deployment: export to ONNX / OpenVINO IR and run on real inference engines.

``get_engine(name, threads=..., precision=...)`` gives an :class:`Engine`; its ``load(model,
example)`` exports (cached) and returns a :class:`Runner` mapping NumPy inputs to NumPy logits.
``check_agreement`` compares any runner with PyTorch eager on the same inputs.
"""
from __future__ import annotations

from . import ort, ov, pytorch, trt  # noqa: F401  (register the engines)
from .engine import (
    Agreement,
    Engine,
    Runner,
    available_engines,
    check_agreement,
    engine_device,
    engine_names,
    engine_precisions,
    get_engine,
)
from .export import cached_onnx, cached_openvino_ir, check_export_dir, export_dir, export_onnx

__all__ = [
    "Agreement", "Engine", "Runner", "available_engines", "cached_onnx", "cached_openvino_ir", "check_agreement",
    "check_export_dir", "engine_device", "engine_names", "engine_precisions", "export_dir", "export_onnx", "get_engine",
]
