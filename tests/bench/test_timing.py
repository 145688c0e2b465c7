import time
from pathlib import Path

import numpy as np
import pytest

from leanvit.bench.timing import (
    Timing, TimingBudget, median_speedup, peak_rss_mb, release_freed_memory, reset_peak_rss, round_ratios, rss_mb,
    time_alternating, time_calls,
)


def test_statistics():
    t = Timing(np.arange(1, 101, dtype=float))
    assert t.n == 100 and t.median == 50.5 and t.min == 1.0
    assert abs(t.p90 - 90.1) < 1e-9 and abs(t.iqr - 49.5) < 1e-9


def test_time_calls_respects_min_iterations_and_measures_sleep():
    calls = []
    timing = time_calls(lambda: (calls.append(1), time.sleep(0.002)),
                        TimingBudget(warmup_s=0, warmup_iters=2, budget_s=0.0, min_iters=7))
    assert timing.n == 7 and len(calls) == 9
    assert timing.median >= 2.0


def test_time_calls_stops_at_max_iterations():
    assert time_calls(lambda: None, TimingBudget(warmup_s=0, budget_s=60, max_iters=50)).n == 50


def test_peak_rss_resets_and_grows():
    if not reset_peak_rss():
        return  # not Linux: nothing to measure
    before = peak_rss_mb()
    block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
    assert peak_rss_mb() >= before + 60
    del block


def resident_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_peak_rss_reset_leaves_out_memory_freed_before_it(heap_leftovers):
    """The reset takes the counter to the resident set, and glibc keeps freed heap memory resident: a bench row's
    "peak" held some 100 MiB the exporter had freed. Freed memory is now handed back first. (Handed back before the
    test too: earlier tests' freed heap, still resident, would take the new blocks without the set growing.)"""
    release_freed_memory()
    start = resident_mb()
    heap_leftovers(300)
    assert resident_mb() > start + 250  # freed, yet resident
    assert reset_peak_rss()
    assert peak_rss_mb() < start + 100
    assert resident_mb() < start + 100


def test_alternating_rounds_interleave_the_functions_and_pool_their_samples():
    calls = []
    budget = TimingBudget(warmup_s=0, warmup_iters=0, budget_s=0, min_iters=6)
    timings = time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, budget, rounds=3)
    assert calls == ["a", "a", "b", "b"] * 3  # each round: a's share, then b's
    assert timings["a"].n == timings["b"].n == 6
    assert len(timings["a"].round_medians_ms) == 3


def test_round_ratios_pair_the_two_timings_round_by_round(monkeypatch):
    """Each round's ratio compares two medians taken back to back, whatever the machine did between rounds. (On a
    clock the calls advance: sleeps overslept on a loaded CI machine, 3.9 for a ratio of 2.)"""
    from types import SimpleNamespace

    from leanvit.bench import timing

    calls, now_ns = [], [0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter_ns=lambda: now_ns[0],
                                                        perf_counter=lambda: now_ns[0] / 1e9))

    def call(name, ms):  # "a" takes twice "b"'s time; both twice as long in every second ("busy") round
        if name == "a" and calls[-1:] == ["b"] or not calls:
            calls.append("round")
        calls.append(name)
        now_ns[0] += int(ms * (2 if calls.count("round") % 2 == 0 else 1) * 1e6)

    budget = TimingBudget(warmup_s=0, warmup_iters=0, budget_s=0, min_iters=12)
    timings = time_alternating({"a": lambda: call("a", 2), "b": lambda: call("b", 1)}, budget, rounds=4)
    ratios = round_ratios(timings["a"], timings["b"])
    assert ratios.tolist() == [2.0] * 4
    a_rounds = timings["a"].round_medians_ms
    assert a_rounds == (2.0, 4.0, 2.0, 4.0)  # the busy rounds twice as long, their ratio unchanged
    with pytest.raises(ValueError):
        round_ratios(timings["a"], Timing(np.ones(3)))



def test_a_speedup_is_the_median_round_ratio_else_the_ratio_of_medians():
    """Rounds that ran 3x, 1x and 1x faster make 1x (the pooled medians' 2.0 / 1.0 says 2x); without rounds the
    medians' ratio, and nothing without both medians (a row that did not run)."""
    assert median_speedup([3.0, 1.0, 1.0], 2.0, 1.0) == 1.0
    assert median_speedup(np.array([1.5, 2.5]), 9.0, 1.0) == 2.0
    assert median_speedup((), 3.0, 2.0) == 1.5
    assert median_speedup((), None, 2.0) is None and median_speedup((), 3.0, None) is None

