"""The timing protocol: warm up, then time single calls until a time or count budget is spent.

Latency statistics are taken over individual calls (not averaged batches of calls) so that the
median, p90 and p99 describe what one request sees. Peak memory is the process's resident-set
high-water mark, reset before each measurement through ``/proc/self/clear_refs`` on Linux. The reset
sets it to the resident set at that moment, not to zero, so freed memory is handed back to the OS
first (:func:`release_freed_memory`) and the resident set right after the reset is the baseline
(:func:`rss_mb`) that a measurement's own growth is read against.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class TimingBudget:
    warmup_s: float = 0.5
    warmup_iters: int = 3  #: at least this many untimed calls, whatever ``warmup_s``
    budget_s: float = 2.0
    min_iters: int = 10  #: at least this many timed calls, even past ``budget_s``
    max_iters: int = 2000


@dataclass
class Timing:
    samples_ms: np.ndarray
    #: from :func:`time_alternating`: the median of each round's samples, in round order
    round_medians_ms: tuple[float, ...] = ()

    @property
    def n(self) -> int:
        return int(self.samples_ms.size)

    def pct(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def median(self) -> float:
        return self.pct(50)

    @property
    def p90(self) -> float:
        return self.pct(90)

    @property
    def p99(self) -> float:
        return self.pct(99)

    @property
    def iqr(self) -> float:
        """Spread: the inter-quartile range, robust to the odd preempted call."""
        return self.pct(75) - self.pct(25)

    @property
    def mean(self) -> float:
        return float(self.samples_ms.mean())

    @property
    def min(self) -> float:
        return float(self.samples_ms.min())


def time_calls(fn: Callable[[], object], budget: TimingBudget = TimingBudget()) -> Timing:
    """Call ``fn`` (which must block until its result is ready) under ``budget``."""
    start = time.perf_counter()
    i = 0
    while i < budget.warmup_iters or time.perf_counter() - start < budget.warmup_s:
        fn()
        i += 1
    samples = []
    start = time.perf_counter()
    while len(samples) < budget.max_iters and (
        len(samples) < budget.min_iters or time.perf_counter() - start < budget.budget_s
    ):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return Timing(np.asarray(samples))


def time_alternating(fns: dict[str, Callable[[], object]], budget: TimingBudget = TimingBudget(),
                     rounds: int = 5) -> dict[str, Timing]:
    """Time several functions in ``rounds`` alternating rounds: each function gets ``budget`` (its ``budget_s``
    each, spread over the rounds), its share of every round timed back to back with the others'.

    On a shared, noisy machine the speed drifts over minutes; timing A, then B, then C in one block
    each would fold that drift into their ratios. Alternating short rounds exposes all of them to
    the same drift, so ratios measured side by side hold. Samples of all rounds are pooled, each function making
    as many calls in every round as in its first, warmed up for ``warmup_s`` before it and ``warmup_s / rounds``
    before each later round (a round timed by the clock would give a function more calls
    where the machine ran it fast, and its pooled median would lean towards its fast rounds, by another amount
    for each function: ratios of such medians are biased).
    """
    if budget.max_iters < rounds:
        raise ValueError(f"max_iters={budget.max_iters} is fewer calls than rounds={rounds}: every round times each "
                         "function at least once")
    # the call limits hold for the whole timing (min_iters rounded up to whole calls per round, winning over max_iters)
    min_iters = max(1, math.ceil(budget.min_iters / rounds))
    per_round = replace(budget, budget_s=budget.budget_s / rounds, min_iters=min_iters,
                        max_iters=max(min_iters, budget.max_iters // rounds))
    samples: dict[str, list[np.ndarray]] = {name: [] for name in fns}
    for i in range(rounds):
        for name, fn in fns.items():
            if i:  # the first round's count of calls, however fast the machine is now, after a shorter warm-up
                calls = len(samples[name][0])  # (warm already: it only brings the caches back from the others)
                samples[name].append(time_calls(fn, replace(per_round, warmup_s=budget.warmup_s / rounds,
                                                             budget_s=0.0, min_iters=calls, max_iters=calls)
                                                ).samples_ms)
            else:
                samples[name].append(time_calls(fn, per_round).samples_ms)
    return {name: Timing(np.concatenate(parts), tuple(float(np.median(part)) for part in parts))
            for name, parts in samples.items()}


def round_ratios(a: Timing | Sequence[float], b: Timing | Sequence[float]) -> np.ndarray:
    """``a``'s latency over ``b``'s within each alternating round (each a :class:`Timing`, or its round medians as a
    bench row keeps them).

    A shared machine switches between states (a busy neighbour slows every model, INT8 ones more than f32): on the
    2-core AMD EPYC efficientformerv2_s0's f32 / INT8 ratio ranged 1.31-2.11 over the 12 rounds of one run
    (median 1.64; pooled medians 1.82, ``benchmarks/results/ptq-smoke-epyc-s26b/``). Within one round both models
    saw the same state, so the spread of these ratios shows how far the machine moved a run's figure."""
    a, b = (t.round_medians_ms if isinstance(t, Timing) else tuple(t) for t in (a, b))
    if not a or len(a) != len(b):
        raise ValueError("round_ratios needs two timings from the same time_alternating call")
    return np.asarray(a) / np.asarray(b)


def median_speedup(ratios: Sequence[float], base_ms: float | None, ms: float | None) -> float | None:
    """How many times faster a configuration ran than its base (below 1: slower): the median of their per-round
    ``ratios`` (:func:`round_ratios`) where they were timed in the same alternating rounds, since the pooled medians'
    ratio can land between two load states of a shared machine, even outside every round's range; else the
    ratio of their medians ``base_ms / ms``; None without them."""
    if len(ratios):
        return float(np.median(ratios))
    return base_ms / ms if base_ms and ms else None


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand memory that is freed but still resident back to the OS: Python's garbage, then (with glibc)
    ``malloc_trim(0)``. glibc keeps what an exporter or an earlier engine freed on its heap, resident, otherwise."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def reset_peak_rss() -> bool:
    """Release freed memory (:func:`release_freed_memory`), then reset the kernel's peak-RSS counter for this
    process to its resident set now; False where the OS cannot."""
    release_freed_memory()
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _status_mb(key: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float | None:
    """The process's peak resident set (VmHWM) in MiB since the last reset, or None."""
    return _status_mb("VmHWM")


def rss_mb() -> float | None:
    """The process's resident set (VmRSS) now, in MiB, or None."""
    return _status_mb("VmRSS")
