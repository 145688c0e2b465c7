"""Pre-processing resolved from the model's ``pretrained_cfg`` by timm, never hand-written.

A model trained at another resolution (CIFAR-10 at 32x32) or with another crop keeps its data
config in its checkpoint (:mod:`leanvit.checkpoint`), so evaluation reproduces it exactly.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.data import create_transform, resolve_model_data_config
from timm.layers import to_2tuple

from ..errors import InputSizeError, warn
from ..modes import eval_mode

#: The keys of a timm data config that define evaluation pre-processing.
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def resolve_data_config(model: nn.Module, *, img_size: int | tuple[int, int] | None = None,
                        crop_pct: float | None = None, saved: dict | None = None, use_test_size: bool = False) -> dict:
    """The evaluation data config of ``model``: the one ``saved`` with its checkpoint when there is
    one, else timm's from its ``pretrained_cfg`` (with ``use_test_size``, its ``test_input_size`` and
    ``test_crop_pct`` where it has them, as timm's ``validate.py`` scores its published top-1). ``img_size``
    (a side, or a (height, width) pair) and ``crop_pct`` override either and keep the rest, so a checkpoint
    evaluated at another resolution keeps its own crop and statistics."""
    pair = None if img_size is None else to_2tuple(img_size)
    if saved:
        config = dict(saved)
        if pair is not None:
            config["input_size"] = [config["input_size"][0], *pair]
        if crop_pct is not None:
            config["crop_pct"] = crop_pct
        return config
    # (3 channels: RGB, as timm's own img_size argument gives)
    args = {k: v for k, v in {"input_size": pair and (3, *pair), "crop_pct": crop_pct}.items() if v is not None}
    config = resolve_model_data_config(model, args=args, use_test_size=use_test_size)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def run_blank_image(model: nn.Module, size: tuple[int, int, int]) -> torch.Tensor:
    """``model``'s output for one blank ``size`` (C, H, W) image, or an :class:`InputSizeError` whose ``reason`` is
    the model's complaint: the one trial that tells whether a model runs at a size (fixed position embeddings and
    attention biases fail). It runs in eval mode, the model's own mode restored after: a blank image must not move
    BatchNorm's running statistics (nor trip BatchNorm1d on a batch of one)."""
    try:
        with torch.no_grad(), eval_mode(model):
            return model(torch.zeros(1, *size))
    except (AssertionError, RuntimeError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputSizeError(f"the model does not run on {'x'.join(map(str, size))} inputs ({reason})", reason) from None


def check_input_size(model: nn.Module, data_config: dict, name: str) -> torch.Tensor:
    """Run one blank image of the pre-processing's size through ``model`` (:func:`run_blank_image`) and return its
    output: a model built for another size fails here, with the fix, not deep inside the command's work."""
    size = tuple(data_config["input_size"])
    try:
        output = run_blank_image(model, size)
    except InputSizeError as e:
        channels = getattr(model, "in_chans", size[0])
        if channels != size[0]:  # the images are RGB whatever the size: no img_size fixes this
            fix = (f"It takes {channels}-channel images and the pre-processing gives {size[0]} (RGB): use a model "
                   f"built for {size[0]} channels (drop the in_chans model kwarg).")
        else:
            fix = (f"A model built for one input size takes another when built for it: add --model-kwargs "
                   f"'{{\"img_size\": {size[-1]}}}' (timm resizes its position embeddings), or drop --img-size.")
        raise InputSizeError(f"{name} does not run on {'x'.join(map(str, size))} inputs ({e.reason}). {fix}",
                             e.reason) from None
    warn_partial_patches(model, name, size[-2], size[-1])
    return output


def warn_partial_patches(model: nn.Module, name: str, height: int, width: int) -> None:
    """Warn where ``model``'s patch embedding drops pixels of a ``height`` x ``width`` input: its convolution cuts
    whole patches and leaves the rest out (unless it pads), so the model computes as at a smaller size, silently."""
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if not all(isinstance(p, int) for p in patch) or getattr(embed, "dynamic_img_pad", False):
        return
    rows, cols = height % patch[0], width % patch[1]
    if not rows and not cols:
        return
    kept = (height - rows, width - cols)
    if height == width and patch[0] == patch[1]:  # a square size, as --img-size gives
        dropped = f"the last {rows} pixel rows and columns"
        fix = f"{kept[0]}x{kept[0]} or {kept[0] + patch[0]}x{kept[0] + patch[0]} inputs"
    else:
        dropped = " and ".join(f"the last {n} pixel {what}" for n, what in ((rows, "rows"), (cols, "columns")) if n)
        fix = f"inputs whose sides are multiples of {patch[0]} and {patch[1]}"
    warn(f"{name} cuts {height}x{width} inputs into {patch[0]}x{patch[1]} patches and drops {dropped}: it computes "
         f"as at {kept[0]}x{kept[1]}. Use {fix}.")


def build_transform(data_config: dict, *, train: bool = False, auto_augment: str | None = None,
                    re_prob: float = 0.0, re_mode: str = "pixel", no_aug: bool = False,
                    crop_scale: float = 0.08) -> Callable:
    """timm's eval transform, or its training one: random resized crop and flip, RandAugment
    (``auto_augment``, e.g. ``"rand-m9-mstd0.5-inc1"``) and random erasing (``re_prob``; ``re_mode`` fills the
    box: ``"pixel"`` noise as DeiT, ``"rand"``, ``"const"``), or with ``no_aug`` only resizing and cropping.
    ``crop_scale`` is the random crop's smallest area fraction."""
    config = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items()}
    if not train:
        return create_transform(**config, is_training=False)
    transform = create_transform(**config, is_training=True, no_aug=no_aug, auto_augment=auto_augment,
                                 re_prob=re_prob, re_mode=re_mode, scale=(crop_scale, 1.0))
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):  # RandAugment's operations
            if op.name.startswith("Posterize"):
                op.aug_fn = _PosterizeKeepingOneBit(op.aug_fn)
    return transform


class _PosterizeKeepingOneBit:
    """timm's RandAugment posterizes to 0 bits at full strength, which Pillow >= 13 rejects
    (older Pillow returned a black image); 1 bit is the nearest strength Pillow still accepts."""

    def __init__(self, posterize: Callable):
        self.posterize = posterize

    def __call__(self, img, bits: int, **kwargs):
        return self.posterize(img, max(1, bits), **kwargs)
