"""The console script: JSON outputs, the bench files, and user errors without tracebacks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leanvit.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_json_lists_the_catalog(capsys):
    code, out, _ = run_cli(capsys, "models", "--json")
    rows = json.loads(out)
    assert code == 0
    names = {r["name"] for r in rows}
    assert {"efficientformer_l1", "mobilenetv2_100", "nextvit_small"} <= names
    assert all({"params_m", "gmacs", "top1", "speed"} <= set(r) for r in rows)


def test_models_table(capsys):
    code, out, _ = run_cli(capsys, "models", "--family", "DeiT")
    assert code == 0 and "deit_small_patch16_224" in out and "efficientformer" not in out


def test_models_family_ignores_hyphens_and_an_unknown_one_is_an_error(capsys):
    code, out, _ = run_cli(capsys, "models", "--family", "nextvit")
    assert code == 0 and "nextvit_small" in out
    code, _, err = run_cli(capsys, "models", "--family", "EfficientFormr")
    assert code == 2 and "No family 'EfficientFormr'" in err and "did you mean EfficientFormer" in err


def test_profile_json(capsys):
    code, out, _ = run_cli(capsys, "profile", "mobilenetv2_100", "--json")
    prof = json.loads(out)
    assert code == 0
    assert prof["model"] == "mobilenetv2_100" and prof["params"] == 3_504_872
    assert 0.29e9 < prof["macs"] < 0.31e9 and "flop_counter" in prof["mac_convention"]


def test_bench_writes_every_file(capsys, tmp_path):
    out_dir = tmp_path / "bench"
    code, out, err = run_cli(
        capsys, "bench", "mobilenetv2_050", "--img-size", "64", "--engines", "eager,onnxruntime", "openvino",
        "--threads", "1", "--budget", "0.05", "--warmup", "0.01", "--out", str(out_dir), "--json", "--no-progress",
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [r["engine"] for r in rows] == ["eager", "onnxruntime", "openvino"]
    required = {"model", "engine", "precision", "batch", "threads", "latency_ms_median", "latency_ms_p90",
                "throughput", "params", "macs", "max_abs_err", "top1_agreement"}
    for r in rows:
        assert required <= set(r)
        assert r["top1_agreement"] == 1.0 and r["latency_ms_median"] > 0 and r["threads"] == 1
    assert {p.name for p in out_dir.iterdir()} >= {"results.json", "results.csv", "report.md", "pareto.png"}
    report = (out_dir / "report.md").read_text()
    assert "mobilenetv2_050" in report and "openvino" in report and "Host" in report


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "efficientformer_l2"], "efficientformer_l1"),
        (["bench", "deit_tiny_patch16_244"], "deit_tiny_patch16_224"),
        (["bench", "mobilenetv2_100", "--engines", "onnxrt"], "onnxruntime"),
        (["bench", "mobilenetv2_100", "--batch", "100000"], "--batch"),
        (["profile", "mobilenetv2_100", "--img-size", "8"], "--img-size must be between 16 and 4096"),
        (["bench", "mobilenetv2_100", "--img-size", "8"], "--img-size must be between 16 and 4096"),  # the same range
        (["profile", "efficientformer_l1", "--img-size", "160"], "224x224"),
    ],
)
def test_user_errors_are_one_line_without_traceback(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["bench", "--threads", "0"], ["bench", "--batch", "two"], ["bench", "--budget", "-1"]])
def test_argument_type_errors(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "leanvit", "models", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)
    missing = subprocess.run([sys.executable, "-m", "leanvit", "profile", "no_such_model"], capture_output=True, text=True)
    assert missing.returncode == 2 and "Unknown model" in missing.stderr and "Traceback" not in missing.stderr


def test_a_reader_that_leaves_early_is_not_a_traceback():
    """`leanvit models --json | head`: the pipe closes before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "wb") as stdout:
        done = subprocess.run([sys.executable, "-m", "leanvit", "models", "--json"], stdout=stdout,
                              stderr=subprocess.PIPE, text=True)
    assert done.returncode == 141 and done.stderr == ""


def test_bench_token_variants_beside_the_model(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "bench", "deit_tiny_patch16_224", "--img-size", "32", "--engines", "openvino", "--tokens", "evit:0.5",
        "--threads", "1", "--budget", "0.05", "--warmup", "0.01", "--out", str(tmp_path), "--json", "--no-progress",
    )
    assert code == 0, err
    rows = json.loads(out)
    assert [r["variant"] for r in rows] == ["", "evit:0.5"]
    assert rows[1]["macs"] < rows[0]["macs"] and rows[1]["top1_agreement"] == 1.0
    assert "Token reduction against the unreduced model" in (tmp_path / "report.md").read_text()


def test_a_token_variant_that_does_not_apply_to_one_model_is_recorded_not_fatal(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "bench", "resnet18", "deit_tiny_patch16_224", "--img-size", "32", "--engines", "eager",
        "--tokens", "evit:0.5", "--threads", "1", "--budget", "0.05", "--warmup", "0.01", "--out", str(tmp_path),
        "--json", "--no-progress",
    )
    assert code == 0, err
    rows = {(r["model"], r["variant"]): r for r in json.loads(out)}
    assert "token reduction does not apply" in rows["resnet18", "evit:0.5"]["skipped"]
    assert not any(r["error"] for r in rows.values()) and rows["deit_tiny_patch16_224", "evit:0.5"]["macs"]
    report = (tmp_path / "report.md").read_text()
    assert "- resnet18 + evit:0.5 on eager (f32): token reduction does not apply" in report
    assert "in the 3 configurations that ran" in report


