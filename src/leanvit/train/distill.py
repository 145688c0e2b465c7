"""DeiT's knowledge-distillation objective (Touvron et al., 2021), for any student and teacher."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LeanvitError

DISTILL_MODES = ("hard", "soft")


class DistillationLoss(nn.Module):
    """``(1 - alpha) * base(student, target) + alpha * distill(student_dist, teacher)``.

    A student with a distillation head (DeiT's ``dist_token``, ``set_distilled_training(True)``)
    returns ``(class_logits, dist_logits)`` in training: the base loss uses the first, the
    distillation term the second; any other student uses its one output for both. ``hard`` is
    cross-entropy against the teacher's arg-max; ``soft`` is the KL divergence at temperature
    ``tau``, scaled by ``tau**2`` and divided by the number of logits, as the official code does.
    The teacher sees the same (mixed, augmented) batch as the student.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module, mode: str = "hard", alpha: float = 0.5,
                 tau: float = 1.0):
        super().__init__()
        if mode not in DISTILL_MODES:
            raise LeanvitError(f"Distillation mode must be one of {', '.join(DISTILL_MODES)}, got '{mode}'.")
        self.base, self.teacher, self.mode, self.alpha, self.tau = base, teacher, mode, alpha, tau

    def forward(self, inputs: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        outputs, outputs_kd = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base = self.base(outputs, targets)
        with torch.no_grad():
            teacher = self.teacher(inputs)
        if self.mode == "hard":
            kd = F.cross_entropy(outputs_kd, teacher.argmax(dim=1))
        else:
            t = self.tau
            kd = F.kl_div(F.log_softmax(outputs_kd / t, dim=1), F.log_softmax(teacher / t, dim=1),
                          reduction="sum", log_target=True) * (t * t) / outputs_kd.numel()
        return (1 - self.alpha) * base + self.alpha * kd


class AdaptedTeacher(nn.Module):
    """A teacher fed the student's batches in its own pre-processing.

    The student's images are un-normalised with the student's mean/std, resized to the teacher's
    input size (with the teacher's interpolation) and normalised with the teacher's mean/std, so a
    hybrid trained at 64x64 can teach a ViT trained at 32x32 on the images it knows. With identical
    data configs the batch passes through untouched.
    """

    def __init__(self, teacher: nn.Module, student_config: dict, teacher_config: dict):
        super().__init__()
        self.teacher = teacher
        self.size = tuple(teacher_config["input_size"][-2:])
        self.mode = "bicubic" if teacher_config.get("interpolation") == "bicubic" else "bilinear"
        same_size = tuple(student_config["input_size"][-2:]) == self.size
        same_norm = all(list(student_config[k]) == list(teacher_config[k]) for k in ("mean", "std"))
        self.identity = same_size and same_norm
        for name, config in (("student", student_config), ("teacher", teacher_config)):
            self.register_buffer(f"{name}_mean", torch.tensor(config["mean"]).view(1, -1, 1, 1), persistent=False)
            self.register_buffer(f"{name}_std", torch.tensor(config["std"]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return self.teacher(x)
        x = x * self.student_std + self.student_mean
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode=self.mode, align_corners=False)
        return self.teacher((x - self.teacher_mean) / self.teacher_std)

