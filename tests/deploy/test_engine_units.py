"""Engine-free units of leanvit.deploy: agreement rules, the export key and cache, runner plumbing (no exports)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from leanvit.deploy import check_agreement, get_engine
from leanvit.deploy.engine import Agreement
from leanvit.errors import LeanvitError


def test_f32_allows_no_top1_flip_and_fp32_is_f32():
    """One flipped top-1 in eight is a different function in f32, however small the error; "fp32" is the same rule
    (not the reduced-precision one, which would let a 5 % error pass)."""
    assert Agreement(0.0, 7 / 8, 8).diverges("f32")
    assert Agreement(5e-3, 1.0, 8).diverges("fp32") and Agreement(0.05, 1.0, 8).diverges("fp32")
    assert not Agreement(5e-4, 1.0, 8).diverges("fp32")


def test_reduced_precision_error_is_relative_to_small_logits_too():
    """The 10 % rule is of the largest logit even below 1 (unlike f32's 1e-3 floor): 0.05 off logits of at most 0.1
    is half their size."""
    assert Agreement(0.05, 1.0, 8, ref_scale=0.1).diverges("bf16")
    assert Agreement(0.05, 1.0, 8, ref_scale=0.1, quantized=True).diverges("f32")
    assert not Agreement(0.005, 1.0, 8, ref_scale=0.1).diverges("bf16")


def test_check_agreement_measures_errors_and_scale_by_magnitude():
    """Logits that come back too low count as much as too high, and all-negative logits have a scale (their largest
    magnitude), not a negative one that makes every error 'diverge'."""
    x = -torch.rand(4, 6) - 1.0  # every logit in [-2, -1)
    low = check_agreement(torch.nn.Identity(), lambda a: a - 0.5, [x])
    assert low.max_abs_err == pytest.approx(0.5) and low.ref_scale == pytest.approx(float(x.abs().max()))
    assert not check_agreement(torch.nn.Identity(), lambda a: a * 1.01, [x]).diverges("bf16")


def test_only_exporting_engines_load_model_files(tmp_path):
    """Eager has no file format: a model file given to it is refused, naming the engines that run one."""
    with pytest.raises(LeanvitError, match=r"engine 'eager' loads models only through load.*run m.onnx on "
                                           "onnxruntime or openvino"):
        get_engine("eager").load_model_file(tmp_path / "m.onnx")


def test_the_export_cache_defaults_to_the_users_cache_folder(tmp_path, monkeypatch):
    """Without LEANVIT_CACHE exports go to ~/.cache/leanvit/exports (the documented place)."""
    from leanvit.deploy.export import cache_root, export_dir

    monkeypatch.delenv("LEANVIT_CACHE", raising=False)  # (the suite sets it for every test: conftest)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    assert cache_root() == tmp_path / ".cache" / "leanvit" and export_dir() == tmp_path / ".cache/leanvit/exports"
    assert export_dir(tmp_path / "mine") == tmp_path / "mine"


def _key(model):
    from leanvit.deploy.export import export_key

    return export_key(model, torch.zeros(1, 2), dynamic_batch=False, opset=20)


def test_export_key_names_the_torch_that_exported(monkeypatch):
    """Another torch writes another graph: its version (without the local build tag) is in the key."""
    model = torch.nn.Linear(2, 2)
    before = _key(model)
    monkeypatch.setattr(torch, "__version__", "9.9.9+cpu")
    assert _key(model) != before and "-pt9.9.9-" in _key(model)


def test_export_key_sees_the_weights():
    """Same structure and settings, other weights (a fine-tuned checkpoint): another export."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert _key(first) != _key(second)
    second.load_state_dict(first.state_dict())
    assert _key(first) == _key(second)


def test_settings_order_and_non_plain_values_do_not_change_the_key():
    """Settings are read sorted (the same settings set in another order are the same model: one export), and a
    tuple holding anything but plain values is no setting (skipped, not a crash)."""
    from leanvit.deploy.export import module_settings

    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    second.load_state_dict(first.state_dict())
    first.zeta, first.alpha = 1, 2
    second.alpha, second.zeta = 2, 1
    assert _key(first) == _key(second)
    first.pair, first.plain = (1, object()), [1, ("a", None)]
    settings = [(attr, text) for _, attr, text in module_settings(first) if attr in ("alpha", "zeta", "pair", "plain")]
    assert settings == [("alpha", "2"), ("plain", "[1, ('a', None)]"), ("zeta", "1")]


def _relu_onnx(path, opsets):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets]), str(path))
    return path


def test_onnx_facts_read_the_default_domains_opset(tmp_path):
    """A file that imports another domain first (ONNX Runtime's contrib ops, say) is recorded at its ONNX opset."""
    from leanvit.deploy.ort import onnx_facts

    path = _relu_onnx(tmp_path / "m.onnx", [("com.microsoft", 1), ("", 17)])
    assert onnx_facts(path) == {"opset": 17, "qdq": False}


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_a_model_files_runner_carries_the_callers_facts(engine, tmp_path):
    path = _relu_onnx(tmp_path / "m.onnx", [("", 17)])
    runner = get_engine(engine, threads=1).load_model_file(path, info={"source": "quantizer"})
    assert runner.info["source"] == "quantizer"


def test_an_openvino_ir_is_not_converted_into_a_read_only_cache(tmp_path, monkeypatch):
    """A read-only cache may hold the ONNX export but not this OpenVINO's IR: a clear error, before converting."""
    from leanvit.deploy import export

    path = _relu_onnx(tmp_path / "m.onnx", [("", 17)])
    monkeypatch.setattr(export, "write_problem", lambda folder: "Read-only file system")
    with pytest.raises(LeanvitError, match=rf"Cannot cache exports in {tmp_path} \(Read-only file system\)"):
        export.cached_openvino_ir(path)
    assert list(tmp_path.iterdir()) == [path]


def test_a_torch_runner_moves_its_input_and_autocasts_on_its_device(monkeypatch):
    """The NumPy batch goes to the runner's device, and bf16 autocast is asked for that device's type ("cuda" for
    "cuda:1"; "meta" stands in here, autocast stubbed)."""
    from leanvit.deploy import pytorch

    seen, autocasts = [], []

    class Autocast:
        def __init__(self, device_type, dtype):
            autocasts.append((device_type, dtype))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", Autocast)
    runner = pytorch.TorchRunner(lambda t: seen.append(t.device) or torch.zeros(1, 2), "meta", "bf16", {}, 1)
    assert runner(np.zeros((1, 3), np.float32)).shape == (1, 2)
    assert seen == [torch.device("meta")] and autocasts == [("meta", torch.bfloat16)]


def test_the_compile_engine_compiles_the_model_in_eval_mode(monkeypatch):
    """A model handed over in training mode would be compiled with its dropout on (torch.compile stubbed)."""
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    x = torch.ones(2, 8)
    runner = get_engine("compile", threads=1).load(model, x)
    assert not model.training and np.array_equal(runner(x.numpy()), x.numpy())
