"""Everything a training run depends on, in one dataclass (also the ``leanvit train`` flags).

Defaults are DeiT's ImageNet recipe (AdamW, lr 5e-4 per 512 images, weight decay 0.05, 5
warm-up epochs, cosine, label smoothing 0.1, mixup 0.8, cutmix 1.0, RandAugment m9, random
erasing 0.25 with per-pixel noise, distillation alpha 0.5, tau 1), scaled to a global batch of 256.
"""
from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from ..compress.tokens import EViT, ToMe, from_spec
from ..errors import LeanvitError, check_range
from ..host import usable_cpus
from ..profile import check_img_size
from .distill import DISTILL_MODES

#: timm's random erasing fills.
RE_MODES = ("pixel", "rand", "const")
#: ``--warmup-epochs``'s default (DeiT's), and the largest fraction of a shorter run it takes.
DEFAULT_WARMUP_EPOCHS, DEFAULT_WARMUP_FRACTION = 5.0, 0.1


def default_workers() -> int:
    """Up to 4 data loader processes per training process, no more than its share of the CPUs it may use (torchrun
    starts ``LOCAL_WORLD_SIZE`` processes per machine): more only take turns, and torch warns about them."""
    return max(1, min(4, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))))


def _help(text: str) -> dict:
    """A field's ``--help`` text, which ``leanvit train`` turns into its flag's help."""
    return {"metadata": {"help": text}}


