"""``leanvit quantize``: calibrates on the shipped CIFAR-10 subset, reports float layers, exports, fails cleanly."""
import json

import pytest

from leanvit.cli import main
from leanvit.errors import LeanvitWarning

TINY = ["deit_tiny_patch16_224", "--model-kwargs",
        '{"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 10}', "--calib", "cifar10-test500",
        "--calib-images", "16", "--threads", "1"]


def test_quantize_exports_and_reports(tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    for name in ("model.xml", "model.bin"):  # an earlier OpenVINO export, which would now describe another model
        (out / name).write_text("stale")
    assert main(["quantize", *TINY, "--bits", "w7a8", "--target", "generic", "--engine", "onnxruntime", "--out",
                 str(out), "--json", "--eval", "cifar10-test500", "--eval-images", "20"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantized_layers"] == 6  # patch conv, qkv, proj, fc1, fc2, head
    assert result["calib_images"] == 16 and result["eval_images"] == 20
    assert {"blocks.0.norm1", "norm"} <= set(result["float_layers"])
    assert (out / "model.onnx").is_file()
    assert not (out / "model.xml").exists() and not (out / "model.bin").exists()
    assert json.loads((out / "report.json").read_text())["exported"] == result["exported"]
    assert result["engine"] == "onnxruntime" and isinstance(result["engine_float_layers"], dict)
    for key in ("top1", "sim_top1", "engine_top1"):
        assert 0.0 <= result[key] <= 100.0
    latency = result["latency"]  # the INT8 model timed against the float one on the same engine
    assert latency["engine"] == "onnxruntime" and latency["threads"] == 1 and latency["batch"] == 1
    assert latency["float_ms"] > 0 and latency["quantized_ms"] > 0
    rounds = sorted(latency["round_ratios"])
    assert len(rounds) == 6  # the median of an even count is the mean of the middle two
    assert latency["ratio"] == pytest.approx((rounds[2] + rounds[3]) / 2, abs=1e-3)


def test_the_openvino_model_is_compiled_once(tmp_path, monkeypatch, capsys):
    """export's INT8 check reads the model the command compiles to run, rather than compiling it again."""
    import sys

    export = sys.modules["leanvit.compress.quant.export"]  # (the package's `export` is the function)

    def no_second_compile():
        raise AssertionError("export compiled the IR for its check")

    monkeypatch.setattr(export, "openvino_core", no_second_compile)
    out = tmp_path / "q"
    assert main(["quantize", *TINY, "--out", str(out), "--no-latency", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["engine"] == "openvino" and result["exported"].endswith("model.xml")
    assert isinstance(result["engine_float_layers"], dict)


def test_an_int8_model_slower_than_float_is_a_warning(tmp_path, monkeypatch, capsys):
    """Whether INT8 pays is the engine's and the CPU's call: when it does not, the user is told, with what to try."""
    from leanvit.bench import speedup

    timed = []

    def slower(model, runner, engine, example):  # the pooled medians (INT8 2.4x as fast) say the opposite
        timed.append(engine.name)
        return speedup.Speedup(engine.name, 1, 1, float_ms=2.4, quantized_ms=1.0, rounds=6,
                               round_ratios=(0.45, 0.5, 0.55, 0.5, 0.5, 0.5))

    monkeypatch.setattr(speedup, "measure_speedup", slower)
    argv = ["quantize", *TINY, "--engine", "onnxruntime", "--out", str(tmp_path / "q")]
    with pytest.warns(LeanvitWarning) as caught:
        assert main(argv) == 0
    warning, = [str(w.message) for w in caught if "slower" in str(w.message)]
    assert ("runs the INT8 model slower than the float one (INT8 0.50x as fast, the median of 0.45-0.55x in 6 "
            "alternating rounds; batch 1, 1 threads)") in warning and "--engine openvino" in warning
    out = capsys.readouterr().out
    assert ("latency  onnxruntime INT8 against float: 0.50x as fast, the median of 0.45-0.55x in 6 alternating "
            "rounds (batch 1, 1 threads") in out
    assert "2.40" not in warning + out  # the medians' ratio is not what was tested
    assert json.loads((tmp_path / "q" / "report.json").read_text())["latency"]["float_ms"] == 2.4  # kept there
    assert main([*argv, "--no-latency", "--json"]) == 0
    assert "latency" not in json.loads(capsys.readouterr().out) and timed == ["onnxruntime"]


def test_a_vnni_target_runs_the_attention_matmuls_in_int8_too(capsys):
    """What is worth INT8 depends on the CPU: with VNNI the attention matmuls are, without it they stay float."""
    layers = {}
    for target in ("generic", "vnni"):
        assert main(["quantize", *TINY, "--target", target, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["target"] == target
        layers[target] = result["layers"]
    assert "blocks.0.attn" in layers["vnni"] and "blocks.0.attn" not in layers["generic"]
    assert set(layers["generic"]) < set(layers["vnni"])


def test_attention_error_bound_from_the_command_line(capsys):
    for bound, quantized in (("0", False), ("-1", True)):  # 0: any error is too much; negative: no bound
        assert main(["quantize", *TINY, "--target", "vnni", "--attn-max-error", bound, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert ("blocks.0.attn" in result["layers"]) is quantized
        assert ("blocks.0.attn" in result["float_layers"]) is not quantized


def test_mixed_precision_from_the_command_line(capsys):
    assert main(["quantize", *TINY, "--bits", "w4a4", "--avg-bits", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    layers = result["layers"]
    assert {"int4 sym", "int8 sym"} <= {scheme.split(" per-")[0].removeprefix("weights ") for scheme in layers.values()}
    assert 4 < result["avg_weight_bits"] <= 6  # what --bits w4a4 alone would not say


def test_research_methods_from_the_command_line(capsys):
    """Hessian search, bridge reconstruction (none in a plain ViT: reported) and quantized attention."""
    assert main(["quantize", *TINY, "--bits", "w6a6", "--hessian", "--reconstruct", "blocks",
                 "--reconstruct-iters", "5", "--attn-bits", "6", "--softmax", "twin", "--a-granularity", "auto",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["hessian_search"] and result["config"]["softmax_quantizer"] == "twin"
    assert result["config"]["a_per_channel"] == "auto"
    assert "twin" in result["layers"]["blocks.0.attn"] and result["reconstructed"]


@pytest.mark.parametrize("argv, message", [
    (["--attn-bits", "4", "--softmax", "log2", "--out", "OUT"], "simulation only"),
    (["--bits", "int8"], "w8a8"),
    (["--bits", "w4a4", "--out", "OUT"], "below 8 bits"),
    # refused before the data is read and calibrated on, not after: here there is none to read
    (["--bits", "w6a6", "--hessian", "--out", "OUT", "--calib", "NOWHERE"],
     "w6a6 in w_bits/a_bits (--bits w6a6): layers quantized below 8 bits"),
    (["--layer-bits", "blocks.*=w8a4", "--out", "OUT", "--calib", "NOWHERE"],
     "w8a4 in layer_bits (--layer-bits PATTERN=w8a4): layers quantized below 8 bits"),
    (["--a-granularity", "channel", "--out", "OUT"], "only a depthwise conv's can be per channel"),
    # the CLI's own fix (QuantConfig(min_images=...), which the API's message suggests, is no flag)
    (["--calib-images", "4"], "--calib-images 4 is too few for stable activation ranges: give at least 16"),
    (["--layer-bits", "head=w8"], "w8"),
    (["--out", "FILE", "--calib", "NOWHERE"], "is a file; give a folder"),
    (["--out", "/proc"], "--out /proc: cannot write the INT8 model and report.json there"),  # before calibrating
    # refused before the model is built and the images decoded, naming the flag that sets the low bit-width
    (["--avg-bits", "6", "--calib", "NOWHERE"], "--avg-bits 6.0 with --bits w8a8: Mixed precision moves layers"),
    (["--bits", "w4a4", "--avg-bits", "3", "--calib", "NOWHERE"], "choose a budget between 4 and 8"),
    (["--attn-bits", "4", "--out", "OUT", "--calib", "NOWHERE"], "attn_bits=4 (--attn-bits 4)"),
    (["--a-granularity", "auto", "--quantize-depthwise", "--engine", "onnxruntime", "--out", "OUT", "--calib",
      "NOWHERE"], "(--a-granularity tensor)"),
    (["--img-size", "48"], "does not run on 3x48x48 inputs"),  # built for 32x32: the fix, not timm's assertion
])
def test_bad_input_is_a_one_line_error(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = [{"OUT": str(tmp_path / "q"), "NOWHERE": str(tmp_path / "none"), "FILE": str(tmp_path / "file")}.get(a, a)
            for a in argv]
    assert main(["quantize", *TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_eval_set_of_other_classes_is_refused_before_calibrating(tmp_path, capsys):
    import timm

    from leanvit.checkpoint import save_weights

    kwargs = json.loads(TINY[2])
    path = save_weights(tmp_path / "m.safetensors", timm.create_model(TINY[0], **kwargs).state_dict(),
                        {"model": TINY[0], "model_kwargs": kwargs, "classes": [f"c{i}" for i in range(10)]})
    out = tmp_path / "q"
    assert main(["quantize", *TINY, "--checkpoint", str(path), "--eval", "cifar10-test500", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "trained on the classes" in err and "calibrated in" not in err and not out.exists()


def test_a_model_with_other_classes_than_the_eval_set_is_refused_before_calibrating(tmp_path, capsys):
    out = tmp_path / "q"
    argv = [TINY[0], TINY[1], TINY[2].replace('"num_classes": 10', '"num_classes": 7'), *TINY[3:]]
    assert main(["quantize", *argv, "--eval", "cifar10-test500", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "(7,) outputs per image but the data has 10 classes" in err and "calibrated in" not in err
    assert not out.exists()


def test_a_flat_folder_of_images_calibrates(tmp_path, capsys):
    """Calibration needs no labels: a folder of images is enough (an --eval set still needs them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    argv = [*TINY[:4], str(tmp_path), *TINY[5:], "--json"]
    assert main(["quantize", *argv]) == 0
    assert json.loads(capsys.readouterr().out)["calib_images"] == 16
    assert main(["quantize", *argv, "--eval", str(tmp_path)]) == 2
    assert "no class folders" in capsys.readouterr().err


def test_a_label_file_of_some_classes_indexes_the_models_as_in_eval(tmp_path, capsys):
    """``--eval DIR --labels F`` reads the label file as ``leanvit eval --labels`` does: labels of some classes
    index the model's outputs (the file's own two classes used to be taken as all the model's: refused)."""
    from leanvit.data import bundled_cifar10

    subset, data = bundled_cifar10(), tmp_path / "flat"
    data.mkdir()
    picks = [subset.targets.index(3), subset.targets.index(7)]
    for i in picks:
        subset[i][0].save(data / f"{i}.png")
    (tmp_path / "labels.txt").write_text("".join(f"{i}.png {subset.targets[i]}\n" for i in picks))
    assert main(["quantize", *TINY, "--eval", str(data), "--labels", str(tmp_path / "labels.txt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["eval_images"] == 2, report


def test_flags_without_effect_and_a_short_calibration_set_are_warned():
    with pytest.warns(LeanvitWarning) as warned:
        assert main(["quantize", *TINY, "--calib-images", "600", "--eval-images", "5", "--reconstruct-iters", "3",
                     "--no-latency", "--labels", "labels.txt", "--json"]) == 0
    said = [str(w.message) for w in warned]
    assert "--eval-images has no effect without --eval" in said
    assert "--labels has no effect without --eval" in said
    assert "--no-latency has no effect without --out" in said
    assert "--reconstruct-iters has no effect without --reconstruct (or --recipe hybrid)" in said
    assert any("holds 500 images, fewer than --calib-images 600" in m for m in said)


def test_percentile_sets_the_range_methods_percentile(capsys):
    assert main(["quantize", *TINY, "--a-method", "percentile", "--percentile", "99.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["percentile"] == 99.5
    with pytest.warns(LeanvitWarning, match="--percentile has no effect without --w-method percentile or "
                                            "--a-method percentile"):
        assert main(["quantize", *TINY, "--percentile", "99.5", "--json"]) == 0  # the default methods are mse


def test_eval_leaves_out_the_calibration_images_and_corrupt_ones_are_replaced(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        (tmp_path / f"c{c}").mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"c{c}" / f"{i}.png")
        (tmp_path / f"c{c}" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    argv = [a if a != "cifar10-test500" else str(tmp_path) for a in TINY]
    with pytest.warns(LeanvitWarning, match="could not be decoded \\(named above\\); others were drawn instead: "
                                            "calibrating on 16"):
        assert main(["quantize", *argv, "--eval", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["calib_images"] == 16 and result["eval_images"] == 30 - 16  # the broken ones are skipped there too
    assert "16 of the --eval images are calibration images" in captured.err


def test_a_nan_attention_error_bound_is_refused(capsys):
    """NaN compared false with every error, which turned the bound off."""
    with pytest.raises(SystemExit):
        main(["quantize", *TINY, "--attn-bits", "8", "--attn-max-error", "nan"])
    assert "argument --attn-max-error: must be in" in capsys.readouterr().err


def test_too_few_decodable_calibration_images_name_the_cli_fix(tmp_path, capsys):
    """The API's message suggested QuantConfig(min_images=...), which no flag sets."""
    import numpy as np
    from PIL import Image

    for i in range(20):
        path = tmp_path / f"{i}.png"
        if i < 10:
            Image.fromarray(np.full((32, 32, 3), i, np.uint8)).save(path)
        else:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    argv = [a if a != "cifar10-test500" else str(tmp_path) for a in TINY]
    assert main(["quantize", *argv]) == 2
    err = capsys.readouterr().err
    assert "Only 10 images of" in err and "at least 16" in err and "QuantConfig" not in err


def test_eval_leaves_out_calibration_images_stored_in_another_layout(tmp_path, capsys):
    """The shipped subset's JPEGs unpacked into a flat folder and calibrated on: the same images, other names."""
    from leanvit.data import bundled_cifar10

    bundled = bundled_cifar10()
    for i in range(0, 500, 25):
        start, end = bundled._offsets[i], bundled._offsets[i + 1]
        (tmp_path / f"img{i}.jpg").write_bytes(bundled._bytes[start:end].tobytes())
    argv = [a if a != "cifar10-test500" else str(tmp_path) for a in TINY]
    assert main(["quantize", *argv, "--eval", "cifar10-test500", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["eval_images"] == 500 - 16
    assert "16 of the --eval images are calibration images" in captured.err


def test_a_calibration_folder_with_too_few_images_is_refused_with_the_fix(tmp_path, capsys):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (32, 32), (i, i, i)).save(tmp_path / f"{i}.png")
    argv = [a if a != "cifar10-test500" else str(tmp_path) for a in TINY]
    assert main(["quantize", *argv]) == 2
    assert "has 3 images; calibration needs at least 16 (256 is a good choice): pass a folder with more" in \
        capsys.readouterr().err


def test_defaults_calibrate_256_images_with_the_mse_recipe_at_2_threads():
    """The documented defaults: the INT8 latency is compared at 2 threads, and 256 images give stable ranges."""
    from leanvit.cli import build_parser

    args = build_parser().parse_args(["quantize", "deit_tiny_patch16_224", "--calib", "cifar10-test500"])
    assert (args.threads, args.calib_images, args.recipe) == (2, 256, "mse")
    assert (args.bits, args.engine, args.target) == ("w8a8", "openvino", "auto")


def test_each_top1_scores_its_own_model_and_the_engine_runs_at_threads(tmp_path, monkeypatch, capsys):
    """top1 is the float model's, sim_top1 the simulation's, engine_top1 the engine running the INT8 file, loaded with
    --threads; report.json holds what --json prints, the top-1s included."""
    import leanvit.cli.quantize
    import leanvit.deploy
    from torch import nn

    from leanvit.deploy.engine import is_quantized

    real_evaluate, real_get_engine, scored, engines = leanvit.cli.quantize.evaluate, leanvit.deploy.get_engine, [], []

    def evaluate(predictor, loader, **kwargs):
        scored.append("runner" if not isinstance(predictor, nn.Module) else
                      "quantized" if is_quantized(predictor) else "float")
        return real_evaluate(predictor, loader, **kwargs)

    def get_engine(name, **kwargs):  # (export and its precision check get engines of their own, never run)
        engine = real_get_engine(name, **kwargs)
        load_model_file = engine.load_model_file
        engine.load_model_file = lambda path, **kw: (engines.append((name, engine.threads))
                                                     or load_model_file(path, **kw))
        return engine

    monkeypatch.setattr(leanvit.cli.quantize, "evaluate", evaluate)
    monkeypatch.setattr(leanvit.deploy, "get_engine", get_engine)
    out = tmp_path / "q"
    assert main(["quantize", *TINY, "--threads", "2", "--target", "generic", "--engine", "onnxruntime", "--out",
                 str(out), "--no-latency", "--eval", "cifar10-test500", "--eval-images", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert scored == ["float", "quantized", "runner"] and engines == [("onnxruntime", 2)]
    assert {"top1", "sim_top1", "engine_top1"} <= set(result)
    assert json.loads((out / "report.json").read_text()) == result


def test_activation_scheme_and_granularity_flags_override_the_recipe(capsys):
    """--a-scheme sym and --a-granularity tensor replace the hybrid recipe's per-layer choices ("auto")."""
    assert main(["quantize", *TINY, "--recipe", "hybrid", "--bits", "w6a6", "--reconstruct-iters", "2",
                 "--a-scheme", "sym", "--a-granularity", "tensor", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["a_symmetric"] is True and result["config"]["a_per_channel"] is False
    inputs = [scheme.split("inputs ")[1] for scheme in result["layers"].values() if "inputs " in scheme]
    assert len(inputs) == 6 and all(s.startswith(("int6 sym per-tensor", "int8 sym per-tensor")) for s in inputs)


def test_an_interrupted_run_leaves_no_earlier_model_in_out(tmp_path, monkeypatch, capsys):
    """The files of an earlier run into --out are removed before calibrating: a run stopped there (Ctrl-C, a failure)
    leaves no model beside which nothing says it is another one's (an earlier ONNX Runtime model.onnx included)."""
    import sys

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["leanvit.compress.quant"], "quantize", interrupted)
    out = tmp_path / "q"
    out.mkdir()
    earlier = ("report.json", "model.onnx", "model.xml", "model.bin")
    for name in earlier:
        (out / name).write_text("an earlier run's")
    (out / "notes.txt").write_text("the user's")
    assert main(["quantize", *TINY, "--out", str(out)]) == 130
    assert not any((out / name).exists() for name in earlier) and (out / "notes.txt").is_file()


@pytest.mark.parametrize("text", ["head=", "=w8a8", "head"])
def test_layer_bits_needs_a_pattern_and_bits(text, capsys):
    from leanvit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", TINY[0], "--calib", "x", "--layer-bits", text])
    assert f"expected PATTERN=BITS such as head=w8a8, got '{text}'" in capsys.readouterr().err


def test_each_flag_overrides_its_recipe_field():
    """Every flag reaches the QuantConfig, each set against the hybrid recipe's own value (checked to differ); flags
    that need another are warned about only without it."""
    import warnings

    from leanvit.cli import build_parser
    from leanvit.cli.quantize import _config_from_args
    from leanvit.compress.quant import QuantConfig

    flags = {"--a-scheme": ("asym", "a_symmetric", False), "--no-reparam": (None, "reparam_layernorm", False),
             "--w-method": ("minmax", "w_method", "minmax"), "--a-method": ("percentile", "a_method", "percentile"),
             "--reconstruct": ("bridge", "reconstruct", "bridge"), "--reconstruct-iters": ("7", "reconstruct_iters", 7),
             "--attn-bits": ("6", "attn_bits", 6), "--quantize-depthwise": (None, "quantize_depthwise", True),
             "--skip": ("head", "skip", ("head",)), "--layer-bits": ("head=w8a8", "layer_bits", (("head", "w8a8"),))}
    argv = [a for flag, (value, _, _) in flags.items() for a in (flag, value) if a is not None]
    args = build_parser().parse_args(["quantize", TINY[0], "--calib", "x", "--recipe", "hybrid", "--target", "generic",
                                      "--engine", "onnxruntime", *argv])
    config, target = _config_from_args(args)
    recipe = vars(QuantConfig.recipe("hybrid", target="generic", engine="onnxruntime"))
    for flag, (_, field, value) in flags.items():
        assert recipe[field] != value and getattr(config, field) == value, flag
    assert target == "generic" and config.quantize_conv_outputs  # (ONNX Runtime's: not an OpenVINO config)
    args = build_parser().parse_args(["quantize", TINY[0], "--calib", "x", "--bias-correction"])
    assert _config_from_args(args)[0].bias_correction and not QuantConfig.recipe("mse").bias_correction
    for argv, said in ((["--sensitivity", "hessian"], "--sensitivity hessian has no effect without --avg-bits"),
                       (["--target", "generic", "--attn-max-error", "0.2"],
                        "--attn-max-error has no effect without --attn-bits (or --target vnni)"),
                       (["--a-method", "percentile", "--percentile", "99"], None)):  # (the activations' percentile)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _config_from_args(build_parser().parse_args(["quantize", TINY[0], "--calib", "x", *argv]))
        assert [str(w.message) for w in caught] == ([said] if said else []), argv


def test_mixed_precision_plumbing_and_the_resolved_target(monkeypatch, capsys):
    """--avg-bits hands allocate_bits --bits as the low width, w8a8 the high one, --sensitivity and the config; the
    user's --layer-bits come before the allocation's (first match wins); torch runs at --threads; the report names
    the CPU the model is for, never "auto", and the weight bits averaged over the weights."""
    import sys
    import warnings

    import timm
    import torch

    quant, calls, threads = sys.modules["leanvit.compress.quant"], [], []

    def allocate_bits(model, calib, avg_bits, **kwargs):
        calls.append((avg_bits, kwargs))
        return (("head", "w4a4"), ("blocks.0.mlp.fc1", "w4a4"))

    monkeypatch.setattr(quant, "allocate_bits", allocate_bits)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "--sensitivity")  # it has its effect here
        assert main(["quantize", *TINY, "--bits", "w4a4", "--avg-bits", "6", "--sensitivity", "hessian",
                     "--layer-bits", "head=w8a8", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "calibrating" not in captured.err  # --json: no progress bar either
    (avg, kwargs), = calls
    assert avg == 6.0 and (kwargs["low"], kwargs["high"], kwargs["method"]) == ("w4a4", "w8a8", "hessian")
    assert kwargs["config"].layer_bits == (("head", "w8a8"),)
    assert result["layers"]["head"].startswith("weights int8") and "int4" in result["layers"]["blocks.0.mlp.fc1"]
    assert threads == [1] and result["target"] in ("generic", "vnni")
    model = timm.create_model(TINY[0], **json.loads(TINY[2]))
    bits = {name: int(scheme.split()[1].removeprefix("int")) for name, scheme in result["layers"].items()
            if scheme.startswith("weights ")}
    sizes = {name: model.get_submodule(name).weight.numel() for name in bits}
    assert sorted(set(bits.values())) == [4, 8]
    assert result["avg_weight_bits"] == pytest.approx(sum(sizes[n] * bits[n] for n in bits) / sum(sizes.values()),
                                                      abs=1e-3)


def test_calibrates_on_the_training_split_with_exactly_the_images_it_needs(tmp_path, capsys):
    """A folder with train/ and val/ calibrates on train/ (16 images: the least allowed, accepted); val/'s 3 would
    be refused."""
    from PIL import Image

    for split, count in (("train", 16), ("val", 3)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (32, 32), (i, 2 * i, 3 * i)).save(tmp_path / split / "ab"[i % 2] / f"{i}.png")
    argv = [a if a != "cifar10-test500" else str(tmp_path) for a in TINY]
    with pytest.warns(LeanvitWarning, match="no --checkpoint, quantizing random weights"):
        assert main(["quantize", *argv, "--bits", "W8A8", "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["calib_images"] == 16 and result["bits"] == "w8a8"  # as --bits parses it, in either case


def test_the_report_counts_the_folded_batchnorms(capsys):
    """Every BatchNorm of a ResNet follows a conv and is folded into it."""
    import timm
    from torch import nn

    assert main(["quantize", "resnet10t", "--model-kwargs", '{"num_classes": 10}', "--img-size", "32", *TINY[3:],
                 "--json"]) == 0
    norms = [m for m in timm.create_model("resnet10t").modules() if isinstance(m, nn.BatchNorm2d)]
    assert json.loads(capsys.readouterr().out)["folded_batchnorms"] == len(norms) > 0


def test_the_deployment_plumbing_and_the_text_report(tmp_path, monkeypatch, capsys):
    """Exported for a batch of 1 at the model's input size, loaded at --threads; an OpenVINO model slower than float
    gets OpenVINO's hint; --eval is read at --batch-size; the text report names the checkpoint, the file written, the
    latency and the three top-1s each under its own name (the export, engine, timing and scoring stood in for: the
    command's own wiring)."""
    import sys

    import timm
    from torch import nn

    import leanvit.bench.speedup
    import leanvit.cli.quantize
    import leanvit.deploy
    from leanvit.checkpoint import save_weights
    from leanvit.deploy.engine import is_quantized
    from leanvit.evaluate import EvalResult

    quant, exported, loaded = sys.modules["leanvit.compress.quant"], [], []

    def export(qmodel, path, *, engine, example, **kwargs):
        exported.append((engine, tuple(example.shape), kwargs))
        return path.with_suffix(".xml")

    class Engine:
        name = "openvino"

        def load_model_file(self, path):
            loaded.append(path.name)
            return lambda images: None

    def scored(predictor, loader, **kwargs):
        top1 = 30.0 if not isinstance(predictor, nn.Module) else 20.0 if is_quantized(predictor) else 10.0
        return EvalResult(top1=top1, top5=100.0, images=len(loader.dataset), skipped=0, seconds=1, images_per_s=1)

    monkeypatch.setattr(quant, "export", export)
    monkeypatch.setattr(quant, "check_engine_precisions", lambda *args, **kwargs: {})
    monkeypatch.setattr(leanvit.deploy, "get_engine", lambda name, threads: loaded.append((name, threads)) or Engine())
    monkeypatch.setattr(leanvit.bench.speedup, "measure_speedup", lambda model, runner, engine, example: (
        leanvit.bench.speedup.Speedup(engine.name, 1, 1, float_ms=1.0, quantized_ms=1.25, round_ratios=(0.8,) * 4,
                                      rounds=4)))
    monkeypatch.setattr(leanvit.cli.quantize, "evaluate", scored)
    real_loader, sizes = leanvit.cli.quantize.make_loader, []
    monkeypatch.setattr(leanvit.cli.quantize, "make_loader", lambda data, size, **kw: sizes.append(size)
                        or real_loader(data, size, **kw))
    kwargs = json.loads(TINY[2])
    path = save_weights(tmp_path / "m.safetensors", timm.create_model(TINY[0], **kwargs).state_dict(),
                        {"model": TINY[0], "model_kwargs": kwargs})
    out = tmp_path / "q"
    with pytest.warns(LeanvitWarning) as caught:
        assert main(["quantize", *TINY, "--checkpoint", str(path), "--out", str(out), "--eval", "cifar10-test500",
                     "--eval-images", "10", "--batch-size", "4"]) == 0
    assert sizes[-2:] == [4, 1]  # the models in PyTorch at --batch-size, the exported one at its batch of 1
    assert exported == [("openvino", (1, 3, 32, 32), {"dynamic_batch": False, "check": False})]
    assert loaded == [("openvino", 1), "model.xml"]
    warning, = [str(w.message) for w in caught if "slower" in str(w.message)]
    assert warning.endswith("check --target (auto picks this CPU's), and keep slow layers float with --skip")
    lines = capsys.readouterr().out.splitlines()  # (the layers kept float are listed between them)
    assert lines[0] == f"model    {TINY[0]}  ({path})"
    assert f"wrote    {out / 'model.xml'}  (and report.json)" in lines
    assert any(line.startswith("latency  openvino INT8 against float: 0.80x as fast") for line in lines)
    assert lines[-1] == ("top-1    float 10.00 %  simulated 20.00 %  openvino INT8 30.00 %  on 10 images of "
                         "cifar10-test500")
    report = json.loads((out / "report.json").read_text())
    assert report["eval_data"] == "cifar10-test500" and report["calib"] == "cifar10-test500"
