"""Every CPU engine's round trip on tiny models: export, load, run, agree with eager."""
from pathlib import Path

import numpy as np
import pytest
import torch

from leanvit.deploy import available_engines, cached_onnx, check_agreement, export_onnx, get_engine
from leanvit.deploy.engine import Agreement
from leanvit.deploy.export import DEFAULT_OPSET
from leanvit.errors import EngineUnavailableError, LeanvitError

CPU_ENGINES = ["eager", "onnxruntime", "openvino"]


@pytest.mark.parametrize("engine", CPU_ENGINES)
@pytest.mark.parametrize("model_fixture", ["tiny_vit", "tiny_cnn"])
def test_round_trip_agrees_with_eager(engine, model_fixture, request, tmp_path):
    model = request.getfixturevalue(model_fixture)
    size = 32 if model_fixture == "tiny_vit" else 64
    x = torch.randn(1, 3, size, size)
    runner = get_engine(engine, threads=1).load(model, x, cache_dir=tmp_path)
    assert runner.precision == "f32"
    agreement = check_agreement(model, runner, [torch.randn(1, 3, size, size) for _ in range(4)])
    assert agreement.top1_agreement == 1.0
    assert agreement.max_abs_err < 1e-4
    assert not agreement.diverges("f32")


@pytest.mark.slow
def test_torch_compile_engine(tiny_vit):
    x = torch.randn(1, 3, 32, 32)
    runner = get_engine("compile", threads=1).load(tiny_vit, x)
    assert check_agreement(tiny_vit, runner, [x]).max_abs_err < 1e-4


