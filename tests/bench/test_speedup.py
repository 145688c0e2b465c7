"""``measure_speedup``: the float model on the engine against a quantized runner, timed side by side."""
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from leanvit.bench.speedup import Speedup, measure_speedup
from leanvit.deploy import get_engine


@pytest.mark.parametrize("engine_name", ["onnxruntime", "openvino"])
def test_the_float_model_runs_on_the_engine_and_the_slower_side_is_named(engine_name):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)).eval()
    engine = get_engine(engine_name, threads=1)
    example = torch.randn(1, 3, 16, 16)

    def slow(x):  # a "quantized" model that takes at least 3 ms
        time.sleep(0.003)
        return x

    speedup = measure_speedup(model, slow, engine, example, budget_s=0.2, rounds=2)
    assert (speedup.engine, speedup.threads, speedup.batch, speedup.rounds) == (engine_name, 1, 1, 2)
    assert speedup.quantized_ms >= 3.0 > speedup.float_ms > 0
    assert len(speedup.round_ratios) == 2 and all(0 < r < 1 for r in speedup.round_ratios)
    assert speedup.ratio == pytest.approx(float(np.median(speedup.round_ratios))) and speedup.ratio < 1
    assert speedup.to_dict()["ratio"] == round(speedup.ratio, 3)
    unpaired = Speedup("openvino", 1, 1, float_ms=1.0, quantized_ms=4.0, rounds=1)  # no rounds: the medians' ratio
    assert unpaired.ratio == 0.25
