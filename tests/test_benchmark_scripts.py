"""The scripts under ``benchmarks/``: the plumbing around the measurements (their names, folders, reports and
errors), with the measurements stubbed; the benchmarks themselves are run by hand."""
from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import timm
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    """``benchmarks/<name>.py`` as a module, importing its neighbours (``manifest``, ``ptq``) as it does when run."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def test_ptq_names_rows_and_export_folders_by_checkpoint(script, tmp_path, monkeypatch):
    """The manifest has three efficientmod_xxs checkpoints: each its own export folder and its own table row."""
    ptq = script("ptq")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16,
                              num_heads=2, num_classes=10).eval()
    data_config = ptq.resolve_data_config(model, img_size=32)
    folders = []

    class Exported(Exception):
        """Stops the benchmark where it first writes into the model's folder."""

    def export_onnx(model, x, path):
        folders.append(path.parent.relative_to(tmp_path).as_posix())
        raise Exported

    monkeypatch.setattr(ptq, "load", lambda entry, kwargs: (model, data_config))
    monkeypatch.setattr(ptq, "export_onnx", export_onnx)
    args = argparse.Namespace(model_kwargs={}, calib="cifar10-test500", data="cifar10-test500", calib_images=10,
                              eval_images=10, out=tmp_path, budget_s=1.0, threads=1, bits="w8a8", recipe="mse",
                              quant_kwargs={}, batch_size=10)
    names = ("efficientmod_xxs-cifar10-64", "efficientmod_xxs-cifar10", "efficientmod_xxs-cifar10-128")
    for name in names:
        with pytest.raises(Exported):
            ptq.bench_model({"name": name, "model": "efficientmod_xxs"}, args)
    assert folders == list(names)

    measured = {"eval_images": 10, "fp32_top1": 80.0, "leanvit_sim_top1": 79.0, "leanvit_top1": 79.0,
                "sim_engine_agreement": 99.0, "nncf_top1": 79.5, "fp32_ms": 2.0, "leanvit_ms": 1.5, "nncf_ms": 1.6,
                "leanvit_vs_nncf": {"leanvit_only": 1, "nncf_only": 2, "mcnemar_p": 1.0}, "leanvit_float_layers": {},
                "leanvit_ort_sim_top1": 79.0, "leanvit_ort_top1": 79.0, "sim_ort_agreement": 99.0,
                "leanvit_ort_precisions": {"int8": 9}, "ort_fp32_ms": 2.0, "ort_leanvit_ms": 1.5}
    rows = [{"model": "efficientmod_xxs", "checkpoint": name, **measured} for name in names]
    rows.append({"model": "mobilevig_ti", "checkpoint": None, **measured})  # random weights: named by the model
    report = argparse.Namespace(bits="w8a8", recipe="mse", target="vnni", threads=2, calib="c", calib_images=256,
                                data="d", rounds=6)
    markdown = ptq.render_markdown(rows, report, {})
    table = [line.split(" | ")[0] for line in markdown.splitlines()
             if line.startswith("| ") and not line.startswith("| model |")]  # the rows, not the headers
    assert table == 2 * [f"| {name}" for name in (*names, "mobilevig_ti")]  # the OpenVINO and the ORT table


def test_ptq_unknown_model_is_one_error_line(script, tmp_path, capsys):
    """Every name is checked before the first model is exported and timed."""
    ptq = script("ptq")
    assert ptq.main(["--models", "deit_tinny_patch16_224", "deit_tiny_patch16_224", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown model 'deit_tinny_patch16_224'") and err.count("\n") == 1
