import warnings

import pytest
import timm
import torch
import torch.nn as nn

from leanvit.data import check_input_size
from leanvit.errors import InputSizeError, LeanvitWarning
from leanvit.profile import count_macs, count_params, create_model_at, profile_model


@pytest.mark.parametrize("name", ["mobilenetv2_050", "deit_tiny_patch16_224", "efficientformerv2_s0"])
def test_params_equal_timms_own_count(name):
    model = timm.create_model(name)
    expected = sum(p.numel() for p in model.parameters())
    assert count_params(model) == expected
    assert profile_model(name, model=model).params == expected


def test_macs_of_a_linear_and_a_conv_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    conv = 8 * 16 * 16 * 3 * 3 * 3
    linear = 8 * 16 * 16 * 10
    assert count_macs(model, (3, 16, 16)) == conv + linear


def test_attention_matmuls_are_counted():
    """A 1-block ViT: the two attention matmuls (QK^T and AV) must be in the count."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=0, class_token=False,
                              global_pool="avg")
    n, d = 4, 192  # 2x2 patches
    linears = n * (3 * 3 * 16 * 16 * d) // 3 + n * d * 3 * d + n * d * d + 2 * n * d * 4 * d
    attention = 2 * n * n * d
    assert count_macs(model, (3, 32, 32)) == linears + attention


def test_deit_tiny_matches_published_and_reports_difference():
    prof = profile_model("deit_tiny_patch16_224")
    assert prof.published_params == 5_720_000
    assert abs(prof.params_diff_pct) < 0.5 and abs(prof.macs_diff_pct) < 2
    for measured, published, diff in ((prof.params, prof.published_params, prof.params_diff_pct),
                                      (prof.macs, prof.published_macs, prof.macs_diff_pct)):
        assert diff == round(100 * (measured - published) / published, 2)  # above the paper: positive
    # at another resolution the published MACs no longer apply
    assert profile_model("deit_tiny_patch16_224", img_size=160).published_macs is None


def test_count_macs_restores_training_mode():
    model = nn.Linear(4, 2).train()
    count_macs(model, (4,))
    assert model.training


def test_distilled_deit_is_built_for_another_img_size():
    """Its constructor takes ``*args, **kwargs``, so a signature check never passed it ``img_size``: no size but 224."""
    model = create_model_at("deit_tiny_distilled_patch16_224", 32)
    assert model.pos_embed.shape[1] == 2 * 2 + 2  # a 2x2 patch grid, class and distillation tokens


def test_a_size_that_is_not_a_multiple_of_the_patch_size_warns():
    """deit_tiny at 40x40 computes as at 32x32 (its 16-pixel patches drop the rest), silently."""
    with pytest.warns(UserWarning, match="drops the last 8 pixel rows and columns: it computes as at 32x32"):
        create_model_at("deit_tiny_patch16_224", 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_model_at("deit_tiny_patch16_224", 48)
        create_model_at("mobilenetv2_050", 40)  # no patch_embed.patch_size: takes any size


def test_commands_that_run_images_warn_of_dropped_pixels_too():
    """eval / quantize / train check the input size with check_input_size; they ran such a size silently."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=(44, 50), patch_size=8, depth=1, embed_dim=16,
                              num_heads=2)
    with pytest.warns(LeanvitWarning, match=r"cuts 44x50 inputs into 8x8 patches and drops the last 4 pixel rows and "
                                            r"the last 2 pixel columns: it computes as at 40x48\. Use inputs whose"):
        check_input_size(model, {"input_size": (3, 44, 50)}, "deit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_input_size(timm.create_model("deit_tiny_patch16_224", img_size=(40, 48), patch_size=8, depth=1,
                                           embed_dim=16, num_heads=2), {"input_size": (3, 40, 48)}, "deit")
        padded = timm.create_model("deit_tiny_patch16_224", img_size=40, patch_size=8, depth=1, embed_dim=16,
                                   num_heads=2, dynamic_img_size=True, dynamic_img_pad=True)
        check_input_size(padded, {"input_size": (3, 44, 44)}, "deit")  # it pads to whole patches: nothing dropped


def test_params_are_compared_with_the_published_figure_only_at_its_size():
    prof = profile_model("deit_tiny_patch16_224", img_size=160)  # the position table is smaller there
    assert prof.published_params is None and prof.params_diff_pct is None


class _ClassToken(nn.Module):
    """CaiT's pattern: a parameter expanded in ``forward`` (a view made under ``no_grad``) fed to a submodule."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.head = nn.Linear(4, 3)
        self.head.bias.requires_grad_(False)

    def forward(self, x):
        return self.head(self.cls_token.expand(x.shape[0], -1, -1))


def test_count_macs_of_a_parameter_view_made_under_no_grad_and_the_grad_flags_are_restored():
    """FlopCounterMode's module tracker asserted on it ('Expected gradient function to be set': cait_xxs24_224)."""
    model = _ClassToken()
    assert count_macs(model, (4,)) == 4 * 3
    assert [p.requires_grad for p in model.parameters()] == [True, True, False]


