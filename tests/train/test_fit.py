"""fit(): an interrupted and resumed run ends exactly where an uninterrupted one does."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from leanvit.checkpoint import model_from_checkpoint, read_checkpoint, read_metadata, save_weights
from leanvit.errors import LeanvitError
from leanvit.train import TrainConfig, fit
from leanvit.train import loop

TINY = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}


def _config(tmp_path, name, **overrides) -> TrainConfig:
    base = dict(model="deit_tiny_distilled_patch16_224", data="cifar10-test500", output=str(tmp_path / name),
                model_kwargs=TINY, epochs=2, batch_size=8, max_steps_per_epoch=3, warmup_epochs=0.5,
                lr=1e-3, ema_decay=0.9, clip_grad=1.0, workers=0, progress=False)
    return TrainConfig(**{**base, **overrides})



def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """Mixup, RandAugment, random erasing, EMA and the schedule all have to pick up where they left."""
    full = fit(_config(tmp_path, "full"))

    save = loop.save_training_state

    def crash_after_first_checkpoint(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_training_state", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        fit(_config(tmp_path, "cut"))
    monkeypatch.setattr(loop, "save_training_state", save)
    resumed = fit(_config(tmp_path, "cut", resume=True))

    assert [s["epoch"] for s in resumed.steps] == [1, 1, 1]
    assert [s["loss"] for s in full.steps[3:]] == [s["loss"] for s in resumed.steps]
    timing = ("seconds", "hardware")  # when and where, not what was computed
    assert ([{k: v for k, v in e.items() if k not in timing} for e in full.epochs]
            == [{k: v for k, v in e.items() if k not in timing} for e in resumed.epochs])
    assert all(e["seconds"] >= 0 and "threads" in e["hardware"] for e in resumed.epochs)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = read_checkpoint(tmp_path / "full" / name)[0], read_checkpoint(tmp_path / "cut" / name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == [
        "ema.safetensors", "epoch-0001", "model.safetensors"]


def test_resume_refuses_other_settings_and_overwriting(tmp_path):
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1))
    with pytest.raises(LeanvitError, match="already holds a run"):
        fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1))
    with pytest.raises(LeanvitError, match=r"different settings \(lr: 0.001 -> 0.002"):
        fit(_config(tmp_path, "run", epochs=2, max_steps_per_epoch=1, lr=2e-3, resume=True))


def test_resume_below_the_epochs_done_is_refused_and_data_by_another_path_is_the_same(tmp_path, monkeypatch, capsys):
    from leanvit.data import bundled_cifar10

    data = tmp_path / "data"  # a folder named by a relative path first, then by its absolute one
    for i in range(16):
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        bundled_cifar10()[i][0].save(data / f"c{i % 2}" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    fit(_config(tmp_path, "run", data="data", epochs=2, max_steps_per_epoch=1))
    with pytest.raises(LeanvitError, match="has trained 2 epochs, more than --epochs 1: pass --epochs 2 or more"):
        fit(_config(tmp_path, "run", data=str(data), epochs=1, max_steps_per_epoch=1, resume=True))
    fit(_config(tmp_path, "run", data=str(data), epochs=2, max_steps_per_epoch=1, resume=True))
    assert "has trained all its 2 epochs; nothing left to train" in capsys.readouterr().err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the saved "data" is relative to where the run started
    fit(_config(tmp_path, "run", data="../data", epochs=3, max_steps_per_epoch=1, resume=True))
    assert "resumed from" in capsys.readouterr().err
    other = tmp_path / "elsewhere" / "data"  # the words the run started with, from here: other images
    for i in range(16, 32):
        (other / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        bundled_cifar10()[i][0].save(other / f"c{i % 2}" / f"{i}.png")
    with pytest.raises(LeanvitError, match=rf"data: 'data' \({tmp_path}/data\) -> 'data' \({other}\)"):
        fit(_config(tmp_path, "run", data="data", epochs=4, max_steps_per_epoch=1, resume=True))


def test_a_longer_resumed_run_steps_at_its_new_schedules_rate(tmp_path):
    """The saved optimizer held the rate the old (1-epoch) schedule set last, its min_lr: the first step after a
    resume with --epochs 2 ran at it, not at the 2-epoch schedule's rate for that step."""
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=2, warmup_epochs=0))
    extended = fit(_config(tmp_path, "run", epochs=2, max_steps_per_epoch=2, warmup_epochs=0, resume=True))
    whole = fit(_config(tmp_path, "whole", epochs=2, max_steps_per_epoch=2, warmup_epochs=0))
    assert [s["lr"] for s in extended.steps] == [s["lr"] for s in whole.steps][2:]


def test_a_run_from_before_remode_resumes_with_the_fill_it_had(tmp_path):
    """Runs recorded before ``remode`` existed erased with zeros (timm's default): resuming one with DeiT's per-pixel
    noise, today's default, would change what it computes."""
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1))
    state_file = tmp_path / "run" / "epoch-0000" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["config"].pop("remode") == "pixel"
    state_file.write_text(json.dumps(state))
    with pytest.raises(LeanvitError, match="remode: 'const' -> 'pixel'"):
        fit(_config(tmp_path, "run", epochs=2, max_steps_per_epoch=1, resume=True))
    fit(_config(tmp_path, "run", epochs=2, max_steps_per_epoch=1, remode="const", resume=True))


def test_random_erasing_fills_as_remode_says():
    from leanvit.data import build_transform

    config = {"input_size": [3, 32, 32], "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0,
              "interpolation": "bicubic"}
    for mode in ("pixel", "const"):
        erasing = build_transform(config, train=True, re_prob=0.25, re_mode=mode).transforms[-1]
        assert type(erasing).__name__ == "RandomErasing" and erasing.mode == mode
    assert TrainConfig(model="m", data="d").remode == "pixel"  # DeiT's recipe
    with pytest.raises(LeanvitError, match="--remode must be one of pixel, rand, const, got 'zeros'"):
        TrainConfig(model="m", data="d", remode="zeros")


def test_data_at_a_size_the_model_was_not_built_for_is_refused_with_the_fix(tmp_path):
    with pytest.raises(LeanvitError, match=r"does not run on 3x48x48 inputs .*--model-kwargs '\{\"img_size\": 48\}'"):
        fit(_config(tmp_path, "run", img_size=48))


def test_a_model_built_for_non_square_inputs_trains_on_them(tmp_path):
    """img_size [height, width] in the model kwargs sizes the data too, as an integer one does (timm's 224 stopped the
    run at the input-size check); the checkpoint records that size for eval and quantize."""
    result = fit(_config(tmp_path, "run", model_kwargs={**TINY, "img_size": [32, 48]}, epochs=1, max_steps_per_epoch=1))
    assert read_metadata(result.output / "model.safetensors")["data_config"]["input_size"] == [3, 32, 48]


def test_the_logged_learning_rate_is_the_one_each_step_ran_at(tmp_path):
    result = fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=3, warmup_epochs=0.5, warmup_lr=1e-6))
    assert result.steps[0]["lr"] == pytest.approx(1e-6)  # the first step runs at the warm-up's start


