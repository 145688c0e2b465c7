"""What report.md and the plot say about the run beside the rows."""
import csv
import json

from leanvit.bench import BenchConfig, BenchRow
from leanvit.bench import report


def measured(engine: str, **kwargs) -> BenchRow:
    row = BenchRow(model="deit_tiny_patch16_224", engine=engine, precision="f32", batch=3, threads=4, img_size=32,
                   latency_ms_median=1.0, latency_ms_p90=1.1, latency_ms_p99=1.2, latency_ms_iqr=0.1, throughput=3000.0,
                   max_abs_err=1e-6, top1_agreement=1.0, engine_info={"device": "cuda"})
    for k, v in kwargs.items():
        setattr(row, k, v)
    return row


HOST = {"cpu": "Test CPU", "usable_cpus": 2, "logical_cpus": 2}


def test_report_states_input_size_device_threads_used_and_images_checked(tmp_path, monkeypatch):
    """It named none of the input size, the device, OpenVINO's capped threads; "8 random images" were 9 at batch 3."""
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager", "openvino"], batch=3, threads=4, img_size=32,
                      device="cuda", n_check=8)
    rows = [measured("eager", threads_used=4), measured("openvino", threads_used=2, engine_info={"device": "cpu"})]
    titles = []
    monkeypatch.setattr(report, "plot_pareto", lambda rows, path, title="": titles.append(title))
    text = report.write_results(rows, cfg, HOST, tmp_path)["md"].read_text()
    assert "- input: 32x32; batch 3, threads 4" in text
    assert "- device: cuda (CPU-only engines on the CPU: openvino)" in text
    assert "- threads as the engine reports them, where not as asked: openvino 2" in text
    assert "on 9 random images" in text
    assert titles == ["32x32, batch 3, 4 threads, cuda, Test CPU"]


def test_input_sizes_per_model_where_they_differ():
    rows = [measured("eager"), measured("eager", model="resnet50", img_size=224)]
    assert report.input_sizes(rows) == "deit_tiny_patch16_224 32x32, resnet50 224x224"


def test_report_gives_each_rows_memory_growth_beside_the_process_peak(tmp_path, monkeypatch):
    """The process peak holds what the export and earlier rows left resident; the growth over the row's baseline is
    the engine's own. A failed row keeps the table's column count."""
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager", "openvino"], img_size=32)
    rows = [measured("eager", peak_rss_mb=900.4, rss_baseline_mb=880.2, peak_rss_above_baseline_mb=20.2),
            measured("openvino", error="boom")]
    monkeypatch.setattr(report, "plot_pareto", lambda *args, **kwargs: None)
    text = report.write_results(rows, cfg, HOST, tmp_path)["md"].read_text()
    header, rule, eager, failed = [line for line in text.splitlines() if line.startswith("|")][:4]
    assert header.endswith("| RSS growth MiB | peak RSS MiB |") and eager.endswith("| 20 | 900 |")
    assert header.count("|") == rule.count("|") == eager.count("|") == failed.count("|")
    assert "*RSS growth* is the resident-set high-water mark during those calls minus that baseline" in text


def test_vs_eager_is_the_median_of_the_rounds_ratios(tmp_path, monkeypatch):
    """Rows timed in the same alternating rounds are compared round by round: eager at 2, 8, 2 ms and the engine at
    1, 2, 2 ms are 2x, 4x and 1x apart (median 2x), where their pooled medians (2 against 2) said 1x."""
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager", "openvino"], rounds=3)
    eager = measured("eager", latency_ms_median=2.0, latency_ms_rounds=(2.0, 8.0, 2.0))
    ov = measured("openvino", latency_ms_median=2.0, latency_ms_rounds=(1.0, 2.0, 2.0))
    assert report.vs_row(eager, ov) == 2.0
    assert report.vs_row(measured("eager", latency_ms_median=2.0), measured("openvino")) == 2.0  # no rounds: medians
    monkeypatch.setattr(report, "plot_pareto", lambda rows, path, title="": None)
    text = report.write_results([eager, ov], cfg, HOST, tmp_path)["md"].read_text()
    assert "| 2.00× |" in text and "timed side by side, in 3 alternating rounds" in text


