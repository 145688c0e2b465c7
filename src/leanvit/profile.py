"""Parameters and multiply-accumulates of a model, compared with its published numbers.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on a real forward pass:
MACs = counted FLOPs / 2, covering matmul/linear, convolution (depthwise and grouped included),
batched matmul and scaled-dot-product attention. Element-wise ops, normalisation, pooling and
softmax are not counted, which is the convention of fvcore and of the papers' own counters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .catalog import CATALOG, head_mismatch
from .data.transforms import run_blank_image, warn_partial_patches
from .errors import InputSizeError, ModelKwargsError, check_range
from .models.registry import create_model
from .modes import eval_mode, frozen

MAC_CONVENTION = (
    "MACs = torch.utils.flop_counter FLOPs / 2 (linear, conv, bmm, attention matmuls); "
    "element-wise, norm, pooling and softmax not counted; batch 1"
)


def count_params(model: nn.Module) -> int:
    """All parameters (frozen ones too), the way papers and timm report model size."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Multiply-accumulates of one eval-mode forward pass at ``input_size`` (C, H, W).

    Parameters count with ``requires_grad`` off (restored after): the counter's module tracker hooks every module
    input that requires grad, and a view of a parameter made under ``no_grad`` (CaiT's ``cls_token.expand``)
    requires grad with no gradient function, which it asserts on.
    """
    weight = next(model.parameters(), None)  # the input in the model's dtype and on its device
    x = torch.zeros(1, *input_size, **({"dtype": weight.dtype, "device": weight.device}
                                       if weight is not None and weight.is_floating_point() else {}))
    with eval_mode(model), frozen(model), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@dataclass
class Profile:
    model: str
    img_size: int
    params: int
    macs: int
    published_params: int | None = None
    published_macs: int | None = None
    params_diff_pct: float | None = None
    macs_diff_pct: float | None = None
    mac_convention: str = MAC_CONVENTION
    published_note: str | None = None  #: how the published figures were counted, where it differs
    not_compared: str | None = None  #: why the published figures are not compared, where they are not

    def to_dict(self) -> dict:
        return asdict(self)


def _diff_pct(measured: int, published: int | None) -> float | None:
    return None if not published else round(100.0 * (measured - published) / published, 2)


#: The input resolutions ``--img-size`` accepts (profile, bench): a typo such as 2240 fails here, not in an
#: allocation; whether a model runs at a given size in the range is the model's to say (``create_model_at``).
IMG_SIZE_RANGE = (16, 4096)


def check_img_size(img_size: int) -> None:
    check_range("--img-size", img_size, *IMG_SIZE_RANGE)


def create_model_at(name: str, img_size: int | None = None, **kwargs) -> nn.Module:
    """``name`` built for ``img_size`` inputs, or an :class:`InputSizeError` if it cannot run there.

    Transformers get their position tables sized by timm's ``img_size`` argument, convolutional
    models take any size as they are; one trial forward pass proves the result runs. Whether a model takes
    ``img_size`` is learnt by building it so, not from its signature, which a subclass taking ``**kwargs``
    hides (DeiT distilled: ``VisionTransformerDistilled(*args, **kwargs)``).
    """
    model = create_model(name, **kwargs)
    chans, _, native = model.pretrained_cfg.get("input_size", (3, 224, 224))
    if img_size is None or img_size == native:
        return model

    def cannot_run(reason: str) -> InputSizeError:  # it may take other sizes than its native one: not said
        return InputSizeError(f"{name} does not run at {img_size}x{img_size} ({reason[:160]}); "
                              f"its native size is {native}x{native}.", reason)

    try:
        model = create_model(name, img_size=img_size, **kwargs)
    except ModelKwargsError as e:
        if not isinstance(e.cause, TypeError):  # the constructor rejects the size (XCiT: patch size must divide it)
            raise cannot_run((str(e.cause).splitlines() or [type(e.cause).__name__])[0]) from None
        # no img_size argument: as built
    try:
        run_blank_image(model, (chans, img_size, img_size))
    except InputSizeError as e:
        raise cannot_run(e.reason) from None
    warn_partial_patches(model, name, img_size, img_size)  # numbers of a smaller size
    return model


def profile_model(name: str, img_size: int | None = None, model: nn.Module | None = None) -> Profile:
    """Count parameters and MACs of ``name`` (or of ``model``, a model of that architecture already built: a ViT at
    the size it was built for) and compare with the catalog's published numbers.

    The published parameters and MACs are compared only at the resolution they were reported at (position
    tables, and so parameters, grow with it) and for the published model's head (a 21k-class head is 7 M more
    parameters); ``not_compared`` says why where they are not.
    """
    if img_size is not None:
        check_img_size(img_size)
    model = model if model is not None else create_model_at(name, img_size)
    cfg_size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # a ViT given as built for another size
    if img_size is None and isinstance(built, (tuple, list)) and len(set(built)) == 1:
        img_size = int(built[0])  # (timm leaves its pretrained_cfg's input_size as it was)
    img_size = img_size or cfg_size[-1]
    params = count_params(model)
    macs = count_macs(model, (cfg_size[0], img_size, img_size))
    facts = CATALOG.get(name.split(".", 1)[0])
    not_compared = facts and (head_mismatch(facts, name, _num_classes(model)) or (
        f"the published figure is at {facts.img_size}x{facts.img_size}" if facts.img_size != img_size else None))
    published = facts if facts and not not_compared else None
    pub_params = round(published.params_m * 1e6) if published else None
    pub_macs = round(published.gmacs * 1e9) if published else None
    return Profile(
        model=name, img_size=img_size, params=params, macs=macs,
        published_params=pub_params, published_macs=pub_macs,
        params_diff_pct=_diff_pct(params, pub_params), macs_diff_pct=_diff_pct(macs, pub_macs),
        published_note=facts.note if published else None, not_compared=not_compared,
    )


def _num_classes(model: nn.Module) -> int | None:
    """The class count of ``model``'s classifier (timm's ``num_classes``), None where it does not say."""
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) else None