def test_openvino_reports_the_precision_it_runs(tiny_vit, tmp_path):
    """load() compiles the cached IR (converted once, not the ONNX file on every load) with one stream for latency,
    at the thread count and precision asked (bf16 asked of the CPU plugin as bf16: read back on a CPU that has it)."""
    import importlib.metadata

    from leanvit.deploy.ov import OpenVinoEngine

    runner = get_engine("openvino", threads=1, precision="f32").load(tiny_vit, torch.randn(1, 3, 32, 32), cache_dir=tmp_path)
    assert runner.info["inference_precision"] == "f32"
    assert runner.info["threads"] == 1 and runner.info["num_streams"] == "1"
    assert Path(runner.info["model_file"]).name == f"model-ov{importlib.metadata.version('openvino')}.xml"
    assert OpenVinoEngine(threads=3, precision="bf16").compile_config() == {
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": 3, "INFERENCE_PRECISION_HINT": "bf16"}


def test_openvino_bf16_needs_a_cpu_with_bf16(monkeypatch):
    """Without AVX-512 BF16 / AMX, bf16 is refused before compiling, naming what the CPU lacks (OpenVINO itself would
    run such a model in f32 under a bf16 row); the CPU's capabilities are read from the plugin (stubbed here)."""
    from leanvit.deploy import ov

    capabilities = []

    class Core:
        def get_property(self, device, key):
            assert (device, key) == ("CPU", "OPTIMIZATION_CAPABILITIES")
            return capabilities

    monkeypatch.setattr(ov, "openvino_core", Core)
    capabilities[:] = ["FP32", "FP16", "INT8", "BIN", "EXPORT_IMPORT"]
    assert not ov.cpu_supports_bf16()
    with pytest.raises(LeanvitError, match="OpenVINO bf16 needs a CPU with AVX-512 BF16 or AMX; this one has neither"):
        get_engine("openvino", threads=1, precision="bf16").load_model_file("never-read.xml")
    capabilities.append("BF16")
    assert ov.cpu_supports_bf16()


def test_openvino_runners_precision_is_the_one_the_compiled_model_uses(tiny_cnn, tmp_path, monkeypatch):
    """The runner (and a bench row) says what OpenVINO runs, read back from the compiled model, not what was
    asked: here a compiled model that reports bf16 for an f32 request."""
    from leanvit.deploy import ov

    class ReportsBf16:
        def __init__(self, compiled):
            self.compiled = compiled

        def get_property(self, key):
            return reported if key == "INFERENCE_PRECISION_HINT" else self.compiled.get_property(key)

        def __getattr__(self, name):  # everything else the real compiled model's
            return getattr(self.compiled, name)

    real, reported = ov.openvino_core(), "bf16"

    class Core:
        def compile_model(self, *args):
            return ReportsBf16(real.compile_model(*args))

    path = export_onnx(tiny_cnn, torch.randn(1, 3, 32, 32), tmp_path / "cnn.onnx")
    monkeypatch.setattr(ov, "openvino_core", Core)
    runner = get_engine("openvino", threads=1, precision="f32").load_model_file(path)
    assert runner.precision == "bf16" and runner.info["inference_precision"] == "bf16"
    reported = "f16"  # (ARM CPUs run f16): named as leanvit names it, fp16
    runner = get_engine("openvino", threads=1, precision="f32").load_model_file(path)
    assert runner.precision == "fp16" and runner.info["inference_precision"] == "f16"


def test_eager_runs_in_eval_mode_and_bf16_under_autocast():
    """The eager reference every engine is checked against runs the model in eval mode (a model handed over in
    training mode ran its dropout), and ``--precision bf16`` runs it under bf16 autocast (without it, a row labelled
    bf16 timed f32); the logits come back float32."""
    nn = torch.nn

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop, self.seen = nn.Dropout(0.5), []

        def forward(self, x):
            self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return self.drop(x)

    x = torch.randn(2, 8)
    model = Probe().train()
    runner = get_engine("eager", threads=1).load(model, x)
    np.testing.assert_array_equal(runner(x.numpy()), x.numpy())
    assert model.seen[-1][0] is False
    bf16 = get_engine("eager", threads=1, precision="bf16").load(model, x)
    assert bf16(x.numpy()).dtype == np.float32 and model.seen[-1] == (True, torch.bfloat16)
    linear = nn.Linear(8, 4)  # computes in bf16 under autocast: NumPy has no bf16, so the runner converts
    out = get_engine("eager", threads=1, precision="bf16").load(linear, x)(x.numpy())
    assert out.dtype == np.float32 and np.allclose(out, linear(x).detach().numpy(), atol=0.05)


def test_onnxruntime_on_cuda_puts_the_cuda_provider_first(monkeypatch):
    """Listed second, every node would run on the CPU provider; without onnxruntime-gpu the error says so. On the CPU
    it is the CPU provider alone, even where onnxruntime-gpu offers CUDA (a CPU row must not run on the GPU)."""
    import onnxruntime

    from leanvit.deploy.ort import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine.__new__(OnnxRuntimeEngine)
    engine.device = "cuda"
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CPUExecutionProvider", "CUDAExecutionProvider"])
    assert engine.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert get_engine("onnxruntime", threads=1).providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(EngineUnavailableError, match="pip install onnxruntime-gpu"):
        engine.providers()


def test_onnxruntime_runs_the_threads_it_is_given(tiny_cnn, tmp_path, monkeypatch):
    """Latency is measured at a thread count (ONNX Runtime's default would take every core), one operator at a time
    on those threads, with every graph optimisation on."""
    import onnxruntime

    given, session = [], onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda path, opts, **kw: given.append(opts) or session(
        path, opts, **kw))
    path = export_onnx(tiny_cnn, torch.randn(1, 3, 32, 32), tmp_path / "cnn.onnx")
    get_engine("onnxruntime", threads=2).load_onnx(path)
    [options] = given
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_openvino_copies_the_logits_once_and_they_do_not_alias_its_buffer(tiny_vit, tmp_path, monkeypatch):
    """OpenVINO's outputs are not copied into a dict first (``share_outputs``), the one copy returned is the
    caller's (the next call does not change it), every input gives what ``infer()``'s dispatcher gave, and a
    float32 C-contiguous writeable batch is handed over as it is (no copy)."""
    x = torch.randn(2, 3, 32, 32)
    runner = get_engine("openvino", threads=1).load_model_file(
        export_onnx(tiny_vit, x[:1], tmp_path / "m.onnx", dynamic_batch=True))
    request, calls = runner.request, []

    class Spy:
        def infer(self, *args, **kwargs):
            calls.append(kwargs)
            return request.infer(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(request, name)

    runner.request = Spy()
    first = runner(x[:1].numpy())
    kept = first.copy()
    second = runner(x[1:].numpy())
    np.testing.assert_array_equal(first, kept)  # not a view of the buffer the second call wrote
    assert not np.array_equal(first, second) and not np.shares_memory(first, second)
    assert calls and all(kwargs.get("share_outputs") for kwargs in calls)
    runner.request = request
    expected = runner.compiled.create_infer_request().infer({0: x.numpy()})[0]  # through the dispatcher, as before
    read_only = x.numpy().copy()
    read_only.flags.writeable = False
    nhwc = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # not C-contiguous
    for given in (x.numpy(), x.numpy().astype(np.float64), read_only, nhwc):
        np.testing.assert_array_equal(runner(given), expected)
    np.testing.assert_array_equal(runner(x[:1].numpy()), kept)  # a batch of 1 after a batch of 2
    import openvino

    tensors, tensor = [], openvino.Tensor
    monkeypatch.setattr(openvino, "Tensor", lambda array, **kwargs: tensors.append(array) or tensor(array, **kwargs))
    batch = x.numpy()
    np.testing.assert_array_equal(runner(batch), expected)
    assert tensors[-1] is batch


def test_export_is_cached_by_weights_and_shape(tiny_vit, tmp_path):
    x = torch.randn(1, 3, 32, 32)
    first = cached_onnx(tiny_vit, x, cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cached_onnx(tiny_vit, x, cache_dir=tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == ["model.onnx"]  # one file, weights inside
    assert cached_onnx(tiny_vit, torch.randn(2, 3, 32, 32), cache_dir=tmp_path) != first
    changed = type(tiny_vit)(img_size=32, patch_size=8, depth=2, num_classes=10, embed_dim=192, num_heads=3).eval()
    assert cached_onnx(changed, x, cache_dir=tmp_path) != first  # new weights, new export


def test_dynamic_batch_export_runs_any_batch(tiny_cnn, tmp_path):
    path = export_onnx(tiny_cnn, torch.randn(1, 3, 64, 64), tmp_path / "m.onnx", dynamic_batch=True)
    runner = get_engine("onnxruntime", threads=1).load_onnx(path)
    x = torch.randn(5, 3, 64, 64)
    np.testing.assert_allclose(runner(x.numpy()), tiny_cnn(x).detach().numpy(), atol=1e-4)


def test_onnxruntime_profiles_each_kernel_on_request(tiny_cnn, tmp_path):
    """``profile=True``: the session records every kernel's time (what ``benchmarks/ptq.py --profile`` sums)."""
    import json
    import tempfile

    path = export_onnx(tiny_cnn, torch.randn(1, 3, 64, 64), tmp_path / "m.onnx")
    engine = get_engine("onnxruntime", threads=1)
    assert not engine.load_onnx(path).session.get_session_options().enable_profiling
    runner = engine.load_onnx(path, profile=True)
    runner(torch.randn(1, 3, 64, 64).numpy())
    trace_file = Path(runner.session.end_profiling())
    assert trace_file.parent == Path(tempfile.gettempdir())  # not the working directory
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    ops = {event["args"]["op_name"] for event in trace if event.get("cat") == "Node"}
    assert "Conv" in ops or "FusedConv" in ops, ops


def test_divergence_is_detected(tiny_vit):
    class Wrong:
        precision, info = "f32", {}

        def __call__(self, x):
            return -tiny_vit(torch.from_numpy(x)).detach().numpy()

    agreement = check_agreement(tiny_vit, Wrong(), [torch.randn(4, 3, 32, 32)])
    assert agreement.diverges("f32") and agreement.top1_agreement < 1.0
    # f32 within 1e-3 of the logits' scale, every top-1 the same
    assert Agreement(5e-3, 1.0, 8, ref_scale=1.0).diverges("f32")
    assert not Agreement(5e-4, 1.0, 8, ref_scale=1.0).diverges("f32")
    assert not Agreement(5e-3, 1.0, 8, ref_scale=10.0).diverges("f32")
    assert not Agreement(5e-4, 1.0, 8, ref_scale=0.01).diverges("f32")  # tiny logits: 1e-3 absolute, not of their scale


def test_missing_engine_names_the_package(monkeypatch):
    from leanvit.deploy.trt import TensorRTEngine

    from leanvit.deploy.ov import OpenVinoEngine

    monkeypatch.setattr(TensorRTEngine, "is_available", classmethod(lambda cls: False))
    with pytest.raises(EngineUnavailableError, match=r"pip install tensorrt  \(or: pip install 'leanvit\[gpu\]'\)$"):
        get_engine("tensorrt")
    assert "tensorrt" not in available_engines()
    monkeypatch.setattr(OpenVinoEngine, "is_available", classmethod(lambda cls: False))
    with pytest.raises(EngineUnavailableError, match="^Engine 'openvino' needs the 'openvino' package: pip install "
                                                     "openvino$"):  # (the [gpu] extra is TensorRT's alone)
        get_engine("openvino")


def test_unknown_engine_and_bad_settings():
    """A misspelt engine gets the likely name; an engine refuses a precision it has no path for (ONNX Runtime in
    bf16 would run f32 in a row labelled bf16), and a name leanvit does not know runs no precision and is left on
    the device asked."""
    from leanvit.deploy import engine_device, engine_precisions

    with pytest.raises(LeanvitError, match=r"Unknown engine 'openvin'. Did you mean: openvino\? Engines: "):
        get_engine("openvin")
    with pytest.raises(LeanvitError, match="threads"):
        get_engine("eager", threads=0)
    with pytest.raises(LeanvitError, match="precisions"):
        get_engine("onnxruntime", precision="int3")
    with pytest.raises(LeanvitError, match="engine 'onnxruntime' runs precisions f32; got 'bf16'"):
        get_engine("onnxruntime", precision="bf16")
    assert engine_precisions("onnxruntime") == ("f32",) and engine_precisions("openvino") == ("f32", "bf16")
    assert engine_precisions("nope") == () and engine_device("nope", "cuda:1") == "cuda:1"


def test_opset_below_17_is_refused(tiny_cnn, tmp_path):
    """17, the first opset with LayerNormalization, is the lowest accepted."""
    import onnx

    with pytest.raises(LeanvitError, match="opset must be >= 17 .*got 16"):
        export_onnx(tiny_cnn, torch.randn(1, 3, 64, 64), tmp_path / "m.onnx", opset=16)
    path = export_onnx(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", opset=17)
    assert onnx.load(str(path)).opset_import[0].version == 17


def test_export_runs_the_model_in_eval_mode_and_puts_its_modes_back(tmp_path):
    """A model handed over in training mode is exported as it infers (BatchNorm's running statistics, a module's own
    ``if self.training`` branch not taken: timm's drop path, leanvit's token reduction), and comes back in the mode
    each of its modules had."""
    nn = torch.nn

    class DoublesInTraining(nn.Module):
        def forward(self, x):
            return x * 2 if self.training else x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), DoublesInTraining(), nn.Flatten(), nn.Linear(144, 5))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    model[3].eval()
    x = torch.randn(2, 3, 8, 8)
    runner = get_engine("onnxruntime", threads=1).load_onnx(export_onnx(model, x, tmp_path / "m.onnx"))
    assert [m.training for m in model] == [True, True, True, False, True]
    np.testing.assert_allclose(runner(x.numpy()), model.eval()(x).detach().numpy(), atol=1e-5)


def test_a_model_torch_export_cannot_trace_falls_back_to_the_torchscript_exporter(tiny_cnn, tmp_path, monkeypatch):
    """The fallback says why, and writes a file that runs, with a dynamic batch (input and logits) where asked."""
    import onnx

    from leanvit.deploy import export
    from leanvit.errors import LeanvitWarning

    def cannot_trace(*args):
        raise RuntimeError("data-dependent control flow\nmore detail")

    monkeypatch.setattr(export, "_export_dynamo", cannot_trace)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 5)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(LeanvitWarning, match=r"torch.export-based ONNX export failed for Sequential \(RuntimeError: "
                                            r"data-dependent control flow\); using the TorchScript exporter"):
        path = export_onnx(model, x, tmp_path / "m.onnx")
    np.testing.assert_allclose(get_engine("onnxruntime", threads=1).load_onnx(path)(x.numpy()),
                               model(x).detach().numpy(), atol=1e-5)
    with pytest.warns(LeanvitWarning):
        path = export_onnx(model, x, tmp_path / "dynamic.onnx", dynamic_batch=True)
    graph = onnx.load(str(path)).graph
    assert [t.type.tensor_type.shape.dim[0].dim_param for t in (*graph.input, *graph.output)] == ["batch", "batch"]
    x = torch.randn(3, 3, 8, 8)
    np.testing.assert_allclose(get_engine("onnxruntime", threads=1).load_onnx(path)(x.numpy()),
                               model(x).detach().numpy(), atol=1e-5)


def test_an_interrupted_export_leaves_nothing_in_the_cache(tmp_path):
    """An export is written beside its place and moved there whole: one that fails half-way (Ctrl-C, a full disk)
    must not leave a file that the next run takes for a finished export."""
    from leanvit.deploy.export import cached_file

    def write(content):
        def write(path):  # (as export_onnx: the key's folder made by the writer)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            if content.startswith(b"half"):
                raise KeyboardInterrupt
        return write

    with pytest.raises(KeyboardInterrupt):
        cached_file("k", write(b"half an onnx file"), cache_dir=tmp_path)
    assert not (tmp_path / "k" / "model.onnx").exists()
    path = cached_file("k", write(b"whole"), cache_dir=tmp_path)
    assert path == tmp_path / "k" / "model.onnx" and path.read_bytes() == b"whole"


def test_gelu_runs_as_one_kernel_on_onnxruntime(tiny_vit, tmp_path):
    """At the default opset GELU is ONNX's Gelu op; written as Div/Erf/Add/Mul/Mul, ONNX Runtime runs 5 kernels."""
    import onnx

    path = export_onnx(tiny_vit, torch.randn(1, 3, 32, 32), tmp_path / "vit.onnx")
    optimized = tmp_path / "optimized.onnx"
    runner = get_engine("onnxruntime", threads=1).load_onnx(path, optimized_path=optimized)
    assert runner.info["opset"] == DEFAULT_OPSET == 20  # recorded with every ORT measurement
    assert "disabled_optimizers" not in runner.info  # a float model keeps every fusion (only QDQ models lose one)
    ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    gelus = sum(isinstance(m, torch.nn.GELU) for m in tiny_vit.modules())
    assert gelus and ops.count("Gelu") == gelus and "Erf" not in ops


def test_export_key_sees_token_reduction(tiny_vit, tmp_path):
    import copy

    import leanvit.tokens as tokens

    x = torch.randn(1, 3, 32, 32)
    reduced = copy.deepcopy(tiny_vit)
    tokens.apply(reduced, tokens.ToMe(r=2))
    assert cached_onnx(reduced, x, cache_dir=tmp_path) != cached_onnx(tiny_vit, x, cache_dir=tmp_path)


def test_the_export_cache_keeps_one_file_per_opset_and_batch_mode(tmp_path):
    """TensorRT exports at opset 18 through the same cache as ONNX Runtime and OpenVINO at 20, and a dynamic-batch
    export is another graph: each gets its own file, written as asked."""
    import onnx

    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    x = torch.randn(1, 3, 32, 32)
    files = {(opset, dynamic): cached_onnx(model, x, cache_dir=tmp_path, opset=opset, dynamic_batch=dynamic)
             for opset in (18, 20) for dynamic in (False, True)}
    assert len(set(files.values())) == 4
    for (opset, dynamic), path in files.items():
        graph = onnx.load(path)
        assert graph.opset_import[0].version == opset
        assert bool(graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param) == dynamic
    runner = get_engine("onnxruntime", threads=1).load_onnx(files[20, True])
    assert runner(torch.randn(5, 3, 32, 32).numpy()).shape == (5, 10)


def test_export_key_sees_settings_that_change_forward():
    """timm ViT's ``global_pool`` is a plain attribute, in neither the repr nor the weights: a token-pooling and an
    average-pooling model with the same weights shared one key, and the second was run on the first one's export."""
    import timm

    from leanvit.deploy.export import export_key

    def vit(**kwargs):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10,
                                 fc_norm=False, **kwargs).eval()

    token, avg = vit(global_pool="token"), vit(global_pool="avg")
    assert repr(token) == repr(avg) and all(torch.equal(a, b) for a, b in
                                            zip(token.state_dict().values(), avg.state_dict().values()))
    x = torch.randn(1, 3, 32, 32)
    assert export_key(token, x, dynamic_batch=False, opset=20) != export_key(avg, x, dynamic_batch=False, opset=20)

    from leanvit.deploy.export import module_settings

    settings = {(name, attr): text for name, attr, text in module_settings(avg)}
    assert settings["", "global_pool"] == "'avg'" and settings["patch_embed", "img_size"] == "(32, 32)"
    assert settings["patch_embed", "output_fmt"].endswith("Format.NCHW")  # an enum, by name
    assert not any(attr.startswith("_") or attr == "training" for _, attr, _ in module_settings(avg))

    def key(model):
        return export_key(model, x, dynamic_batch=False, opset=20)

    scaled = vit(global_pool="avg")
    scaled.blocks[0].attn.scale = 0.5  # a float setting (attention's softmax temperature)
    assert key(scaled) != key(avg)
    nn = torch.nn
    first, second = (nn.Sequential(nn.Identity(), nn.Identity(), nn.Linear(2, 2)) for _ in range(2))
    second.load_state_dict(first.state_dict())
    first[0].r, second[1].r = 2, 2  # the same setting on another module
    assert key(first) != key(second)
    tanh, sigmoid = nn.Sequential(nn.Linear(2, 2), nn.Tanh()), nn.Sequential(nn.Linear(2, 2), nn.Sigmoid())
    sigmoid.load_state_dict(tanh.state_dict())
    assert key(tanh) != key(sigmoid)  # neither has a setting or a weight: only the structure (repr) tells them apart


