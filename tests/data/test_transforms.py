"""Pre-processing comes from the model's timm config, never from constants in leanvit."""
from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from leanvit.data import build_transform, resolve_data_config


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_data_config_is_the_models_pretrained_cfg(name):
    model = timm.create_model(name, pretrained=False, depth=1)
    cfg = resolve_data_config(model)
    assert tuple(cfg["mean"]) == tuple(model.pretrained_cfg["mean"])
    assert tuple(cfg["std"]) == tuple(model.pretrained_cfg["std"])
    assert cfg["crop_pct"] == model.pretrained_cfg["crop_pct"]
    assert cfg["input_size"] == list(model.pretrained_cfg["input_size"])
    small = resolve_data_config(model, img_size=32, crop_pct=1.0)
    assert small["input_size"] == [3, 32, 32] and small["crop_pct"] == 1.0


def test_a_saved_data_config_keeps_its_crop_and_statistics_at_another_resolution():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    saved = {"input_size": [3, 96, 96], "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
             "std": [0.25, 0.25, 0.25], "crop_pct": 1.0, "crop_mode": "center"}
    assert resolve_data_config(model, saved=saved) == saved
    larger = resolve_data_config(model, img_size=128, saved=saved)
    assert larger == {**saved, "input_size": [3, 128, 128]}  # not timm's 0.9 crop and ImageNet statistics
    assert resolve_data_config(model, crop_pct=0.875, saved=saved)["crop_pct"] == 0.875
    assert saved["input_size"] == [3, 96, 96]  # the checkpoint's own record is not modified


def test_a_non_square_size_is_height_by_width_and_its_images_are_cut_to_it():
    """A ViT built for (48, 64) inputs: the pre-processing yields 48x64 images, from timm's config or a saved one,
    where taking the first side (or timm's 224) stopped the command at the input-size check."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=(48, 64), patch_size=16)
    cfg = resolve_data_config(model, img_size=(48, 64), crop_pct=1.0)
    assert cfg["input_size"] == [3, 48, 64] and cfg["crop_pct"] == 1.0
    assert tuple(cfg["mean"]) == tuple(model.pretrained_cfg["mean"])
    saved = resolve_data_config(model, img_size=[48, 64], saved={**cfg, "input_size": [3, 32, 32]})
    assert saved == cfg
    x = build_transform(cfg)(Image.new("RGB", (100, 80)))
    assert x.shape == (3, 48, 64) and model(x[None]).shape == (1, 1000)


def test_eval_transform_normalises_with_the_models_mean_and_std():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    cfg = resolve_data_config(model, img_size=16, crop_pct=1.0)
    rgb = (200, 100, 50)
    x = build_transform(cfg)(Image.new("RGB", (16, 16), rgb))
    expected = (np.array(rgb) / 255 - np.array(cfg["mean"])) / np.array(cfg["std"])
    assert x.shape == (3, 16, 16)
    np.testing.assert_allclose(x.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("interpolation, crop_pct, resized", [("bicubic", 0.8, 40), ("bilinear", 1.0, 32)])
def test_eval_transform_resizes_by_the_crop_fraction_with_the_configs_filter(interpolation, crop_pct, resized):
    """timm's validation pre-processing: the shorter side resized to size / crop_pct with the config's filter, then
    the centre cropped (a 50x50 image to 40x40 bicubic then 32x32 at crop_pct 0.8)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8))
    cfg = {"input_size": (3, 32, 32), "interpolation": interpolation, "mean": (0.0, 0.0, 0.0),
           "std": (1.0, 1.0, 1.0), "crop_pct": crop_pct, "crop_mode": "center"}
    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    margin = (resized - 32) // 2
    expected = image.resize((resized, resized), filters[interpolation]).crop(
        (margin, margin, margin + 32, margin + 32))
    x = build_transform(cfg)(image)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), np.asarray(expected) / 255, atol=1e-6)


def test_randaugment_posterize_at_full_strength_keeps_one_bit():
    cfg = resolve_data_config(timm.create_model("vit_tiny_patch16_224", depth=1), img_size=16)
    transform = build_transform(cfg, train=True, auto_augment="rand-m10-mstd0-inc1")
    ops = [op for step in transform.transforms for op in getattr(step, "ops", ()) if op.name.startswith("Posterize")]
    assert ops, "RandAugment should include a posterize operation"
    op = ops[0]
    op.prob = 1.0
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out = np.asarray(op(img))
    assert set(np.unique(out)) <= {0, 128}