def test_every_round_weighs_alike_in_the_pooled_samples(monkeypatch):
    """Rounds timed by the clock gave a function more calls where the machine ran it fast: "a" at 1 ms in quiet
    rounds and 4 ms in busy ones pooled a median of 1 ms (four quiet calls to each busy one), "b" steady at 2 ms:
    a / b 0.5 where the rounds say 0.5 and 2 by turns. Each function now makes as many calls in every round."""
    from types import SimpleNamespace

    from leanvit.bench import timing

    now_ns, round_of = [0], {"a": -1}
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter_ns=lambda: now_ns[0],
                                                        perf_counter=lambda: now_ns[0] / 1e9))
    calls = []

    def call(name):
        calls.append(name)
        busy = round_of["a"] % 2 == 1
        now_ns[0] += int((4 if busy else 1) * 1e6) if name == "a" else int(2e6)

    def a():
        if calls[-1:] != ["a"]:
            round_of["a"] += 1
        call("a")

    budget = TimingBudget(warmup_s=0, warmup_iters=0, budget_s=0.08, min_iters=4)
    timings = time_alternating({"a": a, "b": lambda: call("b")}, budget, rounds=4)
    n = timings["a"].n // 4
    assert timings["a"].n == 4 * n and timings["b"].n % 4 == 0
    assert timings["a"].round_medians_ms == (1.0, 4.0, 1.0, 4.0)
    assert timings["a"].median == 2.5  # half its calls quiet, half busy (it was 1.0)


def test_the_call_limits_hold_for_all_the_rounds_together():
    """max_iters held per round (5 rounds of a fast function made 5x the stated calls), min_iters was floored."""
    fast = time_alternating({"f": lambda: None}, TimingBudget(warmup_s=0, budget_s=60, max_iters=100), rounds=5)
    assert fast["f"].n == 100
    slow = time_alternating({"f": lambda: None}, TimingBudget(warmup_s=0, budget_s=0, min_iters=10), rounds=3)
    assert slow["f"].n >= 10
    exact = time_alternating({"f": lambda: None}, TimingBudget(warmup_s=0, budget_s=0, min_iters=10, max_iters=10),
                             rounds=3)
    assert exact["f"].n == 12  # min_iters wins: 4 calls a round (max_iters' 3 a round made 9)
    with pytest.raises(ValueError, match="max_iters=2 is fewer calls than rounds=3"):
        time_alternating({"f": lambda: None}, TimingBudget(warmup_s=0, max_iters=2), rounds=3)


def test_a_rounds_figure_is_its_median_and_each_round_warms_up_first(monkeypatch):
    """A round of 1, 1 and 10 ms calls is a 1 ms round (its mean, 4 ms, would let one slow call move a round's
    ratio); each round after the first warms up again (here ``warmup_iters`` calls: the caches it finds were the
    other functions')."""
    from types import SimpleNamespace

    from leanvit.bench import timing

    now_ns, calls = [0], []
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter_ns=lambda: now_ns[0],
                                                        perf_counter=lambda: now_ns[0] / 1e9))

    def call():
        calls.append(1)
        now_ns[0] += int((10 if len(calls) % 5 == 0 else 1) * 1e6)  # per round: 2 warm-up calls, then 1, 1, 10 ms

    budget = TimingBudget(warmup_s=0, warmup_iters=2, budget_s=0, min_iters=9)
    timing_ = time_alternating({"f": call}, budget, rounds=3)["f"]
    assert len(calls) == 3 * (2 + 3)
    assert timing_.round_medians_ms == (1.0, 1.0, 1.0)


def fake_clock(monkeypatch, ms_per_call: float = 1.0):
    """Each call of the returned function takes ``ms_per_call`` on timing's clock; ``calls`` counts them."""
    from types import SimpleNamespace

    from leanvit.bench import timing

    now_ns, calls = [0], []
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter_ns=lambda: now_ns[0],
                                                        perf_counter=lambda: now_ns[0] / 1e9))

    def call():
        calls.append(1)
        now_ns[0] += int(ms_per_call * 1e6)

    return call, calls


