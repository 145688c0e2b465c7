"""One small interface over every inference engine leanvit measures on.

An :class:`Engine` turns a PyTorch model plus an example input into a :class:`Runner`, a callable
from a NumPy batch to NumPy logits, running on that engine with a fixed thread count and
precision. The runner reports the precision the engine *actually* used, which can differ from the
one asked for (OpenVINO's CPU plugin silently runs f32 models in bf16 on AMX/AVX-512-BF16 CPUs
unless told otherwise).
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import EngineUnavailableError, LeanvitError, check_range, close_matches


class Runner(ABC):
    """A model loaded on an engine: ``runner(x) -> logits``, both NumPy arrays."""

    #: the precision the engine runs in, read back from the engine where it can tell
    precision: str = "f32"
    #: engine-specific facts worth reporting (device, provider, exporter ...)
    info: dict

    @abstractmethod
    def __call__(self, x: np.ndarray) -> np.ndarray: ...


class Engine(ABC):
    name: str
    #: the pip package that provides this engine, named in the error when it is missing
    package: str
    precisions: tuple[str, ...] = ("f32",)
    #: device types this engine runs on; "cpu", every engine's default, is taken as "wherever it runs": a GPU-only
    #: engine given it records its own device (``self.device``), the first of these
    devices: tuple[str, ...] = ("cpu",)
    #: whether :meth:`load` exports the model to a file (in the export cache, :func:`~leanvit.deploy.export_dir`)
    exports: bool = False

    def __init__(self, threads: int = 1, precision: str = "f32", device: str = "cpu"):
        check_range("threads", threads, 1, 1024)
        if precision not in self.precisions:
            raise LeanvitError(
                f"engine '{self.name}' runs precisions {', '.join(self.precisions)}; got '{precision}'."
            )
        kind = device.split(":")[0]
        if device != "cpu" and kind not in self.devices:
            able = [n for n, cls in _ENGINES.items() if kind in cls.devices]
            raise LeanvitError(f"engine '{self.name}' runs on {', '.join(self.devices)}, not '{device}'"
                               + (f"; engines for {kind}: {', '.join(able)}." if able else "."))
        if device == "cpu":
            device = self.device_for(device)  # (TensorRT: the default device is where it runs, the GPU)
        self.threads, self.precision, self.device = threads, precision, device

    @classmethod
    def device_for(cls, device: str) -> str:
        """``device`` where this engine runs on it, else its own: "cpu" for a CPU-only engine asked for a GPU, the
        GPU ("cuda") for a GPU-only engine (TensorRT) asked for the CPU."""
        if device.split(":")[0] in cls.devices:
            return device
        return "cpu" if "cpu" in cls.devices else cls.devices[0]

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec(cls.package.split("[")[0].replace("-", "_")) is not None

    @abstractmethod
    def load(self, model: nn.Module, example: torch.Tensor, *, cache_dir: str | Path | None = None) -> Runner:
        """Put ``model`` on this engine for inputs shaped like ``example`` (exporting as needed; an exporting engine
        given a quantized model loads the INT8 file :func:`leanvit.export` writes, :func:`engine_onnx`)."""

    def load_model_file(self, path, *, info: dict | None = None) -> Runner:
        """Run a model file written elsewhere (an INT8 model from a quantizer, say), in a format this engine reads."""
        raise LeanvitError(f"engine '{self.name}' loads models only through load(model, example); "
                           f"run {Path(path).name} on onnxruntime or openvino.")


def existing_model_file(path) -> Path:
    """``path`` as a Path, or a clear error when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise LeanvitError(f"No model file at {path}: give the path of an exported .onnx or .xml file.")
    return path


def engine_onnx(model: nn.Module, example: torch.Tensor, engine: str, *, cache_dir: str | Path | None = None) -> Path:
    """The cached ONNX file ``engine`` runs for ``model`` at ``example``'s shape.

    A float model gets :func:`~leanvit.deploy.export.cached_onnx`. A quantized one (holding leanvit's fake
    quantizers) gets the INT8 QDQ export :func:`leanvit.export` writes for ``engine``: the float exporter cannot
    write 7-bit weights, nor skip the rewrites and checks that make the engine run what was simulated.
    """
    from .export import cached_onnx

    if is_quantized(model):
        from ..compress.quant.export import cached_export_quantized

        return cached_export_quantized(model, example, engine, cache_dir=cache_dir)
    return cached_onnx(model, example, cache_dir=cache_dir)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds leanvit's fake quantizers (a :func:`leanvit.quantize` result)."""
    from ..compress.quant.calibrate import quantizers  # (compress.quant imports deploy: imported when called)

    return bool(quantizers(model))


