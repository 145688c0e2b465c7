"""TensorRT on an NVIDIA GPU, built from the cached ONNX export.

Buffers are CUDA tensors owned by PyTorch, so no pycuda is needed. Engines are built for the
example's exact shape and serialised next to the ONNX file, named by precision, TensorRT version and
GPU (:func:`plan_name`): a plan runs only on the TensorRT and the GPU that built it. ``device="cuda:N"`` builds,
loads and runs on GPU ``N`` (TensorRT works on the current CUDA device, so each step runs inside
``torch.cuda.device(N)``); plain "cuda" is the current device.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn

from ..errors import EngineUnavailableError, LeanvitError
from .engine import Engine, Runner, is_quantized, register_engine
from .export import cached_onnx

#: The ONNX opset TensorRT reads its export at: opset 20's ``Gelu`` op (the default export's, for ONNX Runtime) is
#: not in every TensorRT ONNX parser; at 18 GELU is plain element-wise ops, which TensorRT fuses itself.
TENSORRT_OPSET = 18


def plan_name(precision: str, trt_version: str, gpu: str, capability: tuple[int, int]) -> str:
    """The file name of a serialised engine: TensorRT refuses (or misruns) a plan from another TensorRT
    version or GPU, so these are in the name beside the precision."""
    gpu_slug = re.sub(r"[^A-Za-z0-9.]+", "_", gpu).strip("_")
    return f"model-{precision}-trt{trt_version}-{gpu_slug}-sm{capability[0]}{capability[1]}.plan"


def cuda_device(device: str) -> torch.device:
    """``device`` ("cuda" or "cuda:N") as a CUDA device with its index, checked against the GPUs visible here."""
    if not torch.cuda.is_available():
        raise EngineUnavailableError("TensorRT needs an NVIDIA GPU with CUDA; none is visible here.")
    index = torch.device(device).index
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise LeanvitError(f"TensorRT was asked for {device}, but {count} GPU{'s are' if count > 1 else ' is'} "
                           f"visible (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); pass one of those, or "
                           "set CUDA_VISIBLE_DEVICES.")
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


class TensorRTRunner(Runner):
    def __init__(self, engine, precision: str, info: dict, device: torch.device):
        self.engine, self.precision, self.info, self.device = engine, precision, info, device
        with torch.cuda.device(device):
            self.context = engine.create_execution_context()
            self.stream = torch.cuda.Stream(device)
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.buffers = {}
        for n in self.names:
            shape = tuple(self.context.get_tensor_shape(n))
            self.buffers[n] = torch.empty(shape, dtype=torch.float32, device=device)
            self.context.set_tensor_address(n, self.buffers[n].data_ptr())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import tensorrt as trt

        inp = next(n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        out = next(n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        with torch.cuda.stream(self.stream):  # (which also makes the stream's GPU the current device)
            self.buffers[inp].copy_(torch.from_numpy(x), non_blocking=True)
            self.context.execute_async_v3(self.stream.cuda_stream)
            result = self.buffers[out].cpu()
        self.stream.synchronize()
        return result.numpy()


@register_engine
class TensorRTEngine(Engine):
    name = "tensorrt"
    devices = ("cuda",)
    package = "tensorrt"
    precisions = ("f32", "fp16")
    exports = True

    def load(self, model: nn.Module, example: torch.Tensor, *, cache_dir=None) -> Runner:
        if is_quantized(model):  # (the float exporter cannot write them: 7-bit weights, no QDQ rewrites)
            raise LeanvitError("TensorRT does not run leanvit's quantized models yet (its INT8 path is untested "
                               "here): run them on onnxruntime or openvino, or give TensorRT the float model.")
        import tensorrt as trt

        device = cuda_device(self.device)
        onnx_path = cached_onnx(model, example, cache_dir=cache_dir, opset=TENSORRT_OPSET)
        gpu = torch.cuda.get_device_name(device)
        plan = onnx_path.with_name(plan_name(self.precision, trt.__version__, gpu,
                                             torch.cuda.get_device_capability(device)))
        logger = trt.Logger(trt.Logger.WARNING)
        engine = None
        with torch.cuda.device(device):
            if plan.exists():
                engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
            if engine is None:  # no plan, or one this TensorRT cannot read (a truncated file): build it
                plan.write_bytes(self._build(trt, logger, onnx_path))
                engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise LeanvitError(f"TensorRT cannot load the engine it just built ({plan}); see its log above. "
                               "Delete the file and run again, or use --engines onnxruntime.")
        info = {"tensorrt": trt.__version__, "gpu": gpu, "device": str(device), "plan": str(plan)}
        return TensorRTRunner(engine, self.precision, info, device)

    def _build(self, trt, logger, onnx_path) -> bytes:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise LeanvitError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise LeanvitError(f"TensorRT failed to build an engine from {onnx_path}; see its log above.")
        return bytes(serialized)
