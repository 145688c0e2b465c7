"""DistillationLoss against DeiT's formulas written out by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from leanvit.errors import LeanvitError
from leanvit.train import DistillationLoss


class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(4, 3, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g),
            torch.randn(4, 6, generator=g) * 3, torch.tensor([0, 5, 2, 2]))


def _ce(logits, target):
    return -(logits.log_softmax(1).gather(1, target[:, None])).mean()


def test_hard_uses_the_distillation_head_and_teacher_argmax(batch):
    x, cls, dist, teacher, y = batch
    loss = DistillationLoss(nn.CrossEntropyLoss(), _Fixed(teacher), "hard", alpha=0.3)(x, (cls, dist), y)
    expected = 0.7 * _ce(cls, y) + 0.3 * _ce(dist, teacher.argmax(1))
    torch.testing.assert_close(loss, expected)


def test_soft_is_temperature_scaled_kl_per_logit(batch):
    x, cls, dist, teacher, y = batch
    tau = 2.0
    loss = DistillationLoss(nn.CrossEntropyLoss(), _Fixed(teacher), "soft", alpha=0.5, tau=tau)(x, cls, y)
    p_t = (teacher / tau).softmax(1)
    kl = (p_t * (p_t.log() - (cls / tau).log_softmax(1))).sum()
    expected = 0.5 * _ce(cls, y) + 0.5 * kl * tau**2 / cls.numel()  # single head: used for both terms
    torch.testing.assert_close(loss, expected)


def test_unknown_mode():
    with pytest.raises(LeanvitError, match="hard, soft"):
        DistillationLoss(nn.CrossEntropyLoss(), nn.Identity(), "medium")


class _Recording(nn.Module):
    def forward(self, x):
        self.seen = x
        return x.mean((2, 3))


def test_teacher_sees_its_own_resolution_and_normalisation():
    from leanvit.train.distill import AdaptedTeacher

    student = {"input_size": [3, 4, 4], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    teacher = {"input_size": [3, 8, 8], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear"}
    raw = torch.full((2, 3, 4, 4), 0.8)
    recorder = _Recording()
    AdaptedTeacher(recorder, student, teacher)((raw - 0.5) / 0.25)
    assert recorder.seen.shape == (2, 3, 8, 8)
    torch.testing.assert_close(recorder.seen, torch.full((2, 3, 8, 8), 0.8))  # the raw pixels, renormalised
    x = torch.randn(2, 3, 4, 4)
    AdaptedTeacher(recorder, student, {**student, "interpolation": "bicubic"})(x)
    assert recorder.seen is x  # same pre-processing: untouched


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_teacher_inputs_are_resized_with_the_teachers_interpolation(interpolation):
    """A teacher trained on bicubic resizes (timm's ViTs, DeiT) should see bicubic ones: bilinear is softer."""
    import torch.nn.functional as F

    from leanvit.train.distill import AdaptedTeacher

    student = {"input_size": [3, 4, 4], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    teacher = {"input_size": [3, 8, 8], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": interpolation}
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    recorder = _Recording()
    AdaptedTeacher(recorder, student, teacher)(x)
    torch.testing.assert_close(recorder.seen, F.interpolate(x * 0.25 + 0.5, size=(8, 8), mode=interpolation,
                                                            align_corners=False))


@pytest.mark.parametrize("norm", [{"mean": [0.5] * 3, "std": [1.0] * 3}, {"mean": [0.0] * 3, "std": [0.25] * 3}])
def test_a_teacher_at_the_students_size_with_other_normalisation_is_renormalised(norm):
    """Same resolution is not the same pre-processing: another mean or another std alone changes the teacher's input."""
    from leanvit.train.distill import AdaptedTeacher

    student = {"input_size": [3, 4, 4], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    recorder = _Recording()
    AdaptedTeacher(recorder, student, {**student, **norm})(x)
    expected = (x * 0.25 + 0.5 - norm["mean"][0]) / norm["std"][0]
    torch.testing.assert_close(recorder.seen, expected)


def test_no_gradient_reaches_the_teacher(batch):
    """The teacher is frozen by the loss itself: its forward runs without autograd (no graph kept, no gradients),
    even for a teacher whose parameters require them."""
    x, cls, _, _, y = batch
    teacher = nn.Linear(3, 6)
    student = cls.clone().requires_grad_()
    DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha=0.5, tau=2.0)(x, student, y).backward()
    assert student.grad is not None and teacher.weight.grad is None and teacher.bias.grad is None


def test_soft_uses_the_distillation_head_of_a_two_headed_student(batch):
    x, cls, dist, teacher, y = batch
    tau = 3.0
    loss = DistillationLoss(nn.CrossEntropyLoss(), _Fixed(teacher), "soft", alpha=0.4, tau=tau)(x, (cls, dist), y)
    p_t = (teacher / tau).softmax(1)
    kl = (p_t * (p_t.log() - (dist / tau).log_softmax(1))).sum()
    torch.testing.assert_close(loss, 0.6 * _ce(cls, y) + 0.4 * kl * tau**2 / dist.numel())


def test_a_teacher_trained_at_a_non_square_size_is_fed_that_size():
    """input_size is (channels, height, width): a teacher at 6x8 sees 6x8 batches, not 8x8."""
    from leanvit.train.distill import AdaptedTeacher

    student = {"input_size": [3, 4, 4], "mean": [0.5] * 3, "std": [0.25] * 3}
    teacher = {"input_size": [3, 6, 8], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
    recorder = _Recording()
    AdaptedTeacher(recorder, student, teacher)(torch.randn(2, 3, 4, 4))
    assert recorder.seen.shape == (2, 3, 6, 8)