def test_mixup_needs_an_even_batch_and_the_output_is_checked_first(tmp_path):
    with pytest.raises(LeanvitError, match=r"batch per process \(1\) must be even.*--mixup 0 --cutmix 0"):
        fit(_config(tmp_path, "run", batch_size=1))
    fit(_config(tmp_path, "run", batch_size=1, mixup=0, cutmix=0, epochs=1, max_steps_per_epoch=1))
    (tmp_path / "afile").write_text("")
    with pytest.raises(LeanvitError, match="Cannot create --output .*afile/out"):
        fit(_config(tmp_path, "afile/out"))


def test_resume_records_the_settings_it_changed(tmp_path):
    """A resume that extends the schedule is kept in the run's state, so its card can say so."""
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1))
    fit(_config(tmp_path, "run", epochs=2, max_steps_per_epoch=1, workers=1, resume=True))
    state = json.loads((tmp_path / "run" / "epoch-0001" / "state.json").read_text())
    # workers is recorded: each loader process seeds its own augmentation, so their number changes the draws
    assert state["changes"] == [{"epoch": 1, "changes": {"epochs": [1, 2], "workers": [0, 1]}}]
    fit(_config(tmp_path, "run", epochs=3, max_steps_per_epoch=1, workers=1, resume=True))
    state = json.loads((tmp_path / "run" / "epoch-0002" / "state.json").read_text())
    assert state["changes"] == [{"epoch": 1, "changes": {"epochs": [1, 2], "workers": [0, 1]}},
                                {"epoch": 2, "changes": {"epochs": [2, 3]}}]


@pytest.mark.parametrize("name", ["lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "mixup", "cutmix",
                                  "clip_grad", "distill_tau", "label_smoothing", "crop_pct", "ema_decay"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_options_that_are_not_finite_numbers_are_refused(name, value):
    """--lr inf trained on NaN and reported success; --warmup-epochs inf failed with an OverflowError."""
    with pytest.raises(LeanvitError, match=f"--{name.replace('_', '-')} must be a finite number, got {value}"):
        TrainConfig(model="m", data="d", **{name: value})


def test_a_diverging_run_stops_before_its_checkpoint(tmp_path, monkeypatch):
    """A NaN loss stops the run with the epoch and step, instead of saving NaN weights and exiting 0."""
    objective, calls = loop._objective, []

    def nan_at_the_second_step(*args):
        mixup, loss_fn = objective(*args)
        return mixup, lambda *a: loss_fn(*a) * (float("nan") if calls.append(1) or len(calls) == 2 else 1.0)

    monkeypatch.setattr(loop, "_objective", nan_at_the_second_step)
    with pytest.raises(LeanvitError, match=r"The loss is nan at epoch 0, step 2: training diverged, and no checkpoint "
                                           r"of this epoch is written\. Lower --lr \(it is 0.001\) or pass --clip-grad"):
        fit(_config(tmp_path, "run", epochs=1))
    assert not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("given, message", [
    (dict(distill="soft"), "--distill needs --teacher, the model to distil from"),
    (dict(distill_alpha=0.9, distill_tau=4.0), "--distill-alpha, --distill-tau need --teacher"),
    (dict(keep_rate_shrink_epochs=100), "--keep-rate-start-epoch / --keep-rate-shrink-epochs .* need --tokens evit"),
    (dict(keep_rate_start_epoch=10), "need --tokens evit:KEEP"),
    (dict(val_labels="labels.txt"), "--val-labels needs --val-data"),
])
def test_options_without_the_one_they_act_with_are_refused(given, message):
    """They would be silently ignored (as --teacher-checkpoint without --teacher already is refused)."""
    with pytest.raises(LeanvitError, match=message):
        TrainConfig(model="m", data="d", **given)
    TrainConfig(model="m", data="d", teacher="t", tokens="evit:0.7", val_data="v", **given)


@pytest.mark.parametrize("teacher, size", [("test_vit3", 160), ("test_vit", 32)])
def test_a_teacher_without_metadata_runs_at_the_students_size_or_its_own(tmp_path, teacher, size):
    """A plain timm checkpoint says nothing of its input size: a teacher that runs at the student's 32x32 is fed
    that; a fixed-size one (test_vit3: 160x160 only) gets the batches resized to its own size, not an assertion."""
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model(teacher).state_dict(), tmp_path / "t.pth")  # no leanvit metadata, 1000 classes
    cfg = TrainConfig(model="m", data="d", teacher=teacher, teacher_checkpoint=str(tmp_path / "t.pth"))
    student = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
               "crop_pct": 1.0}
    adapted = loop._teacher(cfg, [str(i) for i in range(1000)], student, torch.device("cpu"))
    assert adapted.size == (size, size)
    assert adapted(torch.zeros(2, 3, 32, 32)).shape == (2, 1000)


def test_distillation_from_a_checkpointed_teacher(tmp_path, monkeypatch):
    teacher, _ = _teacher(tmp_path)
    heads = []

    class Recording(loop.DistillationLoss):
        def forward(self, inputs, outputs, targets):
            heads.append(isinstance(outputs, tuple))  # (class, distillation) logits from DeiT's two heads
            return super().forward(inputs, outputs, targets)

    monkeypatch.setattr(loop, "DistillationLoss", Recording)
    result = fit(_config(tmp_path, "kd", epochs=1, max_steps_per_epoch=2, teacher="deit_tiny_patch16_224",
                         teacher_checkpoint=str(teacher), distill="soft", mixup=0, cutmix=0,
                         val_data="cifar10-test500"))
    assert len(result.steps) == 2 and {"top1", "ema_top1"} <= result.epochs[0].keys()
    assert heads == [True, True]
    student, meta = model_from_checkpoint("deit_tiny_distilled_patch16_224", tmp_path / "kd")
    assert meta["model_kwargs"] == {"num_classes": 10, **TINY} and meta["data_config"]["input_size"] == [3, 32, 32]
    assert json.loads((tmp_path / "kd" / "epoch-0000" / "state.json").read_text())["step"] == 2


