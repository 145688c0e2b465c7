"""``fit(TrainConfig)``: supervised or distilled training, on one process or many (``torchrun``).

Reproducibility is by construction rather than by saving random states: every epoch re-seeds
Python, NumPy and torch from ``(seed, epoch, rank)`` and the sampler orders the data from
``(seed, epoch)``, so a run resumed from an epoch checkpoint repeats exactly what the
uninterrupted run would have done, given the same ``--workers`` (each loader process seeds its own
augmentation, so a resume that changes their number is recorded as a change). Under DDP, ranks draw disjoint slices of the same global
order, so N processes with batch B/N see the same global batches as one process with batch B.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint import (WEIGHTS_FILE, CheckpointMismatchError, checkpoint_file, checkpoint_sha256, load_weights,
                          model_from_checkpoint, read_metadata, save_weights)
from ..compress.tokens import keep_rate_warmup
from ..compress.tokens import apply as token_apply
from ..data import (CorruptImageWarning, build_transform, check_input_size, dataset_classes, make_loader, open_dataset,
                    resolve_data_config)
from ..errors import InputSizeError, LeanvitError, LeanvitWarning, warn
from ..evaluate import evaluate
from ..host import host_info
from ..models.registry import create_model, pretrained_num_classes
from .config import DEFAULT_WARMUP_EPOCHS, DEFAULT_WARMUP_FRACTION, TrainConfig, default_workers
from .distill import AdaptedTeacher, DistillationLoss
from .state import EMA_FILE, latest_checkpoint, load_training_state, read_state, save_training_state


@dataclass
class TrainResult:
    """Where the weights are, and the loss curve (``steps``) and per-epoch log (``epochs``)."""

    output: Path
    steps: list[dict] = field(default_factory=list)  # this call's steps: epoch, step, loss, lr
    epochs: list[dict] = field(default_factory=list)  # every epoch so far: epoch, loss, val top1/top5


def fit(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; checkpoints every epoch, final weights in ``cfg.output``.

    Launched by ``torchrun``, each process runs this same call; the process group is set up from
    torchrun's environment (NCCL on GPUs, gloo on CPU).
    """
    owns_group = _init_distributed()
    try:
        with _warnings_of_rank(dist.get_rank() if dist.is_initialized() else 0):
            return _fit(cfg)
    finally:
        if owns_group:
            dist.destroy_process_group()


@contextlib.contextmanager
def _warnings_of_rank(rank: int):
    """leanvit's warnings from rank 0 alone: every rank has the same settings, data folder and model, and would say
    what rank 0 says once per process. Corrupt images excepted: each rank reads its own share of them."""
    with warnings.catch_warnings():
        if rank != 0:
            warnings.simplefilter("ignore", LeanvitWarning)
            warnings.simplefilter("default", CorruptImageWarning)
        yield


