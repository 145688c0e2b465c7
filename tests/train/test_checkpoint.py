"""Checkpoints: round trips, foreign formats, and errors that name every mismatched key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from leanvit.checkpoint import (
    CheckpointMismatchError, load_weights, model_from_checkpoint, read_checkpoint, read_metadata, save_weights,
)
from leanvit.errors import LeanvitError

TINY = dict(img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2, num_classes=10)


def _vit(**overrides):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", **{**TINY, **overrides}).eval()


def test_safetensors_round_trip_rebuilds_the_model(tmp_path):
    model = _vit()
    meta = {"model": "deit_tiny_patch16_224", "model_kwargs": TINY, "classes": list("abcdefghij")}
    save_weights(tmp_path / "model.safetensors", model.state_dict(), meta)
    rebuilt, got = model_from_checkpoint("deit_tiny_patch16_224", tmp_path)  # a folder means its model.safetensors
    assert got == meta and read_metadata(tmp_path) == meta  # the header alone holds it
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_pth_with_wrapper_and_ddp_prefix(tmp_path):
    model = _vit()
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, tmp_path / "c.pth")
    state, meta = read_checkpoint(tmp_path / "c.pth")
    assert meta == {} and read_metadata(tmp_path / "c.pth") == {} and state.keys() == model.state_dict().keys()
    other = _vit()
    torch.nn.init.zeros_(other.head.weight)
    load_weights(other, tmp_path / "c.pth")
    torch.testing.assert_close(other.head.weight, model.head.weight)


@pytest.mark.parametrize("prefix", ["module._orig_mod.", "_orig_mod.module."])
def test_compiled_and_ddp_wrapped_prefixes_in_either_order(tmp_path, prefix):
    """DDP(torch.compile(model)) writes module._orig_mod., torch.compile(DDP(model)) _orig_mod.module."""
    model = _vit()
    torch.save({f"{prefix}{k}": v for k, v in model.state_dict().items()}, tmp_path / "c.pth")
    other = _vit()
    torch.nn.init.zeros_(other.head.weight)
    load_weights(other, tmp_path / "c.pth")
    torch.testing.assert_close(other.head.weight, model.head.weight)


def test_an_unfinished_run_folder_names_its_last_epoch(tmp_path):
    """An interrupted run has only epoch-NNNN/ checkpoints: the error names the one to pass."""
    (tmp_path / "run" / "epoch-0001").mkdir(parents=True)
    save_weights(tmp_path / "run" / "epoch-0001" / "model.safetensors", _vit().state_dict())
    (tmp_path / "run" / "epoch-0001" / "state.json").write_text("{}")
    with pytest.raises(LeanvitError, match=r"the run in .*run has not finished\. Pass .*run/epoch-0001 for its last "
                                           r"epoch's weights, or finish it with leanvit train --resume"):
        read_checkpoint(tmp_path / "run")
    read_checkpoint(tmp_path / "run" / "epoch-0001")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeanvitError, match=r"empty/model.safetensors does not exist \(the shipped checkpoints"):
        read_checkpoint(tmp_path / "empty")


def test_epoch_checkpoints_past_9999_are_found(tmp_path):
    """--epochs goes to 100000: epoch-10000 is newer than epoch-9999 (a resume would otherwise start afresh)."""
    from leanvit.train.state import latest_checkpoint

    for name in ("epoch-0999", "epoch-9999", "epoch-10000"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-10000"
    (tmp_path / "epoch-10001").mkdir()  # no state.json: an incomplete folder is not a checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-10000"


def test_training_scripts_checkpoints_with_their_options_load(tmp_path):
    """timm's train.py and DeiT's main.py save their argparse options beside the weights; a safetensors file is
    recognised by its content whatever its name."""
    import argparse

    model = _vit()
    options = argparse.Namespace(lr=5e-4, model="deit_tiny_patch16_224", aa=None, input_size=(3, 224, 224))
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "args": options, "metric": 71.2}, tmp_path / "t.pth.tar")
    torch.save({"model": model.state_dict(), "args": options}, tmp_path / "deit.pth")
    save_weights(tmp_path / "weights.bin", model.state_dict(), {"model": "deit_tiny_patch16_224"})
    for name in ("t.pth.tar", "deit.pth", "weights.bin"):
        assert read_checkpoint(tmp_path / name)[0].keys() == model.state_dict().keys()
    assert read_metadata(tmp_path / "weights.bin") == {"model": "deit_tiny_patch16_224"}


def test_unreadable_files_say_what_they_hold(tmp_path):
    torch.save(_vit(), tmp_path / "model.pth")
    with pytest.raises(LeanvitError, match=r"holds a Python object \(timm.models.vision_transformer.VisionTransformer"
                                           r"\).*save model.state_dict\(\) instead"):
        read_checkpoint(tmp_path / "model.pth")
    for i, junk in enumerate((b"", b"hello world, not weights", bytes(range(256)))):
        (tmp_path / f"{i}.pth").write_bytes(junk)
        with pytest.raises(LeanvitError, match=r"Cannot read checkpoint .*\(.+\)\. Is it a complete weights file"):
            read_checkpoint(tmp_path / f"{i}.pth")


def test_another_architecture_names_the_keys(tmp_path):
    save_weights(tmp_path / "r.safetensors", timm.create_model("resnet10t", num_classes=10).state_dict(),
                 {"model": "resnet10t"})
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(_vit(), tmp_path / "r.safetensors")
    message = str(err.value)
    assert "missing keys (blocks.0.attn.proj.bias" in message
    assert "unexpected keys (bn1.bias" in message
    assert "It was saved from 'resnet10t'" in message


def test_deeper_model_and_other_head_name_keys_and_shapes(tmp_path):
    save_weights(tmp_path / "m.safetensors", _vit().state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(blocks\.1\.attn\.proj\.bias"):
        load_weights(_vit(depth=2), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(_vit(num_classes=5), tmp_path / "m.safetensors")
    assert "2 shape mismatches (head.bias: checkpoint [10] vs model [5], head.weight" in str(err.value)
    assert "missing" not in str(err.value)


def test_ignore_classifier_for_fine_tuning(tmp_path):
    source = _vit()
    save_weights(tmp_path / "m.safetensors", source.state_dict())
    target = _vit(num_classes=5)
    head = target.head.weight.clone()
    load_weights(target, tmp_path / "m.safetensors", ignore_classifier=True)
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(target.head.weight, head)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LeanvitError, match="Cannot read checkpoint"):
        read_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(LeanvitError, match="Cannot read checkpoint"):
        read_metadata(tmp_path / "bad.safetensors")
    with pytest.raises(LeanvitError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(LeanvitError, match="no state dict"):
        read_checkpoint(tmp_path / "list.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")  # the model object, not its state dict
    with pytest.raises(LeanvitError, match=r"save model.state_dict\(\) instead"):
        read_checkpoint(tmp_path / "model.pth")
    for i, junk in enumerate((b"not a checkpoint", b"\x80\x02junk", b"PK\x03\x04junk", b"")):
        (tmp_path / f"junk{i}.pth").write_bytes(junk)
        with pytest.raises(LeanvitError, match="Cannot read checkpoint"):
            read_checkpoint(tmp_path / f"junk{i}.pth")


def test_shipped_checkpoints_load_by_name_in_half_precision(tmp_path, monkeypatch):
    import leanvit.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "SHIPPED_DIR", tmp_path)
    model = _vit()
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_weights(tmp_path / "tiny-cifar10.safetensors", half, {"model": "deit_tiny_patch16_224", "model_kwargs": TINY})
    assert list(checkpoint.shipped_checkpoints()) == ["tiny-cifar10"]
    rebuilt, _ = model_from_checkpoint("deit_tiny_patch16_224", "tiny-cifar10")
    assert rebuilt.head.weight.dtype == torch.float32  # float16 on disk, the model's own dtype once loaded
    torch.testing.assert_close(rebuilt.head.weight, model.head.weight.half().float(), rtol=0, atol=0)
    with pytest.raises(LeanvitError, match="usable by name: tiny-cifar10"):
        read_checkpoint("tiny-cifar100")


def _release_tool():
    """``tools/release_checkpoint.py`` as a module (it is a script, not part of the package)."""
    import importlib.util

    tool = Path(__file__).resolve().parents[2] / "tools" / "release_checkpoint.py"
    spec = importlib.util.spec_from_file_location("release_checkpoint", tool)
    release = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(release)
    return release


def test_release_tool_writes_the_command_that_gives_the_runs_config():
    """The model card's command, parsed by ``leanvit train``, is exactly the run's configuration."""
    import argparse

    from leanvit.cli.train import register
    from leanvit.train import TrainConfig

    release = _release_tool()
    config = TrainConfig(model="deit_tiny_patch16_224", data="/data/train", model_kwargs={"img_size": 32},
                         epochs=30, lr=1e-3, mixup=0.0, randaug=None, crop_scale=0.35, ema_decay=0.9995,
                         amp=False, resume=True, workers=0).to_dict()
    command = release.training_command(config)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    import shlex

    args = vars(parser.parse_args(shlex.split(command)[1:]))
    parsed = TrainConfig(**{k: v for k, v in args.items() if k in config and v is not None}).to_dict()
    assert parsed == config


def test_release_card_has_no_absolute_paths_of_the_machine_it_was_made_on(tmp_path):
    """Run folders are written under ``runs/`` and the home folder as ``~``; other text is left alone."""
    release = _release_tool()
    home, runs = Path.home(), tmp_path / "runs-here"
    text = f"--data {home}/.cache/c10/train --output {runs}/s2 --init-checkpoint {runs}/s1/model.safetensors /x/y"
    assert release.portable(text, runs) == ("--data ~/.cache/c10/train --output runs/s2 "
                                            "--init-checkpoint runs/s1/model.safetensors /x/y")


def test_release_card_names_the_initial_weights_teacher_and_earlier_runs(tmp_path):
    """A later-stage run's card says what it started from and repeats every earlier stage's command."""
    from leanvit.train import TrainConfig
    from leanvit.train.state import STATE_FILE

    release = _release_tool()

    def finished(name, config, hours):
        (tmp_path / name / "epoch-0001").mkdir(parents=True)
        log = [{"epoch": i, "loss": 1.0, "seconds": hours * 1800.0, "hardware": "cpu", "top1": 50.0 + i}
               for i in range(2)]
        (tmp_path / name / "epoch-0001" / STATE_FILE).write_text(
            json.dumps({"epoch": 1, "step": 10, "config": config, "epochs": log}))
        return str(tmp_path / name / "model.safetensors")

    first = TrainConfig(model="deit_tiny_patch16_224", data="/data/train", epochs=2, lr=1e-3).to_dict()
    second = TrainConfig(model="deit_tiny_patch16_224", data="/data/train", teacher="mobilevig_ti",
                         teacher_checkpoint="mobilevig_ti-cifar10", init_checkpoint=finished("stage1", first, 1),
                         epochs=2).to_dict()
    third = TrainConfig(model="deit_tiny_patch16_224", data="/data/train", model_kwargs={"img_size": 64},
                        init_checkpoint=finished("stage2", second, 2)).to_dict()

    assert release.provenance(first).startswith("`deit_tiny_patch16_224` trained from scratch")
    assert "fine-tuned from" in release.provenance(second)
    assert "hard distillation (alpha 0.5) from" in release.provenance(second)
    soft = {**second, "distill": "soft", "distill_tau": 2.0}
    assert "soft distillation (alpha 0.5, temperature 2.0)" in release.provenance(soft)
    pinned = release.provenance(second, {"teacher_checkpoint": {"file": "/x.safetensors", "sha256": "ab" * 32}})
    assert "(weights `mobilevig_ti-cifar10` (sha256 `abababababababab…`))" in pinned
    section, seconds = release.earlier_stages(second)
    assert seconds == 3600.0 and release.training_command(first) in section and "## Earlier stage" in section
    section, seconds = release.earlier_stages(third)
    assert seconds == 3 * 3600.0 and "### Stage 1 of 3" in section and "### Stage 2 of 3" in section
    assert section.index(release.training_command(first)) < section.index(release.training_command(second))
    assert release.earlier_stages(first) == ([], 0.0)


def test_a_released_checkpoint_carries_its_run_for_the_next_stages_card(tmp_path, capsys):
    """A stage released in one session is still listed on a later stage's card once its run folder is gone."""
    from leanvit.checkpoint import save_weights
    from leanvit.train import TrainConfig

    release = _release_tool()
    first = TrainConfig(model="deit_tiny_patch16_224", data="/data/train", epochs=2, lr=1e-3).to_dict()
    log = [{"epoch": i, "loss": 1.0, "seconds": 1800.0, "hardware": "cpu", "top1": 50.0 + i} for i in range(2)]
    (tmp_path / "shipped").mkdir()
    stage1 = save_weights(tmp_path / "shipped" / "stage1.safetensors", {"w": torch.zeros(1)},
                          {"run": {"config": first, "epochs": log, "step": 10}})
    second = TrainConfig(model="deit_tiny_patch16_224", data="/data/train", init_checkpoint=str(stage1)).to_dict()
    section, seconds = release.earlier_stages(second)
    assert seconds == 3600.0 and release.training_command(first) in section
    assert "`shipped/stage1.safetensors`" in "\n".join(section)
    unknown = TrainConfig(model="deit_tiny_patch16_224", data="/data/train", init_checkpoint="no-such-run").to_dict()
    assert release.earlier_stages(unknown) == ([], 0.0)
    assert "no training record of no-such-run" in capsys.readouterr().err  # said, not silently dropped


