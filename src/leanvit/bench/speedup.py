"""Is a quantized model faster than the float one on this engine and this CPU? Timed side by side.

Whether INT8 pays depends on the engine and the CPU more than on the model: ONNX Runtime runs the
activations between INT8 convolutions in float, with a dequantize / quantize pass around each, so a
mobile CNN can be slower in INT8 than in f32 there while OpenVINO runs the same model 1.5x faster
(``benchmarks/results/ptq-families/``). So ``leanvit quantize`` measures it where the model will run.
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..deploy import export_onnx
from ..deploy.engine import Engine, Runner
from .timing import TimingBudget, median_speedup, round_ratios, time_alternating


@dataclass
class Speedup:
    """Median latencies (ms) of a float model and its quantized counterpart, timed in alternating rounds, and
    the speed-up measured round by round."""

    engine: str
    threads: int
    batch: int
    float_ms: float
    quantized_ms: float
    rounds: int
    #: float / quantized within each round (both timed back to back): how far the machine's load moved the ratio
    round_ratios: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        """How many times faster the quantized model is (below 1: slower): :func:`median_speedup` of the per-round
        ratios, which pair timings taken back to back."""
        return median_speedup(self.round_ratios, self.float_ms, self.quantized_ms)

    @property
    def slower(self) -> bool:
        """Whether the quantized model is slower, judged on the ratio as :meth:`summary` prints it (so a 0.996
        that prints as 1.00x is not called slower)."""
        return round(self.ratio, 2) < 1

    def summary(self) -> str:
        """The speed-up as tested, e.g. ``0.80x as fast, the median of 0.42-1.20x in 5 alternating rounds``.
        Without the pooled medians: their ratio can disagree with the per-round one, even on which is faster."""
        if not self.round_ratios:
            return f"{self.ratio:.2f}x as fast, the medians {self.quantized_ms:.2f} against {self.float_ms:.2f} ms"
        return (f"{self.ratio:.2f}x as fast, the median of {min(self.round_ratios):.2f}-"
                f"{max(self.round_ratios):.2f}x in {len(self.round_ratios)} alternating rounds")

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": round(self.ratio, 3)}


def measure_speedup(model: nn.Module, quantized: Runner, engine: Engine, example: torch.Tensor, *,
                    budget_s: float = 4.0, rounds: int = 6) -> Speedup:
    """Time the float ``model`` (exported to ONNX and loaded on ``engine``) and the ``quantized`` runner on
    ``example`` in ``rounds`` alternating rounds, so that a shared machine's drift hits both alike."""
    x = example.numpy()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on the float model are not the user's concern here
        reference = engine.load_model_file(export_onnx(model, example, Path(tmp) / "float.onnx"))
    timings = time_alternating({"float": lambda: reference(x), "quantized": lambda: quantized(x)},
                               TimingBudget(warmup_s=0.2, budget_s=budget_s), rounds=rounds)
    per_round = np.round(round_ratios(timings["float"], timings["quantized"]), 3)
    return Speedup(engine.name, engine.threads, example.shape[0], round(timings["float"].median, 3),
                   round(timings["quantized"].median, 3), rounds, tuple(per_round.tolist()))
