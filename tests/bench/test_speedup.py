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


def test_the_words_quote_the_ratio_that_was_tested_not_the_pooled_medians():
    """The pooled medians can say INT8 is 2.4x as fast while the rounds, paired back to back, say 0.8x: the
    summary and the slower verdict both use the median per-round ratio, with its range over the rounds."""
    split = Speedup("openvino", 2, 1, float_ms=2.40, quantized_ms=1.00, rounds=5,
                    round_ratios=(0.42, 0.6, 0.8, 0.9, 1.2))
    assert split.slower
    assert split.summary() == "0.80x as fast, the median of 0.42-1.20x in 5 alternating rounds"
    faster = Speedup("openvino", 2, 1, float_ms=2.00, quantized_ms=1.00, rounds=6,
                     round_ratios=(1.3, 1.4, 1.4, 1.4, 1.5, 1.6))
    assert not faster.slower and faster.summary().startswith("1.40x as fast, the median of 1.30-1.60x in 6")
    assert "2.00" not in faster.summary()  # 2.00 / 1.00 ms would read as 2x, not the 1.40x tested
    even = Speedup("openvino", 2, 1, float_ms=1.0, quantized_ms=1.0, rounds=2, round_ratios=(0.995, 0.997))
    assert even.summary().startswith("1.00x") and not even.slower  # not "slower" beside a printed 1.00x
    unpaired = Speedup("openvino", 1, 1, float_ms=1.0, quantized_ms=4.0, rounds=1)  # the medians are what is tested
    assert unpaired.slower and unpaired.summary() == "0.25x as fast, the medians 4.00 against 1.00 ms"


def test_the_budget_rounds_batch_and_threads_are_the_ones_given(monkeypatch):
    """The budget and rounds go to the timing; the row names the engine's threads and the example's batch; the float
    side runs the model exported onto the engine (its logits), the quantized side the runner given."""
    from leanvit.bench import speedup as module
    from leanvit.bench.timing import Timing

    seen = {}

    def alternating(fns, budget, rounds):
        seen.update(budget=budget, rounds=rounds, outputs={name: fn() for name, fn in fns.items()})
        return {"float": Timing(np.full(4, 2.0), (2.0, 2.0)), "quantized": Timing(np.full(4, 1.0), (1.0, 1.0))}

    monkeypatch.setattr(module, "time_alternating", alternating)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)).eval()
    example = torch.randn(2, 3, 16, 16)
    speedup = measure_speedup(model, lambda x: "quantized", get_engine("onnxruntime", threads=2), example,
                              budget_s=0.7, rounds=2)
    assert seen["budget"].budget_s == 0.7 and seen["rounds"] == 2
    assert (speedup.threads, speedup.batch, speedup.rounds) == (2, 2, 2)
    assert (speedup.float_ms, speedup.quantized_ms, speedup.round_ratios, speedup.ratio) == (2.0, 1.0, (2.0, 2.0), 2.0)
    assert seen["outputs"]["quantized"] == "quantized"
    assert np.allclose(seen["outputs"]["float"], model(example).detach().numpy(), atol=1e-5)


def test_the_figures_are_kept_to_the_microsecond(monkeypatch):
    """Medians of 1/3 and 7/3 ms are stored as 0.333 and 2.333, their rounds' ratios as 0.143 (not 15 digits)."""
    from leanvit.bench import speedup as module
    from leanvit.bench.timing import Timing

    monkeypatch.setattr(module, "time_alternating", lambda fns, budget, rounds: {
        "float": Timing(np.full(2, 1 / 3), (1 / 3, 1 / 3)), "quantized": Timing(np.full(2, 7 / 3), (7 / 3, 7 / 3))})
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    speedup = measure_speedup(model, lambda x: x, get_engine("onnxruntime", threads=1), torch.randn(1, 3, 4, 4),
                              rounds=2)
    assert (speedup.float_ms, speedup.quantized_ms, speedup.round_ratios) == (0.333, 2.333, (0.143, 0.143))