def _fit(cfg: TrainConfig) -> TrainResult:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = _device()
    _check_batch_split(cfg, world)
    output = Path(cfg.output).expanduser()
    main = rank == 0
    if main:  # before any training, not when the first epoch is saved
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LeanvitError(f"Cannot create --output {output}: {e.strerror}. Give a writable folder.") from None

    train_set = open_dataset(cfg.data, train=True)
    classes = dataset_classes(train_set)
    _seed_everything(cfg.seed)
    model, data_config, metadata = _student(cfg, classes, announce=main)
    train_set.transform = build_transform(data_config, train=True, auto_augment=cfg.randaug, re_prob=cfg.reprob,
                                          re_mode=cfg.remode, no_aug=cfg.no_aug, crop_scale=cfg.crop_scale)

    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device, memory_format=layout)
    teacher = _teacher(cfg, classes, data_config, device)
    if teacher is not None:
        teacher.to(memory_format=layout)
    if teacher is not None and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    net = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:  # model, EMA and checkpoints keep the plain module; only the calls go through Inductor
        net = torch.compile(net)
        teacher = torch.compile(teacher) if teacher is not None else None

    last = latest_checkpoint(output)
    if last is not None and not cfg.resume:
        raise LeanvitError(f"{output} already holds a run ({last.name}). Pass --resume to continue it, "
                           "or choose another --output.")
    state = read_state(last) if last is not None else None
    # given, else the resumed run's (their number changes the augmentation draws), else this machine's share
    workers = cfg.workers if cfg.workers is not None else (state or {}).get("config", {}).get("workers")
    workers = default_workers() if workers is None else workers
    loader = make_loader(train_set, cfg.batch_size // world, train=True, seed=cfg.seed, workers=workers)
    steps = min(len(loader), cfg.max_steps_per_epoch or len(loader))
    if steps == 0:
        raise LeanvitError(f"{cfg.data} has {len(train_set)} images, fewer than one batch of {cfg.batch_size}.")
    warmup = _warmup_epochs(cfg, state["config"] if state else None, announce=main)
    scheduler = _lr_scheduler(optimizer, cfg, steps, warmup)
    mixup, loss_fn = _objective(cfg, len(classes), teacher)
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    trainer = _Trainer(cfg, model, net, optimizer, scheduler, scaler, ema, mixup, loss_fn,
                       _keep_rate_schedule(cfg, model, steps), amp_dtype, layout, device, world,
                       show=cfg.progress and main)
    val_loader = _val_loader(cfg, data_config, classes, workers) if main and cfg.val_data else None

    config = {**cfg.to_dict(), "warmup_epochs": warmup, "workers": workers}  # as it ran, kept by a resume
    run = _Progress(inputs=_weights_read(cfg), cwd=os.getcwd())
    if state is not None:
        run = _resume(cfg, state, last, config, run.inputs, trainer, main)
    if world > 1:
        _check_ranks_agree(run.start_epoch, device)

    steps_log = []
    for epoch in range(run.start_epoch, cfg.epochs):
        _seed_everything(int(np.random.SeedSequence([cfg.seed, epoch, rank]).generate_state(1)[0]))
        loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        epoch_log = trainer.train_epoch(loader, steps, epoch, run)
        steps_log += epoch_log
        losses = [s["loss"] for s in epoch_log]
        summary = {"epoch": epoch, "loss": round(sum(losses) / len(losses), 6), "lr": epoch_log[-1]["lr"],
                   "seconds": round(time.perf_counter() - started, 1), "hardware": _hardware(device, world)}
        run.epochs.append(summary)
        if main:
            if val_loader is not None:
                summary.update(_validate(model, ema, val_loader, device, trainer.show))
            save_training_state(output, epoch, model=model, metadata=metadata, optimizer=optimizer, ema=ema,
                                state={"step": run.step, "config": config, "scaler": scaler.state_dict(),
                                       "epochs": run.epochs, "changes": run.changes,
                                       "inputs": run.inputs, "cwd": run.cwd})
            print(json.dumps(summary), file=sys.stderr)
        if world > 1:
            dist.barrier()

    if main:
        save_weights(output / WEIGHTS_FILE, model.state_dict(), metadata)
        if ema is not None:
            save_weights(output / EMA_FILE, ema.module.state_dict(), metadata)
    return TrainResult(output=output, steps=steps_log, epochs=run.epochs)


def _check_batch_split(cfg: TrainConfig, world: int) -> None:
    """The batch must split evenly over the processes, and into pairs where Mixup / CutMix pair its images."""
    if cfg.batch_size % world:
        raise LeanvitError(f"--batch-size {cfg.batch_size} does not split evenly over {world} processes.")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size // world % 2:
        raise LeanvitError(f"Mixup and CutMix pair the images of a batch: the batch per process "
                           f"({cfg.batch_size // world}) must be even. Change --batch-size, or pass --mixup 0 "
                           "--cutmix 0.")


def _student(cfg: TrainConfig, classes: list[str], announce: bool) -> tuple[nn.Module, dict, dict]:
    """The model to train (its init weights loaded, its token method applied), its data config, checked against
    its input size, and the metadata its checkpoints carry."""
    kwargs = {"num_classes": len(classes), **cfg.model_kwargs}
    if kwargs["num_classes"] != len(classes):
        raise LeanvitError(f"--model-kwargs sets num_classes={kwargs['num_classes']} but {cfg.data} "
                           f"has {len(classes)} classes.")
    model = create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
    if cfg.init_checkpoint:
        _load_init(model, cfg.init_checkpoint, classes, announce=announce)
    if cfg.tokens:
        token_apply(model, cfg.token_method())  # no new parameters: the weights stay a plain ViT's
    kwarg = cfg.model_kwargs.get("img_size")  # (an integer one is cfg.img_size's default already)
    size = kwarg if cfg.img_size is None and isinstance(kwarg, (list, tuple)) else cfg.img_size  # (height, width)
    data_config = resolve_data_config(model, img_size=size, crop_pct=cfg.crop_pct)
    check_input_size(model, data_config, cfg.model)  # a ViT built for 224 fed 32x32 data: the fix, not an assertion
    metadata = {"model": cfg.model, "model_kwargs": kwargs, "data_config": data_config, "classes": classes,
                **({"tokens": cfg.tokens} if cfg.tokens else {}),
                **({"tokens_options": {"prop_attn": False}} if not cfg.tome_prop_attn else {})}
    return model, data_config, metadata


def _lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int, warmup: float) -> CosineLRScheduler:
    """timm's cosine schedule with linear warm-up, stepped per optimizer step (``steps`` per epoch)."""
    cosine_log = logging.getLogger(CosineLRScheduler.__module__)
    level = cosine_log.level  # its "will have no effect ... t_initial = t_mul = eta_mul = 1" for a one-step run
    cosine_log.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps, lr_min=cfg.min_lr,
                                 warmup_t=round(warmup * steps), warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)
    finally:
        cosine_log.setLevel(level)


