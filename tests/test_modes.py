"""Models come back from leanvit's eval-mode and frozen passes as they came, module by module."""
import torch
import torch.nn as nn

from leanvit.modes import eval_mode, frozen
from leanvit.profile import count_macs


def _half_frozen() -> nn.Sequential:
    """Training, but with a BatchNorm kept in eval (frozen statistics) and a frozen first layer."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)).train()
    model(torch.zeros(2, 3, 8, 8))
    model[1].eval()
    model[0].requires_grad_(False)
    return model


def test_each_modules_mode_and_each_parameters_requires_grad_are_restored():
    """``model.train(was_training)`` put the frozen BatchNorm back in training mode."""
    model = _half_frozen()
    with eval_mode(model), frozen(model):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
    assert [m.training for m in model] == [True, False, True, True] and model.training
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True, True, True]


def test_counting_macs_leaves_a_mixed_mode_model_as_it_was():
    model = _half_frozen()
    count_macs(model, (3, 8, 8))
    assert [m.training for m in model] == [True, False, True, True]