def test_run_records_its_teachers_file_and_refuses_another_on_resume(tmp_path):
    """A teacher named by a (reusable) name or path is pinned by its sha256: a resume after the file was
    replaced would distil from other weights, so it is refused."""
    import hashlib

    import timm

    path, _ = _teacher(tmp_path)
    kd = dict(epochs=1, max_steps_per_epoch=1, teacher="deit_tiny_patch16_224", teacher_checkpoint=str(path),
              mixup=0, cutmix=0)
    fit(_config(tmp_path, "kd", **kd))
    inputs = json.loads((tmp_path / "kd" / "epoch-0000" / "state.json").read_text())["inputs"]
    assert inputs == {"teacher_checkpoint": {"file": str(path.resolve()),
                                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}
    fit(_config(tmp_path, "kd", **{**kd, "epochs": 2}, resume=True))  # same file: resumes, record kept
    assert json.loads((tmp_path / "kd" / "epoch-0001" / "state.json").read_text())["inputs"] == inputs

    kwargs = {**TINY, "num_classes": 10}
    save_weights(path, timm.create_model("deit_tiny_patch16_224", **kwargs).state_dict(),
                 {"model": "deit_tiny_patch16_224", "model_kwargs": kwargs})  # same name, other weights
    with pytest.raises(LeanvitError, match="--teacher-checkpoint .* is not the file the run started with"):
        fit(_config(tmp_path, "kd", **{**kd, "epochs": 3}, resume=True))


def test_teacher_for_other_classes_is_refused(tmp_path):
    _, path = _teacher(tmp_path, num_classes=3)
    with pytest.raises(LeanvitError, match="teacher deit_tiny_patch16_224 has 3 classes"):
        fit(_config(tmp_path, "kd", teacher="deit_tiny_patch16_224", teacher_checkpoint=str(path)))


def test_a_pretrained_teacher_for_other_classes_is_refused_before_its_download(tmp_path, monkeypatch):
    create = loop.create_model

    def offline(name, *, pretrained=False, **kwargs):
        assert not pretrained, "the teacher's weights were fetched before its classes were checked"
        return create(name, **kwargs)

    monkeypatch.setattr(loop, "create_model", offline)
    with pytest.raises(LeanvitError, match="teacher resnet18 has 1000 classes but cifar10-test500 has 10"):
        fit(_config(tmp_path, "kd", teacher="resnet18"))


def test_a_teacher_trained_on_these_classes_in_another_order_is_refused(tmp_path):
    import timm

    from leanvit.data import bundled_cifar10

    kwargs = {**TINY, "num_classes": 10}
    path = tmp_path / "reversed.safetensors"
    save_weights(path, timm.create_model("deit_tiny_patch16_224", **kwargs).state_dict(),
                 {"model": "deit_tiny_patch16_224", "model_kwargs": kwargs, "classes": bundled_cifar10().classes[::-1]})
    with pytest.raises(LeanvitError, match="was trained on the classes \\['truck'.*not those of cifar10-test500"):
        fit(_config(tmp_path, "kd", teacher="deit_tiny_patch16_224", teacher_checkpoint=str(path)))


@pytest.mark.parametrize("classes, kept", [("same", True), ("reversed", False), ("unnamed", True)])
def test_init_checkpoint_keeps_a_classifier_trained_on_these_classes(tmp_path, classes, kept, capsys):
    """The next resolution step of one run starts from its trained head; other classes' head is re-initialised."""
    import timm

    from leanvit.data import bundled_cifar10

    names = bundled_cifar10().classes
    meta = {"model": "deit_tiny_distilled_patch16_224", "model_kwargs": {**TINY, "num_classes": 10},
            **({"classes": names if classes == "same" else names[::-1]} if classes != "unnamed" else {})}
    torch.manual_seed(123)
    init = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, **TINY).state_dict()
    save_weights(tmp_path / "init.safetensors", init, meta)
    tiny_lr = dict(lr=1e-12, warmup_lr=1e-12, min_lr=1e-12, weight_decay=0.0)
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1, init_checkpoint=str(tmp_path / "init.safetensors"),
                **tiny_lr))
    head = read_checkpoint(tmp_path / "run" / "model.safetensors")[0]["head.weight"]
    assert torch.allclose(head, init["head.weight"], atol=1e-6) is kept
    assert ("the classifier too" if kept else "classifier re-initialised") in capsys.readouterr().err


def _teacher(tmp_path, num_classes=10):
    import timm

    kwargs = {**TINY, "num_classes": num_classes}
    path = tmp_path / f"teacher{num_classes}.safetensors"
    save_weights(path, timm.create_model("deit_tiny_patch16_224", **kwargs).state_dict(),
                 {"model": "deit_tiny_patch16_224", "model_kwargs": kwargs})
    return path, path


def test_training_with_evit_follows_the_keep_rate_warmup(tmp_path, monkeypatch):
    """--tokens evit:0.5 with a 1-epoch start and 1-epoch shrink: keep rate 1, then the cosine, per step."""
    from leanvit.compress.tokens import evit

    seen = []
    warmup = evit.keep_rate_warmup

    def recording_warmup(model, **kwargs):
        hook = warmup(model, **kwargs)
        return lambda step: seen.append(hook(step)) or seen[-1]

    monkeypatch.setattr(loop, "keep_rate_warmup", recording_warmup)
    result = fit(_config(tmp_path, "evit", model="deit_tiny_patch16_224", model_kwargs={**TINY, "depth": 10},
                         epochs=3, max_steps_per_epoch=2,
                         tokens="evit:0.5", keep_rate_start_epoch=1, keep_rate_shrink_epochs=1))
    assert seen[:2] == [1.0, 1.0]
    assert seen[2] == 1.0 and 0.5 < seen[3] < 1.0 and seen[4:] == [0.5, 0.5]
    assert len(result.epochs) == 3
    assert read_metadata(tmp_path / "evit")["tokens"] == "evit:0.5"
    reloaded, _ = model_from_checkpoint("deit_tiny_patch16_224", tmp_path / "evit" / "model.safetensors")
    assert reloaded.blocks.method.keep_rate == 0.5  # trained with EViT on, evaluated with it


def test_keep_rate_schedule_needs_evit(tmp_path):
    """Refused when the options are read, before the model or any data."""
    with pytest.raises(LeanvitError, match="need --tokens evit:KEEP, not tome:1"):
        _config(tmp_path, "tome", model="deit_tiny_patch16_224", tokens="tome:1", keep_rate_shrink_epochs=1)
    with pytest.raises(LeanvitError, match="token spec"):
        _config(tmp_path, "bad", tokens="evit0.7")


def test_channels_last_changes_the_layout_not_the_result(tmp_path):
    conv = dict(model="resnet10t", model_kwargs={}, img_size=32, epochs=1, max_steps_per_epoch=2, ema_decay=None)
    plain = fit(_config(tmp_path, "plain", **conv))
    nhwc = fit(_config(tmp_path, "nhwc", channels_last=True, **conv))
    assert [s["loss"] for s in nhwc.steps] == pytest.approx([s["loss"] for s in plain.steps], rel=1e-4)
    a, b = read_checkpoint(tmp_path / "plain")[0], read_checkpoint(tmp_path / "nhwc")[0]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_compiled_training_step_matches_eager(tmp_path):
    """--compile only changes how the step runs: same losses, and checkpoints keep plain key names."""
    short = dict(epochs=1, max_steps_per_epoch=2, ema_decay=None)
    eager = fit(_config(tmp_path, "eager", **short))
    compiled = fit(_config(tmp_path, "compiled", compile=True, **short))
    assert [s["loss"] for s in compiled.steps] == pytest.approx([s["loss"] for s in eager.steps], rel=1e-4)
    a, b = read_checkpoint(tmp_path / "eager")[0], read_checkpoint(tmp_path / "compiled")[0]
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def _default_warmup(tmp_path, name, **overrides) -> TrainConfig:
    """_config's run with --warmup-epochs left at its default."""
    config = _config(tmp_path, name, **overrides).to_dict()
    del config["warmup_epochs"]
    return TrainConfig(**config)