_ENGINES: dict[str, type[Engine]] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    _ENGINES[cls.name] = cls
    return cls


def engine_names() -> list[str]:
    return list(_ENGINES)


def engine_device(name: str, device: str) -> str:
    """Where engine ``name`` runs when ``device`` is asked (:meth:`Engine.device_for`); ``device`` for a name
    leanvit does not know."""
    cls = _ENGINES.get(name)
    return device if cls is None else cls.device_for(device)


def engine_precisions(name: str) -> tuple[str, ...]:
    """The precisions engine ``name`` runs; () for a name leanvit does not know."""
    cls = _ENGINES.get(name)
    return () if cls is None else cls.precisions


def available_engines() -> list[str]:
    return [n for n, cls in _ENGINES.items() if cls.is_available()]


def get_engine(name: str, threads: int = 1, precision: str = "f32", device: str = "cpu") -> Engine:
    """The engine ``name`` configured for ``threads`` and ``precision``.

    Raises :class:`EngineUnavailableError` naming the package to install when it is missing.
    """
    if name not in _ENGINES:
        hints = close_matches(name, _ENGINES)
        hint = f" Did you mean: {', '.join(hints)}?" if hints else ""
        raise LeanvitError(f"Unknown engine '{name}'.{hint} Engines: {', '.join(_ENGINES)}.")
    cls = _ENGINES[name]
    if not cls.is_available():
        raise EngineUnavailableError(
            f"Engine '{name}' needs the '{cls.package}' package: pip install {cls.package}"
            + ("  (or: pip install 'leanvit[gpu]')" if name == "tensorrt" else "")
        )
    return cls(threads=threads, precision=precision, device=device)


#: The largest error a bf16/fp16 engine may have, as a fraction of the largest eager logit: bf16 rounding gave
#: 0.5-4 % with random weights (mobilenetv2_050 3.9 %, deit_tiny 1.2 %, eager and OpenVINO alike); a wrong
#: function is off by about the logits themselves.
REDUCED_PRECISION_RTOL = 0.1


@dataclass
class Agreement:
    """How far an engine's logits are from PyTorch eager's on the same inputs."""

    max_abs_err: float
    top1_agreement: float  #: fraction of samples whose argmax matches eager's
    n: int
    ref_scale: float = field(default=1.0)  #: max |eager logit|, to read max_abs_err against
    #: eager was a quantized (fake-quant) model and the engine runs its INT8 export (eager and compile engines run the
    #: simulation itself, held to the rule of their precision)
    quantized: bool = False

    def diverges(self, precision: str = "f32") -> bool:
        """True when the engine is not computing the same function as eager.

        f32 must agree on every top-1 and stay within 1e-3 relative error. Reduced precisions, and a quantized
        model (whatever the engine's float precision), are judged by their error alone, at most
        :data:`REDUCED_PRECISION_RTOL` of the largest eager logit: a top-1 flip is no evidence there, as a flip
        needs a top1-top2 margin under twice the error (the rounding explains every flip it allows), and random
        weights' margins are far below bf16's rounding (efficientformerv2_s0, OpenVINO bf16: 7 of 8 top-1 agreed
        at 0.5 % relative error, flagged by a 90 % top-1 rule). In INT8 a float rounding one engine does otherwise
        moves a value across a rounding boundary of the next quantizer, a whole step (ONNX Runtime quantizes by
        ``x / scale``, the simulation by ``x * (1 / scale)``: a tiny DeiT's logits 0.9 % apart, every top-1 kept).
        """
        if precision in ("f32", "fp32") and not self.quantized:
            return self.top1_agreement < 1.0 or self.max_abs_err > 1e-3 * max(1.0, self.ref_scale)
        return self.max_abs_err > REDUCED_PRECISION_RTOL * self.ref_scale


@torch.inference_mode()
def check_agreement(model: nn.Module, runner: Runner, inputs: list[torch.Tensor]) -> Agreement:
    """Run eager and ``runner`` on the same ``inputs`` and compare logits.

    Eager runs wherever ``model`` is (the inputs go to it), the runner gets them as NumPy arrays.
    """
    if not inputs:
        raise LeanvitError("check_agreement needs at least one input batch.")
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    errs, agree, n, scale = [], 0, 0, 0.0
    for x in inputs:
        ref = model(x.to(device)).float().cpu().numpy()
        out = np.asarray(runner(x.numpy()), dtype=np.float32).reshape(ref.shape)
        errs.append(float(np.abs(out - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
        n += ref.shape[0]
    from .pytorch import TorchRunner

    return Agreement(max_abs_err=max(errs), top1_agreement=agree / n, n=n, ref_scale=scale,
                     quantized=is_quantized(model) and not isinstance(runner, TorchRunner))
