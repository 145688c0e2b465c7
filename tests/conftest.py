"""Shared fixtures: tiny models so every engine round trip takes seconds on 2 CPU cores."""
from __future__ import annotations

import pytest
import timm
import torch

import leanvit  # noqa: F401  (registers leanvit's models with timm)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep exports out of the user's ~/.cache; shared across one test session."""
    monkeypatch.setenv("LEANVIT_CACHE", str(tmp_path_factory.getbasetemp() / "leanvit-cache"))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: CI has 2 cores, and tiny models gain nothing from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_vit():
    """A 2-block DeiT-tiny at 32x32: the same ops as the real one (attention, LayerNorm, GELU)."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()


@pytest.fixture(scope="session")
def tiny_cnn():
    torch.manual_seed(0)
    return timm.create_model("mobilenetv2_050", num_classes=10).eval()
