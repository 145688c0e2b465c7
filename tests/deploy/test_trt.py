"""TensorRT's control flow without a GPU or the tensorrt package: a stand-in ``tensorrt`` module with just the calls
leanvit.deploy.trt makes (TensorRT 10's Python API names: Logger, Builder, OnnxParser, Runtime, BuilderFlag,
TensorIOMode) and CUDA's queries stubbed. What it pins: the plan is built from the cached ONNX at TensorRT's opset and
written beside it under plan_name(...); a second load reuses the plan; a plan this TensorRT cannot read is rebuilt;
fp16 builds with BuilderFlag.FP16, f32 without; parser errors and a failed build are one LeanvitError each; every
TensorRT step runs on the GPU asked for; the runner feeds the input tensor and returns the output tensor by their
I/O modes."""
import contextlib
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from leanvit.deploy import cached_onnx
from leanvit.deploy import trt as trt_module
from leanvit.deploy.trt import TENSORRT_OPSET, TensorRTEngine, TensorRTRunner, plan_name
from leanvit.errors import LeanvitError

GPUS = {0: ("NVIDIA L4", (8, 9)), 1: ("NVIDIA H100 80GB HBM3", (9, 0))}  # (name, compute capability) per index


def fake_tensorrt(parse_errors=(), build_fails=False, unreadable=(b"truncated",)) -> types.ModuleType:
    """A ``tensorrt`` module as far as trt.py uses it. It records each build and deserialisation with the CUDA device
    current at the time (``trt.current``, set by the fake ``torch.cuda.device``), the builder flags, the files parsed;
    ``deserialize_cuda_engine`` returns None (as TensorRT does) for a plan in ``unreadable``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.current, trt.calls, trt.flags, trt.parsed, trt.loggers = [0], [], [], [], []

    class Logger:
        WARNING, INFO = "WARNING", "INFO"

        def __init__(self, severity):
            trt.loggers.append(severity)

    class BuilderFlag:
        FP16, INT8 = "FP16", "INT8"

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class ParserError:  # str() of TensorRT's is its description
        def __init__(self, desc):
            self.desc = desc

        def __str__(self):
            return self.desc

    class OnnxParser:
        def __init__(self, network, logger):
            self.errors = [ParserError(e) for e in parse_errors]

        def parse_from_file(self, path):
            trt.parsed.append(path)
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

    class BuilderConfig:
        def set_flag(self, flag):
            trt.flags.append(flag)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return object()

        def create_builder_config(self):
            return BuilderConfig()

        def build_serialized_network(self, network, config):
            trt.calls.append(("build", trt.current[-1]))
            # an IHostMemory: a buffer the caller turns into bytes
            return None if build_fails else memoryview(f"engine #{len(trt.calls)}".encode())

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            trt.calls.append(("deserialize", trt.current[-1]))
            return None if data in unreadable else SimpleNamespace(plan=data)

    trt.Logger, trt.BuilderFlag, trt.TensorIOMode = Logger, BuilderFlag, TensorIOMode
    trt.OnnxParser, trt.Builder, trt.Runtime = OnnxParser, Builder, Runtime
    return trt


def fake_cuda(monkeypatch, trt) -> None:
    """Two visible GPUs, cuda:0 current; ``torch.cuda.device(d)`` makes d current for its block (recorded in ``trt``)."""
    class device:
        def __init__(self, d):
            self.index = torch.device(d).index

        def __enter__(self):
            trt.current.append(self.index)

        def __exit__(self, *exc):
            trt.current.pop()

    def index(d):
        return torch.device(d).index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(GPUS))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: GPUS[index(d)][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: GPUS[index(d)][1])
    monkeypatch.setattr(torch.cuda, "device", device)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model, its example and an export cache holding its ONNX at TensorRT's opset (exported once, with the
    real CUDA queries)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    example = torch.randn(1, 3, 16, 16)
    cache = tmp_path_factory.mktemp("exports")
    onnx_path = cached_onnx(model, example, cache_dir=cache, opset=TENSORRT_OPSET)
    yield SimpleNamespace(model=model, example=example, cache=cache, onnx=onnx_path)
    for plan in onnx_path.parent.glob("*.plan"):
        plan.unlink()


@pytest.fixture
def load(exported, monkeypatch):
    """``load(trt, precision, device)``: TensorRTEngine.load on the stand-ins, the runner replaced by a record of what
    it was given (its buffers are CUDA tensors); plans are removed after each test."""
    def run(trt, precision="fp16", device="cuda:1"):
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        fake_cuda(monkeypatch, trt)
        return TensorRTEngine(threads=1, precision=precision, device=device).load(
            exported.model, exported.example, cache_dir=exported.cache)

    monkeypatch.setattr(trt_module, "TensorRTRunner", lambda engine, precision, info, device: SimpleNamespace(
        engine=engine, precision=precision, info=info, device=device))
    yield run
    for plan in exported.onnx.parent.glob("*.plan"):
        plan.unlink()


def plan_path(exported, precision="fp16", gpu=1):
    return exported.onnx.with_name(plan_name(precision, "10.3.0", *GPUS[gpu]))


def test_the_plan_is_built_from_the_tensorrt_opset_export_and_written_beside_it(exported, load):
    """The parser reads the export at opset 18 (the default export's Gelu op is not in every TensorRT parser); the plan
    is named by precision, TensorRT version and the GPU asked for (cuda:1, not the current cuda:0), and every build
    and load runs with that GPU current."""
    trt = fake_tensorrt()
    runner = load(trt, "fp16", "cuda:1")
    assert trt.parsed == [str(exported.onnx)] and "-op18-" in exported.onnx.parent.name
    plan = plan_path(exported, "fp16", 1)
    assert plan.read_bytes() == b"engine #1" and runner.engine.plan == b"engine #1"
    assert trt.calls == [("build", 1), ("deserialize", 1)] and trt.flags == ["FP16"] and trt.loggers[0] == "WARNING"
    assert runner.precision == "fp16" and runner.device == torch.device("cuda", 1)
    assert runner.info == {"tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "device": "cuda:1", "plan": str(plan)}


def test_f32_builds_without_the_fp16_flag_on_the_current_gpu(exported, load):
    """Plain "cuda" is the current GPU, recorded by its index (a bench row says which GPU ran)."""
    trt = fake_tensorrt()
    runner = load(trt, "f32", "cuda")
    assert trt.flags == [] and trt.calls == [("build", 0), ("deserialize", 0)]
    assert plan_path(exported, "f32", 0).read_bytes() == b"engine #1" and runner.device == torch.device("cuda", 0)
    assert runner.info["device"] == "cuda:0" and runner.info["gpu"] == "NVIDIA L4"


def test_a_second_load_reuses_the_plan(exported, load):
    load(fake_tensorrt())
    trt = fake_tensorrt()
    runner = load(trt)
    assert trt.calls == [("deserialize", 1)] and trt.parsed == [] and runner.engine.plan == b"engine #1"


def test_a_plan_this_tensorrt_cannot_read_is_rebuilt(exported, load):
    """A truncated plan (an interrupted write) deserialises to None: it is built again and overwritten."""
    plan = plan_path(exported)
    plan.write_bytes(b"truncated")
    trt = fake_tensorrt()
    runner = load(trt)
    assert trt.calls == [("deserialize", 1), ("build", 1), ("deserialize", 1)]
    assert plan.read_bytes() == runner.engine.plan == b"engine #2"


def test_parser_errors_are_named_in_one_error_and_no_plan_is_written(exported, load):
    trt = fake_tensorrt(parse_errors=("Unsupported ONNX op: Foo", "node 3: bad shape"))
    with pytest.raises(LeanvitError, match=r"TensorRT cannot parse .*model\.onnx: Unsupported ONNX op: Foo; node 3: "
                                           r"bad shape$"):
        load(trt)
    assert not plan_path(exported).exists()


def test_a_failed_build_raises_and_writes_no_plan(exported, load):
    with pytest.raises(LeanvitError, match=r"TensorRT failed to build an engine from .*model\.onnx"):
        load(fake_tensorrt(build_fails=True))
    assert not plan_path(exported).exists()


def test_an_engine_it_cannot_load_after_building_is_an_error(exported, load):
    with pytest.raises(LeanvitError, match=r"TensorRT cannot load the engine it just built \(.*\.plan\)"):
        load(fake_tensorrt(unreadable=(b"engine #1",)))


def test_the_runner_feeds_the_input_tensor_and_returns_the_output_by_their_io_modes(monkeypatch):
    """Tensors are found by mode, not position (the engine here lists its output first); the input is copied into its
    buffer, the context runs on the runner's stream, and that stream is synchronised before the output is returned.
    CPU tensors stand in for the CUDA buffers: the stand-in context finds them by the addresses it was given."""
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    fake_cuda(monkeypatch, trt)
    buffers, devices, events = {}, [], []
    real_empty = torch.empty

    def empty(shape, dtype=None, device=None):
        devices.append(device)
        t = real_empty(shape, dtype=dtype)
        buffers[t.data_ptr()] = t
        return t

    class Stream:
        cuda_stream = 1234

        def __init__(self, device=None):
            devices.append(device)

        def synchronize(self):
            events.append("synchronize")

    class Context:
        shapes = {"logits": (2, 5), "images": (2, 3, 4, 4)}

        def __init__(self):
            self.addresses = {}

        def get_tensor_shape(self, name):
            return self.shapes[name]

        def set_tensor_address(self, name, address):
            self.addresses[name] = address

        def execute_async_v3(self, stream_handle):
            events.append(("execute", stream_handle))
            images = buffers[self.addresses["images"]]
            buffers[self.addresses["logits"]].copy_(images.flatten(1)[:, :5] * 2)

    class Engine:
        num_io_tensors = 2
        modes = {"logits": trt.TensorIOMode.OUTPUT, "images": trt.TensorIOMode.INPUT}

        def get_tensor_name(self, index):
            return ["logits", "images"][index]

        def get_tensor_mode(self, name):
            return self.modes[name]

        def create_execution_context(self):
            return Context()

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    device = torch.device("cuda", 1)
    runner = TensorRTRunner(Engine(), "fp16", {}, device)
    assert devices == [device, device, device]  # the stream and both buffers on the GPU asked for
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    out = runner(x)
    np.testing.assert_array_equal(out, x.reshape(2, -1)[:, :5] * 2)
    assert events == [("execute", 1234), "synchronize"]