def test_a_classifier_other_than_the_published_models_is_not_compared():
    """The published 5.72 M parameters are those of the 1000-class head, not of a 10-class one."""
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, depth=1)  # depth 1: fast, the head decides
    prof = profile_model("deit_tiny_patch16_224", model=model)
    assert prof.published_params is None and prof.params_diff_pct is None and prof.macs_diff_pct is None
    assert "published figure is for the 1000-class head" in prof.not_compared and "has 10" in prof.not_compared
    small = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=1)
    assert profile_model("deit_tiny_patch16_224", 32, model=small).not_compared == "the published figure is at 224x224"


def test_a_size_the_constructor_rejects_is_an_input_size_error():
    """XCiT asserts the patch size divides the image size when it is built, before any forward pass."""
    with pytest.raises(InputSizeError, match=r"xcit_nano_12_p16_224 does not run at 100x100 \(.*patch_size.*\); "
                                             r"its native size is 224x224\.$"):
        create_model_at("xcit_nano_12_p16_224", 100)


def test_a_size_the_forward_rejects_does_not_claim_only_the_native_size_runs():
    """efficientformerv2_s0 fails at 100x100 but runs at 192 and 256: the native size is not the only one."""
    with pytest.raises(InputSizeError) as e:
        create_model_at("efficientformerv2_s0", 100)
    assert str(e.value).startswith("efficientformerv2_s0 does not run at 100x100 (")
    assert str(e.value).endswith("; its native size is 224x224.") and "takes" not in str(e.value)


def test_a_model_given_is_profiled_at_the_size_it_was_built_for():
    """A ViT built with img_size=32 and given to profile_model was run at its pretrained_cfg's 224 (which timm leaves
    as it was): an assertion from its patch embedding."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2)
    profile = profile_model("deit_tiny_patch16_224", model=model)
    assert profile.img_size == 32 and profile.macs == count_macs(model, (3, 32, 32))


def test_macs_of_a_half_model():
    """The counting input was float32 whatever the model: a bfloat16 model failed with a dtype error."""
    assert count_macs(nn.Linear(4, 3).to(torch.bfloat16), (4,)) == 12


def test_frozen_parameters_count_and_macs_are_counted_in_eval_mode():
    """A frozen backbone is still model size; a BatchNorm in training mode cannot take the batch of 1 counted."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    model[0].requires_grad_(False)
    assert count_params(model) == 4 * 4 + 4 + 2 * 4
    assert count_macs(model, (4,)) == 4 * 4 and model.training


def test_the_difference_is_relative_to_the_published_figure():
    """A 1-block deit_tiny (1000 classes, 224): far below the published 5.72 M / 1.26 G of the DeiT README, so the
    denominator matters; the published note is given only for entries that have one."""
    model = timm.create_model("deit_tiny_patch16_224", depth=1)
    prof = profile_model("deit_tiny_patch16_224", model=model)
    assert prof.params_diff_pct == round(100 * (prof.params - 5.72e6) / 5.72e6, 2)
    assert prof.macs_diff_pct == round(100 * (prof.macs - 1.26e9) / 1.26e9, 2)
    assert prof.published_note is None


def test_img_size_range_is_inclusive_and_checked_before_building():
    from leanvit.errors import LeanvitError
    from leanvit.profile import check_img_size

    check_img_size(16)
    check_img_size(4096)
    for size in (15, 4097):
        with pytest.raises(LeanvitError, match=f"--img-size must be between 16 and 4096, got {size}"):
            profile_model("no_such_model", img_size=size)


def test_an_asked_size_wins_over_the_built_one_and_the_input_has_the_cfgs_channels():
    vit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2,
                            dynamic_img_size=True)
    prof = profile_model("deit_tiny_patch16_224", 48, model=vit)
    assert prof.img_size == 48 and prof.macs == count_macs(vit, (3, 48, 48))
    gray = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten())
    gray.pretrained_cfg = {"input_size": (1, 16, 16)}
    assert profile_model("gray", model=gray).macs == 2 * 16 * 16


def test_a_published_note_comes_with_the_comparison():
    """EfficientFormerV2's README counts parameters without BatchNorm (../shared/specs/zoo-hybrids.md)."""
    model = timm.create_model("efficientformerv2_s0")
    assert "BatchNorm" in profile_model("efficientformerv2_s0", model=model).published_note