def test_export_key_is_the_same_in_a_fresh_process():
    """The key names an export on disk for later runs: nothing in it (an id, an address) may change per process."""
    import subprocess
    import sys

    script = """
import timm, torch, leanvit
from leanvit.deploy.export import export_key
torch.manual_seed(0)
model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
print(export_key(model, torch.zeros(1, 3, 32, 32), dynamic_batch=False, opset=20))
"""
    here = {}
    exec(script, {"print": lambda key: here.setdefault("key", key)})
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == here["key"]


def test_openvino_models_freed_in_any_order_leave_signals_deliverable(tmp_path):
    """OpenVINO's CPU plugin swaps the thread's signal stack when a Core's plugin is made and destroyed: with a
    Core per model, freeing models in creation order left a freed signal stack behind, and the next signal with
    a handler (here a child's SIGCHLD) killed the process. Run in a fresh interpreter, which that would kill."""
    import subprocess
    import sys

    script = f"""
import signal, subprocess, sys, torch, torch.nn as nn
from leanvit.deploy import export_onnx, get_engine
engine = get_engine("openvino", threads=1)
runners = [engine.load_model_file(export_onnx(nn.Conv2d(3, c, 3), torch.randn(1, 3, 8, 8), r"{tmp_path}/m{{c}}.onnx"))
           for c in (4, 8)]
del runners[0]; del runners[0]
signal.signal(signal.SIGCHLD, lambda *args: None)
subprocess.run([sys.executable, "-c", "pass"], check=True)
print("alive")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "alive" in done.stdout, (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_a_missing_or_wrong_model_file_is_a_clear_error(engine, tmp_path):
    with pytest.raises(LeanvitError, match="No model file at"):
        get_engine(engine).load_model_file(tmp_path / "missing.onnx")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(LeanvitError, match="No model file at .*folder.onnx"):  # a directory is no model file
        get_engine(engine).load_model_file(tmp_path / "folder.onnx")
    if engine == "onnxruntime":
        (tmp_path / "model.xml").write_text("<net/>")
        with pytest.raises(LeanvitError, match="use the .onnx file next to it"):
            get_engine(engine).load_model_file(tmp_path / "model.xml")
        upper = export_onnx(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), tmp_path / "MODEL.ONNX")
        assert get_engine(engine).load_model_file(upper)(np.zeros((1, 3, 8, 8), np.float32)).shape == (1, 4, 6, 6)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_a_model_file_from_elsewhere_runs_whatever_its_input_is_named(engine, tmp_path):
    """A model file another tool wrote (a quantizer's, say) need not name its input "input" as leanvit's exports do:
    the runner feeds the model's first input, whatever its name."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["scores"])], "g",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    np.testing.assert_array_equal(get_engine(engine, threads=1).load_model_file(tmp_path / "m.onnx")(x),
                                  np.maximum(x, 0))