@dataclass
class _Progress:
    """Where the run stands: the next epoch, the optimizer steps taken, the per-epoch log, the settings changed by
    resumes, the weights files read, and the folder relative paths in the saved config are relative to."""

    inputs: dict
    cwd: str
    start_epoch: int = 0
    step: int = 0
    epochs: list[dict] = field(default_factory=list)
    changes: list[dict] = field(default_factory=list)


def _resume(cfg: TrainConfig, state: dict, last: Path, config: dict, inputs: dict, trainer: _Trainer,
            announce: bool) -> _Progress:
    """Continue the run saved in ``last`` (its ``state``): refuse changes that would make it another computation,
    record the allowed ones, load the model, optimizer, EMA and scaler, and set the schedule at its step. ``config``,
    the settings as this call runs them, keeps the start's words for paths that name the same files."""
    cwd = state.get("cwd", os.getcwd())  # relative paths in the saved config are relative to the start's folder
    resumed = _resume_changes(state["config"], config, state["epoch"] + 1, cwd)
    # the same files by other words (from another folder): the record keeps the words relative to ``cwd``
    moved = {k for change in resumed for k in change["changes"]}
    config.update({k: state["config"][k] for k in _PATHS if k in state["config"] and k not in moved})
    run = _Progress(inputs=_same_weights_read(state.get("inputs"), inputs), cwd=cwd, start_epoch=state["epoch"] + 1,
                    step=state["step"], epochs=state["epochs"], changes=state.get("changes", []) + resumed)
    load_training_state(last, state, model=trainer.model, optimizer=trainer.optimizer, ema=trainer.ema)
    if state["scaler"]:
        trainer.scaler.load_state_dict(state["scaler"])
    # the saved optimizer holds the learning rate the old schedule set last; a longer --epochs changes the
    # schedule, and the first step must run at the new one's rate, not the old one's last (often min_lr)
    trainer.scheduler.step_update(run.step)
    if run.start_epoch > cfg.epochs:
        raise LeanvitError(f"The run in {last.parent} has trained {run.start_epoch} epochs, more than --epochs "
                           f"{cfg.epochs}: pass --epochs {run.start_epoch} or more to resume it.")
    if announce:
        print(f"resumed from {last} (epoch {run.start_epoch} of {cfg.epochs})" if run.start_epoch < cfg.epochs else
              f"{last}: the run has trained all its {cfg.epochs} epochs; nothing left to train", file=sys.stderr)
    return run