def test_the_report_names_the_cpus_identity_and_the_load():
    """Two hosts both called "AMD EPYC" are told apart by family, model and stepping; a busy machine shows."""
    lines = report.host_lines({**HOST, "cpu_id": {"vendor": "AuthenticAMD", "family": 26, "model": 2},
                               "loadavg": [3.84, 2.1, 1.0], "loadavg_at": "2026-11-25 14:00:00 UTC"})
    assert lines[0] == "- CPU: Test CPU (2 usable of 2 logical CPUs); vendor AuthenticAMD, family 26, model 2"
    assert lines[1] == "- load average (1, 5, 15 min) at 2026-11-25 14:00:00 UTC: 3.84, 2.1, 1.0"
    assert report.host_lines(HOST)[0] == "- CPU: Test CPU (2 usable of 2 logical CPUs)"  # older results as before


def test_one_round_is_reported_as_one_block_per_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "plot_pareto", lambda rows, path, title="": None)
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager"], rounds=1)
    text = report.write_results([measured("eager")], cfg, HOST, tmp_path)["md"].read_text()
    assert "each configuration was timed in one block" in text and "side by side" not in text


def test_each_row_says_how_many_calls_its_statistics_are_over(tmp_path, monkeypatch):
    """A p99 of 10 calls is their slowest but one: the table gave no count."""
    monkeypatch.setattr(report, "plot_pareto", lambda rows, path, title="": None)
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager", "openvino"])
    rows = [measured("eager", iterations=250), measured("openvino", error="boom")]
    text = report.write_results(rows, cfg, HOST, tmp_path)["md"].read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert "| calls |" in table[0] and "| 0.10 | 250 | 1.00× |" in table[1]
    assert len({line.count("|") for line in table}) == 1  # a failed row keeps the column count


def test_a_token_variants_speed_up_is_the_median_of_the_rounds_ratios(tmp_path, monkeypatch):
    """The variant shares its model's rounds: 2x, 4x and 1x faster round by round is 2x (pooled medians: 1x)."""
    monkeypatch.setattr(report, "plot_pareto", lambda rows, path, title="": None)
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager"], tokens=["evit:0.7"], rounds=3)
    base = measured("eager", latency_ms_median=2.0, latency_ms_rounds=(2.0, 8.0, 2.0), macs=1e9)
    reduced = measured("eager", variant="evit:0.7", latency_ms_median=2.0, latency_ms_rounds=(1.0, 2.0, 2.0), macs=7e8)
    text = report.write_results([base, reduced], cfg, HOST, tmp_path)["md"].read_text()
    assert "| deit_tiny_patch16_224 | evit:0.7 | eager | f32 | 0.700 | 30.0% | 2.00 | 50.0% | 2.00× |" in text


def _vs_eager_column(text: str) -> list[str]:
    """The results table's "vs eager" cells, in row order."""
    header, _rule, *rows = text.split("## Results")[1].strip().split("\n\n")[0].splitlines()
    column = [cell.strip() for cell in header.split("|")].index("vs eager")
    return [[cell.strip() for cell in row.split("|")][column] for row in rows]


def test_vs_eager_is_against_the_f32_eager_row_whatever_the_rows_precision(tmp_path, monkeypatch):
    """With --precision f32 bf16 the eager bf16 row is a configuration like any other, not the baseline: both it and
    the OpenVINO f32 row are 2x eager f32 (the bf16 row as baseline would make OpenVINO's 1x)."""
    monkeypatch.setattr(report, "plot_pareto", lambda rows, path, title="": None)
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager", "openvino"], precisions=["f32", "bf16"],
                      rounds=3)
    rows = [measured("eager", latency_ms_median=2.0, latency_ms_rounds=(2.0, 2.0, 2.0)),
            measured("eager", precision="bf16", latency_ms_median=1.0, latency_ms_rounds=(1.0, 1.0, 1.0)),
            measured("openvino", latency_ms_median=1.0, latency_ms_rounds=(1.0, 1.0, 1.0))]
    text = report.write_results(rows, cfg, HOST, tmp_path)["md"].read_text()
    assert _vs_eager_column(text) == ["1.00×", "2.00×", "2.00×"]


