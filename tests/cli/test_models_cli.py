"""`leanvit models`, `profile` and `bench`: an unknown family's hints, the tables they print, the settings they pass."""
import json
from pathlib import Path

import pytest

from leanvit.cli import main


@pytest.mark.parametrize("family, hints", [("vit", "Next-ViT, TinyViT"), ("mobile", "MobileViG, MobileNetV2"),
                                           ("MOBILENET", "MobileNetV2, MobileViG")])
def test_family_hints_ignore_case_and_hyphens(capsys, family, hints):
    assert main(["models", "--family", family]) == 2
    assert f"(did you mean {hints}?)" in capsys.readouterr().err


def test_family_keys_ignore_underscores_and_a_name_like_none_gets_no_hint(capsys):
    """``next_vit`` is Next-ViT; a family nothing resembles gets the list of families, not an empty "did you mean"."""
    assert main(["models", "--family", "next_vit"]) == 0 and "nextvit_small" in capsys.readouterr().out
    assert main(["models", "--family", "qqqq"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and "Families: DeiT, EfficientFormer, EfficientFormerV2," in err


def test_models_table_rows_and_json_of_one_family(capsys):
    """EfficientFormer-L1 as published (12.3 M parameters, 1.3 GMACs, 79.2 % top-1, 1.6 ms on an iPhone 12); a model
    without a paper speed shows '-'; --json keeps the --family filter."""
    assert main(["models", "--family", "EfficientFormer"]) == 0
    rows = {line.split()[0]: line.split(maxsplit=5)[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["efficientformer_l1"] == ["EfficientFormer", "12.30", "1.30", "79.2", "1.6 ms, iPhone 12 (CoreML)"]
    assert main(["models", "--family", "DeiT"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("deit_small_patch16_224 ")]
    assert row[0].split()[1:] == ["DeiT", "22.05", "4.61", "79.9", "-"]
    assert main(["models", "--family", "deit", "--json"]) == 0
    families = {r["family"] for r in json.loads(capsys.readouterr().out)}
    assert families == {"DeiT"}


def test_profile_text_prints_millions_giga_and_the_differences(capsys, monkeypatch):
    """Parameters in M and MACs in G to three places, each difference signed against the published figure (none
    only where there is no figure), the resolution measured at, and the notes only where there are some."""
    import leanvit.cli.profile
    from leanvit.profile import Profile

    profiles = {"a": Profile("a", 160, 3_504_872, 300_774_272, params_diff_pct=-1.5, macs_diff_pct=0.0,
                             published_note="FLOPs counted as MACs"),
                "b": Profile("b", 224, 5_717_416, 1_258_189_824, not_compared="the head has 10 classes")}
    monkeypatch.setattr(leanvit.cli.profile, "profile_model", lambda name, img_size: profiles[name])
    assert main(["profile", "a"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["model   a @ 160x160", "params  3.505 M  (-1.50 % vs published)",
                         "MACs    0.301 G  (+0.00 % vs published)"]  # the published figure exactly: still compared
    assert lines[3].strip() == profiles["a"].mac_convention
    assert lines[4:] == ["note    published figures: FLOPs counted as MACs"]
    assert main(["profile", "b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["params  5.717 M", "MACs    1.258 G"]
    assert lines[4:] == ["note    not compared with the published figures: the head has 10 classes"]


def _fake_bench(monkeypatch, rows):
    """``run_bench`` replaced: the config and progress flag the command line gave, and ``rows`` as its result."""
    import leanvit.cli.bench

    calls = []
    monkeypatch.setattr(leanvit.cli.bench, "run_bench", lambda cfg, progress: calls.append((cfg, progress)) or rows)
    monkeypatch.setattr(leanvit.cli.bench, "write_results", lambda rows, cfg, host, out: {
        "json": Path(out) / "results.json", "md": Path(out) / "report.md"})
    return calls


def test_bench_defaults_are_the_ones_its_help_names(monkeypatch, tmp_path):
    """5 models x eager/onnxruntime/openvino, f32, batch 1, every usable CPU, 2 s timed after 0.5 s warm-up, in 5
    rounds, random weights, on the CPU, with a progress bar."""
    from leanvit.bench import TimingBudget
    from leanvit.host import usable_cpus

    calls = _fake_bench(monkeypatch, [])
    assert main(["bench", "--out", str(tmp_path)]) == 0
    (cfg, progress), = calls
    assert len(cfg.models) == 5 and list(cfg.engines) == ["eager", "onnxruntime", "openvino"] and progress
    assert (list(cfg.precisions), cfg.batch, cfg.threads, cfg.img_size) == (["f32"], 1, usable_cpus(), None)
    assert cfg.rounds == 5
    assert cfg.budget == TimingBudget(warmup_s=0.5, budget_s=2.0)
    assert (cfg.pretrained, cfg.device, cfg.cache_dir, list(cfg.tokens)) == (False, "cpu", None, [])


def test_bench_flags_reach_its_config(monkeypatch, tmp_path):
    """Names by spaces or commas (a trailing comma adds none), and each setting where the run reads it."""
    from leanvit.bench import BenchConfig, TimingBudget

    calls = _fake_bench(monkeypatch, [])
    monkeypatch.setattr(BenchConfig, "validate", lambda self: None)  # (--device cuda on a machine without one)
    assert main(["bench", "resnet18,mobilenetv2_050", "deit_tiny_patch16_224", "--engines", "eager,", "onnxruntime",
                 "--precision", "f32,bf16", "--batch", "4", "--threads", "3", "--img-size", "64", "--budget", "0.3",
                 "--warmup", "0.2", "--rounds", "2", "--tokens", "evit:0.5,tome:4", "--device", "cuda", "--pretrained",
                 "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    (cfg, progress), = calls
    assert list(cfg.models) == ["resnet18", "mobilenetv2_050", "deit_tiny_patch16_224"] and not progress
    assert list(cfg.engines) == ["eager", "onnxruntime"] and list(cfg.precisions) == ["f32", "bf16"]
    assert (cfg.batch, cfg.threads, cfg.img_size, cfg.rounds) == (4, 3, 64, 2)
    assert cfg.budget == TimingBudget(warmup_s=0.2, budget_s=0.3) and list(cfg.tokens) == ["evit:0.5", "tome:4"]
    assert (cfg.pretrained, cfg.device, cfg.cache_dir) == (True, "cuda", str(tmp_path / "c"))


def test_bench_table_of_measured_diverging_skipped_and_failed_rows(monkeypatch, tmp_path, capsys):
    """Median, p90, images/s and agreement in percent; a diverging engine flagged; a row that did not run says why;
    one failed row among good ones makes the status 1; where the files went is said on stderr."""
    from leanvit.bench.runner import BenchRow

    rows = [BenchRow("m", "eager", "f32", 1, 1, 64, latency_ms_median=12.25, latency_ms_p90=15.5, throughput=81.6,
                     top1_agreement=1.0),
            BenchRow("m", "openvino", "f32", 1, 1, 64, variant="evit:0.5", latency_ms_median=6.0, latency_ms_p90=7.25,
                     throughput=166.7, top1_agreement=0.75, diverges=True),
            BenchRow("m", "onnxruntime", "bf16", 1, 1, 64, skipped="onnxruntime does not run bf16"),
            BenchRow("m", "onnxruntime", "f32", 1, 1, 64, error="RuntimeError: export failed")]
    _fake_bench(monkeypatch, rows)
    assert main(["bench", "mobilenetv2_050", "--engines", "eager", "--out", str(tmp_path), "--no-progress"]) == 1
    out, err = capsys.readouterr()
    assert [line.split() for line in out.splitlines()[1:]] == [
        ["m", "eager", "f32", "12.25", "15.50", "81.6", "100%"],
        ["m", "+", "evit:0.5", "openvino", "f32", "6.00", "7.25", "166.7", "75%", "DIVERGES"],
        ["m", "onnxruntime", "bf16", "skipped", "onnxruntime", "does", "not", "run", "bf16"],
        ["m", "onnxruntime", "f32", "FAILED", "RuntimeError:", "export", "failed"]]
    assert f"wrote {tmp_path / 'results.json'}, {tmp_path / 'report.md'}" in err