def test_the_default_warmup_fits_a_short_run_and_a_resume_keeps_it(tmp_path, capsys):
    """--epochs 2 with the default 5 warm-up epochs never reached --lr nor started the cosine decay, silently."""
    cfg = _default_warmup(tmp_path, "short", ema_decay=None)  # 2 epochs of 3 steps
    lrs = [s["lr"] for s in fit(cfg).steps]
    assert ("warm-up: 0.2 epochs (the default 5 epochs, capped at a tenth of the 2-epoch run; --warmup-epochs sets it)"
            in capsys.readouterr().err)
    assert lrs[0] == pytest.approx(cfg.warmup_lr) and lrs[1] > 0.9 * cfg.lr  # one warm-up step, then the cosine
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.5 * cfg.lr
    assert json.loads((tmp_path / "short" / "epoch-0001" / "state.json").read_text())["config"]["warmup_epochs"] == 0.2

    # a longer schedule on resume keeps the warm-up the run started with (it is over), and says no more
    fit(_default_warmup(tmp_path, "short", epochs=3, ema_decay=None, resume=True))
    state = json.loads((tmp_path / "short" / "epoch-0002" / "state.json").read_text())
    assert state["config"]["warmup_epochs"] == 0.2 and state["changes"] == [{"epoch": 2, "changes": {"epochs": [2, 3]}}]
    assert "warm-up:" not in capsys.readouterr().err
    with pytest.raises(LeanvitError, match=r"different settings \(warmup_epochs: 0.2 -> 0.5\)"):
        fit(_config(tmp_path, "short", epochs=4, ema_decay=None, resume=True))


def test_a_given_warmup_as_long_as_the_run_is_kept_and_warned_about(tmp_path):
    from leanvit.errors import LeanvitWarning

    with pytest.warns(LeanvitWarning, match=r"--warmup-epochs 2 is as long as the run \(--epochs 2\) or longer: the "
                                            r"learning rate .* never reaches --lr 0.001, and the cosine decay never"):
        lrs = [s["lr"] for s in fit(_config(tmp_path, "run", warmup_epochs=2, ema_decay=None)).steps]
    assert lrs == sorted(lrs) and lrs[-1] < 0.9e-3  # the user's warm-up, not a shortened one


def test_train_help_says_how_long_the_default_warmup_is(capsys):
    from leanvit.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 5, at most a tenth of --epochs" in text
    # every other option with a default shows it, and a flag with none says nothing
    assert "training epochs (default: 300)" in text and "distillation: hard or soft (default: hard)" in text
    assert "--ema-decay X keep an EMA of the weights (e.g. 0.9998) --teacher" in text


def test_a_one_step_run_logs_no_scheduler_notice(tmp_path, caplog, capsys):
    """timm's 'Cosine annealing scheduler will have no effect ... t_initial = t_mul = eta_mul = 1' named settings
    leanvit does not have, ahead of the run's own output or errors."""
    import logging

    with caplog.at_level(logging.INFO):
        fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1))
    assert "Cosine annealing" not in caplog.text + capsys.readouterr().err
    assert logging.getLogger("timm.scheduler.cosine_lr").level == logging.NOTSET  # silenced for that call only


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_files_of_a_run_get_the_umasks_mode(tmp_path, umask):
    """safetensors writes 0600: the other users (of the other nodes) of a shared --output could not read them."""
    import os

    old = os.umask(umask)
    try:
        fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1))
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path / "run").as_posix(): oct(p.stat().st_mode & 0o777)
             for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert modes == {name: oct(0o666 & ~umask) for name in (
        "model.safetensors", "ema.safetensors", "epoch-0000/model.safetensors", "epoch-0000/ema.safetensors",
        "epoch-0000/optimizer.safetensors", "epoch-0000/state.json")}


@pytest.mark.parametrize("cpus, local_world_size, workers", [(2, None, 2), (64, None, 4), (8, "4", 2), (2, "4", 1)])
def test_the_default_data_workers_are_this_process_share_of_the_cpus(cpus, local_world_size, workers, monkeypatch):
    """4 loader processes on a 2-core machine only took turns (and torch warned); torchrun's processes split the
    CPUs between them."""
    import os

    from leanvit.train import config

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    if local_world_size:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert config.default_workers() == workers


def test_a_batch_of_one_through_a_pooled_batchnorm_is_an_error_with_the_fix(tmp_path):
    """MobileViG's head normalises its pooled features with BatchNorm (as the official model): a training batch of
    one image cannot be normalised there (torch's ValueError named neither the layer nor the fix)."""
    with pytest.raises(LeanvitError, match="BatchNorm that sees one value per channel.*--batch-size 2 or more.$"):
        fit(_config(tmp_path, "one", model="mobilevig_ti", model_kwargs={}, img_size=32, batch_size=1, mixup=0,
                    cutmix=0, epochs=1, max_steps_per_epoch=1, ema_decay=0))


def test_a_resume_without_workers_keeps_the_runs_own_on_another_machine(tmp_path, monkeypatch):
    """The default is worked out from the machine: resumed where it differs (1 CPU for 2), a plain --resume recorded
    a change of workers, so the same command was no longer one uninterrupted run. The run's own count is kept."""
    import os

    from leanvit.train import config as train_config

    asked, make_loader = [], loop.make_loader
    monkeypatch.setattr(loop, "make_loader",
                        lambda *a, workers, **k: asked.append(workers) or make_loader(*a, workers=0, **k))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1, workers=None))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert train_config.default_workers() == 1
    fit(_config(tmp_path, "run", epochs=2, max_steps_per_epoch=1, workers=None, resume=True))
    state = json.loads((tmp_path / "run" / "epoch-0001" / "state.json").read_text())
    assert asked == [2, 2] and state["config"]["workers"] == 2
    assert state["changes"] == [{"epoch": 1, "changes": {"epochs": [1, 2]}}]


def test_the_batch_of_one_fix_counts_the_processes_and_corrupt_images():
    """--batch-size is the global batch: under torchrun with 2 processes "--batch-size 2 or more" was the size given."""
    assert loop._batch_of_one_fix(1, 1) == "use --batch-size 2 or more"
    assert loop._batch_of_one_fix(2, 2) == "use --batch-size 4 or more (2 per process, 2 processes)"
    assert "could not be decoded" in loop._batch_of_one_fix(8, 2)


def test_tome_trains_without_proportional_attention_when_asked_and_its_checkpoint_evaluates_so(tmp_path):
    """Official ToMe trains with proportional attention off; the checkpoint records it, so that the model it loads
    runs as it was trained (a reduction re-applied from "tome:1" alone would turn it back on)."""
    from leanvit.compress import tokens

    fit(_config(tmp_path, "tome", tokens="tome:1x1", tome_prop_attn=False, epochs=1, max_steps_per_epoch=1))
    checkpoint = tmp_path / "tome" / "epoch-0000" / "model.safetensors"
    assert read_metadata(checkpoint)["tokens_options"] == {"prop_attn": False}
    model, _ = model_from_checkpoint("deit_tiny_distilled_patch16_224", checkpoint)
    assert tokens.applied(model).prop_attn is False
    assert TrainConfig(model="m", data="d", tokens="tome:1x1").token_method().prop_attn is True  # the default
    with pytest.raises(LeanvitError, match="--no-tome-prop-attn acts on ToMe's attention and needs --tokens tome:R"):
        TrainConfig(model="m", data="d", tokens="evit:0.5", tome_prop_attn=False)


