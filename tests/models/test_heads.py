"""Every zoo family's classifier head under timm's ``reset_classifier`` / ``forward_head`` API.

With ``global_pool=''`` the head is timm's unpooled one (ConvNeXt's, TinyViT's): whatever the head does
after pooling runs at every position of the final map, so a classifier gives a logit map in the features'
layout, NCHW (B, num_classes, H, W) or NHWC (B, H, W, num_classes) for EfficientMod, and without a
classifier the pre-logits map. Tiny models on non-square inputs, so a swapped H and W shows.
"""
from __future__ import annotations

import pytest
import timm
import torch

import leanvit.models

#: the smallest variant of each family, shrunk; fixed-size families built for the 96x64 input
TINY = {
    'mobilevig': ('mobilevig_ti', dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 2), head_hidden_size=24)),
    'efficientmod': ('efficientmod_xxs', dict(
        embed_dims=(8, 16, 24, 40), depths=(1, 1, 1, 1), attn_depths=(0, 0, 1, 1), attn_mlp_ratios=(4, 4, 2, 3))),
    'fcaformer': ('fcaformer_l1', dict(embed_dims=(16, 24, 32, 48), depths=(1, 1, 2, 1), num_heads=(2, 3))),
    'vcmamba': ('vcmamba_s', dict(embed_dims=(16, 16, 32, 48), depths=(1, 1, 1, 2), num_mamba=1)),
}
FIXED_SIZE = {'fcaformer', 'vcmamba'}
SIZE = (96, 64)  # a 3x2 final map
RESETS = [(0,), (5,), (5, ''), (5, 'avg'), (0, '')]


def _tiny(family: str, size=SIZE, **kwargs):
    name, args = TINY[family]
    if family in FIXED_SIZE:
        args = dict(args, img_size=size)
    torch.manual_seed(0)
    return timm.create_model(name, **{**args, **kwargs}).eval()


def test_every_family_is_covered():
    assert set(TINY) == set(leanvit.models.FAMILIES)


def _expected(model, feats: torch.Tensor, num_classes: int, pooled: bool) -> tuple[tuple, tuple]:
    """(output shape, pre-logits shape) by timm's conventions."""
    width = model.head_hidden_size
    batch = feats.shape[0]
    if pooled:
        return (batch, num_classes or width), (batch, width)
    if getattr(model, 'output_fmt', 'NCHW') == 'NHWC':
        grid = tuple(feats.shape[1:3])
        return (batch, *grid, num_classes or width), (batch, *grid, width)
    grid = tuple(feats.shape[2:])
    return (batch, num_classes or width, *grid), (batch, width, *grid)


@pytest.mark.parametrize('reset', RESETS, ids=[repr(r) for r in RESETS])
@pytest.mark.parametrize('family', sorted(TINY))
def test_reset_classifier_gives_timms_output_shapes(family, reset):
    model = _tiny(family, num_classes=10)
    model.reset_classifier(*reset)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        feats = model.forward_features(x)
        out, pre = model(x), model.forward_head(feats, pre_logits=True)
    num_classes, pool = reset[0], reset[1] if len(reset) > 1 else 'avg'
    assert model.num_classes == num_classes
    assert (tuple(out.shape), tuple(pre.shape)) == _expected(model, feats, num_classes, pooled=pool != '')


def _same_weights(model, other):
    """``model``'s weights loaded into ``other``, whose classifier may be a 1x1 conv where ``model``'s is a Linear."""
    target = other.state_dict()
    other.load_state_dict({k: v.reshape(target[k].shape) for k, v in model.state_dict().items()})
    return other


@pytest.mark.parametrize('family', sorted(TINY))
def test_unpooled_logits_are_the_pooled_head_at_every_position(family):
    """Each position of the unpooled logit map is what the pooled head gives for a map of that one position."""
    unpooled = _tiny(family, num_classes=10)
    unpooled.reset_classifier(5, '')
    pooled = _same_weights(unpooled, _tiny(family, num_classes=5))
    nhwc = getattr(unpooled, 'output_fmt', 'NCHW') == 'NHWC'
    with torch.no_grad():
        feats = unpooled.forward_features(torch.randn(2, 3, *SIZE))
        logits = unpooled.forward_head(feats)
        grid = feats.shape[1:3] if nhwc else feats.shape[2:]
        for h in range(grid[0]):
            for w in range(grid[1]):
                at = feats[:, h:h + 1, w:w + 1] if nhwc else feats[:, :, h:h + 1, w:w + 1]
                got = logits[:, h, w] if nhwc else logits[:, :, h, w]
                torch.testing.assert_close(got, pooled.forward_head(at))


@pytest.mark.parametrize('family', sorted(TINY))
def test_pooling_switches_back_and_forth(family):
    """'' and 'avg' in turn on one model; None keeps the current pooling."""
    model = _tiny(family, num_classes=10)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        feats = model.forward_features(x)
        for num_classes, pool, pooled in [(5, '', False), (5, 'avg', True), (0, '', False), (3, None, False),
                                          (7, 'avg', True), (4, None, True)]:
            model.reset_classifier(num_classes, pool)
            assert tuple(model(x).shape) == _expected(model, feats, num_classes, pooled)[0]


@pytest.mark.parametrize('family', sorted(TINY))
def test_headless_model_gets_a_working_classifier(family):
    model = _tiny(family, num_classes=0)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert model(x).shape == (2, model.head_hidden_size)
    model.reset_classifier(10)
    model.train()
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    classifiers = model.get_classifier()
    for head in classifiers if isinstance(classifiers, tuple) else (classifiers,):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('family', ['mobilevig', 'vcmamba'])
def test_distilled_training_returns_two_unpooled_logit_maps(family):
    model = _tiny(family, num_classes=10)
    model.reset_classifier(5, '')
    model.set_distilled_training(True)
    model.train()
    out, out_dist = model(torch.randn(2, 3, *SIZE))
    assert out.shape == out_dist.shape == (2, 5, 3, 2)
    (out.sum() + out_dist.sum()).backward()