def test_training_crop_scale_bounds_the_random_crop_area():
    cfg = resolve_data_config(timm.create_model("vit_tiny_patch16_224", depth=1), img_size=16)
    crop = build_transform(cfg, train=True, crop_scale=0.35).transforms[0]
    assert crop.scale == (0.35, 1.0)
    assert build_transform(cfg, train=True).transforms[0].scale == (0.08, 1.0)  # timm's ImageNet default


def test_evaluation_uses_the_test_time_size_as_timms_validate_does():
    """A model trained at one size and scored by timm at another (pretrained_cfg's test_input_size, test_crop_pct):
    ``leanvit eval`` uses the test-time pair unless --use-train-size."""
    import argparse

    from leanvit.cli import input_data_config

    model = timm.create_model("resnet10t", pretrained=False)  # trained at 176, scored at 224 with crop 0.95
    cfg = model.pretrained_cfg
    assert resolve_data_config(model)["input_size"] == list(cfg["input_size"])
    test = resolve_data_config(model, use_test_size=True)
    assert test["input_size"] == list(cfg["test_input_size"]) != list(cfg["input_size"])
    assert test["crop_pct"] == cfg.get("test_crop_pct", cfg["crop_pct"])
    args = argparse.Namespace(model_kwargs={}, img_size=None, crop_pct=None)
    assert input_data_config(model, {}, args) == test
    assert input_data_config(model, {}, argparse.Namespace(**vars(args), use_train_size=True))["input_size"] == [3, 176, 176]


def test_the_input_size_check_leaves_batchnorm_statistics_and_the_mode_alone():
    from leanvit.data import check_input_size

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(8), torch.nn.BatchNorm1d(8)).train()
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = check_input_size(model, {"input_size": (3, 8, 8)}, "toy")  # BatchNorm1d on one image: fine in eval
    assert out.shape == (1, 8) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dropped_pixels_are_warned_of_when_only_the_rows_or_only_the_columns_are_cut_by_non_square_patches():
    """The check of dropped pixels reads the patch height for the rows and the patch width for the columns, and warns
    where either side leaves a remainder, not only both."""
    from leanvit.data import check_input_size
    from leanvit.errors import LeanvitWarning

    def deit(height: int, width: int) -> torch.nn.Module:  # built for the size: the conv cuts whole patches
        return timm.create_model("deit_tiny_patch16_224", img_size=(height, width), patch_size=(8, 12), depth=1,
                                 embed_dim=16, num_heads=2)

    with pytest.warns(LeanvitWarning, match=r"cuts 44x48 inputs into 8x12 patches and drops the last 4 pixel rows: "
                                            r"it computes as at 40x48\. Use inputs whose sides are multiples of 8 and "
                                            r"12\.") as caught:
        check_input_size(deit(44, 48), {"input_size": (3, 44, 48)}, "deit")
    assert "columns" not in str(caught[0].message)  # 48 is a multiple of 12 (of 8 too: not what is read)
    with pytest.warns(LeanvitWarning, match=r"cuts 40x44 inputs into 8x12 patches and drops the last 8 pixel "
                                            r"columns: it computes as at 40x36"):
        check_input_size(deit(40, 44), {"input_size": (3, 40, 44)}, "deit")


def test_a_model_of_other_input_channels_than_rgb_is_told_to_drop_in_chans_not_to_change_the_size():
    from leanvit.data import check_input_size
    from leanvit.errors import InputSizeError

    gray = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2,
                             in_chans=1)
    with pytest.raises(InputSizeError, match=r"gray does not run on 3x32x32 inputs \(.*\)\. It takes 1-channel "
                                             r"images and the pre-processing gives 3 \(RGB\): use a model built for 3 "
                                             r"channels \(drop the in_chans model kwarg\)\.$"):
        check_input_size(gray, {"input_size": (3, 32, 32)}, "gray")
    rgb = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2)
    with pytest.raises(InputSizeError, match=r"add --model-kwargs '\{\"img_size\": 48\}'"):
        check_input_size(rgb, {"input_size": (3, 48, 48)}, "rgb")


def test_random_erasing_fills_its_box_with_noise_by_default_as_deit():
    config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 1.0, "crop_mode": "center"}
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    random.seed(0)
    torch.manual_seed(0)
    erased = [build_transform(config, train=True, re_prob=1.0)(image) for _ in range(3)]
    assert all(x.unique().numel() > 20 for x in erased)  # per-pixel normal noise (a box of 2% at least), not a constant
    const = build_transform(config, train=True, re_prob=1.0, re_mode="const")(image)
    assert const.unique().numel() < 10