def test_a_run_recorded_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """A field added since a run was saved (``tome_prop_attn``) was read as None and refused the resume of every
    older run; it takes the default, the behaviour those runs had (``EARLIER_VALUES`` where it is not)."""
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1))
    state_file = tmp_path / "run" / "epoch-0000" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["config"].pop("tome_prop_attn") is True
    state_file.write_text(json.dumps(state))
    fit(_config(tmp_path, "run", epochs=2, max_steps_per_epoch=1, resume=True))
    state = json.loads((tmp_path / "run" / "epoch-0001" / "state.json").read_text())
    assert state["changes"] == [{"epoch": 1, "changes": {"epochs": [1, 2]}}]


def _float_weights(path) -> dict:
    return {k: v for k, v in read_checkpoint(path)[0].items() if v.is_floating_point()}


def test_the_ema_averages_the_weights_of_each_step_at_the_given_decay(tmp_path):
    """The EMA is what ema.safetensors ships (and what --val-data scores as ema_top1): never updated, it was the
    initial weights; at decay 1 - d, it followed the last step instead of averaging. timm's EMA starts with a copy
    (its update at step 1 has decay 0), then mixes each step in with weight 1 - decay."""
    short = dict(epochs=1, warmup_epochs=0, mixup=0, cutmix=0, ema_decay=0.9)
    one = fit(_config(tmp_path, "one", max_steps_per_epoch=1, **short))
    two = fit(_config(tmp_path, "two", max_steps_per_epoch=2, **short))
    assert one.steps[0] == two.steps[0]  # the 2-step run's first step is the 1-step run's
    first, second = (_float_weights(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    ema_one, ema_two = (_float_weights(tmp_path / name / "ema.safetensors") for name in ("one", "two"))
    assert ema_one.keys() == first.keys() == ema_two.keys() == second.keys()
    for k in first:
        torch.testing.assert_close(ema_one[k], first[k])
        assert not torch.equal(first[k], second[k])  # the second step moved every weight
        torch.testing.assert_close(ema_two[k], 0.9 * first[k] + 0.1 * second[k])


class _AskedFor(torch.utils.data.Dataset):
    """The first 16 images of ``inner`` (two batches of 8: an epoch asks for each once, and no more), recording each
    index asked for with a draw of Python's, NumPy's and torch's generators at that moment."""

    def __init__(self, inner):
        self.inner, self.classes, self.asked = inner, inner.classes, []

    transform = property(lambda self: self.inner.transform, lambda self, t: setattr(self.inner, "transform", t))

    def __len__(self):
        return 16

    def __getitem__(self, i):
        self.asked.append((i, (random.random(), float(np.random.random()), torch.rand(()).item())))
        return self.inner[i]


def test_each_epoch_shuffles_the_data_and_draws_its_augmentations_anew(tmp_path, monkeypatch):
    """Every epoch must see the data in a new random order (the sampler's shuffle, ``set_epoch``) and draw new
    augmentations (the re-seed from the epoch): one fixed order, or the same crops and flips every epoch, trains on
    fewer distinct batches, and nothing else notices."""
    datasets, open_dataset = [], loop.open_dataset
    monkeypatch.setattr(loop, "open_dataset", lambda *a, **k: datasets.append(_AskedFor(open_dataset(*a, **k)))
                        or datasets[-1])
    fit(_config(tmp_path, "run", epochs=2, max_steps_per_epoch=None, mixup=0, cutmix=0, ema_decay=None))
    asked = datasets[0].asked
    assert len(asked) == 32
    first, second = [i for i, _ in asked[:16]], [i for i, _ in asked[16:]]
    assert sorted(first) == sorted(second) == list(range(16))
    assert first != sorted(first)  # shuffled
    assert second != first  # and anew each epoch
    draws = asked[0][1], asked[16][1]  # the first image's of each epoch
    assert all(a != b for a, b in zip(*draws))  # Python's, NumPy's and torch's generators: all re-seeded per epoch


def test_clip_grad_clips_the_gradient_norm_of_each_step(tmp_path, monkeypatch):
    """--clip-grad is the fix the divergence error suggests: the optimizer must step on the clipped gradients."""
    norms, create = [], loop.create_optimizer_v2

    def recording(*args, **kwargs):
        optimizer = create(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, a, k: norms.append(torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for group in opt.param_groups for p in group["params"] if p.grad is not None])).item()))
        return optimizer

    monkeypatch.setattr(loop, "create_optimizer_v2", recording)
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=2, mixup=0, cutmix=0, ema_decay=None, clip_grad=1e-3))
    assert norms == pytest.approx([1e-3, 1e-3], rel=1e-3)  # unclipped, they are far larger (about 1)


def test_objective_passes_mixup_cutmix_and_label_smoothing_as_given():
    """Mixup and CutMix draw from --mixup and --cutmix (not the other way round) and smooth the mixed labels with
    --label-smoothing; without them, the loss is label-smoothed cross-entropy (DeiT's recipe: 0.1)."""
    import torch.nn.functional as F

    mixup, loss = loop._objective(TrainConfig(model="m", data="d", mixup=0.3, cutmix=0.7, label_smoothing=0.1), 10,
                                  None)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.3, 0.7, 0.1)

    def mixed(**options):  # a black image and a white one, mixed with each other
        mixup, _ = loop._objective(TrainConfig(model="m", data="d", label_smoothing=0.1, **options), 10, None)
        np.random.seed(0)  # Mixup draws its mode and lambda from NumPy
        return mixup(torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)]), torch.tensor([0, 1]))

    x, target = mixed(mixup=0.8, cutmix=0)
    assert all(len(image.unique()) == 1 and 0 < image.unique() < 1 for image in x)  # blended throughout
    torch.testing.assert_close(target[:, 2:], torch.full((2, 8), 0.1 / 10))  # each label smoothed, then mixed
    torch.testing.assert_close(target.sum(1), torch.ones(2))
    x, _ = mixed(mixup=0, cutmix=1.0)
    assert set(x.unique().tolist()) == {0.0, 1.0}  # a patch pasted, nothing blended

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(4, 10, generator=g), torch.tensor([0, 3, 9, 3])
    for smoothing in (0.1, 0.0):
        mixup, loss = loop._objective(TrainConfig(model="m", data="d", mixup=0, cutmix=0, label_smoothing=smoothing),
                                      10, None)
        assert mixup is None
        torch.testing.assert_close(loss(None, logits, y), F.cross_entropy(logits, y, label_smoothing=smoothing))
    soft = torch.softmax(torch.randn(4, 10, generator=g), 1)
    _, loss = loop._objective(TrainConfig(model="m", data="d"), 10, None)
    torch.testing.assert_close(loss(None, logits, soft), -(soft * logits.log_softmax(1)).sum(1).mean())