def test_a_device_an_engine_cannot_use_is_an_error_and_bench_runs_cpu_engines_on_the_cpu():
    from leanvit.deploy import engine_device

    with pytest.raises(LeanvitError, match="engine 'openvino' runs on cpu, not 'cuda'; engines for cuda: onnxruntime, "
                                           "eager, compile, tensorrt[.]$"):
        get_engine("openvino", device="cuda")
    assert engine_device("openvino", "cuda") == "cpu" and engine_device("onnxruntime", "cuda") == "cuda"
    if not torch.cuda.is_available():
        with pytest.raises(LeanvitError, match="PyTorch sees no CUDA GPU here"):
            get_engine("eager", device="cuda")


def test_a_gpu_only_engine_in_a_cpu_run_is_recorded_on_its_gpu():
    """TensorRT (GPU only) in a bench on the default ``--device cpu`` ran on the GPU while its row said "cpu": the
    engine took "cpu" as given and engine_device turned every device it cannot use into "cpu". No tensorrt needed:
    it is imported only when a model is loaded."""
    from leanvit.deploy import engine_device
    from leanvit.deploy.trt import TensorRTEngine

    assert TensorRTEngine.devices == ("cuda",)
    assert engine_device("tensorrt", "cpu") == "cuda" and engine_device("tensorrt", "cuda:1") == "cuda:1"
    assert TensorRTEngine(threads=1).device == TensorRTEngine(threads=1, device="cpu").device == "cuda"
    assert TensorRTEngine(threads=1, device="cuda:1").device == "cuda:1"
    assert engine_device("openvino", "cpu") == "cpu" and get_engine("openvino").device == "cpu"  # as before