def test_a_token_variants_rows_are_compared_with_that_variants_eager_row(tmp_path, monkeypatch):
    """'vs eager' of OpenVINO running the reduced model is against eager running the reduced model (2x), not the
    unreduced one (4x: the engine's speed-up and the token reduction's folded together); the token section's
    latency cut is 1 - 1/speed-up (75 % at 4x, where 1/speed-up would say 25 %)."""
    monkeypatch.setattr(report, "plot_pareto", lambda rows, path, title="": None)
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager", "openvino"], tokens=["evit:0.7"], rounds=3)
    rows = [measured("eager", latency_ms_median=4.0, latency_ms_rounds=(4.0, 4.0, 4.0), macs=1e9),
            measured("eager", variant="evit:0.7", latency_ms_median=2.0, latency_ms_rounds=(2.0, 2.0, 2.0), macs=7e8),
            measured("openvino", variant="evit:0.7", latency_ms_median=1.0, latency_ms_rounds=(1.0, 1.0, 1.0),
                     macs=7e8)]
    text = report.write_results(rows, cfg, HOST, tmp_path)["md"].read_text()
    assert _vs_eager_column(text) == ["1.00×", "1.00×", "2.00×"]
    base = measured("eager", latency_ms_median=4.0, latency_ms_rounds=(4.0, 4.0, 4.0), macs=1e9)
    reduced = measured("eager", variant="evit:0.7", latency_ms_median=1.0, latency_ms_rounds=(1.0, 1.0, 1.0), macs=7e8)
    text = report.write_results([base, reduced], cfg, HOST, tmp_path)["md"].read_text()
    assert "| 1.00 | 75.0% | 4.00× |" in text


def _table_row(text: str, label: str, engine: str) -> list[str]:
    """The results table's cells of one row."""
    for line in text.split("## Results")[1].splitlines():
        cells = [cell.strip() for cell in line.split("|")][1:-1]
        if cells[:2] == [label, engine]:
            return cells
    raise AssertionError(f"no row {label} {engine}")


def test_the_table_gives_params_in_millions_gmacs_and_flags_a_diverging_engine(tmp_path, monkeypatch):
    """5.7 M parameters and 1.258 GMACs; an engine that diverges is marked beside its error and listed under
    Correctness with its agreement, in place of "every engine agrees"."""
    monkeypatch.setattr(report, "plot_pareto", lambda *args, **kwargs: None)
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager", "openvino"], rounds=3)
    rows = [measured("eager", params=5_717_416, macs=1_258_000_000),
            measured("openvino", params=5_717_416, macs=1_258_000_000, diverges=True, max_abs_err=0.25,
                     top1_agreement=0.5)]
    text = report.write_results(rows, cfg, HOST, tmp_path)["md"].read_text()
    header = [cell.strip() for cell in text.split("## Results")[1].strip().splitlines()[0].split("|")][1:-1]
    eager = dict(zip(header, _table_row(text, "deit_tiny_patch16_224", "eager")))
    ov = dict(zip(header, _table_row(text, "deit_tiny_patch16_224", "openvino")))
    assert (eager["params M"], eager["GMACs"], eager["max abs err"]) == ("5.72", "1.258", "1.00e-06")
    assert (ov["max abs err"], ov["top-1 agree"]) == ("2.50e-01 ⚠", "50%")
    assert "- deit_tiny_patch16_224 on openvino (f32): top-1 agreement 50.0%, max abs err 0.25" in text
    assert "Every engine agrees" not in text