@pytest.mark.parametrize("given, message", [
    (dict(epochs=0), r"--epochs must be between 1 and 100000, got 0\."),
    (dict(batch_size=0), r"--batch-size must be between 1 and 1048576, got 0\."),
    (dict(workers=-1), r"--workers must be between 0 and 256, got -1\."),
    (dict(label_smoothing=1.5), r"--label-smoothing must be between 0\.0 and 1\.0, got 1\.5\."),
    (dict(reprob=-0.1), r"--reprob must be between 0\.0 and 1\.0, got -0\.1\."),
    (dict(distill_alpha=2.0, teacher="t"), r"--distill-alpha must be between 0\.0 and 1\.0, got 2\.0\."),
    (dict(crop_scale=1.5), r"--crop-scale must be between 0\.0 and 1\.0, got 1\.5\."),
    (dict(ema_decay=1.0), r"--ema-decay must be in \[0, 1\)"),  # decay 1: the EMA never moves from the initial weights
    (dict(lr=0.0), r"--lr must be above 0, got 0\.0\."),
    (dict(img_size=8), r"--img-size must be between 16 and 4096, got 8\."),
    (dict(tokens="evit:0.5", keep_rate_start_epoch=-1), r"--keep-rate-start-epoch must be between 0 and 100000"),
    (dict(tokens="evit:0.5", keep_rate_shrink_epochs=-1), r"--keep-rate-shrink-epochs must be between 0 and 100000"),
    (dict(teacher_checkpoint="t.pth"), r"--teacher-checkpoint needs --teacher, the teacher's model name\."),
])
def test_options_out_of_their_range_are_refused(given, message):
    """Each would train on nonsense or fail late (an epoch of nothing, a probability above 1, a negative warm-up)."""
    with pytest.raises(LeanvitError, match=message):
        TrainConfig(model="m", data="d", **given)


def test_an_empty_randaug_policy_means_none():
    """'--randaug ""' (as 'none') turns RandAugment off; it is no policy for timm to parse."""
    assert TrainConfig(model="m", data="d", randaug="").randaug is None
    assert TrainConfig(model="m", data="d", randaug="none").randaug is None


def test_tome_is_trained_with_the_proportional_attention_asked_for(tmp_path, monkeypatch):
    """The checkpoint's record is not enough: the training forward itself must run without it."""
    from leanvit.compress import tokens

    applied = []
    monkeypatch.setattr(loop, "token_apply", lambda model, method: applied.append(method) or tokens.apply(model, method))
    fit(_config(tmp_path, "tome", tokens="tome:1x1", tome_prop_attn=False, epochs=1, max_steps_per_epoch=1))
    assert applied == [tokens.ToMe(r=(1,), prop_attn=False)]
    assert TrainConfig(model="m", data="d", tokens="tome:2", tome_prop_attn=False).token_method() == tokens.ToMe(
        r=2, prop_attn=False)


def test_a_resume_may_change_the_memory_layout_and_records_it_but_not_the_progress_bars(tmp_path):
    """channels_last is a resumable change (same result, another layout) and kept in the run's changes; the progress
    bars say nothing of how the run was carried out."""
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1))
    fit(_config(tmp_path, "run", epochs=2, max_steps_per_epoch=1, channels_last=True, progress=True, resume=True))
    state = json.loads((tmp_path / "run" / "epoch-0001" / "state.json").read_text())
    assert state["changes"] == [{"epoch": 1, "changes": {"epochs": [1, 2], "channels_last": [False, True]}}]


def test_the_batch_splits_over_the_processes_and_into_pairs_for_mixup_or_cutmix():
    """--batch-size is the global batch: it must split evenly over torchrun's processes, and each process's share must
    be even where Mixup or CutMix (either alone) pairs its images."""
    def check(world, **given):
        loop._check_batch_split(TrainConfig(model="m", data="d", **given), world)

    check(2, batch_size=8)
    with pytest.raises(LeanvitError, match="--batch-size 9 does not split evenly over 2 processes"):
        check(2, batch_size=9, mixup=0, cutmix=0)
    with pytest.raises(LeanvitError, match=r"the batch per process \(3\) must be even"):
        check(2, batch_size=6)  # even in all, odd per process
    check(2, batch_size=6, mixup=0, cutmix=0)
    for alone in (dict(mixup=0.8, cutmix=0), dict(mixup=0, cutmix=1.0)):
        with pytest.raises(LeanvitError, match=r"the batch per process \(1\) must be even"):
            check(1, batch_size=1, **alone)


def test_model_kwargs_giving_another_number_of_classes_are_refused(tmp_path):
    """The data's classes size the classifier: a num_classes in --model-kwargs that disagrees is the user's mistake."""
    with pytest.raises(LeanvitError, match="--model-kwargs sets num_classes=5 but cifar10-test500 has 10 classes"):
        fit(_config(tmp_path, "run", model_kwargs={**TINY, "num_classes": 5}))


def test_crop_pct_is_recorded_in_the_checkpoints_data_config(tmp_path):
    """--crop-pct is the evaluation crop the checkpoint's data config gives eval and export."""
    fit(_config(tmp_path, "run", crop_pct=0.75, epochs=1, max_steps_per_epoch=1))
    assert read_metadata(tmp_path / "run" / "model.safetensors")["data_config"]["crop_pct"] == 0.75


def test_adamw_decays_the_weights_at_weight_decay_but_not_norms_biases_and_tokens(tmp_path):
    """--weight-decay reaches AdamW, on the weight matrices only (timm's groups: no decay on 1-d parameters and the
    model's no_weight_decay(), its position embedding and tokens)."""
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1, weight_decay=0.3))
    groups = json.loads((tmp_path / "run" / "epoch-0000" / "state.json").read_text())["param_groups"]
    model, _ = model_from_checkpoint("deit_tiny_distilled_patch16_224", tmp_path / "run")
    skip = model.no_weight_decay()
    decayed = sum(p.ndim > 1 and name not in skip for name, p in model.named_parameters())
    assert sorted((g["weight_decay"], len(g["params"])) for g in groups) == [
        (0.0, len(list(model.parameters())) - decayed), (0.3, decayed)]


def test_the_learning_rate_rises_linearly_then_follows_the_cosine_to_min_lr(tmp_path):
    """Per step: warm-up from --warmup-lr over round(warmup_epochs * steps) steps, then timm's cosine from --lr towards
    --min-lr over the whole run (its steps counted from the run's start)."""
    import math

    cfg = _config(tmp_path, "run", epochs=2, max_steps_per_epoch=3, warmup_epochs=0.5, warmup_lr=1e-5, lr=1e-3,
                  min_lr=2e-4, ema_decay=None)
    lrs = [s["lr"] for s in fit(cfg).steps]
    warmup = [1e-5, 1e-5 + (1e-3 - 1e-5) / 2]  # 0.5 x 3 steps: 2 warm-up steps
    cosine = [2e-4 + 0.5 * (1e-3 - 2e-4) * (1 + math.cos(math.pi * t / 6)) for t in range(2, 6)]
    assert lrs == pytest.approx(warmup + cosine, rel=1e-9)