def test_the_mean_min_and_p99_are_over_every_sample_whatever_their_order():
    """Samples in call order, not sorted: the mean is not the median, the min not the first call."""
    t = Timing(np.array([5.0, 1.0, 9.0, 3.0, 100.0, 2.0]))
    assert t.mean == 20.0 and t.median == 4.0 and t.min == 1.0
    assert t.p99 == pytest.approx(95.45) and t.p90 == pytest.approx(54.5)


def test_the_timed_budget_starts_after_the_warm_up(monkeypatch):
    """12.5 ms of warm-up (13 calls of 1 ms), then 5.5 ms timed (6 calls): the warm-up is not taken out of the
    budget (that left the minimum, 1 call)."""
    call, calls = fake_clock(monkeypatch)
    timing_ = time_calls(call, TimingBudget(warmup_s=0.0125, warmup_iters=0, budget_s=0.0055, min_iters=1))
    assert timing_.n == 6 and len(calls) == 13 + 6


def test_the_budget_is_spread_over_the_rounds(monkeypatch):
    """42 ms over 4 rounds: 10.5 ms a round, 11 calls of 1 ms in each (the whole budget in every round made 42)."""
    call, calls = fake_clock(monkeypatch)
    timing_ = time_alternating({"f": call}, TimingBudget(warmup_s=0, warmup_iters=0, budget_s=0.042, min_iters=1),
                               rounds=4)["f"]
    assert timing_.n == 44 and timing_.round_medians_ms == (1.0,) * 4


def test_later_rounds_warm_up_for_a_share_of_the_warm_up(monkeypatch):
    """12.5 ms before the first round (13 calls of 1 ms), 12.5 / 3 ms (5 calls) before each later one: not the whole
    warm-up again (13 each), nor none."""
    call, calls = fake_clock(monkeypatch)
    timing_ = time_alternating({"f": call}, TimingBudget(warmup_s=0.0125, warmup_iters=0, budget_s=0, min_iters=3),
                               rounds=3)["f"]
    assert timing_.n == 3 and len(calls) == (13 + 1) + 2 * (5 + 1)


def test_as_many_calls_as_rounds_is_enough_and_every_round_times_at_least_one():
    """max_iters equal to rounds is one call a round, not refused; min_iters 0 still times each round once (an empty
    round has no median)."""
    exact = time_alternating({"f": lambda: None}, TimingBudget(warmup_s=0, budget_s=0, min_iters=3, max_iters=3),
                             rounds=3)["f"]
    assert exact.n == 3 and len(exact.round_medians_ms) == 3
    none = time_alternating({"f": lambda: None}, TimingBudget(warmup_s=0, budget_s=0, min_iters=0), rounds=3)["f"]
    assert none.n == 3 and all(np.isfinite(none.round_medians_ms))


def test_round_ratios_refuse_timings_without_rounds():
    """Two time_calls timings have no rounds to pair: an empty answer would make median_speedup fall back silently."""
    with pytest.raises(ValueError, match="same time_alternating call"):
        round_ratios(Timing(np.ones(3)), Timing(np.ones(3)))
    with pytest.raises(ValueError):
        round_ratios((), ())


def test_memory_figures_are_read_in_mib_from_their_own_fields(monkeypatch, tmp_path):
    """VmHWM is the peak and VmRSS the resident set now, in kB; where /proc cannot be read or reset: None and False."""
    from leanvit.bench import timing

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t 9999999 kB\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n")
    monkeypatch.setattr(timing, "_STATUS", status)
    assert peak_rss_mb() == 200.0 and rss_mb() == 100.0
    monkeypatch.setattr(timing, "_STATUS", tmp_path / "missing")
    assert peak_rss_mb() is None and rss_mb() is None
    monkeypatch.setattr(timing, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    assert reset_peak_rss() is False


def test_freed_memory_is_released_with_the_garbage_collected_first():
    """Objects kept only by a reference cycle are freed memory too: they go before malloc_trim, even with gc off."""
    import gc
    import weakref

    class Node:
        pass

    gc.disable()
    try:
        node = Node()
        node.self = node
        ref = weakref.ref(node)
        del node
        assert ref() is not None  # the cycle keeps it until a collection
        release_freed_memory()
        assert ref() is None
    finally:
        gc.enable()