@pytest.mark.parametrize("engine", ["eager", "compile"])
def test_a_torch_engine_on_another_device_leaves_the_given_model_where_it_is(engine, tiny_cnn, monkeypatch):
    """``--device cuda`` moved the bench's one model in place: eager's reference then got CPU inputs on a GPU
    model and the next engine exported the moved model. "meta" stands in for the GPU (no data, no kernels)."""
    from leanvit.deploy import pytorch

    monkeypatch.setattr(pytorch.EagerEngine, "devices", ("cpu", "cuda", "meta"))
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    monkeypatch.setattr(pytorch.TorchRunner, "__call__", lambda self, x: None)  # nothing to run on "meta"
    runner = get_engine(engine, threads=1, device="meta").load(tiny_cnn, torch.randn(1, 3, 32, 32))
    assert {p.device.type for p in tiny_cnn.parameters()} == {"cpu"}
    assert {p.device.type for p in runner.fn.parameters()} == {"meta"}
    assert get_engine(engine, threads=1).load(tiny_cnn, torch.randn(1, 3, 32, 32)).fn is tiny_cnn  # no copy needed


def test_reduced_precision_is_judged_by_its_error_not_by_flips_its_rounding_explains():
    """Logits whose top two classes are 1e-3 apart (random weights): rounding that swaps them flips every top-1,
    which a 90 % top-1 rule called divergence; f32 stays strict, and a wrong function still diverges in bf16."""
    x = torch.randn(8, 10)
    x[:, 0], x[:, 1] = 5.0, 5.001  # eager's top-1: class 1, by a hair

    class Rounded:
        precision, info = "bf16", {}

        def __call__(self, x):
            out = x.copy()
            out[:, 0] += 0.002  # 0.04 % of the largest logit: now class 0 wins
            return out

    class Wrong(Rounded):
        def __call__(self, x):
            return -x

    rounded = check_agreement(torch.nn.Identity(), Rounded(), [x])
    assert rounded.top1_agreement == 0.0
    assert not rounded.diverges("bf16") and rounded.diverges("f32")
    assert check_agreement(torch.nn.Identity(), Wrong(), [x]).diverges("bf16")


