"""``leanvit quantize MODEL --checkpoint F --calib DATA --bits w8a8 --out DIR``: post-training quantization.

Calibrates on ``--calib-images`` class-balanced images of ``--calib`` (its training split where it has
one), prints which layers stay in float and why, and with ``--out`` writes the deployable INT8 model
(OpenVINO IR converted from a QDQ ONNX, or the QDQ ONNX alone for ONNX Runtime) plus
``report.json``, and times it against the float model on that engine, warning where INT8 is the slower
of the two on this CPU (``--no-latency`` skips it). ``--eval DATA`` adds the top-1 of the float model,
the simulation and, when exported, the engine running the INT8 file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..checkpoint import model_from_checkpoint
from ..data import (
    build_transform, check_input_size, dataset_classes,
    make_loader, open_dataset, without_calibration_images,
)
from ..errors import LeanvitError, warn
from ..evaluate import check_class_outputs, evaluate
from ..models.registry import create_model
from . import (
    decode_calibration, eval_subset, input_data_config, label_classes, note, number_in, positive_int, prepare_out_dir,
    print_json,
)
from .train import json_object


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..compress.quant.attention import SOFTMAX_QUANTIZERS
    from ..compress.quant.calibrate import TARGETS
    from ..compress.quant.quantizer import RANGE_METHODS

    p = sub.add_parser("quantize", help="post-training INT8 quantization, exported for OpenVINO / ONNX Runtime")
    p.add_argument("model", help="timm or leanvit model name")
    p.add_argument("--checkpoint", help="weights: a `leanvit train` folder or .safetensors, or a timm/official .pth")
    p.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                   help="kwargs for timm.create_model, e.g. '{\"num_classes\": 10}'")
    p.add_argument("--img-size", type=positive_int,
                   help="input resolution (default: the checkpoint's, the img_size model kwarg, or the model's)")
    p.add_argument("--calib", required=True, metavar="DATA",
                   help="calibration images: any layout `leanvit eval` reads (its training split if it has one), "
                        "or a folder of images without labels")
    p.add_argument("--calib-images", type=positive_int, default=256, help="images used (default 256)")
    p.add_argument("--bits", default="w8a8",
                   help="weight/activation bits: w8a8 (default), w7a8 (exact on CPUs without VNNI); "
                        "w6a6, w4a8, w4a4 are simulation-only")
    p.add_argument("--target", choices=TARGETS, default="auto",
                   help="the CPU the INT8 model is for: vnni (VNNI/AMX: depthwise convs and attention matmuls "
                        "run INT8 too), generic (they stay float: no faster without VNNI), auto (this machine's)")
    p.add_argument("--recipe", choices=("minmax", "mse", "hybrid"), default="mse",
                   help="mse (default: deployable W8A8), minmax (baseline), or hybrid (the hybrid-aware method: "
                        "+ per-layer symmetry, Hessian search, bias correction, block reconstruction); the flags "
                        "below override the recipe")
    p.add_argument("--w-method", choices=RANGE_METHODS, help="weight range choice")
    p.add_argument("--a-method", choices=RANGE_METHODS, help="activation range choice")
    p.add_argument("--percentile", type=number_in(50, 100, "a percentile such as 99.99"), metavar="P",
                   help="with --w-method / --a-method percentile: the percentile of the values the range keeps "
                        "(default 99.99)")
    p.add_argument("--a-scheme", choices=("asym", "sym", "auto"),
                   help="activations: uint8 asymmetric, int8 symmetric, or per layer by held-out error")
    p.add_argument("--a-granularity", choices=("tensor", "channel", "auto"),
                   help="activation ranges: per tensor, per channel (simulation only), or per channel on the "
                        "depthwise convs where that lowers the held-out error (OpenVINO runs those INT8 where a "
                        "conv writes their input, in float after a transpose: --out's warning names them)")
    p.add_argument("--no-reparam", action="store_true",
                   help="no RepQ-ViT reparameterisation of post-LayerNorm ranges (on by default where it helps)")
    p.add_argument("--bias-correction", action="store_true", help="remove each layer's mean output error")
    p.add_argument("--quantize-depthwise", action="store_true",
                   help="quantize depthwise convs too (float for a generic --target: no faster in INT8 there)")
    p.add_argument("--hessian", action="store_true",
                   help="PTQ4ViT: refine ranges by the output error weighted by the task loss's squared gradients")
    p.add_argument("--reconstruct", choices=("blocks", "bridge"),
                   help="BRECQ/AdaRound reconstruction of every block, or only of a hybrid's CNN-to-transformer "
                        "bridge blocks (Q-HyViT)")
    p.add_argument("--reconstruct-iters", type=positive_int, help="steps per block (default 500)")
    p.add_argument("--attn-bits", type=positive_int,
                   help="also quantize the attention matmuls' inputs (q, k, softmax, v) to this many bits")
    p.add_argument("--attn-max-error", type=number_in(-math.inf, math.inf, "a relative error such as 0.1"),
                   metavar="E",
                   help="with 8-bit attention: keep float the attentions whose output quantized matmul inputs change "
                        "by more than E (relative RMS; default 0.1; a negative value keeps every one quantized)")
    p.add_argument("--softmax", choices=SOFTMAX_QUANTIZERS,
                   help="softmax-output quantizer with --attn-bits: uniform (deployable), or log2, sulq, twin "
                        "(simulation only; better at 3-4 bits)")
    p.add_argument("--avg-bits", type=float, metavar="B",
                   help="mixed precision: --bits where it hurts least, w8a8 elsewhere, averaging B weight bits")
    p.add_argument("--sensitivity", choices=("logit", "hessian"), default="logit",
                   help="layer sensitivity for --avg-bits: logit error (default) or Hessian trace")
    p.add_argument("--layer-bits", action="append", type=_layer_bits, default=[], metavar="PATTERN=BITS",
                   help="bit-widths for layers matching a glob (repeatable, first match wins), e.g. head=w8a8")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="keep in float the layers whose name, or a containing module's, matches this glob "
                        "(repeatable), e.g. --skip head")
    p.add_argument("--engine", choices=("openvino", "onnxruntime"), default="openvino",
                   help="engine the model is for (default openvino); onnxruntime also quantizes convolution outputs, "
                        "which its INT8 QLinearConv needs")
    p.add_argument("--out", type=Path, help="folder to write the INT8 model and report.json to")
    p.add_argument("--no-latency", action="store_true",
                   help="with --out: skip timing the INT8 model against the float model on the engine (~10 s)")
    p.add_argument("--eval", metavar="DATA", help="dataset to measure top-1 on (any layout `leanvit eval` reads)")
    p.add_argument("--labels", help="label file for a flat folder of --eval images (as `leanvit eval --labels`)")
    p.add_argument("--eval-images", type=positive_int, help="evaluate on this many images (class-balanced)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--threads", type=positive_int, default=2,
                   help="CPU threads for PyTorch and the engine (default 2, the setting the INT8 latency is compared at)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


#: what to try when the INT8 model is slower than the float one on the engine it was exported for
_SLOWER_HINTS = {
    "onnxruntime": "ONNX Runtime runs the activations between INT8 convolutions in float, with a dequantize and a "
                   "quantize pass around each; try --engine openvino, or --skip the convolutions",
    "openvino": "on a CPU without VNNI its INT8 kernels gain little; check --target (auto picks this CPU's), and "
                "keep slow layers float with --skip",
}


def _layer_bits(text: str) -> tuple[str, str]:
    pattern, sep, bits = text.partition("=")
    if not sep or not pattern or not bits:
        raise argparse.ArgumentTypeError(f"expected PATTERN=BITS such as head=w8a8, got '{text}'")
    return pattern, bits


def _warn_unused_flags(args: argparse.Namespace, config) -> None:
    """Name the flags this run ignores: each takes effect only together with another."""
    unused = [(flag, needs) for flag, given, needs in (
        ("--sensitivity hessian", args.sensitivity != "logit" and args.avg_bits is None, "--avg-bits"),
        ("--reconstruct-iters", args.reconstruct_iters is not None and not config.reconstruct,
         "--reconstruct (or --recipe hybrid)"),
        ("--percentile", args.percentile is not None and "percentile" not in (config.w_method, config.a_method),
         "--w-method percentile or --a-method percentile"),
        ("--eval-images", args.eval_images is not None and not args.eval, "--eval"),
        ("--labels", args.labels is not None and not args.eval, "--eval"),
        ("--no-latency", args.no_latency and not args.out, "--out"),
        ("--attn-max-error", args.attn_max_error is not None and config.attn_bits is None,
         "--attn-bits (or --target vnni)"),
    ) if given]
    for flag, needs in unused:
        warn(f"{flag} has no effect without {needs}")


def _config_from_args(args: argparse.Namespace):
    """The QuantConfig the flags ask for (the recipe's, with each given flag winning) and the CPU target resolved."""
    from ..compress import quant

    given = {
        "w_method": args.w_method, "a_method": args.a_method, "reconstruct": args.reconstruct,
        "a_symmetric": {"asym": False, "sym": True, "auto": "auto", None: None}[args.a_scheme],
        "a_per_channel": {"tensor": False, "channel": True, "auto": "auto", None: None}[args.a_granularity],
        "reconstruct_iters": args.reconstruct_iters, "attn_bits": args.attn_bits, "softmax_quantizer": args.softmax,
        "reparam_layernorm": False if args.no_reparam else None, "bias_correction": args.bias_correction or None,
        "hessian_search": args.hessian or None, "quantize_depthwise": args.quantize_depthwise or None,
        "percentile": args.percentile,
    }
    target = quant.resolve_target(args.target)
    config = quant.QuantConfig.recipe(args.recipe, args.bits, target=target, engine=args.engine,
                                      skip=tuple(args.skip), layer_bits=tuple(args.layer_bits),
                                      **{k: v for k, v in given.items() if v is not None})
    if args.attn_max_error is not None:  # (negative: None, every attention quantized)
        config = dataclasses.replace(config, attn_max_error=args.attn_max_error if args.attn_max_error >= 0 else None)
    _warn_unused_flags(args, config)
    return config, target


def _check_args(args: argparse.Namespace, config) -> None:
    """Refuse, with the fix, flags that cannot work together: too few calibration images, an average-bit budget
    the bit-widths cannot meet, a config the engine cannot run, an ``--out`` that is a file."""
    from ..compress import quant

    if args.calib_images < config.min_images:
        raise LeanvitError(f"--calib-images {args.calib_images} is too few for stable activation ranges: give at least "
                           f"{config.min_images} (256 is a good choice).")
    if args.avg_bits is not None:
        try:
            quant.check_budget(args.avg_bits, args.bits, "w8a8")
        except LeanvitError as e:
            raise LeanvitError(f"--avg-bits {args.avg_bits} with --bits {args.bits}: {e} (--bits sets the low "
                               "bit-width, w8a8 the high one; e.g. --bits w4a4 --avg-bits 6).") from None
    if args.out:
        quant.check_config_deployable(config, args.engine)
        if args.out.exists() and not args.out.is_dir():
            raise LeanvitError(f"--out {args.out} is a file; give a folder to write the INT8 model and report.json to.")


def _deploy(args: argparse.Namespace, model: torch.nn.Module, qmodel: torch.nn.Module, data_config: dict,
            result: dict):
    """Export the quantized model for ``--engine`` into ``--out``, load it there, list the layers the engine runs in
    float and (unless ``--no-latency``) time it against the float model; returns the runner and the speed-up."""
    from ..compress import quant
    from ..deploy import get_engine

    example = torch.zeros(1, *data_config["input_size"])
    path = quant.export(qmodel, args.out / "model", engine=args.engine, example=example, dynamic_batch=False,
                        check=False)
    engine = get_engine(args.engine, threads=args.threads)
    runner = engine.load_model_file(path)
    in_float = quant.check_engine_precisions(qmodel, path, args.engine, compiled=getattr(runner, "compiled", None))
    result.update(exported=str(path), engine=args.engine, engine_float_layers=in_float)
    if args.no_latency:
        return runner, None
    from ..bench.speedup import measure_speedup

    speedup = measure_speedup(model, runner, engine, torch.randn_like(example))
    result["latency"] = speedup.to_dict()
    if speedup.slower:  # the figure tested is the one quoted: the medians' ratio can say otherwise
        warn(f"on this CPU {args.engine} runs the INT8 model slower than the float one (INT8 "
             f"{speedup.summary()}; batch {speedup.batch}, {speedup.threads} threads): "
             f"{_SLOWER_HINTS[args.engine]}")
    return runner, speedup


def _score(args: argparse.Namespace, model, qmodel, runner, evalset, result: dict) -> None:
    """Top-1 on ``--eval`` of the float model, the simulation and (when exported) the engine's INT8 model."""
    dataset, classes = eval_subset(evalset, args.eval_images), dataset_classes(evalset)
    loader = make_loader(dataset, args.batch_size)
    result["eval_data"] = str(args.eval)
    scored = evaluate(model, loader, classes=classes, device="cpu", progress=False)
    result["top1"] = scored.top1
    result["sim_top1"] = evaluate(qmodel, loader, classes=classes, device="cpu", progress=False).top1
    if runner is not None:  # the exported file has a batch of 1, the deployment case
        result["engine_top1"] = evaluate(runner, make_loader(dataset, 1), classes=classes, progress=False).top1
    result["eval_images"] = scored.images  # those that decoded


def _print_summary(args: argparse.Namespace, result: dict, report, target: str, speedup) -> None:
    """The human-readable lines of what ``run`` did (``--json`` prints ``result`` instead)."""
    print(f"model    {args.model}" + (f"  ({args.checkpoint})" if args.checkpoint else ""))
    print(f"quant    {args.bits.lower()} for a {target} CPU, calibrated in {result['calibration_s']} s: "
          f"{report.summary()}")
    if args.out:
        print(f"wrote    {result['exported']}  (and report.json)")
    if speedup is not None:  # the medians are in report.json and --json
        print(f"latency  {args.engine} INT8 against float: {speedup.summary()} (batch {speedup.batch}, "
              f"{speedup.threads} threads; --no-latency skips)")
    if args.eval:
        line = f"top-1    float {result['top1']:.2f} %  simulated {result['sim_top1']:.2f} %"
        if "engine_top1" in result:
            line += f"  {args.engine} INT8 {result['engine_top1']:.2f} %"
        print(line + f"  on {result['eval_images']} images of {args.eval}")


def run(args: argparse.Namespace) -> int:
    from ..compress import quant

    config, target = _config_from_args(args)
    _check_args(args, config)  # before the model is loaded and the images decoded
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, meta = model_from_checkpoint(args.model, args.checkpoint, **args.model_kwargs)
    else:
        model, meta = create_model(args.model, **args.model_kwargs), {}
        warn("no --checkpoint, quantizing random weights")
    model.eval()
    data_config = input_data_config(model, meta, args)
    output = check_input_size(model, data_config, args.model)
    transform = build_transform(data_config)
    calibset = open_dataset(args.calib, train=True, transform=transform, unlabelled=True)
    if len(calibset) < config.min_images:
        raise LeanvitError(f"{args.calib} has {len(calibset)} images; calibration needs at least {config.min_images} "
                           "(256 is a good choice): pass a folder with more.")
    evalset = None
    if args.eval:  # checked before the minutes of calibration
        evalset = open_dataset(args.eval, transform=transform, labels=args.labels,
                               **(label_classes(model, meta) if args.labels else {}))
        if meta.get("classes") and meta["classes"] != dataset_classes(evalset):
            raise LeanvitError(f"The checkpoint was trained on the classes {meta['classes']}, not those of "
                               f"{args.eval}. Evaluate it on data with the same classes.")
        check_class_outputs(output, len(dataset_classes(evalset)))

    if args.out:  # once the inputs are checked, before the minutes of calibration
        prepare_out_dir(args.out, "the INT8 model and report.json")
        for name in ("report.json", "model.onnx", "model.xml", "model.bin"):  # an earlier run's would describe
            (args.out / name).unlink(missing_ok=True)  # another model (an IR beside a new ONNX export, say)
    started = time.perf_counter()
    # decoded once, used by every pass
    calib = decode_calibration(calibset, args)
    if len(calib.indices) < config.min_images:  # (QuantConfig.min_images, the API's way round it, is no flag)
        raise LeanvitError(f"Only {len(calib.indices)} images of {args.calib} could be decoded; calibration needs at "
                           f"least {config.min_images} (256 is a good choice): pass a folder with more.")
    if evalset is not None:
        evalset, left_out = without_calibration_images(evalset, calibset, calib.indices, args.eval)
        if left_out:
            note("quantize", left_out)
    calib = calib.batches
    if args.avg_bits is not None:
        mixed = quant.allocate_bits(model, calib, args.avg_bits, low=args.bits, high="w8a8", config=config,
                                    method=args.sensitivity)
        config = dataclasses.replace(config, layer_bits=(*config.layer_bits, *mixed))
    qmodel = quant.quantize(model, calib, config, progress=not args.json)
    report = qmodel.quant_report
    result = {"model": args.model, "checkpoint": args.checkpoint, "bits": args.bits.lower(), "target": target,
              "config": vars(config), "calib": str(args.calib),
              "calib_images": report.calib_images, "calibration_s": round(time.perf_counter() - started, 1),
              "quantized_layers": len(report.quantized), "layers": report.quantized,
              "float_layers": report.float_layers,
              "reparameterised": report.reparameterised, "reconstructed": report.reconstructed,
              "int8_concats": report.int8_concats, "folded_batchnorms": len(report.folded_batchnorms)}

    if args.avg_bits is not None:
        result["avg_weight_bits"] = round(quant.average_weight_bits(qmodel), 3)
    runner, speedup = _deploy(args, model, qmodel, data_config, result) if args.out else (None, None)
    if evalset is not None:
        _score(args, model, qmodel, runner, evalset, result)

    if args.out:
        (args.out / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.json:
        print_json(result)
        return 0
    _print_summary(args, result, report, target, speedup)
    return 0
