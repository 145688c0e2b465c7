"""Shared checks for the zoo's model files."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from leanvit.deploy import check_agreement, export_onnx, get_engine


@pytest.fixture
def check_engines(tmp_path):
    """``check(model, size)``: export with a dynamic batch through torch.export (a TorchScript fallback
    fails the test), then ONNX Runtime and OpenVINO must match eager at batch 1 and 3."""

    def check(model: nn.Module, size: int) -> None:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            path = export_onnx(model, torch.randn(1, 3, size, size), tmp_path / "model.onnx",
                               dynamic_batch=True)
        assert not [w for w in record if "TorchScript exporter" in str(w.message)]
        batches = [torch.randn(1, 3, size, size), torch.randn(3, 3, size, size)]
        for engine in (get_engine("onnxruntime", threads=1), get_engine("openvino", threads=1)):
            runner = engine.load_model_file(path)
            agreement = check_agreement(model, runner, batches)
            assert agreement.max_abs_err <= 1e-3 and agreement.top1_agreement == 1.0, (engine.name, agreement)

    return check
