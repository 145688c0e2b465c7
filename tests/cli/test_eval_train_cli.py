"""`leanvit train` then `leanvit eval` on its checkpoint, and the CLI's errors for bad input."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from leanvit.checkpoint import model_from_checkpoint, save_weights
from leanvit.cli import main
from leanvit.data import build_transform, open_dataset
from leanvit.errors import LeanvitWarning

MODEL = "deit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["train", MODEL, "--data", "cifar10-test500", "--output", str(out), "--model-kwargs",
                   json.dumps(KWARGS), "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "2",
                   "--workers", "0", "--crop-pct", "1.0", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


def test_eval_of_a_trained_checkpoint_matches_a_direct_count(trained, capsys, tmp_path):
    assert main(["eval", MODEL, "--checkpoint", str(trained), "--json", "--no-progress", "--workers", "0",
                 "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report["images"] == 500 and report["data_config"]["input_size"] == [3, 32, 32]

    model, meta = model_from_checkpoint(MODEL, trained)
    data = open_dataset("cifar10-test500", transform=build_transform(meta["data_config"]))
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        pred = model.eval()(x).argmax(1).numpy()
    assert report["top1"] == pytest.approx(100 * np.mean(pred == np.array(data.targets)))
    assert sorted(report["per_class"]) == sorted(data.classes)


def test_eval_img_size_keeps_the_checkpoints_crop(trained, capsys):
    # the run trained with --crop-pct 1.0; naming a resolution must not bring back timm's 0.9 crop
    assert main(["eval", MODEL, "--checkpoint", str(trained), "--img-size", "32", "--json", "--no-progress",
                 "--workers", "0"]) == 0
    config = json.loads(capsys.readouterr().out)["data_config"]
    assert config["input_size"] == [3, 32, 32] and config["crop_pct"] == 1.0


def test_eval_human_readable(trained, capsys):
    assert main(["eval", MODEL, "--checkpoint", str(trained), "--no-progress", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "images/s" in out and "500 images, 10 classes, 0 skipped" in out


def test_use_train_size_with_a_leanvit_checkpoint_is_a_warning(trained):
    """The checkpoint's saved pre-processing wins: the flag changed nothing, silently."""
    with pytest.warns(LeanvitWarning, match="--use-train-size has no effect with a leanvit checkpoint"):
        assert main(["eval", MODEL, "--checkpoint", str(trained), "--use-train-size", "--no-progress", "--workers",
                     "0", "--json"]) == 0


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    import timm

    save_weights(tmp_path / "r.safetensors", timm.create_model("resnet10t", num_classes=10).state_dict())
    rc = main(["eval", MODEL, "--checkpoint", str(tmp_path / "r.safetensors"), "--model-kwargs",
               json.dumps({**KWARGS, "num_classes": 10}), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit" in err and "missing keys (blocks.0" in err and "unexpected keys (bn1" in err


@pytest.mark.parametrize("layout, message", [
    ("empty", "No images found"),
    ("labels", "image(s) without a label"),
])
def test_bad_data(tmp_path, capsys, layout, message):
    from PIL import Image

    args = ["eval", MODEL, "--data", str(tmp_path), "--model-kwargs", json.dumps(KWARGS), "--no-progress"]
    if layout == "labels":
        for name in ("a.png", "b.png"):
            Image.new("RGB", (8, 8)).save(tmp_path / name)
        (tmp_path / "labels.txt").write_text("a.png 0\n")
        args += ["--labels", str(tmp_path / "labels.txt")]
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--img-size", "48"], "does not run on 3x48x48 inputs"),  # built for 32x32: the fix, not timm's assertion
    (["--crop-pct", "0"], "must be in (0, 1]"),
    (["--model-kwargs", '{"img_size": 32, "no_such_kwarg": 1}'], "cannot be built with the model kwargs"),
    (["--out", "/proc/no/such/dir/x.json"], "--out /proc/no/such/dir/x.json: cannot write the JSON result there"),
    (["--out", "/proc/eval.json"], "--out /proc/eval.json: cannot write the JSON result there"),  # mkdir passes
    (["--out", "/etc/passwd/x.json"], "cannot write the JSON result there (/etc/passwd is a file)"),
    (["--out", "/proc"], "--out /proc is a folder; give the file to write the JSON result to, e.g. /proc/eval.json"),
    (["--workers", "-1"], "--workers: must be 0 or more, got -1"),
    (["--model-kwargs", json.dumps({**KWARGS, "in_chans": 1})], "It takes 1-channel images and the pre-processing "
                                                                "gives 3 (RGB)"),  # not "add img_size"
])
def test_bad_eval_arguments_are_one_line_errors_before_the_work(extra, message, capsys):
    args = ["eval", MODEL, "--model-kwargs", json.dumps(KWARGS), "--no-progress", "--workers", "0", *extra]
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_a_label_file_indexes_the_checkpoints_or_the_models_classes(trained, capsys, tmp_path):
    """Labels covering some classes (a subset of a validation split) keep the model's class order: indices and names
    index the checkpoint's classes, synsets an ImageNet model's, indices a plain model's outputs."""
    from leanvit.data import bundled_cifar10

    data, subset = tmp_path / "flat", bundled_cifar10()
    data.mkdir()
    first = subset.targets.index
    picks = [first(1), first(2), first(2) + 1]  # three images of classes 1 and 2 only
    for i in picks:
        subset[i][0].save(data / f"{i}.png")
    cases = {"ints": [str(subset[i][1]) for i in picks], "names": [subset.classes[subset[i][1]] for i in picks],
             "synsets": ["n01443537", "n01484850", "n01484850"]}
    for name, labels in cases.items():
        (tmp_path / name).write_text("".join(f"{i}.png {label}\n" for i, label in zip(picks, labels)))
    common = ["--data", str(data), "--json", "--no-progress", "--workers", "0"]
    for name in ("ints", "names"):
        assert main(["eval", MODEL, "--checkpoint", str(trained), "--labels", str(tmp_path / name), *common]) == 0
        report = json.loads(capsys.readouterr().out)
        assert sorted(report["per_class"]) == [subset.classes[1], subset.classes[2]] and report["images"] == 3
    for name, outputs, classes in (("ints", 1000, ["n01443537", "n01484850"]), ("synsets", 1000, ["n01443537", "n01484850"]),
                                   ("ints", 10, ["1", "2"])):
        kwargs = json.dumps({**KWARGS, "num_classes": outputs})
        assert main(["eval", MODEL, "--model-kwargs", kwargs, "--labels", str(tmp_path / name), *common]) == 0
        assert sorted(json.loads(capsys.readouterr().out)["per_class"]) == classes


def test_train_rejects_bad_model_kwargs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", MODEL, "--data", "cifar10-test500", "--model-kwargs", "[32]"])
    assert exit_.value.code == 2 and "expected a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("crop", ["0", "1.5"])
def test_train_rejects_a_crop_fraction_outside_0_1(crop, capsys, tmp_path):
    rc = main(["train", MODEL, "--data", "cifar10-test500", "--model-kwargs", json.dumps(KWARGS), "--crop-pct", crop,
               "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--crop-pct must be in (0, 1]" in err and not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag, value, message", [
    ("--distill-tau", "0", "--distill-tau must be above 0"),  # NaN losses and weights, reported as success
    ("--clip-grad", "-1", "--clip-grad must be 0 or more"),  # would scale the gradient by a negative factor
    ("--ema-decay", "1.5", "--ema-decay must be in [0, 1)"),
    ("--max-steps-per-epoch", "0", "--max-steps-per-epoch must be at least 1"),
    ("--lr", "-1", "--lr must be above 0"),
    ("--warmup-epochs", "-2", "--warmup-epochs must be 0 or more"),
    ("--img-size", "0", "--img-size must be between 16 and 4096"),
    ("--randaug", "garbage", "--randaug 'garbage' is not a timm augmentation policy"),
])
def test_train_refuses_numbers_that_would_corrupt_the_run(flag, value, message, capsys, tmp_path):
    rc = main(["train", MODEL, "--data", "cifar10-test500", "--model-kwargs", json.dumps(KWARGS), flag, value,
               "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and not (tmp_path / "run").exists()


def test_warnings_print_as_the_commands_own(tmp_path):
    """A user of the command sees its words, not a line of leanvit or of the console script, nor the source line;
    a caller recording warnings around main() (pytest.warns, catch_warnings) still gets them."""
    import subprocess
    import sys

    from PIL import Image


    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (32, 32), (40, 80, 120)).save(tmp_path / name / "0.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    argv = ["eval", MODEL, "--data", str(tmp_path), "--model-kwargs", json.dumps({**KWARGS, "num_classes": 2}),
            "--no-progress", "--workers", "0"]
    run = subprocess.run([sys.executable, "-m", "leanvit", *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"leanvit eval: warning: {tmp_path}: 1 file(s) not read" in run.stderr
    assert ".py:" not in run.stderr and "Warning:" not in run.stderr  # no source line, no category
    with pytest.warns(LeanvitWarning, match=r"1 file\(s\) not read"):
        assert main(argv) == 0


def test_another_librarys_warning_keeps_its_source():
    from leanvit.cli import _warning_format

    assert (_warning_format("eval")("old API", FutureWarning, "/site-packages/lib/x.py", 12)
            == "leanvit eval: warning (FutureWarning from /site-packages/lib/x.py:12): old API\n")


def test_eval_out_may_be_a_pipe(trained, capsys):
    """`--out >(jq .)` passes /dev/fd/N, beside which no file can be created: it was refused by the write probe."""
    import os

    read, write = os.pipe()
    with os.fdopen(read) as pipe:
        with os.fdopen(write, "w"):  # (closed after the command: the reader then sees the end)
            assert main(["eval", MODEL, "--checkpoint", str(trained), "--no-progress", "--workers", "0",
                         "--out", f"/dev/fd/{write}"]) == 0
        assert json.loads(pipe.read())["images"] == 500


def test_eval_on_an_engine_runs_the_engine_at_threads(trained, capsys, monkeypatch):
    """`--engine onnxruntime --threads 2` scores the engine's runner, built with those threads (and PyTorch's own
    count set too): a run on eager would still report the engine it was asked for."""
    import leanvit.deploy

    real_get_engine, engines, batches, torch_threads = leanvit.deploy.get_engine, [], [], []

    def get_engine(name, **kwargs):
        engine = real_get_engine(name, **kwargs)
        engines.append((name, engine.threads))
        load = engine.load

        def counting_load(model, example, **kw):
            runner = load(model, example, **kw)
            return lambda x: batches.append(len(x)) or runner(x)

        engine.load = counting_load
        return engine

    set_num_threads = torch.set_num_threads
    monkeypatch.setattr(leanvit.deploy, "get_engine", get_engine)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: torch_threads.append(n) or set_num_threads(n))
    assert main(["eval", MODEL, "--checkpoint", str(trained), "--engine", "onnxruntime", "--threads", "2",
                 "--batch-size", "100", "--json", "--no-progress", "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert engines == [("onnxruntime", 2)] and 2 in torch_threads
    assert batches == [100] * 5 and report["engine"] == "onnxruntime" and report["images"] == 500


def test_eval_refuses_a_checkpoint_trained_on_other_classes(tmp_path, capsys):
    """Its outputs index the classes it was trained on: scored against other labels, the top-1 would mean nothing."""
    import timm

    kwargs = {**KWARGS, "num_classes": 10}
    path = save_weights(tmp_path / "m.safetensors", timm.create_model(MODEL, **kwargs).state_dict(),
                        {"model": MODEL, "model_kwargs": kwargs, "classes": [f"c{i}" for i in range(10)]})
    assert main(["eval", MODEL, "--checkpoint", str(path), "--no-progress", "--workers", "0"]) == 2
    captured = capsys.readouterr()
    assert "trained on the classes ['c0', 'c1'" in captured.err and "same classes" in captured.err
    assert "top-1" not in captured.out


def test_a_checkpoint_without_a_data_config_is_evaluated_at_its_recorded_img_size(tmp_path, capsys):
    """Its model is built with the recorded ``img_size`` (32): the images were resized to timm's 224 for it, and the
    run stopped on "does not run on 3x224x224 inputs"."""
    import timm

    kwargs = {**KWARGS, "num_classes": 10}
    path = save_weights(tmp_path / "m.safetensors", timm.create_model(MODEL, **kwargs).state_dict(),
                        {"model": MODEL, "model_kwargs": kwargs})
    assert main(["eval", MODEL, "--checkpoint", str(path), "--json", "--no-progress", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["data_config"]["input_size"] == [3, 32, 32]


def test_eval_lists_the_lowest_per_class_top1_lowest_first(trained, capsys, monkeypatch):
    """The ten worst classes, worst first: the line a user reads to see where the model fails."""
    import dataclasses

    import leanvit.cli.eval

    accuracies = {f"class{i}": float(v) for i, v in enumerate([50, 10, 90, 30, 70, 0, 100, 20, 60, 40, 80, 5])}
    real = leanvit.cli.eval.evaluate
    monkeypatch.setattr(leanvit.cli.eval, "evaluate",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), per_class=accuracies))
    assert main(["eval", MODEL, "--checkpoint", str(trained), "--no-progress", "--workers", "0"]) == 0
    line, = [s for s in capsys.readouterr().out.splitlines() if s.startswith("lowest per-class top-1: ")]
    assert line == ("lowest per-class top-1: class5 0.0, class11 5.0, class1 10.0, class7 20.0, class3 30.0, "
                    "class9 40.0, class0 50.0, class8 60.0, class4 70.0, class10 80.0")


@pytest.mark.parametrize("mode", ["text", "json", "rank1"])
def test_train_reports_the_run_once_as_text_or_json(mode, capsys, tmp_path, monkeypatch):
    """The closing line (or --json's per-epoch log) names the epochs, the last loss, the validation top-1 and where the
    weights are; under torchrun only rank 0 prints it, the others would repeat it once per process."""
    if mode == "rank1":
        monkeypatch.setenv("RANK", "1")
    else:
        monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "run"
    rc = main(["train", MODEL, "--data", "cifar10-test500", "--val-data", "cifar10-test500", "--output", str(out),
               "--model-kwargs", json.dumps(KWARGS), "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "1",
               "--workers", "0", "--mixup", "0", "--cutmix", "0", "--no-progress"] + (["--json"] if mode == "json" else []))
    printed = capsys.readouterr().out
    assert rc == 0 and (out / "model.safetensors").exists()
    if mode == "rank1":
        assert printed == ""
    elif mode == "json":
        report = json.loads(printed)
        assert report["output"] == str(out) and len(report["epochs"]) == 1
        assert report["epochs"][0]["epoch"] == 0 and {"loss", "top1", "top5"} <= report["epochs"][0].keys()
    else:
        assert re.fullmatch(rf"trained {MODEL}: 1 epochs, last loss \d+\.\d{{4}}, val top-1 \d+\.\d\d %; weights in "
                            rf"{re.escape(str(out))}\n", printed), printed


def test_train_needs_its_data(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", MODEL, "--model-kwargs", json.dumps(KWARGS)])
    assert exit_.value.code == 2 and "the following arguments are required: --data" in capsys.readouterr().err


def _fake_fit(monkeypatch, epochs):
    """``fit`` replaced: the configuration the command line gave, and a run that logged ``epochs``."""
    import leanvit.cli.train
    from leanvit.train.loop import TrainResult

    configs = []
    monkeypatch.setattr(leanvit.cli.train, "fit",
                        lambda cfg: configs.append(cfg) or TrainResult("runs/x", epochs=epochs))
    monkeypatch.delenv("RANK", raising=False)
    return configs


def test_train_flags_become_the_config_and_unset_ones_keep_its_defaults(monkeypatch):
    """A flag not given leaves the field's default (--amp and --progress on), a --no- flag turns one off."""
    from leanvit.train import TrainConfig

    configs = _fake_fit(monkeypatch, [{"epoch": 0, "loss": 1.0}])
    assert main(["train", MODEL, "--data", "d"]) == 0
    assert configs.pop() == TrainConfig(model=MODEL, data="d")
    assert main(["train", MODEL, "--data", "d", "--epochs", "3", "--warmup-epochs", "0.5", "--no-amp", "--pretrained",
                 "--model-kwargs", '{"img_size": 32}', "--randaug", "rand-m7"]) == 0
    assert configs.pop() == TrainConfig(model=MODEL, data="d", epochs=3, warmup_epochs=0.5, amp=False, pretrained=True,
                                        model_kwargs={"img_size": 32}, randaug="rand-m7")


@pytest.mark.parametrize("text, message", [("{img_size: 32}", "not valid JSON"),
                                           ("32", "expected a JSON object like '{\"img_size\": 32}', got 32")])
def test_model_kwargs_that_are_not_a_json_object_are_usage_errors(text, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", MODEL, "--data", "d", "--model-kwargs", text])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_train_reports_the_last_of_several_epochs(monkeypatch, capsys):
    """Without --val-data there is no top-1 to print; the count, the loss and --json's log are the whole run's."""
    epochs = [{"epoch": 0, "loss": 2.5}, {"epoch": 1, "loss": 1.25}, {"epoch": 2, "loss": 0.75}]
    _fake_fit(monkeypatch, epochs)
    assert main(["train", MODEL, "--data", "d"]) == 0
    assert capsys.readouterr().out == f"trained {MODEL}: 3 epochs, last loss 0.7500; weights in runs/x\n"
    assert main(["train", MODEL, "--data", "d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"output": "runs/x", "epochs": epochs}


def _fake_evaluate(monkeypatch, result):
    """``evaluate`` replaced by ``result`` (no image decoded); returns what it and ``make_loader`` were called with."""
    import leanvit.cli.eval

    calls, make_loader = {}, leanvit.cli.eval.make_loader
    monkeypatch.setattr(leanvit.cli.eval, "make_loader",
                        lambda *a, **k: calls.setdefault("loader", (a[1:], k)) and make_loader(*a, **k))
    monkeypatch.setattr(leanvit.cli.eval, "evaluate", lambda *a, **k: calls.setdefault("evaluate", k) and result)
    return calls


def _result(**kwargs):
    from leanvit.evaluate import EvalResult

    return EvalResult(**{"top1": 12.5, "top5": 55.25, "images": 497, "skipped": 3, "seconds": 2.0,
                         "images_per_s": 248.5, **kwargs})


def test_eval_text_report_line_by_line(trained, monkeypatch, capsys):
    """Each figure on its own line, the five most confused pairs as true -> predicted; by default batches of 64 read
    by 2 loader processes, with a progress bar."""
    confused = [{"true": t, "predicted": p, "count": c} for t, p, c in
                [("cat", "dog", 9), ("dog", "cat", 7), ("car", "truck", 5), ("deer", "horse", 4), ("ship", "plane", 3),
                 ("bird", "plane", 2)]]
    calls = _fake_evaluate(monkeypatch, _result(most_confused=confused))
    assert main(["eval", MODEL, "--checkpoint", str(trained)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == [f"model    {MODEL}  ({trained})",
                         "data     cifar10-test500: 497 images, 10 classes, 3 skipped",
                         "top-1    12.50 %", "top-5    55.25 %",
                         "speed    248.5 images/s (decode + pre-process + model, batch 64, eager)"]
    assert lines[6] == ("most confused (true -> predicted): cat -> dog (9), dog -> cat (7), car -> truck (5), "
                        "deer -> horse (4), ship -> plane (3)")
    assert calls["loader"] == ((64,), {"workers": 2}) and calls["evaluate"]["progress"] is True


def test_eval_json_report_names_what_was_evaluated_and_how(trained, monkeypatch, capsys):
    """The model, checkpoint, data, batch size and the pre-processing used (--crop-pct over the checkpoint's)."""
    calls = _fake_evaluate(monkeypatch, _result())
    assert main(["eval", MODEL, "--checkpoint", str(trained), "--batch-size", "50", "--crop-pct", "0.5",
                 "--workers", "0", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {k: report[k] for k in ("model", "checkpoint", "data", "engine", "batch_size", "top5", "skipped")} == {
        "model": MODEL, "checkpoint": str(trained), "data": "cifar10-test500", "engine": "eager", "batch_size": 50,
        "top5": 55.25, "skipped": 3}
    assert report["data_config"]["crop_pct"] == 0.5 and report["data_config"]["input_size"] == [3, 32, 32]
    assert calls["loader"] == ((50,), {"workers": 0}) and calls["evaluate"]["progress"] is False


def test_eval_without_weights_warns_and_pretrained_asks_for_them(monkeypatch):
    """Random weights are said to be random; --pretrained is passed to the model's creation (faked: no download) and
    then says nothing, nor does --use-train-size without a leanvit checkpoint, where it does act."""
    import warnings

    import leanvit.cli.eval

    asked, create_model = [], leanvit.cli.eval.create_model
    monkeypatch.setattr(leanvit.cli.eval, "create_model",
                        lambda name, pretrained, **k: asked.append(pretrained) or create_model(name, **k))
    _fake_evaluate(monkeypatch, _result())
    argv = ["eval", MODEL, "--model-kwargs", json.dumps({**KWARGS, "num_classes": 10}), "--no-progress", "--workers",
            "0", "--json"]
    with pytest.warns(LeanvitWarning, match="no --checkpoint or --pretrained, evaluating random weights"):
        assert main(argv) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "--pretrained", "--use-train-size"]) == 0
    assert asked == [False, True] and not [w for w in caught if issubclass(w.category, LeanvitWarning)]