def test_release_card_says_what_a_resume_changed():
    release = _release_tool()
    state = {"changes": [{"epoch": 6, "changes": {"epochs": [20, 18]}},
                         {"epoch": 8, "changes": {"compile": [False, True]}}]}
    assert release.resume_changes(state) == "from epoch 6, `epochs` 20 → 18; from epoch 8, `compile` False → True"
    assert release.resume_changes({}, "lr restarted.") == "lr restarted"
    assert release.resume_changes({"changes": []}) == ""


MANIFEST = Path(__file__).resolve().parents[2] / "benchmarks" / "checkpoints.json"


@pytest.mark.parametrize("entry", json.loads(MANIFEST.read_text()), ids=lambda e: e["name"])
def test_each_shipped_checkpoint_classifies_the_bundled_test_subset(entry):
    """The bundled 500 test images score near the card's full-split top-1 (3 standard errors of a
    500-image sample), so a file that no longer loads into its architecture correctly cannot pass."""
    from leanvit.data import BUNDLED_CIFAR10, build_transform, make_loader, open_dataset
    from leanvit.evaluate import evaluate

    model, meta = model_from_checkpoint(entry["model"], entry["name"])
    dataset = open_dataset(BUNDLED_CIFAR10, transform=build_transform(meta["data_config"]))
    top1 = evaluate(model, make_loader(dataset, 100), progress=False).top1
    p = entry["top1"] / 100
    assert abs(top1 - entry["top1"]) <= 300 * (p * (1 - p) / len(dataset)) ** 0.5