def test_reduced_precision_and_int8_may_err_a_tenth_of_the_largest_logit():
    """REDUCED_PRECISION_RTOL: bf16 rounding gave up to 4 % of the largest logit; past 10 % the engine computes
    something else, whatever its top-1s."""
    assert not Agreement(0.09, 0.0, 8, ref_scale=1.0).diverges("bf16")
    assert Agreement(0.11, 1.0, 8, ref_scale=1.0).diverges("bf16")
    assert Agreement(0.11, 1.0, 8, ref_scale=1.0, quantized=True).diverges("f32")
    assert not Agreement(0.09, 1.0, 8, ref_scale=1.0, quantized=True).diverges("f32")


def test_check_agreement_pools_every_batch_and_runs_eager_in_eval_mode():
    """The error and the logits' scale are the largest over all batches (not the last one's), top-1 agreement is a
    fraction of samples (not of batches), eager runs in eval mode (a model handed over in training mode ran its
    dropout), and no inputs at all is a clear error rather than max()'s ValueError."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 5)).train()
    big, small = torch.randn(3, 6) * 10, torch.randn(2, 6)
    calls = []

    def runner(x):  # every logit 0.5 high on the first batch (top-1s kept), exact after
        calls.append(len(x))
        return model[1](torch.from_numpy(x)).numpy() + (0.5 if len(calls) == 1 else 0.0)

    agreement = check_agreement(model, runner, [big, small])
    assert calls == [3, 2] and agreement.n == 5 and agreement.top1_agreement == 1.0
    assert agreement.max_abs_err == pytest.approx(0.5, abs=1e-5)
    assert agreement.ref_scale == pytest.approx(float(model[1](big).detach().abs().max()), rel=1e-6)
    with pytest.raises(LeanvitError, match="check_agreement needs at least one input batch"):
        check_agreement(model, runner, [])


def test_exports_are_keyed_by_the_converters_versions(tiny_cnn, tmp_path, monkeypatch):
    """An IR converted by one OpenVINO was reused by the next; the ONNX graph is onnxscript's as much as torch's."""
    import importlib.metadata

    from leanvit.deploy import export

    onnx_path = cached_onnx(tiny_cnn, torch.randn(1, 3, 32, 32), cache_dir=tmp_path)
    assert f"-osc{importlib.metadata.version('onnxscript')}-" in onnx_path.parent.name
    xml = export.cached_openvino_ir(onnx_path)
    assert xml.name == f"model-ov{importlib.metadata.version('openvino')}.xml" and xml.with_suffix(".bin").is_file()
    real = export._version
    monkeypatch.setattr(export, "_version", lambda package: "0.0.1" if package == "openvino" else real(package))
    assert export.cached_openvino_ir(onnx_path).name == "model-ov0.0.1.xml"


def test_tensorrt_plans_are_named_by_precision_tensorrt_version_and_gpu():
    """Plans were keyed by precision alone, so another TensorRT or GPU got a plan it cannot run (no tensorrt needed)."""
    from leanvit.deploy.trt import plan_name

    name = plan_name("fp16", "10.3.0", "NVIDIA H100 80GB HBM3", (9, 0))
    assert name == "model-fp16-trt10.3.0-NVIDIA_H100_80GB_HBM3-sm90.plan"
    assert len({name, plan_name("fp16", "10.4.0", "NVIDIA H100 80GB HBM3", (9, 0)),
                plan_name("fp16", "10.3.0", "NVIDIA L4", (8, 9)), plan_name("f32", "10.3.0", "NVIDIA H100 80GB HBM3", (9, 0))}) == 4


def test_tensorrt_takes_the_gpu_index_it_is_given(monkeypatch):
    """``--device cuda:1`` built and ran TensorRT on the current GPU (cuda:0) while the row said cuda:1: the index
    was dropped. It is now resolved and checked against the visible GPUs (no GPU needed: CUDA's queries stubbed)."""
    from leanvit.deploy.trt import cuda_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineUnavailableError, match="needs an NVIDIA GPU"):
        cuda_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert cuda_device("cuda") == torch.device("cuda", 0) and cuda_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LeanvitError, match=r"cuda:2, but 2 GPUs are visible \(cuda:0 to cuda:1\)"):
        cuda_device("cuda:2")


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_an_unwritable_export_cache_is_one_clear_error(engine, tiny_cnn, tmp_path, monkeypatch):
    """A cache under a file (or in /proc) raised the exporter's NotADirectoryError / FileNotFoundError: a traceback
    from ``leanvit eval --engine openvino``, one per row in ``leanvit bench``."""
    afile = tmp_path / "afile"
    afile.write_text("")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(LeanvitError, match=rf"Cannot cache exports in {afile}/x \({afile} is a file\): point "
                                           "--cache-dir at a directory you can write to"):
        get_engine(engine, threads=1).load(tiny_cnn, x, cache_dir=afile / "x")
    with pytest.raises(LeanvitError, match=rf"{afile} \({afile} is a file\)"):
        cached_onnx(tiny_cnn, x, cache_dir=afile)
    monkeypatch.setenv("LEANVIT_CACHE", str(afile / "x"))
    with pytest.raises(LeanvitError, match=r"afile/x/exports \(.*afile is a file\): point LEANVIT_CACHE .* at a "
                                           "directory you can write to"):
        get_engine(engine, threads=1).load(tiny_cnn, x)
    if Path("/proc/self").is_dir():  # a directory that cannot be created, whoever runs the tests (root included)
        with pytest.raises(LeanvitError, match=r"Cannot cache exports in /proc/cache \("):
            get_engine(engine, threads=1).load(tiny_cnn, x, cache_dir="/proc/cache")


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_a_read_only_export_cache_serves_what_it_holds(engine, tiny_cnn, tmp_path, monkeypatch):
    """The cache was checked writable on every load, so a read-only cache holding every export (a shared mount)
    was refused. Only a cache miss needs to write; it fails with the clear error."""
    from leanvit.deploy import export

    x = torch.randn(1, 3, 32, 32)
    ran = get_engine(engine, threads=1).load(tiny_cnn, x, cache_dir=tmp_path)(x.numpy())
    monkeypatch.setattr(export, "write_problem", lambda folder: "Read-only file system")  # (root writes anywhere)
    assert np.allclose(get_engine(engine, threads=1).load(tiny_cnn, x, cache_dir=tmp_path)(x.numpy()), ran)
    with pytest.raises(LeanvitError, match=r"Cannot cache .* \(Read-only file system\): point --cache-dir"):
        get_engine(engine, threads=1).load(tiny_cnn, torch.randn(2, 3, 32, 32), cache_dir=tmp_path)


