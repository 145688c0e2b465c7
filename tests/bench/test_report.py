"""What report.md and the plot say about the run beside the rows."""
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
