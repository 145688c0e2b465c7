"""PyTorch itself as an engine: eager mode (the reference every other engine is checked against)
and ``torch.compile`` (Inductor)."""
from __future__ import annotations

import copy
import itertools

import numpy as np
import torch
import torch.nn as nn

from ..errors import EngineUnavailableError
from .engine import Engine, Runner, register_engine

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TorchRunner(Runner):
    """Runs ``fn`` on ``threads`` intra-op threads, the process's count put back after each call.

    ``torch.set_num_threads`` is process-wide: set once at load, the engine's count (1 by default) stayed for every
    later PyTorch call in the user's process. Set only where it differs, so a timed call pays one
    ``torch.get_num_threads()`` when the process already runs that many (as bench sets it).
    """

    def __init__(self, fn, device: str, precision: str, info: dict, threads: int):
        self.fn, self.device, self.precision, self.info, self.threads = fn, device, precision, info, threads

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        before = torch.get_num_threads()
        if before != self.threads:
            torch.set_num_threads(self.threads)
        try:
            t = torch.from_numpy(x).to(self.device)
            if self.precision in _DTYPES:
                with torch.autocast(self.device.split(":")[0], dtype=_DTYPES[self.precision]):
                    out = self.fn(t)
            else:
                out = self.fn(t)
            return out.float().cpu().numpy()
        finally:
            if before != self.threads:
                torch.set_num_threads(before)


def on_device(model: nn.Module, device: str) -> nn.Module:
    """``model`` if it is already on ``device``, else a copy moved there.

    Never moved in place: the caller's model stays where it is, the eager reference every engine is checked
    against and the model the next engine exports (``--device cuda`` moved the bench's one model to the GPU).
    """
    want = torch.device(device)
    have = next(itertools.chain(model.parameters(), model.buffers()), None)
    if have is None or (have.device.type == want.type and want.index in (None, have.device.index)):
        return model
    return copy.deepcopy(model).to(want)


@register_engine
class EagerEngine(Engine):
    name = "eager"
    devices = ("cpu", "cuda")
    package = "torch"
    precisions = ("f32", "bf16")

    def __init__(self, threads: int = 1, precision: str = "f32", device: str = "cpu"):
        super().__init__(threads, precision, device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailableError(f"--device {device}: PyTorch sees no CUDA GPU here (torch "
                                         f"{torch.__version__}). Run on the CPU (--device cpu) or on a GPU machine.")

    def load(self, model: nn.Module, example: torch.Tensor, *, cache_dir=None) -> Runner:
        model = on_device(model.eval(), self.device)
        return TorchRunner(model, self.device, self.precision, {"torch": torch.__version__, "threads": self.threads},
                           self.threads)


@register_engine
class CompileEngine(EagerEngine):
    """``torch.compile`` with Inductor; compiled on load (first call) so timing excludes it."""

    name = "compile"

    def load(self, model: nn.Module, example: torch.Tensor, *, cache_dir=None) -> Runner:
        model = on_device(model.eval(), self.device)
        compiled = torch.compile(model, mode="max-autotune-no-cudagraphs", dynamic=False)
        info = {"torch": torch.__version__, "threads": self.threads, "mode": "max-autotune-no-cudagraphs"}
        runner = TorchRunner(compiled, self.device, self.precision, info, self.threads)
        runner(example.numpy())  # trigger compilation now (at the runner's thread count), not inside the timed loop
        return runner