@pytest.fixture(scope="module")
def quantized_vits(tiny_vit):
    """``tiny_vit`` quantized W8A8, W7A8 and W4A8 (the last without engine kernels)."""
    from leanvit.compress.quant import QuantConfig, quantize

    torch.manual_seed(3)
    calib = torch.randn(16, 3, 32, 32)
    return {bits: quantize(tiny_vit, calib, QuantConfig.from_bits(bits, min_images=8), progress=False)
            for bits in ("w8a8", "w7a8", "w4a8")}


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("bits", ["w8a8", "w7a8"])
def test_a_quantized_model_loads_as_its_int8_export(engine, bits, quantized_vits, tmp_path):
    """Engine.load of a quantized model ran the float exporter, which cannot write 7-bit weights (it raised
    SymbolicValueError after printing its whole graph) and skipped the QDQ rewrites: it now loads, from the export
    cache, the file leanvit.export writes, and computes what was simulated."""
    import copy

    import onnx

    from leanvit.compress.quant import onnx_int8_summary

    qmodel = quantized_vits[bits]
    torch.manual_seed(0)  # inputs of their own, not the RNG state earlier tests left: one INT8 rounding step moves
    x = torch.randn(1, 3, 32, 32)  # these logits 1-2 %, and `-k openvino` drew inputs 2.3 % off
    runner = get_engine(engine, threads=1).load(qmodel, x, cache_dir=tmp_path)
    path = Path(runner.info["onnx"] if engine == "onnxruntime" else runner.info["model_file"]).with_name("model.onnx")
    assert path.parent.name.endswith(f"-qdq-{engine}")  # the engine's own export (its rewrites and checks differ)
    graph = onnx.load(str(path)).graph
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)  # int8 weights, as export writes
    assert onnx_int8_summary(path).int8 == len(qmodel.quant_report.quantized)
    agreement = check_agreement(qmodel, runner, [torch.randn(1, 3, 32, 32) for _ in range(4)])
    assert agreement.top1_agreement == 1.0 and agreement.max_abs_err < 0.02 * agreement.ref_scale
    # cached like a float export: reused as it is, and keyed by the quantizers' parameters
    mtime = path.stat().st_mtime_ns
    get_engine(engine, threads=1).load(qmodel, x, cache_dir=tmp_path)
    assert path.stat().st_mtime_ns == mtime and len(list(tmp_path.iterdir())) == 1
    rescaled = copy.deepcopy(qmodel)
    rescaled.head.input_quantizer.scale.mul_(2)
    get_engine(engine, threads=1).load(rescaled, x, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_a_quantized_model_on_its_engine_is_judged_by_its_error_not_as_f32(tiny_vit, tmp_path):
    """check_agreement held a quantized model run in INT8 to the f32 rule (1e-3 relative): ONNX Runtime, whose
    x / scale rounds a few values to the other side of a quantization step than the simulation's x * (1 / scale),
    was 'diverging' at a 0.9 % error with every top-1 kept. A wrong function is still caught."""
    from leanvit.compress.quant import QuantConfig, quantize

    torch.manual_seed(0)
    calib = torch.randn(16, 3, 32, 32)
    qmodel, x = quantize(tiny_vit, calib, QuantConfig.from_bits("w8a8", min_images=8), progress=False), [calib[:4]]
    agreement = check_agreement(qmodel, get_engine("onnxruntime", threads=1).load(qmodel, x[0], cache_dir=tmp_path), x)
    assert agreement.quantized and not agreement.diverges()
    assert agreement.max_abs_err > 1e-3 * agreement.ref_scale  # (what the f32 rule refused)
    assert check_agreement(qmodel, lambda a: np.zeros((len(a), 10), np.float32), x).diverges()

    class FivePercentOff(torch.nn.Module):
        def forward(self, images):
            return qmodel(images) * 1.05

    eager = check_agreement(qmodel, get_engine("eager", threads=1).load(FivePercentOff(), x[0]), x)
    assert not eager.quantized and eager.diverges()  # eager runs the simulation itself: held to the f32 rule


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_a_quantized_model_without_engine_kernels_is_refused_on_load(engine, quantized_vits, tmp_path):
    with pytest.raises(LeanvitError, match="simulation-only"):
        get_engine(engine, threads=1).load(quantized_vits["w4a8"], torch.randn(1, 3, 32, 32), cache_dir=tmp_path)


def test_tensorrt_refuses_a_quantized_model_with_the_engines_that_run_it(quantized_vits, tmp_path):
    """TensorRT exported a quantized model with the float exporter (7-bit weights fail there, W8A8 loses the QDQ
    rewrites). It refuses it before needing a GPU (the engine is made without its availability checks here)."""
    from leanvit.deploy.trt import TensorRTEngine

    with pytest.raises(LeanvitError, match="TensorRT does not run leanvit's quantized models yet .* onnxruntime or "
                                           "openvino"):
        TensorRTEngine.__new__(TensorRTEngine).load(quantized_vits["w8a8"], torch.randn(1, 3, 32, 32),
                                                    cache_dir=tmp_path)


def test_the_compile_engine_compiles_on_load_for_the_examples_static_shape(monkeypatch):
    """torch.compile compiles at the first call: load() makes it, with the example, so the timed loop does not pay
    for compilation; shapes are static (dynamic=True builds a symbolic-shape graph) and Inductor autotunes without
    CUDA graphs (torch.compile stubbed: no compilation here)."""
    given, calls = {}, []

    def fake_compile(model, **kwargs):
        given.update(kwargs)
        return lambda t: calls.append(tuple(t.shape)) or model(t)

    monkeypatch.setattr(torch, "compile", fake_compile)
    runner = get_engine("compile", threads=1).load(torch.nn.Linear(3, 2), torch.randn(4, 3))
    assert calls == [(4, 3)] and given == {"mode": "max-autotune-no-cudagraphs", "dynamic": False}
    assert runner(np.zeros((4, 3), np.float32)).shape == (4, 2) and len(calls) == 2


@pytest.mark.parametrize("engine", ["eager", "compile"])
def test_a_torch_runner_uses_its_thread_count_per_call_and_keeps_the_process_count(engine, monkeypatch):
    """load() called torch.set_num_threads(threads) and kept it: the default threads=1 left every later PyTorch call
    in the user's process on one thread. The runner now sets its count for each call and puts the process's back,
    calling set_num_threads only where the counts differ (bench runs at the engine's count: nothing added)."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x.sum(1)

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # (compile: the first call is in load)
    torch.set_num_threads(3)  # the user's count (conftest puts the test's own back)
    runner = get_engine(engine, threads=2).load(Probe(), torch.randn(1, 3))
    assert torch.get_num_threads() == 3
    runner(np.zeros((1, 3), np.float32))
    assert torch.get_num_threads() == 3 and set(seen) == {2} and runner.info["threads"] == 2
    calls = []
    set_num_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_num_threads(n)))
    set_num_threads(2)
    runner(np.zeros((1, 3), np.float32))
    assert calls == [] and seen[-1] == 2