def test_bench_out_that_is_a_file_fails_before_measuring(capsys, tmp_path, monkeypatch):
    """It crashed with a traceback when writing the results, after every measurement."""
    import leanvit.cli.bench

    monkeypatch.setattr(leanvit.cli.bench, "run_bench", lambda *a, **k: pytest.fail("measured before checking --out"))
    (tmp_path / "results").write_text("not a directory")
    code, _, err = run_cli(capsys, "bench", "mobilenetv2_050", "--engines", "eager", "--out", str(tmp_path / "results"))
    assert code == 2 and "--out" in err and "is a file, not a directory" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "bench", "mobilenetv2_050", "--out", str(tmp_path / "results" / "sub"))
    assert code == 2 and "cannot write the results there" in err
    if Path("/proc").is_dir():  # exists, but takes no files: found before measuring too
        code, _, err = run_cli(capsys, "bench", "mobilenetv2_050", "--engines", "eager", "--out", "/proc")
        assert code == 2 and "--out /proc: cannot write the results there" in err


def test_bench_exits_1_when_a_configuration_failed(capsys, tmp_path, monkeypatch):
    """A script running `leanvit bench` learns from the status that a row holds an error, not numbers."""
    import leanvit.cli.bench
    from leanvit.bench.runner import BenchRow

    failed = BenchRow("mobilenetv2_050", "onnxruntime", "f32", 1, 1, 64, error="RuntimeError: export failed")
    monkeypatch.setattr(leanvit.cli.bench, "run_bench", lambda cfg, progress: [failed])
    monkeypatch.setattr(leanvit.cli.bench, "write_results", lambda rows, cfg, host, out: {})
    code, out, err = run_cli(capsys, "bench", "mobilenetv2_050", "--engines", "onnxruntime", "--threads", "1",
                             "--out", str(tmp_path / "bench"), "--no-progress")
    assert code == 1 and "FAILED" in out and "export failed" in out


def test_a_misspelt_bench_model_creates_no_out_folder(capsys, tmp_path):
    """The name is checked before --out is made: a typo leaves no empty results folder behind."""
    out = tmp_path / "bench"
    code, _, err = run_cli(capsys, "bench", "deit_tiny_patch16_244", "--out", str(out))
    assert code == 2 and "deit_tiny_patch16_224" in err
    assert not out.exists()


def test_an_interrupted_command_exits_130(capsys, monkeypatch):
    """Ctrl-C is the shell's 128 + SIGINT, one line and no traceback: a script can tell it from a failure (1)."""
    import leanvit.cli.models

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(leanvit.cli.models, "run", interrupted)
    code, _, err = run_cli(capsys, "models")
    assert code == 130 and err == "interrupted\n"


def test_argument_types_take_their_bounds_and_refuse_nan():
    """``--crop-pct 1`` (keep the whole image) and ``--workers 0`` are in range; NaN compares false with either
    bound, so a check written as ``value <= lo or value > hi`` would let it through."""
    import argparse
    import math

    from leanvit.cli import count, crop_fraction, number_in, positive_int

    assert (positive_int("1"), count("0"), crop_fraction("1"), crop_fraction("0.875")) == (1, 0, 1.0, 0.875)
    for parse, text in ((crop_fraction, "nan"), (number_in(-math.inf, math.inf, "an error"), "nan"),
                        (crop_fraction, "1.0001"), (count, "-1")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize("argv, message", [
    (["bench", "--batch", "two"], "argument --batch: expected a whole number, got 'two'"),
    (["bench", "--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["bench", "--budget", "soon"], "argument --budget: expected seconds, got 'soon'"),
    (["bench", "--budget", "-1"], "argument --budget: must be in (0, 3600] (seconds), got -1.0"),
])
def test_argument_type_errors_say_what_was_expected(capsys, argv, message):
    """Raised as anything but ArgumentTypeError, argparse would replace the message by "invalid parse value"."""
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_main_restores_the_warning_format_it_set_for_the_command(capsys):
    """A program calling main() keeps its own warning format afterwards, not lines labelled ``leanvit models``."""
    import warnings

    before = warnings.formatwarning
    run_cli(capsys, "models", "--json")
    assert warnings.formatwarning is before


def test_an_existing_out_file_that_cannot_be_written_is_refused_before_the_work(tmp_path, monkeypatch):
    """An existing --out file is checked for write permission (no file can be created beside /dev/stdout); the
    permission is faked, as root may write anything."""
    from leanvit.cli import prepare_out_file
    from leanvit.errors import LeanvitError

    out = tmp_path / "eval.json"
    out.write_text("{}")
    assert prepare_out_file(out, "the JSON result", "eval.json") == out
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(LeanvitError, match=r"cannot write the JSON result there \(permission denied\)"):
        prepare_out_file(out, "the JSON result", "eval.json")


def test_the_input_size_from_the_img_size_model_kwarg():
    """--model-kwargs' ``img_size`` sizes the pre-processing when --img-size is not given: the command line's over
    the checkpoint's (the model is built with it), a square one given as a pair too, a non-square pair as (height,
    width), not as a square of its first side nor as timm's default."""
    import argparse

    import torch.nn as nn

    from leanvit.cli import input_data_config

    model = nn.Linear(2, 2)  # timm's defaults: 224

    def size(kwargs, meta=None):
        args = argparse.Namespace(model_kwargs=kwargs, img_size=None)
        return input_data_config(model, {"model_kwargs": meta or {}}, args)["input_size"]

    assert size({"img_size": [48, 48]}) == [3, 48, 48]
    assert size({"img_size": 56}, meta={"img_size": 40}) == [3, 56, 56]
    assert size({}, meta={"img_size": 40}) == [3, 40, 40]
    assert size({"img_size": [48, 64]}) == [3, 48, 64]
    assert size({}, meta={"img_size": [40, 56]}) == [3, 40, 56]