def test_the_callers_kwargs_override_the_saved_model_kwargs(tmp_path):
    """model_kwargs rebuild the saved architecture; what the caller passes wins (a fine-tune's drop_path_rate)."""
    tiny = {**TINY, "depth": 2}
    model = _vit(depth=2)
    save_weights(tmp_path / "a.safetensors", model.state_dict(),
                 {"model": "deit_tiny_patch16_224", "model_kwargs": {**tiny, "drop_path_rate": 0.0}})
    rebuilt, _ = model_from_checkpoint("deit_tiny_patch16_224", tmp_path / "a.safetensors", drop_path_rate=0.1)
    assert rebuilt.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    torch.testing.assert_close(rebuilt.head.weight, model.head.weight, rtol=0, atol=0)


def test_another_architectures_model_kwargs_are_not_applied(tmp_path):
    """A checkpoint of another architecture still reaches the error naming it, not a kwargs error from its
    model_kwargs (resnet's stem_width means nothing to a ViT)."""
    resnet = timm.create_model("resnet10t", num_classes=10)
    save_weights(tmp_path / "r.safetensors", resnet.state_dict(),
                 {"model": "resnet10t", "model_kwargs": {"num_classes": 10, "stem_width": 24}})
    with pytest.raises(CheckpointMismatchError, match="It was saved from 'resnet10t'"):
        model_from_checkpoint("deit_tiny_patch16_224", tmp_path / "r.safetensors", **TINY)