def test_failures_are_listed_and_a_run_where_nothing_ran_says_so(tmp_path, monkeypatch):
    """Each failed configuration with its error; with none that ran, no claim that every engine agrees."""
    monkeypatch.setattr(report, "plot_pareto", lambda *args, **kwargs: None)
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager", "openvino"])
    rows = [measured("eager", error="cannot build (test)"),
            measured("openvino", precision="fp16", skipped="openvino does not run fp16 (it runs f32, bf16)")]
    text = report.write_results(rows, cfg, HOST, tmp_path)["md"].read_text()
    assert "No configuration ran, so none was checked against eager" in text and "agrees" not in text
    failed = text.split("## Failed configurations")[1].split("##")[0]
    assert failed.strip() == "- deit_tiny_patch16_224 on eager (f32): `cannot build (test)`"
    skipped = text.split("## Skipped configurations")[1].split("![")[0]
    assert skipped.strip() == ("- deit_tiny_patch16_224 on openvino (fp16): openvino does not run fp16 "
                               "(it runs f32, bf16)")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [(r["engine"], r["error"], r["skipped"]) for r in doc["rows"]] == [
        ("eager", "cannot build (test)", None), ("openvino", None, "openvino does not run fp16 (it runs f32, bf16)")]
    with (tmp_path / "results.csv").open() as f:
        assert [(r["engine"], r["error"]) for r in csv.DictReader(f)] == [("eager", "cannot build (test)"),
                                                                          ("openvino", "")]


def test_the_token_section_leaves_out_variants_that_did_not_run_or_whose_model_did_not(tmp_path, monkeypatch):
    """A variant the model cannot take (skipped, no MACs) and one whose unreduced row failed have nothing to be
    compared with: they are left out of the section, not a crash."""
    monkeypatch.setattr(report, "plot_pareto", lambda *args, **kwargs: None)
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager", "openvino"], tokens=["evit:0.7"], rounds=3)
    rows = [measured("eager", latency_ms_rounds=(2.0, 2.0, 2.0), macs=1e9),
            measured("eager", variant="evit:0.7", skipped="token reduction does not apply: (test)"),
            measured("openvino", error="boom", latency_ms_median=None, macs=1e9),
            measured("openvino", variant="evit:0.7", latency_ms_rounds=(1.0, 1.0, 1.0), macs=7e8)]
    text = report.write_results(rows, cfg, HOST, tmp_path)["md"].read_text()
    assert "## Token reduction against the unreduced model" not in text


def test_the_papers_speed_figures_are_listed_once_per_model(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "plot_pareto", lambda *args, **kwargs: None)
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager", "openvino"])
    rows = [measured(e, paper_speed="2536 img/s on a V100") for e in ("eager", "openvino")]
    text = report.write_results(rows, cfg, HOST, tmp_path)["md"].read_text()
    section = text.split("## Papers' own speed figures (their hardware, not this host)")[1].split("![")[0]
    assert section.strip() == "- deit_tiny_patch16_224: 2536 img/s on a V100"


def test_an_engine_that_does_not_report_its_threads_is_not_listed_as_capped(tmp_path, monkeypatch):
    """ONNX Runtime says nothing (None): that is not "threads None"."""
    monkeypatch.setattr(report, "plot_pareto", lambda *args, **kwargs: None)
    cfg = BenchConfig(models=["deit_tiny_patch16_224"], engines=["eager", "onnxruntime"], threads=4)
    rows = [measured("eager", threads_used=4), measured("onnxruntime", threads_used=None)]
    text = report.write_results(rows, cfg, HOST, tmp_path)["md"].read_text()
    assert "threads as the engine reports them" not in text


