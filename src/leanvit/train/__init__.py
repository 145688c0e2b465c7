"""Training: ``fit(TrainConfig(...))`` — supervised or DeiT-style distillation, resumable, DDP.

Built from timm's parts: ``create_transform`` (RandAugment, random erasing), ``Mixup``,
``SoftTargetCrossEntropy`` / ``LabelSmoothingCrossEntropy``, ``create_optimizer_v2`` (AdamW),
``CosineLRScheduler`` with warm-up and ``ModelEmaV3``. Multi-GPU and multi-node runs are
launched with ``torchrun``; each process calls the same ``fit``.
"""
from __future__ import annotations

from .config import TrainConfig
from .distill import DistillationLoss
from .loop import TrainResult, fit

__all__ = ["DistillationLoss", "TrainConfig", "TrainResult", "fit"]