def test_each_epochs_summary_is_the_mean_loss_and_last_rate_of_its_steps(tmp_path):
    """The per-epoch log (the model card's loss curve) averages the epoch's step losses and gives the rate its last
    step ran at; the steps are counted over the run, as the checkpoint's step."""
    result = fit(_config(tmp_path, "run", epochs=2, max_steps_per_epoch=3))
    assert [s["step"] for s in result.steps] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "run" / "epoch-0001" / "state.json").read_text())["step"] == 6
    for summary in result.epochs:
        steps = [s for s in result.steps if s["epoch"] == summary["epoch"]]
        assert summary["loss"] == pytest.approx(sum(s["loss"] for s in steps) / 3, abs=1e-6)
        assert summary["lr"] == steps[-1]["lr"] != steps[0]["lr"]


def test_validation_scores_the_model_then_its_ema(tmp_path, monkeypatch):
    """--val-data's top1 is the trained weights', ema_top1 the EMA's (the weights ema.safetensors ships)."""
    seen, evaluate = [], loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda net, *a, **k: seen.append(
        {name: value.clone() for name, value in net.state_dict().items()}) or evaluate(net, *a, **k))
    result = fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=2, val_data="cifar10-test500", mixup=0,
                         cutmix=0))
    assert {"top1", "ema_top1"} <= result.epochs[0].keys() and len(seen) == 2
    model, ema = (_float_weights(tmp_path / "run" / "epoch-0000" / name) for name in ("model.safetensors",
                                                                                      "ema.safetensors"))
    assert any(not torch.equal(model[k], ema[k]) for k in model)  # two steps at decay 0.9: the EMA lags
    for k in model:
        assert torch.equal(seen[0][k], model[k]) and torch.equal(seen[1][k], ema[k])


def test_data_with_fewer_images_than_one_batch_is_refused(tmp_path):
    """The training loader drops an incomplete last batch: with fewer images than one batch an epoch had no step."""
    from leanvit.data import bundled_cifar10

    for i in range(6):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        bundled_cifar10()[i][0].save(tmp_path / "data" / f"c{i % 2}" / f"{i}.png")
    with pytest.raises(LeanvitError, match=r"data has 6 images, fewer than one batch of 8\."):
        fit(_config(tmp_path, "run", data=str(tmp_path / "data")))


def test_mixup_trains_on_a_batch_left_odd_by_a_corrupt_image(tmp_path):
    """A skipped corrupt image leaves a batch of 7 of 8: Mixup pairs the images, so it mixes the first 6 (timm's
    Mixup asserted an even batch and stopped the run)."""
    from leanvit.data import CorruptImageWarning, bundled_cifar10

    for i in range(16):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        bundled_cifar10()[i][0].save(tmp_path / "data" / f"c{i % 2}" / f"{i}.png")
    (tmp_path / "data" / "c1" / "5.png").write_bytes(b"not an image")
    with pytest.warns(CorruptImageWarning, match="5.png"):
        result = fit(_config(tmp_path, "run", data=str(tmp_path / "data"), epochs=1, max_steps_per_epoch=None))
    assert len(result.steps) == 2 and result.epochs[0]["loss"] > 0


def test_a_checkpointed_teacher_is_frozen_in_eval_mode_and_fed_in_its_saved_preprocessing(tmp_path):
    """The teacher's BatchNorm / dropout must not train on the student's batches, and a teacher that leanvit saved
    says its own pre-processing (mean, std, size), which wins over timm's default for its architecture."""
    import timm

    kwargs = {**TINY, "num_classes": 10}
    own = {"input_size": [3, 32, 32], "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bilinear",
           "crop_pct": 1.0}
    save_weights(tmp_path / "t.safetensors", timm.create_model("deit_tiny_patch16_224", **kwargs).state_dict(),
                 {"model": "deit_tiny_patch16_224", "model_kwargs": kwargs, "data_config": own})
    cfg = TrainConfig(model="m", data="d", teacher="deit_tiny_patch16_224",
                      teacher_checkpoint=str(tmp_path / "t.safetensors"))
    student = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
               "crop_pct": 1.0}
    adapted = loop._teacher(cfg, [str(i) for i in range(10)], student, torch.device("cpu"))
    assert not adapted.teacher.training and not any(p.requires_grad for p in adapted.teacher.parameters())
    assert adapted.teacher_mean.flatten().tolist() == pytest.approx(own["mean"])
    assert adapted.teacher_std.flatten().tolist() == pytest.approx(own["std"])