def test_rounds_that_cannot_be_paired_fall_back_to_the_medians():
    """Rows with different counts of rounds (not timed together) are compared by their medians."""
    eager = measured("eager", latency_ms_median=3.0, latency_ms_rounds=(2.0, 8.0, 2.0))
    ov = measured("openvino", latency_ms_median=1.5, latency_ms_rounds=(1.0, 2.0))
    assert report.vs_row(eager, ov) == 2.0


def test_the_plot_front_holds_each_point_more_accurate_than_every_faster_one(tmp_path, monkeypatch):
    """A slower point at the same top-1 is not on the front; a row that did not run (no latency) is not plotted."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [measured("eager", model=m, latency_ms_median=ms, published_top1=top1)
            for m, ms, top1 in (("a", 1.0, 70.0), ("b", 2.0, 75.0), ("c", 3.0, 75.0), ("d", 4.0, 72.0))]
    rows.append(measured("openvino", model="a", latency_ms_median=None, published_top1=70.0, error="boom"))
    report.plot_pareto(rows, tmp_path / "p.png")
    (ax,) = figures[0].axes
    (front,) = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    assert list(front.get_xdata()) == [1.0, 2.0] and list(front.get_ydata()) == [70.0, 75.0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 4
    plt.close(figures[0])


def test_a_host_without_flags_of_interest_says_so():
    assert "- CPU flags: none of interest" in report.host_lines(HOST)


def _report(tmp_path, monkeypatch, rows, host=HOST, **cfg) -> str:
    monkeypatch.setattr(report, "plot_pareto", lambda *args, **kwargs: None)
    cfg = BenchConfig(**{"models": ["deit_tiny_patch16_224"], "engines": ["eager", "openvino"], **cfg})
    return report.write_results(rows, cfg, host, tmp_path)["md"].read_text()


def test_each_statistic_is_in_its_own_column(tmp_path, monkeypatch):
    """Distinct values per statistic, so that no column shows another's (median, p90, p99, img/s, top-1)."""
    row = measured("eager", latency_ms_median=1.25, latency_ms_p90=2.5, latency_ms_p99=7.75, latency_ms_iqr=0.5,
                   throughput=2400.04, published_top1=72.2)
    text = _report(tmp_path, monkeypatch, [row, measured("openvino", error="boom"),
                                           measured("openvino", precision="bf16", skipped="no bf16 (test)")])
    header = [cell.strip() for cell in text.split("## Results")[1].strip().splitlines()[0].split("|")][1:-1]
    cells = dict(zip(header, _table_row(text, "deit_tiny_patch16_224", "eager")))
    assert [cells[k] for k in ("median ms", "p90", "p99", "IQR", "img/s", "published top-1")] == [
        "1.25", "2.50", "7.75", "0.50", "2400.0", "72.2"]
    assert "| f32 | **failed** |" in text and "| bf16 | **skipped** |" in text


def test_the_settings_state_the_timing_budget_and_the_weights(tmp_path, monkeypatch):
    """Every budget figure where it belongs; with --rounds 1 vs eager is the medians' ratio, not the rounds'."""
    from leanvit.bench.timing import TimingBudget

    budget = TimingBudget(warmup_s=0.25, warmup_iters=4, budget_s=1.5, min_iters=7, max_iters=300)
    text = _report(tmp_path, monkeypatch, [measured("eager")], budget=budget, rounds=1, pretrained=True)
    assert ("- protocol: per configuration, warm-up ≥ 0.25 s and ≥ 4 calls, then single calls timed for 1.5 s in "
            "all (≥ 7, ≤ 300 calls); ") in text
    assert "*vs eager* is eager's median latency over the row's" in text and "median over the rounds" not in text
    assert "weights: pretrained" in text
    assert "weights: random init" in _report(tmp_path, monkeypatch, [measured("eager")], pretrained=False)