@dataclass
class _Trainer:
    """What a training step needs, set up once by :func:`_fit`. ``model`` is the plain module (gradient clipping,
    EMA), ``net`` what the steps call (the model under DDP and / or ``torch.compile``)."""

    cfg: TrainConfig
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    mixup: Mixup | None
    loss_fn: nn.Module
    keep_rate: object | None  # EViT's keep-rate hook, called with the step
    amp_dtype: torch.dtype | None
    layout: torch.memory_format
    device: torch.device
    world: int
    show: bool

    def train_epoch(self, loader, steps: int, epoch: int, run: _Progress) -> list[dict]:
        """``steps`` optimizer steps on ``loader``'s batches (``run.step`` counts them); each step's log."""
        self.net.train()
        log = []
        bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", disable=not self.show, leave=False)
        for i, batch in enumerate(loader):
            if i == steps:
                break
            if batch is None:
                raise LeanvitError("Every image of a training batch failed to decode; see the warnings above.")
            lr = self.optimizer.param_groups[0]["lr"]  # this step's (the scheduler sets the next one's)
            loss = self._step(batch, run)
            if not torch.isfinite(loss):  # every rank sees the reduced loss, so all stop; before any checkpoint
                bar.close()
                raise LeanvitError(f"The loss is {loss.item()} at epoch {epoch}, step {i + 1}: training diverged, "
                                   f"and no checkpoint of this epoch is written. Lower --lr (it is {self.cfg.lr}) or "
                                   "pass --clip-grad (e.g. 1.0).")
            log.append({"epoch": epoch, "step": run.step, "loss": loss.item(), "lr": lr})
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update()
        bar.close()
        return log

    def _step(self, batch, run: _Progress) -> torch.Tensor:
        """One optimizer step on ``batch``; the loss, averaged over the processes."""
        cfg, device = self.cfg, self.device
        x, y = batch[0].to(device, non_blocking=True, memory_format=self.layout), batch[1].to(device, non_blocking=True)
        if self.mixup:
            even = len(x) // 2 * 2  # mixup pairs samples; a skipped corrupt image can leave one over
            x, y = self.mixup(x[:even], y[:even])
        if self.keep_rate is not None:
            self.keep_rate(run.step)
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            try:
                logits = self.net(x)
            except ValueError as e:  # torch's complaint names no layer nor fix
                if "more than 1 value per channel" not in str(e):
                    raise
                raise LeanvitError(f"{cfg.model} has a BatchNorm that sees one value per channel (after pooling, "
                                   f"as a classifier head's), which cannot normalise a training batch of "
                                   f"{len(x)} image: {_batch_of_one_fix(cfg.batch_size, self.world)}.") from None
            loss = self.loss_fn(x, logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        run.step += 1
        self.scheduler.step_update(run.step)
        if self.ema is not None:
            self.ema.update(self.model, step=run.step)
        loss = loss.detach().float()
        if self.world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        return loss


def _load_init(model: nn.Module, path: str, classes: list[str], announce: bool) -> None:
    """``--init-checkpoint``: all its weights, the classifier too where it fits and was trained on these classes (the
    next resolution step of one run); re-initialised where not (fine-tuning on other classes)."""
    saved = read_metadata(path).get("classes")
    keep = saved is None or saved == classes
    try:
        load_weights(model, path, ignore_classifier=not keep)
    except CheckpointMismatchError:
        if not keep:
            raise
        keep = False
        load_weights(model, path, ignore_classifier=True)
    if announce:
        why = "its size differs" if saved is None or len(saved) != len(classes) else "it was trained on other classes"
        print(f"--init-checkpoint {path}: " + ("every weight loaded, the classifier too" if keep else
                                               f"classifier re-initialised ({why})"), file=sys.stderr)


def _warmup_epochs(cfg: TrainConfig, started: dict | None, announce: bool) -> float:
    """The warm-up's length in epochs: ``--warmup-epochs``, else the one the resumed run (``started``: its saved
    config) ran with, else the default, capped at a fraction of a short run (said in the log). A given warm-up as
    long as the run is kept, and warned about."""
    if cfg.warmup_epochs is None and started is None:
        warmup = min(DEFAULT_WARMUP_EPOCHS, DEFAULT_WARMUP_FRACTION * cfg.epochs)
        if announce and warmup < DEFAULT_WARMUP_EPOCHS:
            print(f"warm-up: {warmup:g} epochs (the default {DEFAULT_WARMUP_EPOCHS:g} epochs, capped at a tenth of "
                  f"the {cfg.epochs}-epoch run; --warmup-epochs sets it)", file=sys.stderr)
        return warmup
    warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else started["warmup_epochs"]
    if announce and warmup >= cfg.epochs:
        if cfg.warmup_epochs is not None:
            given, fix = f"--warmup-epochs {warmup:g}", ("Pass a shorter --warmup-epochs, or leave it out for the "
                                                         f"default ({DEFAULT_WARMUP_EPOCHS:g} epochs, at most a tenth "
                                                         "of the run).")
        else:
            given, fix = f"The warm-up this run started with ({warmup:g} epochs)", "Pass a larger --epochs."
        warn(f"{given} is as long as the run (--epochs {cfg.epochs}) or longer: the learning rate rises from "
             f"--warmup-lr {cfg.warmup_lr:g} all run long, never reaches --lr {cfg.lr:g}, and the cosine decay never "
             f"starts. {fix}")
    return warmup


def _keep_rate_schedule(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int):
    """EViT's keep-rate warm-up hook (``hook(step)``), or None when there is nothing to schedule."""
    if not (cfg.keep_rate_start_epoch or cfg.keep_rate_shrink_epochs):  # (TrainConfig checked they go with EViT)
        return None
    return keep_rate_warmup(model, steps_per_epoch=steps_per_epoch, start_epoch=cfg.keep_rate_start_epoch,
                            shrink_epochs=cfg.keep_rate_shrink_epochs)


def _init_distributed() -> bool:
    """Join torchrun's process group if launched by it with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _objective(cfg: TrainConfig, num_classes: int, teacher: nn.Module | None):
    """timm's Mixup/CutMix (or None) and ``loss(inputs, outputs, targets)``: soft-target CE after
    mixup (which smooths the labels itself), else label-smoothed CE, wrapped for distillation."""
    mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                   num_classes=num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None)
    if mixup is not None:
        base = SoftTargetCrossEntropy()
    elif cfg.label_smoothing > 0:
        base = LabelSmoothingCrossEntropy(cfg.label_smoothing)
    else:
        base = nn.CrossEntropyLoss()
    if teacher is not None:
        return mixup, DistillationLoss(base, teacher, cfg.distill, cfg.distill_alpha, cfg.distill_tau)
    return mixup, lambda inputs, outputs, targets: base(outputs, targets)


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _hardware(device: torch.device, world: int) -> str:
    """What an epoch ran on, for model cards: processes x (GPU, or CPU model and threads)."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{host_info()['cpu']}, {torch.get_num_threads()} threads"
    return f"{world} x {what}" if world > 1 else what


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _teacher(cfg: TrainConfig, classes: list[str], data_config: dict, device: torch.device) -> nn.Module | None:
    """The frozen teacher, fed in its own pre-processing (its checkpoint's data config, else timm's at
    the student's resolution where the teacher runs at it, else at the teacher's own)."""
    if not cfg.teacher:
        return None
    if cfg.teacher_checkpoint:
        teacher, meta = model_from_checkpoint(cfg.teacher, cfg.teacher_checkpoint)
    else:
        _check_teacher_classes(cfg, pretrained_num_classes(cfg.teacher), classes)  # before the download
        teacher, meta = create_model(cfg.teacher, pretrained=True), {}
    if meta.get("classes", classes) != classes:  # as many classes in another order would teach wrong labels
        raise LeanvitError(f"The --teacher-checkpoint {cfg.teacher_checkpoint} was trained on the classes "
                           f"{meta['classes']}, not those of {cfg.data} ({classes}): give a teacher trained on these "
                           "classes.")
    _check_teacher_classes(cfg, teacher.num_classes, classes)
    teacher.eval().requires_grad_(False)
    teacher_config = meta.get("data_config") or _teacher_data_config(cfg, teacher, data_config)
    return AdaptedTeacher(teacher, data_config, teacher_config).to(device)


def _teacher_data_config(cfg: TrainConfig, teacher: nn.Module, data_config: dict) -> dict:
    """A teacher without leanvit's metadata says nothing of its resolution: the student's where the teacher runs at
    it, else the teacher's own (a fixed-size ViT), to which :class:`AdaptedTeacher` resizes the batches."""
    size = data_config["input_size"][-1]
    for config in (resolve_data_config(teacher, img_size=size), resolve_data_config(teacher)):
        try:
            check_input_size(teacher, config, cfg.teacher)
            return config
        except InputSizeError as e:
            reason = e.reason
    own = config["input_size"][-1]
    raise LeanvitError(f"The teacher {cfg.teacher} runs neither at the student's {size}x{size} inputs nor at its own "
                       f"{own}x{own} ({reason}). Give a --teacher-checkpoint that leanvit train saved, whose metadata "
                       "records the teacher's model kwargs and input size.")


def _check_teacher_classes(cfg: TrainConfig, num_classes: int | None, classes: list[str]) -> None:
    if num_classes is not None and num_classes != len(classes):
        raise LeanvitError(f"The teacher {cfg.teacher} has {num_classes} classes but {cfg.data} has "
                           f"{len(classes)}: give a --teacher-checkpoint trained on these classes.")


def _batch_of_one_fix(batch_size: int, world: int) -> str:
    """What to do about a training batch of one image: ``--batch-size`` is the global batch, split over ``world``
    processes; a larger one left one image where the others failed to decode."""
    if batch_size // world >= 2:
        return "the other images of this batch could not be decoded (named above): remove them"
    return f"use --batch-size {2 * world} or more" + (f" (2 per process, {world} processes)" if world > 1 else "")


def _val_loader(cfg: TrainConfig, data_config: dict, classes: list[str], workers: int):
    val_set = open_dataset(cfg.val_data, train=False, transform=build_transform(data_config),
                           labels=cfg.val_labels, classes=classes if cfg.val_labels else None)
    if dataset_classes(val_set) != classes:
        raise LeanvitError(f"--val-data {cfg.val_data} has other classes than --data {cfg.data}.")
    return make_loader(val_set, cfg.batch_size, workers=workers)


def _validate(model, ema, loader, device, show: bool) -> dict:
    row = {}
    for prefix, net in (("", model), ("ema_", ema.module if ema is not None else None)):
        if net is not None:
            result = evaluate(net, loader, device=device, progress=show)
            row.update({f"{prefix}top1": result.top1, f"{prefix}top5": result.top5})
    return row


def _check_ranks_agree(start_epoch: int, device: torch.device) -> None:
    """Every process must resume from the same checkpoint (``--output`` shared by all nodes)."""
    lo, hi = torch.tensor([start_epoch], device=device), torch.tensor([start_epoch], device=device)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise LeanvitError(f"The processes found different checkpoints in --output (epochs {lo.item()} to "
                           f"{hi.item()}). Put --output on a filesystem that every node shares.")


def _weights_read(cfg: TrainConfig) -> dict:
    """The weights files the run reads (``--init-checkpoint``, ``--teacher-checkpoint``) with their sha256:
    a shipped checkpoint's name may later stand for other weights, the hash does not."""
    files = {key: checkpoint_file(path).resolve() for key, path in
             (("init_checkpoint", cfg.init_checkpoint), ("teacher_checkpoint", cfg.teacher_checkpoint)) if path}
    return {key: {"file": str(file), "sha256": checkpoint_sha256(file)} for key, file in files.items()}


def _same_weights_read(saved: dict | None, now: dict) -> dict:
    """Refuse a resume whose init or teacher weights are not the files the run started with (same name,
    other contents: the run would no longer be one computation). Returns the record to keep: the
    start's (none for runs from before the record existed)."""
    if saved is None:
        return {}
    for key, first in saved.items():
        if key in now and now[key]["sha256"] != first["sha256"]:
            raise LeanvitError(
                f"Cannot resume: --{key.replace('_', '-')} {now[key]['file']} is not the file the run started "
                f"with (sha256 {first['sha256'][:16]}… then, {now[key]['sha256'][:16]}… now; it was "
                f"{first['file']}). Restore those weights or start a new --output.")
    return saved


def _resume_changes(saved: dict, config: dict, epoch: int, start_cwd: str) -> list[dict]:
    """Refuse a resume whose ``config`` (the fields of a :class:`TrainConfig`) changes what the run computes; return
    the allowed changes it makes (e.g. a longer schedule) as ``[{"epoch", "changes": {field: [old, new]}}]``,
    bookkeeping left out, so the run's card can say that it is not one uninterrupted command. The saved config's
    relative paths are relative to ``start_cwd``; a field it lacks (newer than the run) had its earlier value."""
    saved = TrainConfig.as_run_before(saved)
    changed = {k: [saved.get(k), v] for k, v in config.items()
               if (not _same_path(saved.get(k), v, start_cwd) if k in _PATHS else saved.get(k) != v)}
    refused = sorted(k for k in changed if k not in TrainConfig.RESUMABLE_CHANGES)
    if refused:
        raise LeanvitError(
            "Cannot resume: the run in --output was started with different settings ("
            + ", ".join(f"{k}: {_shown(k, changed[k][0], start_cwd)} -> {_shown(k, changed[k][1], os.getcwd())}"
                        for k in refused)
            + "). Use the original settings or another --output."
        )
    kept = {k: v for k, v in changed.items() if k not in TrainConfig.BOOKKEEPING}
    return [{"epoch": epoch, "changes": kept}] if kept else []


def _shown(key: str, value, cwd: str) -> str:
    """A setting's value for an error; a relative path also as where it leads from ``cwd`` (the same words from two
    folders are two places)."""
    if key in _PATHS and isinstance(value, str) and not Path(value).expanduser().is_absolute():
        return f"{value!r} ({Path(cwd) / value})"
    return repr(value)


#: Settings naming files or folders: a resume may name them by another path (another working directory).
_PATHS = ("data", "val_data", "val_labels", "init_checkpoint", "teacher_checkpoint")


def _same_path(saved: str | None, now: str | None, start_cwd: str) -> bool:
    """Whether ``saved`` (relative to ``start_cwd``) and ``now`` (relative to this folder) name one file. The same
    words may not: ``data="imgs"`` from another folder is other images. Where ``saved`` names nothing that exists
    (a bundled dataset's name, or a folder since removed), the words are all there is to compare."""
    if saved is None or now is None:
        return saved == now
    first, second = Path(start_cwd) / Path(saved).expanduser(), Path(now).expanduser()
    if not first.exists():
        return saved == now
    return second.exists() and first.resolve() == second.resolve()