def test_val_data_with_other_classes_is_refused(tmp_path):
    """Scoring on another class list would compare labels that mean other things."""
    from leanvit.data import bundled_cifar10

    for i in range(4):
        (tmp_path / "val" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        bundled_cifar10()[i][0].save(tmp_path / "val" / f"c{i % 2}" / f"{i}.png")
    with pytest.raises(LeanvitError, match="--val-data .*val has other classes than --data cifar10-test500"):
        fit(_config(tmp_path, "run", val_data=str(tmp_path / "val"), epochs=1, max_steps_per_epoch=1))


def test_objective_distils_with_the_mode_alpha_and_temperature_given():
    """--distill soft, --distill-alpha and --distill-tau reach the loss (hard distillation at tau 1 trained instead,
    with nothing said)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    cls, dist, teacher = (torch.randn(4, 10, generator=g) for _ in range(3))
    y = torch.tensor([0, 3, 9, 3])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return teacher

    _, loss = loop._objective(TrainConfig(model="m", data="d", teacher="t", distill="soft", distill_alpha=0.3,
                                          distill_tau=2.0, mixup=0, cutmix=0, label_smoothing=0), 10, Fixed())
    kd = F.kl_div((dist / 2).log_softmax(1), (teacher / 2).log_softmax(1), reduction="sum", log_target=True) * 4 / 40
    torch.testing.assert_close(loss(None, (cls, dist), y), 0.7 * F.cross_entropy(cls, y) + 0.3 * kd)


def test_an_evit_keep_rate_shrink_alone_starts_at_once_and_lasts_its_epochs(tmp_path, monkeypatch):
    """--keep-rate-shrink-epochs without --keep-rate-start-epoch (0: from the first step) schedules the cosine from 1
    down to the target over that many epochs."""
    from leanvit.compress.tokens import evit

    seen, warmup = [], evit.keep_rate_warmup

    def recording_warmup(model, **kwargs):
        hook = warmup(model, **kwargs)
        return lambda step: seen.append(hook(step)) or seen[-1]

    monkeypatch.setattr(loop, "keep_rate_warmup", recording_warmup)
    fit(_config(tmp_path, "evit", model="deit_tiny_patch16_224", model_kwargs={**TINY, "depth": 10}, epochs=2,
                max_steps_per_epoch=2, tokens="evit:0.5", keep_rate_shrink_epochs=2))
    assert seen == [evit.keep_rate_at(step, 2, 0.5, start_epoch=0, shrink_epochs=2) for step in range(4)]
    assert seen[0] == 1.0 and 0.5 < seen[3] < seen[2] < seen[1] < 1.0


def test_a_run_from_before_the_weights_record_resumes_without_claiming_its_files(tmp_path):
    """A run saved before ``inputs`` existed cannot say which teacher file it started from: a resume keeps no record
    rather than record today's file as the start's."""
    path, _ = _teacher(tmp_path)
    kd = dict(max_steps_per_epoch=1, teacher="deit_tiny_patch16_224", teacher_checkpoint=str(path), mixup=0, cutmix=0)
    fit(_config(tmp_path, "kd", epochs=1, **kd))
    state_file = tmp_path / "kd" / "epoch-0000" / "state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("inputs").keys() == {"teacher_checkpoint"}
    state_file.write_text(json.dumps(state))
    fit(_config(tmp_path, "kd", epochs=2, resume=True, **kd))
    assert json.loads((tmp_path / "kd" / "epoch-0001" / "state.json").read_text())["inputs"] == {}


def test_a_resume_on_other_data_than_a_bundled_datasets_name_is_refused(tmp_path):
    """A saved --data that names no folder (the bundled subset's name) is compared by its words: a resume on a folder
    of other images, with as many classes, would go on training on them."""
    from leanvit.data import bundled_cifar10

    for i in range(20):
        (tmp_path / "data" / f"c{i % 10}").mkdir(parents=True, exist_ok=True)
        bundled_cifar10()[i][0].save(tmp_path / "data" / f"c{i % 10}" / f"{i}.png")
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1))
    with pytest.raises(LeanvitError, match=rf"different settings \(data: 'cifar10-test500' .*-> '{tmp_path}/data'"):
        fit(_config(tmp_path, "run", data=str(tmp_path / "data"), epochs=2, max_steps_per_epoch=1, resume=True))


def test_init_checkpoint_without_classes_and_another_head_size_starts_a_new_classifier(tmp_path, capsys):
    """A checkpoint that names no classes keeps its classifier where it fits; where its size differs (a 5-class head
    for 10 classes) the rest is loaded and the classifier re-initialised, said in the log."""
    import timm

    kwargs = {**TINY, "num_classes": 5}
    torch.manual_seed(123)
    init = timm.create_model("deit_tiny_distilled_patch16_224", **kwargs).state_dict()
    save_weights(tmp_path / "init.safetensors", init, {"model": "deit_tiny_distilled_patch16_224",
                                                       "model_kwargs": kwargs})
    tiny_lr = dict(lr=1e-12, warmup_lr=1e-12, min_lr=1e-12, weight_decay=0.0)
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1, init_checkpoint=str(tmp_path / "init.safetensors"),
                **tiny_lr))
    weights = read_checkpoint(tmp_path / "run" / "model.safetensors")[0]
    assert weights["head.weight"].shape == (10, 16)
    torch.testing.assert_close(weights["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
    assert "classifier re-initialised (its size differs)" in capsys.readouterr().err


def test_the_default_warmup_is_announced_only_when_a_short_run_caps_it(capsys):
    """The log line says that the run's warm-up is shorter than the default: at 50 epochs and more it is the default,
    and nothing is said."""
    assert loop._warmup_epochs(TrainConfig(model="m", data="d", epochs=50), None, announce=True) == 5
    assert loop._warmup_epochs(TrainConfig(model="m", data="d", epochs=20), None, announce=True) == 2
    assert capsys.readouterr().err.count("warm-up:") == 1


def test_a_checkpoint_save_left_half_written_by_a_killed_run_is_replaced(tmp_path):
    """A run killed while saving leaves its temporary folder: the resumed (or restarted) run writes over it."""
    stale = tmp_path / "run" / ".epoch-0000.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    fit(_config(tmp_path, "run", epochs=1, max_steps_per_epoch=1))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ema.safetensors", "epoch-0000",
                                                                    "model.safetensors"]
    read_checkpoint(tmp_path / "run" / "epoch-0000")


def test_the_seed_sets_the_initial_weights_the_data_order_and_the_augmentations(tmp_path, monkeypatch):
    """--seed is the seed of initialisation, data order and augmentation: another seed changes all three."""
    datasets, open_dataset = [], loop.open_dataset
    monkeypatch.setattr(loop, "open_dataset", lambda *a, **k: datasets.append(_AskedFor(open_dataset(*a, **k)))
                        or datasets[-1])
    initial, create = [], loop.create_model

    def recording(*args, **kwargs):
        model = create(*args, **kwargs)
        initial.append({k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()})
        return model

    monkeypatch.setattr(loop, "create_model", recording)
    for seed in (0, 1):
        fit(_config(tmp_path, f"seed{seed}", seed=seed, epochs=1, max_steps_per_epoch=None, mixup=0, cutmix=0,
                    ema_decay=None))
    (a, b), (first, second) = datasets, initial
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert [i for i, _ in a.asked] != [i for i, _ in b.asked]
    assert all(x != y for x, y in zip(a.asked[0][1], b.asked[0][1]))  # Python's, NumPy's and torch's draws


def test_a_batch_of_images_that_all_fail_to_decode_stops_the_run_with_the_reason(tmp_path):
    from leanvit.data import CorruptImageWarning

    for i in range(8):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / f"c{i % 2}" / f"{i}.png").write_bytes(b"not an image")
    with pytest.warns(CorruptImageWarning), pytest.raises(
            LeanvitError, match="Every image of a training batch failed to decode; see the warnings above"):
        fit(_config(tmp_path, "run", data=str(tmp_path / "data"), epochs=1))


def test_run_records_its_init_checkpoints_file(tmp_path):
    """The initial weights are pinned by their sha256 as the teacher's are."""
    import hashlib

    path, _ = _teacher(tmp_path)  # a 10-class DeiT checkpoint
    fit(_config(tmp_path, "run", model="deit_tiny_patch16_224", epochs=1, max_steps_per_epoch=1,
                init_checkpoint=str(path)))
    inputs = json.loads((tmp_path / "run" / "epoch-0000" / "state.json").read_text())["inputs"]
    assert inputs == {"init_checkpoint": {"file": str(path.resolve()),
                                          "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}


def test_an_infinite_loss_stops_the_run_as_a_nan_does(tmp_path, monkeypatch):
    """An overflow gives inf before any NaN: the run stops there, not at the NaN a later step makes of it."""
    objective = loop._objective

    def infinite(*args):
        mixup, loss_fn = objective(*args)
        return mixup, lambda *a: loss_fn(*a) * float("inf")

    monkeypatch.setattr(loop, "_objective", infinite)
    with pytest.raises(LeanvitError, match=r"The loss is inf at epoch 0, step 1: training diverged"):
        fit(_config(tmp_path, "run", epochs=1))


def test_a_teacher_whose_class_count_is_not_known_before_its_download_is_checked_after():
    """pretrained_num_classes is None where timm's config does not say: the check waits for the model itself."""
    cfg = TrainConfig(model="m", data="d", teacher="t")
    loop._check_teacher_classes(cfg, None, ["a", "b"])
    with pytest.raises(LeanvitError, match="The teacher t has 3 classes but d has 2"):
        loop._check_teacher_classes(cfg, 3, ["a", "b"])