def test_saved_weights_get_the_umasks_mode_and_a_sha256_of_their_bytes(tmp_path):
    """safetensors writes 0600 (other users of a shared run folder could not read it): the umask's 0644 instead.
    The digest is the file's sha256, whole, the way ``sha256sum`` gives it (a folder names its model.safetensors)."""
    import hashlib
    import os

    from leanvit.checkpoint import checkpoint_sha256

    old = os.umask(0o022)
    try:
        path = save_weights(tmp_path / "model.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert checkpoint_sha256(tmp_path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_local_file_named_like_a_shipped_checkpoint_is_the_one_read(tmp_path, monkeypatch):
    """A shipped name stands for its file only where no such path exists."""
    import leanvit.checkpoint as checkpoint

    (tmp_path / "shipped").mkdir()
    monkeypatch.setattr(checkpoint, "SHIPPED_DIR", tmp_path / "shipped")
    save_weights(tmp_path / "shipped" / "tiny.safetensors", {"w": torch.zeros(1)})
    monkeypatch.chdir(tmp_path)
    save_weights(tmp_path / "tiny", {"w": torch.ones(1)})
    assert read_checkpoint("tiny")[0]["w"].item() == 1.0


def test_safetensors_keys_lose_the_wrappers_prefixes_and_load_weights_returns_the_metadata(tmp_path):
    model = _vit()
    save_weights(tmp_path / "m.safetensors", {f"module.{k}": v for k, v in model.state_dict().items()}, {"a": 1})
    assert read_checkpoint(tmp_path / "m.safetensors")[0].keys() == model.state_dict().keys()
    assert load_weights(_vit(), tmp_path / "m.safetensors") == {"a": 1}


def test_an_unreadable_file_names_the_errors_type_and_a_pickled_leanvit_model_the_fix(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LeanvitError, match=r"\(SafetensorError: "):
        read_checkpoint(tmp_path / "bad.safetensors")
    from leanvit.models.registry import create_model

    torch.save(create_model("mobilevig_ti"), tmp_path / "vig.pth")  # leanvit.models.mobilevig.MobileViG
    with pytest.raises(LeanvitError, match=r"save model.state_dict\(\) instead"):
        read_checkpoint(tmp_path / "vig.pth")


def test_saved_kwargs_and_token_reduction_apply_to_a_tagged_name_of_the_same_architecture_only(tmp_path):
    """``deit_tiny_patch16_224.fb_in1k`` is the saved architecture; ``vit_tiny_patch16_224`` (same keys) is not."""
    from leanvit.compress.tokens import applied

    save_weights(tmp_path / "t.safetensors", _vit().state_dict(),
                 {"model": "deit_tiny_patch16_224", "model_kwargs": TINY, "tokens": "tome:4",
                  "tokens_options": {"prop_attn": False}})
    model, _ = model_from_checkpoint("deit_tiny_patch16_224.fb_in1k", tmp_path / "t.safetensors")
    assert applied(model).r == 4 and applied(model).prop_attn is False
    plain, _ = model_from_checkpoint("deit_tiny_patch16_224", tmp_path / "t.safetensors", with_tokens=False)
    assert applied(plain) is None
    other, _ = model_from_checkpoint("vit_tiny_patch16_224", tmp_path / "t.safetensors", **TINY)
    assert applied(other) is None


def test_a_checkpoint_of_the_same_architecture_that_does_not_fit_says_to_match_its_kwargs(tmp_path):
    save_weights(tmp_path / "m.safetensors", _vit().state_dict(), {"model": "deit_tiny_patch16_224.fb_in1k"})
    with pytest.raises(CheckpointMismatchError, match=r"Create the model with the architecture and num_classes") as e:
        load_weights(_vit(depth=2), tmp_path / "m.safetensors")
    assert "saved from" not in str(e.value)


def test_a_long_list_of_keys_names_the_first_eight_sorted_and_says_there_are_more(tmp_path):
    state = _vit().state_dict()
    dropped = sorted(state)[:9]
    save_weights(tmp_path / "m.safetensors", {k: v for k, v in state.items() if k not in dropped})
    with pytest.raises(CheckpointMismatchError) as e:
        load_weights(_vit(), tmp_path / "m.safetensors")
    assert f"9 missing keys ({', '.join(dropped[:8])}, ...)" in str(e.value)
    save_weights(tmp_path / "l.safetensors", {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match="does not fit Linear: "):  # no pretrained_cfg: its class
        load_weights(torch.nn.Linear(2, 3), tmp_path / "l.safetensors")
