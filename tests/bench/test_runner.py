"""What a bench row claims beside its measurements, and which failures a bench survives."""
import pytest

from leanvit.bench import BenchConfig, TimingBudget, run_bench, time_alternating
from leanvit.host import usable_cpus
from leanvit.bench.runner import published_top1
from leanvit.catalog import find_facts
from leanvit.errors import InputSizeError, LeanvitError, LeanvitWarning
from leanvit.profile import create_model_at


def test_published_top1_only_where_it_describes_the_row():
    name = "deit_tiny_patch16_224"
    facts = find_facts(name)
    assert published_top1(facts, name, facts.img_size, "") == facts.top1
    assert published_top1(facts, name, 32, "") is None  # the model at another --img-size
    assert published_top1(facts, name, facts.img_size, "evit:0.7") is None  # a token-reduced variant
    assert published_top1(None, name, 224, "") is None  # a model the catalog does not know


@pytest.mark.parametrize("name, top1", [("nextvit_small", 82.5), ("nextvit_small.bd_ssld_6m_in1k", 84.8),
                                        ("tiny_vit_5m_224.in1k", 79.1), ("tiny_vit_5m_224.dist_in22k_ft_in1k", 80.7),
                                        ("efficientformer_l1.snap_dist_in1k", 80.2)])
def test_a_tag_trained_otherwise_gets_its_own_published_top1(name, top1):
    """Facts are found by architecture: every 1000-class tag got the one top-1 (Next-ViT's SSLD weights 82.5 for
    84.8, TinyViT's 1k-only ones 80.7 for 79.1)."""
    facts = find_facts(name)
    assert published_top1(facts, name, facts.img_size, "") == top1


def tiny_bench(**kwargs) -> BenchConfig:
    """A bench that takes seconds: tiny models at 32x32, a few timed calls, one thread."""
    settings = dict(models=["mobilenetv2_050"], engines=["eager"], img_size=32, threads=1, n_check=2,
                    budget=TimingBudget(warmup_s=0, warmup_iters=1, budget_s=0, min_iters=2))
    return BenchConfig(**{**settings, **kwargs})


def test_a_model_that_cannot_be_built_is_a_failed_row_and_the_others_still_count(monkeypatch):
    """It aborted the run, throwing away the rows already measured (no report written)."""
    from leanvit.bench import runner

    def create(name, img_size, **kwargs):
        if name == "resnet10t":
            raise InputSizeError(f"{name} does not run at {img_size}x{img_size}; it takes 224x224 inputs (test).")
        return create_model_at(name, img_size, **kwargs)

    monkeypatch.setattr(runner, "create_model_at", create)
    rows = run_bench(tiny_bench(models=["mobilenetv2_050", "resnet10t"], precisions=["f32", "bf16"]), progress=False)
    assert [(r.model, r.precision, r.ran) for r in rows] == [
        ("mobilenetv2_050", "f32", True), ("mobilenetv2_050", "bf16", True),
        ("resnet10t", "f32", False), ("resnet10t", "bf16", False)]
    assert "does not run at 32x32" in rows[-1].error and rows[-1].img_size == 32


def test_an_engine_that_refuses_a_configuration_is_a_failed_row(monkeypatch):
    from leanvit.deploy import ov

    monkeypatch.setattr(ov, "cpu_supports_bf16", lambda: False)
    rows = run_bench(tiny_bench(engines=["eager", "openvino"], precisions=["bf16"]), progress=False)
    assert [r.engine for r in rows] == ["eager", "openvino"] and rows[0].ran
    assert "OpenVINO bf16 needs a CPU with AVX-512 BF16 or AMX" in rows[1].error


def test_whole_run_errors_stay_fatal_and_up_front():
    with pytest.raises(LeanvitError, match="Unknown engine"):
        run_bench(tiny_bench(engines=["eager", "onnxrt"]), progress=False)
    with pytest.raises(LeanvitError, match="Unknown model"):
        run_bench(tiny_bench(models=["mobilenetv2_050", "no_such_model"]), progress=False)