def test_the_host_lines_give_gpu_os_python_versions_and_an_undated_load():
    lines = report.host_lines({**HOST, "gpu": "H200", "os": "Linux 6.1", "python": "3.11.9",
                               "versions": {"torch": "2.5.0", "timm": "1.0.11"}, "loadavg": [1.5, 1.0, 0.5]})
    assert "- GPU: H200" in lines and "- OS: Linux 6.1, Python 3.11.9" in lines
    assert "- Versions: torch 2.5.0, timm 1.0.11" in lines
    assert "- load average (1, 5, 15 min) at the time the host was recorded: 1.5, 1.0, 0.5" in lines


def test_a_cpu_run_names_only_the_engines_that_ran_on_the_gpu(tmp_path, monkeypatch):
    """An engine that reports no device ran where it was asked to; one on the CPU in a CPU run is no exception."""
    rows = [measured("eager", engine_info={"device": "cpu"}), measured("onnxruntime", engine_info={}),
            measured("tensorrt", engine_info={"device": "cuda"})]
    text = _report(tmp_path, monkeypatch, rows, device="cpu")
    assert "- device: cpu (GPU-only engines on the GPU: tensorrt)\n" in text
    text = _report(tmp_path, monkeypatch, rows, device="cuda")  # in a GPU run, the GPU is no exception
    assert "- device: cuda (CPU-only engines on the CPU: eager)\n" in text


def test_the_correctness_note_gives_the_tolerances_and_points_to_the_failures(tmp_path, monkeypatch):
    """REDUCED_PRECISION_RTOL is a fraction of the largest logit: 0.1 is 10 %."""
    from leanvit.deploy.engine import REDUCED_PRECISION_RTOL

    text = _report(tmp_path, monkeypatch, [measured("eager"), measured("openvino", error="boom")])
    assert f"max abs error ≤ {round(REDUCED_PRECISION_RTOL * 100, 6):g} % of the largest logit)" in text
    assert "in the 1 configurations that ran" in text and "the failed ones are listed below." in text


def test_a_row_without_an_eager_row_has_no_speed_up(tmp_path, monkeypatch):
    assert _vs_eager_column(_report(tmp_path, monkeypatch, [measured("openvino")])) == ["–"]


def test_a_reduced_precision_variant_is_compared_with_the_unreduced_model_at_that_precision(tmp_path, monkeypatch):
    """The bf16 variant at 1 ms against the bf16 model at 2 ms is 2x (against the f32 model's 4 ms: 4x)."""
    rows = [measured("eager", latency_ms_median=4.0, latency_ms_rounds=(4.0, 4.0, 4.0), macs=1e9),
            measured("eager", precision="bf16", latency_ms_median=2.0, latency_ms_rounds=(2.0, 2.0, 2.0), macs=1e9),
            measured("eager", precision="bf16", variant="evit:0.7", latency_ms_median=1.0,
                     latency_ms_rounds=(1.0, 1.0, 1.0), macs=7e8)]
    text = _report(tmp_path, monkeypatch, rows, precisions=["f32", "bf16"], tokens=["evit:0.7"], rounds=3)
    assert "| evit:0.7 | eager | bf16 | 0.700 | 30.0% | 1.00 | 50.0% | 2.00× |" in text


def test_results_json_keeps_the_host_and_config_and_the_csv_leaves_out_engine_info(tmp_path, monkeypatch):
    """engine_info is a nested dict: it has no place in a CSV cell (it is in the JSON rows)."""
    _report(tmp_path, monkeypatch, [measured("eager")], batch=3)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["host"] == HOST and doc["config"]["batch"] == 3
    assert doc["rows"][0]["engine_info"] == {"device": "cuda"}
    with (tmp_path / "results.csv").open() as f:
        header = next(csv.reader(f))
    assert "engine_info" not in header and {"model", "engine", "latency_ms_median"} <= set(header)


def test_one_plotted_point_makes_no_front_and_latency_is_on_a_log_axis(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report.plot_pareto([measured("eager", published_top1=72.2)], tmp_path / "p.png")
    (ax,) = figures[0].axes
    assert not [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    assert ax.get_xscale() == "log"
    plt.close(figures[0])
