"""DiffRate's differentiable rate search on a tiny ViT: deterministic, driven by the MAC target."""
import copy
import warnings

import pytest
import timm
import torch

import leanvit.tokens as tokens
from leanvit.errors import LeanvitError
from leanvit.profile import count_macs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=4,
                             num_heads=3, num_classes=10).eval()


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(2)
    return torch.randn(16, 3, 32, 32)


def search(vit, calib, target, **kw):
    cfg = dict(target_macs=target, calib=calib, steps=4, lr=0.1, batch_size=8, granularity=2) | kw
    return tokens.apply(copy.deepcopy(vit), tokens.DiffRate(**cfg))


def test_search_is_deterministic_and_well_formed(vit, calib):
    full = count_macs(vit, (3, 32, 32))
    a, b = tokens.applied(search(vit, calib, 0.6 * full)), tokens.applied(search(vit, calib, 0.6 * full))
    assert (a.prune, a.merge) == (b.prune, b.merge)
    assert a.calib is None and a.target_macs == 0.6 * full
    n = 65
    assert a.prune[0] == a.merge[0] == n  # the first block is never reduced
    assert all(1 < v <= n for v in a.prune + a.merge)


def test_the_mac_target_steers_the_rates(vit, calib):
    full = count_macs(vit, (3, 32, 32))
    low, high = search(vit, calib, 0.4 * full), search(vit, calib, 0.95 * full)
    assert sum(tokens.token_counts(low)) < sum(tokens.token_counts(high))
    assert count_macs(low, (3, 32, 32)) < count_macs(high, (3, 32, 32)) < full


def test_labelled_calibration_batches(vit, calib):
    labels = torch.arange(16) % 10
    model = search(vit, [(calib[:8], labels[:8]), (calib[8:], labels[8:])], 0.6 * count_macs(vit, (3, 32, 32)))
    with torch.no_grad():
        assert model(calib[:2]).shape == (2, 10)


def test_unreachable_target(vit, calib):
    # said in GMACs, which is what `leanvit tokens --target-gmacs` asks for, and in MACs for the API
    with pytest.raises(LeanvitError, match=r"target of 2.9e-09 GMACs .*outside.*GMACs.*--target-gmacs.*e.g. 2.9e9"):
        search(vit, calib, 2.9)  # GMACs given where MACs are expected
    with pytest.raises(LeanvitError, match="outside"):
        search(vit, calib, 2 * count_macs(vit, (3, 32, 32)))


def test_published_rates():
    rates = tokens.DiffRate.published("deit_small_patch16_224", 2.9)
    assert rates.prune[:4] == (197, 196, 190, 168) and rates.merge[-1] == 3
    with pytest.raises(LeanvitError, match="published no rates"):
        tokens.DiffRate.published("deit_small_patch16_224", 3.0)


def test_a_target_between_published_ones_is_not_rounded_onto_one():
    with pytest.raises(LeanvitError, match="published no rates"):
        tokens.DiffRate.published("deit_small_patch16_224", 2.86)  # 2.9's counts give 2.909 G, above the target
    model = timm.create_model("deit_small_patch16_224")
    assert tokens.DiffRate(target_macs=2.9e9).resolve(model).prune[:4] == (197, 196, 190, 168)
    with pytest.raises(LeanvitError, match=r"at 2.86 GMACs \(published at 224x224: 2.3, 2.5, 2.7, 2.9, 3.1\).*calib"):
        tokens.DiffRate(target_macs=2.86e9).resolve(model)


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_the_search_reaches_its_target_whatever_the_model_size(vit, calib, fraction):
    """The MAC term is relative to the model's MACs: on this 0.009-GMAC ViT the official absolute one,
    5 (GMACs - target)^2, is at most 4e-4 (a miss of all its MACs), and the counts barely moved."""
    full = count_macs(vit, (3, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no miss reported
        model = search(vit, calib, fraction * full, steps=60, lr=0.1, min_lr=0.01)
    assert count_macs(model, (3, 32, 32)) == pytest.approx(fraction * full, abs=0.02 * full)


def test_a_missed_target_is_reported(vit, calib):
    full = count_macs(vit, (3, 32, 32))
    with pytest.warns(UserWarning, match=r"reached .* GMACs for a target of .*Raise macs_weight \(now 0; "
                                         r"leanvit tokens: --macs-weight\)"):
        search(vit, calib, 0.5 * full, macs_weight=0.0)


def test_search_options_without_a_search_are_refused(vit):
    with pytest.raises(LeanvitError, match=r"DiffRate\(steps=5\) sets the rate search.*--calib DATA"):
        tokens.apply(copy.deepcopy(vit), tokens.DiffRate(target_macs=0.6e9, steps=5))


def test_the_searched_counts_are_the_expected_counts_rounded_up(vit, calib):
    """The search trains on the expected kept count under its softmax (candidates 64, 61, ..., 1 at granularity 3:
    32.5 patch tokens while the logits stay uniform, lr 0) and keeps its ceiling, 33, plus the class token."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the target is not what this checks)
        method = tokens.applied(search(vit, calib, count_macs(vit, (3, 32, 32)) / 2, steps=1, lr=0.0, min_lr=0.0,
                                       granularity=3))
    assert method.prune[1:] == method.merge[1:] == (34,) * 3