def test_more_threads_than_cpus_warns_and_rows_record_what_the_engines_report():
    """``--threads 8`` on 2 CPUs: OpenVINO silently ran 2, the others 8, and every row said 8."""
    asked = usable_cpus() + 1
    with pytest.warns(UserWarning, match=f"--threads {asked} is more than the {usable_cpus()} CPUs"):
        rows = run_bench(tiny_bench(engines=["eager", "onnxruntime", "openvino"], threads=asked), progress=False)
    eager, ort, ov = rows
    assert all(r.threads == asked for r in rows)  # asked for
    assert eager.threads_used == asked  # torch runs what it is told
    assert ort.threads_used is None  # ONNX Runtime does not say
    assert ov.threads_used == ov.engine_info["threads"] <= asked  # OpenVINO's read-back


def test_peak_memory_is_the_running_engines_not_its_export(monkeypatch, heap_leftovers):
    """The high-water mark was reset before the engine loaded, so a row's peak held the exporter's (cache miss); reset
    after it, the peak still held what the exporter freed but glibc kept resident (the reset takes the counter to the
    resident set, not to zero): 100 MiB of a resnet10t row on ONNX Runtime, depending on the cache."""
    from leanvit.bench import runner
    from leanvit.deploy.pytorch import EagerEngine

    load = EagerEngine.load

    def exporting_load(self, model, example, **kwargs):
        heap_leftovers(400)  # 400 MiB used while "exporting", freed before timing, resident
        return load(self, model, example, **kwargs)

    if not runner.reset_peak_rss():
        pytest.skip("this OS cannot reset the peak-RSS counter")
    before = runner.peak_rss_mb()
    monkeypatch.setattr(EagerEngine, "load", exporting_load)
    row, = run_bench(tiny_bench(), progress=False)
    assert row.peak_rss_mb < before + 300
    assert row.rss_baseline_mb <= row.peak_rss_mb < row.rss_baseline_mb + 100
    assert row.peak_rss_above_baseline_mb == row.peak_rss_mb - row.rss_baseline_mb


def test_a_gpu_only_engine_in_a_cpu_run_is_recorded_and_reported_on_its_gpu(monkeypatch, tmp_path):
    """TensorRT in a bench on the default ``--device cpu`` ran on the GPU while its row and the report said "cpu".
    A stand-in GPU-only engine (it runs eager on the CPU: there is no GPU here) takes its place."""
    from leanvit.bench import report
    from leanvit.deploy import engine
    from leanvit.deploy.pytorch import EagerEngine

    class GpuOnly(engine.Engine):
        name, package, devices = "gpu_only", "torch", ("cuda",)

        def load(self, model, example, **kwargs):
            return EagerEngine(threads=self.threads).load(model, example)

    monkeypatch.setitem(engine._ENGINES, "gpu_only", GpuOnly)
    cfg = tiny_bench(engines=["eager", "gpu_only"])
    rows = run_bench(cfg, progress=False)
    assert [r.engine_info["device"] for r in rows] == ["cpu", "cuda"]
    monkeypatch.setattr(report, "plot_pareto", lambda *args, **kwargs: None)
    text = report.write_results(rows, cfg, {}, tmp_path)["md"].read_text()
    assert "- device: cpu (GPU-only engines on the GPU: gpu_only)" in text


