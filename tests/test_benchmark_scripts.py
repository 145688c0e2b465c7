"""The scripts under ``benchmarks/``: the plumbing around the measurements (their names, folders, reports and
errors), with the measurements stubbed; the benchmarks themselves are run by hand."""
from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
from pathlib import Path

import numpy as np
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


def _measured(name, engine_name, out, timed=False):
    """A stand-in for ``ptq_families.measure``: a row without quantizing anything."""
    return {"quantized": 3, "float_compute": 0, "float_reasons": {}, "engine_float": [], "engine_vs_sim": 0.01,
            "sim_vs_fp32": 0.02}


def test_ptq_families_update_without_an_earlier_report_keeps_the_run(script, tmp_path, monkeypatch):
    """``--update`` where no report exists yet writes the measured rows (it crashed after measuring them all);
    with one, it replaces the measured models' rows and keeps the others."""
    families = script("ptq_families")
    monkeypatch.setattr(families, "measure", _measured)
    assert families.main(["--models", "deit_tiny_patch16_224", "--out", str(tmp_path), "--update"]) == 0
    rows = json.loads((tmp_path / "ptq_families.json").read_text())["rows"]
    assert [(r["model"], r["engine"]) for r in rows] == [("deit_tiny_patch16_224", e) for e in families.ENGINES]

    rows[0]["quantized"] = 1  # the earlier measurement, replaced by the update
    rows.append({**rows[1], "model": "convnext_atto"})  # another model's row, kept
    (tmp_path / "ptq_families.json").write_text(json.dumps({"rows": rows}))
    assert families.main(["--models", "deit_tiny_patch16_224", "--out", str(tmp_path), "--update"]) == 0
    rows = json.loads((tmp_path / "ptq_families.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["deit_tiny_patch16_224"] * 2 + ["convnext_atto"]
    assert rows[0]["quantized"] == 3


def test_ptq_families_fails_when_every_row_failed(script, tmp_path, monkeypatch, capsys):
    """Failed rows are the report's findings, but a run where nothing could be measured does not exit 0."""
    families = script("ptq_families")

    def broken(name, engine_name, out, timed=False):
        raise RuntimeError("engine missing")

    monkeypatch.setattr(families, "measure", broken)
    assert families.main(["--models", "deit_tiny_patch16_224", "--out", str(tmp_path)]) == 1
    assert "every model failed" in capsys.readouterr().err
    rows = json.loads((tmp_path / "ptq_families.json").read_text())["rows"]
    assert all(r["error"] == "RuntimeError: engine missing" for r in rows)
    monkeypatch.setattr(families, "measure", lambda name, *a, **k: broken(name) if name == "convnext_atto"
                        else _measured(name, *a, **k))
    assert families.main(["--models", "deit_tiny_patch16_224", "convnext_atto", "--out", str(tmp_path)]) == 0


def test_documented_tokens_commands_run_and_write_the_folder_they_document(script, monkeypatch):
    """Each ``python benchmarks/tokens.py ...`` command in benchmarks/README.md parses (``--out`` is required), writes
    to the results folder its entry links, and names the engines that folder's run used."""
    tokens = script("tokens")
    readme = (BENCHMARKS / "README.md").read_text()
    entry = r"^- \[`[^`]+`\]\((results/[^)]+?)/?\) — `(python benchmarks/tokens\.py[^`]*)`"  # (folder, command)
    entries = re.findall(entry, readme, re.M)
    assert len(entries) >= 2
    for folder, command in entries:
        monkeypatch.setattr("sys.argv", shlex.split(command)[1:])
        args = tokens.parse_args()
        assert args.out == Path("benchmarks") / folder
        assert args.engines == json.loads((BENCHMARKS / folder / "tokens.json").read_text())["engines"]


def _stub_measurements(module, monkeypatch, time_alternating) -> None:
    """A latency script's models, exports, engines and (where it quantizes) quantization stubbed, its timing by
    ``time_alternating``: what is left is the script's own plumbing."""

    class Engine:
        def load_model_file(self, path):
            return lambda x: x

    monkeypatch.setattr(module, "create_model", lambda model, **kwargs: torch.nn.Identity())
    monkeypatch.setattr(module, "export_onnx", lambda model, x, path, **kwargs: path)
    monkeypatch.setattr(module, "get_engine", lambda *args, **kwargs: Engine())
    monkeypatch.setattr(module, "time_alternating", time_alternating)
    if hasattr(module, "quant"):
        monkeypatch.setattr(module.quant, "quantize", lambda model, calib, config, progress: (lambda x: x))
        monkeypatch.setattr(module.quant, "export", lambda qmodel, path, **kwargs: path)


def test_recipe_ab_rates_b_by_the_median_of_its_rounds(script, tmp_path, monkeypatch):
    """A machine in two load states: B as fast as A in four rounds of five, but its pooled median lands in the slow
    state and A's in the fast one. The verdict is the rounds' median (1.0), the pooled medians' ratio (0.71) beside."""
    from leanvit.bench.timing import Timing

    module = script("recipe_ab")
    # round by round (ms): B as fast as A but in round 3, where B met the slow state and A the fast one
    states = {"fp32": [4.0] * 3 + [5.6] * 2, "A": [2.0] * 3 + [2.8] * 2, "B": [2.0] * 2 + [2.8] * 3}

    _stub_measurements(module, monkeypatch, lambda fns, budget, rounds: {
        k: Timing(np.repeat(states[k], 3), tuple(states[k])) for k in fns})
    monkeypatch.setattr("sys.argv", ["recipe_ab", "--models", "deit_tiny_patch16_224", "--rounds", "5", "--change",
                                     "{}", "--out", str(tmp_path)])
    module.main()
    row, = json.loads((tmp_path / "recipe_ab.json").read_text())["rows"]
    assert row["A_over_B_round_median"] == 1.0 and row["A_over_B"] == pytest.approx(2.0 / 2.8, abs=1e-3)
    assert row["A_over_B_rounds"] == pytest.approx([1.0, 1.0, 2.0 / 2.8, 1.0, 1.0], abs=1e-3)
    assert "| **1.000** | 0.71–1.00 | 0.714 |" in (tmp_path / "recipe_ab.md").read_text()


@pytest.mark.parametrize("name", ["opset", "recipe_ab", "activation_cost"])
def test_budget_s_is_each_files_budget_not_multiplied_by_the_files(name, script, tmp_path, monkeypatch):
    """``--budget-s`` is documented as the timing budget per file, and time_alternating gives each function the whole
    ``budget_s`` (spread over the rounds): the scripts pass it on as given (they multiplied it by the files)."""
    module = script(name)
    help_text = {a.dest: a.help for a in script("manifest").latency_parser("d", "o", 2, 1.0)._actions}["budget_s"]
    assert "per file" in help_text

    class Timed(Exception):
        """Stops the benchmark at its first timing."""

    def time_alternating(fns, budget, rounds):
        raise Timed(len(fns), budget.budget_s, rounds)

    _stub_measurements(module, monkeypatch, time_alternating)
    extra = ["--change", "{}"] if name == "recipe_ab" else []
    monkeypatch.setattr("sys.argv", [name, "--models", "deit_tiny_patch16_224", "--budget-s", "1.5", "--rounds", "3",
                                     "--out", str(tmp_path), *extra])
    with pytest.raises(Timed) as timed:
        module.main()
    files, budget_s, rounds = timed.value.args
    assert files >= 3 and (budget_s, rounds) == (1.5, 3)
