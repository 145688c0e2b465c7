"""Building blocks shared by leanvit's model families."""
from .selective_scan import linear_recurrence, selective_scan

__all__ = ["linear_recurrence", "selective_scan"]