def test_an_unwritable_export_cache_fails_the_run_up_front_in_one_line(tmp_path, capsys, monkeypatch):
    """``--cache-dir /proc/cache`` (or under a file) printed a traceback per exporting row and exited 1."""
    from leanvit.cli import main

    afile = tmp_path / "afile"
    afile.write_text("")
    args = ["bench", "mobilenetv2_050", "--img-size", "32", "--engines", "eager", "onnxruntime", "--threads", "1",
            "--no-progress", "--out", str(tmp_path / "out")]
    assert main([*args, "--cache-dir", str(afile / "x")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "FAILED" not in err
    assert (f"leanvit bench: error: Cannot cache exports in {afile / 'x'} ({afile} is a file): point --cache-dir at a "
            "directory you can write to.") in err.splitlines()
    assert not (tmp_path / "out").exists()  # before anything is measured or written
    monkeypatch.setenv("LEANVIT_CACHE", str(afile))
    with pytest.raises(LeanvitError, match="point LEANVIT_CACHE"):
        run_bench(tiny_bench(engines=["onnxruntime"]), progress=False)
    assert run_bench(tiny_bench(engines=["eager"]), progress=False)[0].ran  # eager exports nothing: no cache needed


def test_a_read_only_export_cache_is_a_warning_and_its_exports_run(tmp_path, monkeypatch):
    """A read-only cache refused the whole run, though it may hold every export the run needs: its rows run, a
    row it lacks fails with the reason, and one warning says so up front."""
    from leanvit.deploy import export
    from leanvit.bench import runner

    monkeypatch.setenv("LEANVIT_CACHE", str(tmp_path))
    assert run_bench(tiny_bench(engines=["onnxruntime"]), progress=False)[0].ran  # fills the cache
    monkeypatch.setattr(export, "write_problem", lambda folder: "Read-only file system")  # (root writes anywhere)
    monkeypatch.setattr(runner, "check_export_dir", export.check_export_dir)
    with pytest.warns(UserWarning, match=r"\(Read-only file system\).*Exports already cached there are used"):
        rows = run_bench(tiny_bench(engines=["onnxruntime"], batch=2), progress=False)
    assert not rows[0].ran and "Read-only file system" in rows[0].error
    with pytest.warns(UserWarning, match="Exports already cached there are used"):
        assert run_bench(tiny_bench(engines=["onnxruntime"]), progress=False)[0].ran


def test_a_precision_an_engine_does_not_run_is_a_skipped_row_not_a_refused_run(tmp_path, capsys):
    """``leanvit bench --precision f32 bf16`` on the default engines refused the whole run: ONNX Runtime runs only
    f32. Every pair an engine runs is measured; the others are skipped rows, said once, in the report and the CSV."""
    import csv

    from leanvit.cli import main

    args = ["bench", "mobilenetv2_050", "--img-size", "32", "--engines", "eager", "onnxruntime", "--threads", "1",
            "--precision", "f32", "bf16", "--budget", "0.01", "--warmup", "0.01", "--no-progress",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    with pytest.warns(LeanvitWarning) as caught:
        assert main(args) == 0
    said = [str(w.message) for w in caught if "does not run bf16" in str(w.message)]
    assert said == ["onnxruntime does not run bf16 (it runs f32): those rows are skipped."]  # once
    out = capsys.readouterr().out
    table = [line.split()[:4] for line in out.splitlines()[1:]]
    assert [line[1:3] for line in table] == [["eager", "f32"], ["eager", "bf16"], ["onnxruntime", "f32"],
                                             ["onnxruntime", "bf16"]]
    assert table[3][3] == "skipped" and all(line[3] not in ("skipped", "FAILED") for line in table[:3])
    with (tmp_path / "out" / "results.csv").open() as f:
        rows = [(r["engine"], r["precision"], r["skipped"], r["error"]) for r in csv.DictReader(f)]
    assert rows[3] == ("onnxruntime", "bf16", "onnxruntime does not run bf16 (it runs f32)", "")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| mobilenetv2_050 | onnxruntime | bf16 | **skipped** |" in report
    assert "- mobilenetv2_050 on onnxruntime (bf16): onnxruntime does not run bf16 (it runs f32)" in report
    assert "in the 3 configurations that ran" in report and (tmp_path / "out" / "pareto.png").stat().st_size


def test_a_precision_no_chosen_engine_runs_still_refuses_the_run(monkeypatch):
    from leanvit.bench import runner

    with pytest.raises(LeanvitError, match=r"--precision fp16: none of the engines eager, onnxruntime runs it \(they "
                                           r"run f32, bf16\); engines for fp16: tensorrt\."):
        run_bench(tiny_bench(engines=["eager", "onnxruntime"], precisions=["f32", "fp16"]), progress=False)
    with pytest.raises(LeanvitError, match=r"--precision bf16: engine 'onnxruntime' does not run it \(it runs f32\)"):
        run_bench(tiny_bench(engines=["onnxruntime"], precisions=["bf16"]), progress=False)

    def create(name, img_size, **kwargs):  # a model that cannot be built: its unrunnable pairs stay skipped
        raise InputSizeError("cannot build (test).")

    monkeypatch.setattr(runner, "create_model_at", create)
    with pytest.warns(UserWarning, match="onnxruntime does not run bf16"):
        rows = run_bench(tiny_bench(engines=["eager", "onnxruntime"], precisions=["f32", "bf16"]), progress=False)
    assert [(r.error is not None, r.skipped is not None) for r in rows] == [(True, False)] * 3 + [(False, True)]


def test_a_models_engines_are_timed_side_by_side_in_alternating_rounds(monkeypatch):
    """Each row was timed in its own block, one after another, so its "vs eager" ratio folded in how the machine
    drifted between the blocks (the same eager row 92x apart in one run). A model's engines now share the rounds."""
    from leanvit.bench import runner

    calls, alternate = [], runner.time_alternating

    def recording(fns, budget, rounds):
        calls.append((list(fns), rounds))
        return alternate(fns, budget, rounds)

    monkeypatch.setattr(runner, "time_alternating", recording)
    rows = run_bench(tiny_bench(models=["mobilenetv2_050", "resnet10t"], engines=["eager", "onnxruntime"],
                                rounds=3), progress=False)
    assert calls == [([f"{m} eager f32", f"{m} onnxruntime f32"], 3) for m in ("mobilenetv2_050", "resnet10t")]
    # (one alternation per model, its two engines' rows)
    assert all(r.ran and len(r.latency_ms_rounds) == 3 and r.iterations % 3 == 0 for r in rows)


def test_an_engine_failing_while_timed_fails_its_row_and_the_others_are_timed(monkeypatch):
    from leanvit.deploy.ort import OrtRunner

    calls = []

    def flaky(self, x):
        calls.append(1)
        if len(calls) > 6:  # past the agreement check (2 calls), the memory pass (2) and a few timed calls
            raise RuntimeError("device lost (test)")
        return original(self, x)

    original = OrtRunner.__call__
    monkeypatch.setattr(OrtRunner, "__call__", flaky)
    eager, ort = run_bench(tiny_bench(engines=["eager", "onnxruntime"]), progress=False)
    assert len(calls) > 6 and eager.ran and eager.latency_ms_median > 0 and eager.latency_ms_rounds
    assert not ort.ran and "device lost (test)" in ort.error


@pytest.mark.parametrize("field, values", [("engines", ["eager", "eager"]), ("precisions", ["f32", "f32"]),
                                           ("models", ["resnet10t", "resnet10t"])])
def test_a_configuration_listed_twice_is_refused(field, values):
    """Two rows of one configuration, and "vs eager" taken from whichever eager row came last."""
    with pytest.raises(LeanvitError, match="more than once"):
        tiny_bench(**{field: values}).validate()


def test_a_reduced_precision_row_gets_no_published_top1():
    """The paper measured the f32 model: a bf16 row plotted at its top-1 claimed an accuracy no one measured."""
    name = "deit_tiny_patch16_224"
    facts = find_facts(name)
    assert published_top1(facts, name, facts.img_size, "", "bf16") is None
    assert published_top1(facts, name, facts.img_size, "", "f32") == facts.top1


def test_token_variants_share_their_models_rounds_and_the_model_as_built_stays_unreduced(monkeypatch):
    """Each variant was timed in its own block, and it patched the one model in place: its speed-up came from two
    blocks' pooled medians. A model's variants are now timed in its rounds, each on its own copy."""
    from leanvit.bench import runner
    from leanvit.compress import tokens

    loads, alternations, load = [], [], runner._load
    monkeypatch.setattr(runner, "_load",
                        lambda row, model, *a: loads.append((row.variant, model)) or load(row, model, *a))
    monkeypatch.setattr(runner, "time_alternating", lambda fns, budget, rounds: alternations.append(
        [(v, tokens.applied(m)) for v, m in loads]) or time_alternating(fns, budget, rounds))
    rows = run_bench(tiny_bench(models=["deit_tiny_patch16_224"], tokens=["evit:0.5", "tome:1x1"], rounds=2),
                     progress=False)
    assert [r.variant for r in rows] == ["", "evit:0.5", "tome:1x1"]
    assert all(len(r.latency_ms_rounds) == 2 for r in rows)
    weights = {id(p) for _, model in loads for p in model.parameters()}
    assert len(weights) == len(list(loads[0][1].parameters()))  # the copies share the weights (memory per variant)
    (timed,) = alternations  # one alternation, all three rows, the model as built still unreduced in it
    assert [(v, type(m).__name__ if m else None) for v, m in timed] == [("", None), ("evit:0.5", "EViT"),
                                                                      ("tome:1x1", "ToMe")]


def test_a_rows_statistics_are_its_timings(monkeypatch):
    """Each figure of a row from its timed calls: median, p90 and p99 in their places, throughput in images (the
    batch's) per second, the rounds' medians kept for the report's per-round ratios."""
    import numpy as np

    from leanvit.bench import runner
    from leanvit.bench.timing import Timing

    samples = np.arange(1.0, 101.0)  # 1..100 ms: p90 90.1, p99 99.01
    monkeypatch.setattr(runner, "time_alternating", lambda fns, budget, rounds: {
        key: Timing(samples, (10.0, 20.0)) for key in fns})
    [row] = run_bench(tiny_bench(batch=2, rounds=2), progress=False)
    assert (row.latency_ms_median, row.latency_ms_p90, row.latency_ms_p99) == pytest.approx((50.5, 90.1, 99.01))
    assert (row.latency_ms_min, row.latency_ms_mean, row.iterations) == (1.0, 50.5, 100)
    assert row.throughput == pytest.approx(2 * 1000 / 50.5)
    assert row.latency_ms_rounds == (10.0, 20.0)


@pytest.mark.parametrize("settings, match", [
    (dict(tokens=["evit:0.7", "evit:0.7"]), "--tokens lists evit:0.7 more than once"),
    (dict(models=[]), "no models to benchmark"),
    (dict(tokens=["evit"]), "Token spec 'evit' has no value"),
    (dict(rounds=0), "--rounds"),
])
def test_a_bad_setting_is_refused_before_anything_runs(settings, match):
    """A token spec that cannot be read was a skipped row per model ("does not apply"), not a mistake named."""
    with pytest.raises(LeanvitError, match=match):
        tiny_bench(**settings).validate()


def test_an_unwritable_cache_is_refused_whichever_engine_comes_last(tmp_path):
    """The exporting engine first, eager last: the check ran only where the last engine exported."""
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(LeanvitError, match="point --cache-dir at a directory"):
        tiny_bench(engines=["onnxruntime", "eager"], cache_dir=str(afile / "x")).validate()


def test_as_many_threads_as_usable_cpus_is_no_warning(monkeypatch):
    import warnings

    from leanvit.bench import runner

    monkeypatch.setattr(runner, "usable_cpus", lambda: 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_bench(tiny_bench(threads=1), progress=False)[0].ran
    assert not [w for w in caught if "more than the" in str(w.message)]


def test_a_model_that_cannot_be_built_gets_a_row_per_variant_at_its_own_size(monkeypatch):
    """Without --img-size the failed rows give the model's pretrained size (resnet10t: 176), not 224."""
    from leanvit.bench import runner

    def create(name, img_size, **kwargs):
        raise InputSizeError("cannot build (test).")

    monkeypatch.setattr(runner, "create_model_at", create)
    rows = run_bench(tiny_bench(models=["resnet10t"], img_size=None, tokens=["evit:0.7"]), progress=False)
    assert [(r.variant, r.img_size, r.error) for r in rows] == [("", 176, "cannot build (test)."),
                                                                 ("evit:0.7", 176, "cannot build (test).")]


def test_the_engines_get_the_batch_and_the_checked_images_at_the_models_size(monkeypatch):
    """Without --img-size a model runs at its pretrained size (resnet10t: 176); the engine is loaded and timed on a
    batch of --batch images and checked on n_check of them in whole batches (5 at batch 2: 3 batches)."""
    from leanvit.bench import runner

    seen, check, load = [], runner.check_agreement, runner._load

    def checking(model, runner_, checks):
        seen.append([tuple(c.shape) for c in checks])
        return check(model, runner_, checks)

    def loading(row, model, x, *args):
        seen.append(tuple(x.shape))
        return load(row, model, x, *args)

    monkeypatch.setattr(runner, "check_agreement", checking)
    monkeypatch.setattr(runner, "_load", loading)
    [row] = run_bench(tiny_bench(models=["resnet10t"], img_size=None, batch=2, n_check=5), progress=False)
    assert row.ran and row.img_size == 176
    assert seen == [(2, 3, 176, 176), [(2, 3, 176, 176)] * 3]
    assert runner.checked_images(tiny_bench(n_check=0, batch=3)) == 3  # at least one batch


def test_a_variant_the_model_cannot_take_is_a_skipped_row(capsys):
    """EViT on a CNN: the variant's rows are skipped with the reason, and the model's own rows still run."""
    plain, variant = run_bench(tiny_bench(tokens=["evit:0.5"]), progress=False)
    assert plain.ran and plain.macs > 0
    assert variant.skipped.startswith("token reduction does not apply:") and variant.macs is None
    assert variant.latency_ms_median is None and "token reduction does not apply" in capsys.readouterr().err


def test_each_row_gets_its_own_variants_macs_and_the_papers_figures_where_they_describe_it(monkeypatch):
    """The variant's MACs are the reduced model's; published_top1 is asked with the row's own variant and
    precision; the paper's speed figure is the model's."""
    from dataclasses import replace

    from leanvit.bench import runner

    asked, published = [], runner.published_top1
    facts = replace(find_facts("deit_tiny_patch16_224"), speed="0.5 ms on a test GPU")
    monkeypatch.setattr(runner, "find_facts", lambda name: facts)
    monkeypatch.setattr(runner, "published_top1", lambda facts, name, size, variant, precision: asked.append(
        (variant, precision)) or published(facts, name, size, variant, precision))
    rows = run_bench(tiny_bench(models=["deit_tiny_patch16_224"], tokens=["evit:0.5"], precisions=["f32", "bf16"]),
                     progress=False)
    assert asked == [("", "f32"), ("", "bf16"), ("evit:0.5", "f32"), ("evit:0.5", "bf16")]
    assert rows[0].macs == rows[1].macs > rows[2].macs == rows[3].macs > 0
    assert [r.paper_speed for r in rows] == ["0.5 ms on a test GPU"] * 4


def test_a_row_records_the_precision_the_engine_ran_and_its_divergence(monkeypatch):
    """OpenVINO runs an f32 model in bf16 on an AMX CPU, unasked: the row says bf16. A runner whose logits are far
    from eager's is flagged as diverging."""
    from leanvit.bench import runner
    from leanvit.deploy import engine
    from leanvit.deploy.pytorch import EagerEngine

    class Silent(engine.Engine):
        name, package = "silent_bf16", "torch"

        def load(self, model, example, **kwargs):
            runner_ = EagerEngine(threads=self.threads).load(model, example)
            runner_.precision = "bf16"
            return runner_

    monkeypatch.setitem(engine._ENGINES, "silent_bf16", Silent)
    monkeypatch.setattr(runner, "check_agreement", lambda *args: engine.Agreement(0.5, 0.5, 2))
    eager, silent = run_bench(tiny_bench(engines=["eager", "silent_bf16"]), progress=False)
    assert (eager.precision, silent.precision) == ("f32", "bf16")
    assert eager.diverges and silent.diverges and silent.ran


def test_an_engine_failing_in_its_warm_up_fails_its_row_with_the_errors_type(monkeypatch):
    """The memory pass runs each engine first: one that raises there is a failed row without figures (named with
    its exception's type, not a leanvit error), the others are timed."""
    from leanvit.bench import runner

    load = runner._load

    def loading(row, *args):
        ran = load(row, *args)
        if row.precision == "f32":
            return ran

        def crashing(x):
            raise RuntimeError("warm-up crashed (test)")

        return crashing

    monkeypatch.setattr(runner, "_load", loading)
    f32, bf16 = run_bench(tiny_bench(precisions=["f32", "bf16"]), progress=False)
    assert f32.ran and f32.latency_ms_median > 0 and f32.peak_rss_mb is not None
    assert bf16.error == "RuntimeError: warm-up crashed (test)"
    assert bf16.peak_rss_mb is None and bf16.latency_ms_median is None and bf16.iterations == 0
    assert bf16.rss_baseline_mb is None  # (it kept the baseline read before its warm-up, without a peak)


def test_a_rows_mean_min_and_iqr_are_its_timings(monkeypatch):
    import numpy as np

    from leanvit.bench import runner
    from leanvit.bench.timing import Timing

    monkeypatch.setattr(runner, "time_alternating", lambda fns, budget, rounds: {
        key: Timing(np.array([5.0, 1.0, 9.0, 3.0, 100.0, 2.0]), (4.0,)) for key in fns})
    [row] = run_bench(tiny_bench(rounds=1), progress=False)
    assert (row.latency_ms_mean, row.latency_ms_min, row.latency_ms_median) == (20.0, 1.0, 4.0)
    assert row.latency_ms_iqr == pytest.approx(8.0 - 2.25)


def test_the_seed_fixes_the_weights_and_the_inputs(monkeypatch):
    """Two runs with one seed check and time the same model on the same images; another seed, others."""
    from leanvit.bench import runner

    seen, load = [], runner._load
    monkeypatch.setattr(runner, "_load", lambda row, model, x, checks, cfg: seen.append(
        (sum(float(p.detach().sum()) for p in model.parameters()), float(x.sum()), float(checks[0].sum())))
        or load(row, model, x, checks, cfg))
    for seed in (1, 1, 2):
        run_bench(tiny_bench(seed=seed), progress=False)
    assert seen[0] == seen[1]
    assert all(a != b for a, b in zip(seen[1], seen[2]))
