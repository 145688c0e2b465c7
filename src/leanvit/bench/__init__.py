"""Benchmarking: the timing protocol, the bench runner and its reports."""
from __future__ import annotations

from ..host import host_info
from .report import write_results
from .runner import DEFAULT_ENGINES, DEFAULT_MODELS, BenchConfig, BenchRow, run_bench
from .timing import Timing, TimingBudget, time_alternating, time_calls

__all__ = [
    "DEFAULT_ENGINES", "DEFAULT_MODELS", "BenchConfig", "BenchRow", "Timing", "TimingBudget",
    "host_info", "run_bench", "time_alternating", "time_calls", "write_results",
]