@dataclass
class TrainConfig:
    model: str = field(**_help("timm or leanvit model name"))
    data: str = field(**_help("training data: folder (ImageFolder, train/ + val/, CIFAR-10 pickles) "
                              "or 'cifar10-test500'"))
    output: str = field(default="runs/train", **_help(
        "run folder: checkpoints, state, final weights (on a filesystem every node sees)"))
    val_data: str | None = field(default=None, **_help("evaluated after every epoch (default: none)"))
    val_labels: str | None = field(default=None, **_help(
        "label file when --val-data is a flat folder (ImageNet's validation layout)"))
    model_kwargs: dict = field(default_factory=dict, **_help(
        "JSON kwargs for timm.create_model, e.g. '{\"img_size\": 32}' for a 32x32 ViT"))
    img_size: int | None = field(default=None, **_help(
        "input resolution of the data pipeline (default: the model kwarg img_size, a side or a [height, width] "
        "pair, else the model's pretrained_cfg)"))
    crop_pct: float | None = field(default=None, **_help("evaluation crop fraction (default: the model's)"))
    pretrained: bool = field(default=False, **_help("start from timm's pretrained weights (downloads)"))
    init_checkpoint: str | None = field(default=None, **_help(
        "start from these weights; the classifier is re-initialised if its size differs or it was trained on "
        "other classes"))
    epochs: int = field(default=300, **_help("training epochs"))
    batch_size: int = field(default=256, **_help("global batch, split evenly over the processes"))
    lr: float = field(default=2.5e-4, **_help("peak learning rate (DeiT: 5e-4 x batch / 512)"))
    min_lr: float = field(default=1e-5, **_help("cosine schedule's final learning rate"))
    warmup_epochs: float | None = field(default=None, **_help(
        f"linear warm-up length, in epochs (default: {DEFAULT_WARMUP_EPOCHS:g}, at most a tenth of --epochs, "
        "e.g. 0.2 for 2 epochs; a resumed run keeps the warm-up it started with). A warm-up as long as the run or "
        "longer is warned about: the learning rate never reaches --lr and the cosine decay never starts"))
    warmup_lr: float = field(default=1e-6, **_help("learning rate at the first step"))
    weight_decay: float = field(default=0.05, **_help("AdamW weight decay (not on norms and biases)"))
    label_smoothing: float = field(default=0.1, **_help("label smoothing"))
    mixup: float = field(default=0.8, **_help("mixup alpha (0: off)"))
    cutmix: float = field(default=1.0, **_help("cutmix alpha (0: off)"))
    randaug: str | None = field(default="rand-m9-mstd0.5-inc1", **_help(
        "timm auto-augment policy ('none': off)"))
    reprob: float = field(default=0.25, **_help("random erasing probability"))
    remode: str = field(default="pixel", **_help(
        "random erasing fill: pixel (per-pixel normal noise, DeiT's), rand (one random colour per box) or const "
        "(zeros)"))
    crop_scale: float = field(default=0.08, **_help(
        "smallest area fraction of the random resized crop (ImageNet: 0.08; short runs on small "
        "images learn faster with ~0.35)"))
    no_aug: bool = field(default=False, **_help(
        "no data augmentation: resize and crop only (mixup/cutmix are separate)"))
    clip_grad: float | None = field(default=None, **_help("clip the gradient norm to this value"))
    ema_decay: float | None = field(default=None, **_help("keep an EMA of the weights (e.g. 0.9998)"))
    teacher: str | None = field(default=None, **_help("distil from this timm or leanvit model"))
    teacher_checkpoint: str | None = field(default=None, **_help(
        "teacher weights (default: timm's pretrained weights, downloaded)"))
    distill: str = field(default="hard", **_help("distillation: hard or soft"))
    distill_alpha: float = field(default=0.5, **_help("weight of the distillation term"))
    distill_tau: float = field(default=1.0, **_help("soft distillation temperature"))
    tokens: str | None = field(default=None, **_help(
        "train with token reduction on (plain ViTs): evit:KEEP, tome:R or diffrate:GMACS"))
    keep_rate_start_epoch: int = field(default=0, **_help(
        "EViT: epochs at keep rate 1 before it shrinks (official from-scratch recipe: 10)"))
    keep_rate_shrink_epochs: int = field(default=0, **_help(
        "EViT: epochs of cosine decay from 1 to the target keep rate (official: 100; 0: the target "
        "from the start, as EViT's fine-tuning does)"))
    tome_prop_attn: bool = field(default=True, **_help(
        "ToMe (--tokens tome:R): proportional attention while training, recorded with the checkpoint so that "
        "evaluation runs as training did; official ToMe trains with it off (--no-tome-prop-attn) and keeps it for "
        "models reduced off the shelf"))
    amp: bool = field(default=True, **_help("mixed precision on GPU (bf16, else fp16)"))
    compile: bool = field(default=False, **_help(
        "torch.compile (Inductor) the model's training step and the teacher: a few minutes of compiling per "
        "start, then faster steps (1.4x on MobileViG-Ti at 64px on a 2-core CPU)"))
    channels_last: bool = field(default=False, **_help(
        "channels-last memory layout for the model and its inputs: faster convolutions with oneDNN on CPU "
        "and with tensor cores on GPU (same result, another layout)"))
    seed: int = field(default=0, **_help("seed of initialisation, data order and augmentation"))
    workers: int | None = field(default=None, **_help(
        "data loader processes per training process (default: the resumed run's, else this process's share of the "
        "machine's CPUs, at most 4)"))
    max_steps_per_epoch: int | None = field(default=None, **_help("cut epochs short (smoke tests)"))
    resume: bool = field(default=False, **_help(
        "continue from the last checkpoint in --output (a fresh start if there is none)"))
    progress: bool = field(default=True, **_help("show progress bars"))

    #: Fields a resumed run may change and stay one run (epochs extends it; a change to any other field is refused).
    RESUMABLE_CHANGES = ("output", "resume", "workers", "progress", "epochs", "val_data", "val_labels",
                         "channels_last", "compile")
    #: Of those, the ones that say where and how a run was carried out, not what it trained: a resume
    #: that changes any other one is recorded in the run's state (``changes``) for its model card. ``workers``
    #: is recorded: each loader process seeds its own augmentation, so their number changes the random draws.
    BOOKKEEPING = ("output", "resume", "progress")
    #: Fields added after runs were recorded, with the value those runs had (where it is not the default): a run's
    #: saved config that lacks one ran with this value.
    EARLIER_VALUES = {"remode": "const"}

    @classmethod
    def as_run_before(cls, saved: dict) -> dict:
        """A run's saved config with the fields it lacks (added since it was recorded) at the values it ran with:
        :attr:`EARLIER_VALUES`' where the behaviour changed, else the field's default."""
        defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                    for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}
        return {**defaults, **cls.EARLIER_VALUES, **saved}

    def __post_init__(self) -> None:
        for f in fields(self):  # inf passes the range checks below and trains on NaN
            value = getattr(self, f.name)
            if "float" in f.type and isinstance(value, (int, float)) and not math.isfinite(value):
                raise LeanvitError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}.")
        if self.randaug in ("", "none"):
            self.randaug = None
        if not isinstance(self.model_kwargs, dict):
            raise LeanvitError(f"--model-kwargs must be a JSON object, got {self.model_kwargs!r}.")
        if self.img_size is None and isinstance(self.model_kwargs.get("img_size"), int):
            self.img_size = self.model_kwargs["img_size"]  # a model built for 32x32 needs 32x32 data
        for name, lo, hi in (("epochs", 1, 100_000), ("batch_size", 1, 1 << 20), ("workers", 0, 256)):
            if getattr(self, name) is not None:
                check_range(f"--{name.replace('_', '-')}", getattr(self, name), lo, hi)
        for name in ("label_smoothing", "reprob", "distill_alpha", "crop_scale"):
            check_range(f"--{name.replace('_', '-')}", getattr(self, name), 0.0, 1.0)
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:  # as `leanvit eval --crop-pct`
            raise LeanvitError(f"--crop-pct must be in (0, 1] (a fraction of the resized image), got {self.crop_pct}.")
        for name, value in (("lr", self.lr), ("distill_tau", self.distill_tau)):  # 0 stalls or divides by zero
            if not value > 0:
                raise LeanvitError(f"--{name.replace('_', '-')} must be above 0, got {value}.")
        # a negative clipping norm would turn the gradient round (0: no clipping)
        for name in ("min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "mixup", "cutmix", "clip_grad"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise LeanvitError(f"--{name.replace('_', '-')} must be 0 or more, got {value}.")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise LeanvitError(f"--ema-decay must be in [0, 1), e.g. 0.9998 (0 or none: no EMA), got {self.ema_decay}.")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise LeanvitError(f"--max-steps-per-epoch must be at least 1 (omit it for whole epochs), got "
                               f"{self.max_steps_per_epoch}.")
        if self.img_size is not None:
            check_img_size(self.img_size)
        if self.randaug is not None:
            _check_randaug(self.randaug)
        if self.remode not in RE_MODES:
            raise LeanvitError(f"--remode must be one of {', '.join(RE_MODES)}, got '{self.remode}'.")
        if self.distill not in DISTILL_MODES:
            raise LeanvitError(f"--distill must be one of {', '.join(DISTILL_MODES)}, got '{self.distill}'.")
        for name in ("keep_rate_start_epoch", "keep_rate_shrink_epochs"):
            check_range(f"--{name.replace('_', '-')}", getattr(self, name), 0, 100_000)
        method = from_spec(self.tokens) if self.tokens is not None else None  # a bad spec fails here, before any data
        if self.teacher_checkpoint and not self.teacher:
            raise LeanvitError("--teacher-checkpoint needs --teacher, the teacher's model name.")
        # options that only act with another one: given without it, they would be silently ignored
        given = [f.name for f in fields(self) if f.name in ("distill", "distill_alpha", "distill_tau")
                 and getattr(self, f.name) != f.default]
        if given and not self.teacher:
            raise LeanvitError(f"{', '.join('--' + n.replace('_', '-') for n in given)} "
                               f"{'needs' if len(given) == 1 else 'need'} --teacher, the model to distil from.")
        if (self.keep_rate_start_epoch or self.keep_rate_shrink_epochs) and not isinstance(method, EViT):
            raise LeanvitError("--keep-rate-start-epoch / --keep-rate-shrink-epochs schedule EViT's keep rate and need "
                               "--tokens evit:KEEP" + (f", not {self.tokens}." if self.tokens else "."))
        if not self.tome_prop_attn and not isinstance(method, ToMe):
            raise LeanvitError("--no-tome-prop-attn acts on ToMe's attention and needs --tokens tome:R.")
        if self.val_labels and not self.val_data:
            raise LeanvitError("--val-labels needs --val-data, the flat folder of validation images it labels.")

    def token_method(self):
        """The ``--tokens`` method as trained (None without one): ToMe with ``--[no-]tome-prop-attn``."""
        if self.tokens is None:
            return None
        method = from_spec(self.tokens)
        return replace(method, prop_attn=self.tome_prop_attn) if isinstance(method, ToMe) else method

    def to_dict(self) -> dict:
        return asdict(self)


def _check_randaug(policy: str) -> None:
    """A policy timm's ``create_transform`` can build, refused here rather than by an assertion mid-setup."""
    from timm.data.auto_augment import auto_augment_transform, augment_and_mix_transform, rand_augment_transform

    build = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}.get(policy.split("-")[0],
                                                                                      auto_augment_transform)
    try:
        build(policy, {})
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise LeanvitError(f"--randaug '{policy}' is not a timm augmentation policy ({type(e).__name__}: {e}); e.g. "
                           "'rand-m9-mstd0.5-inc1' (RandAugment), 'augmix-m5-w4-d2', 'v0' (AutoAugment), or 'none'.") \
            from None
