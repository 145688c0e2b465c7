"""``leanvit eval MODEL``: top-1/top-5, per-class accuracy, confusions and images/s on a dataset."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..checkpoint import model_from_checkpoint
from ..data import (
    BUNDLED_CIFAR10, build_transform, check_input_size, dataset_classes, make_loader, open_dataset,
)
from ..errors import LeanvitError, warn
from ..evaluate import evaluate
from ..models.registry import create_model
from . import count, crop_fraction, input_data_config, label_classes, positive_int, prepare_out_file, print_json
from .train import json_object


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="accuracy of a model on a dataset (top-1/top-5, per class, images/s)",
        description="Evaluate a model on a dataset. Pre-processing (resolution, crop, mean, std) comes "
                    "from the checkpoint's metadata when it has some, else from the model's timm config. "
                    "Images that cannot be decoded are skipped with a warning and counted as 'skipped'.",
    )
    p.add_argument("model", help="timm or leanvit model name")
    p.add_argument("--data", default=BUNDLED_CIFAR10,
                   help="ImageFolder tree, folder with train/ and val/ (or test/), CIFAR-10 python pickles, "
                        f"a flat folder with --labels, or '{BUNDLED_CIFAR10}' (shipped; the default)")
    p.add_argument("--labels", help="label file for a flat folder of images ('filename label' lines, "
                                    "or ImageNet's LOC_val_solution.csv)")
    p.add_argument("--checkpoint", help="weights: a `leanvit train` folder or .safetensors, or a timm/official "
                                        ".pth; leanvit checkpoints also restore num_classes and pre-processing")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (downloads)")
    p.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                   help="kwargs for timm.create_model, e.g. '{\"num_classes\": 10}'")
    p.add_argument("--img-size", type=positive_int,
                   help="input resolution (default: the checkpoint's, the img_size model kwarg, or the model's)")
    p.add_argument("--crop-pct", type=crop_fraction,
                   help="centre-crop fraction, in (0, 1] (default: checkpoint's or model's)")
    p.add_argument("--use-train-size", action="store_true",
                   help="without a leanvit checkpoint: the model's training input size and crop, not its test-time "
                        "ones (the default where its pretrained_cfg has them, as timm's validate.py)")
    p.add_argument("--engine", default="eager",
                   help="inference engine: eager (PyTorch), compile, onnxruntime, openvino (default eager)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the engine's default)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=count, default=2, help="data loading processes (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        model, meta = model_from_checkpoint(args.model, args.checkpoint, **args.model_kwargs)
    else:
        model, meta = create_model(args.model, pretrained=args.pretrained, **args.model_kwargs), {}
        if not args.pretrained:
            warn("no --checkpoint or --pretrained, evaluating random weights")
    data_config = input_data_config(model, meta, args)
    if args.use_train_size and meta.get("data_config"):
        warn("--use-train-size has no effect with a leanvit checkpoint: it carries the pre-processing it was "
             "trained with (--img-size and --crop-pct override it)")
    check_input_size(model, data_config, args.model)
    if args.out:  # before the evaluation, not after it
        prepare_out_file(args.out, "the JSON result", "eval.json")
    dataset = open_dataset(args.data, transform=build_transform(data_config), labels=args.labels,
                           **(label_classes(model, meta) if args.labels else {}))
    classes = dataset_classes(dataset)
    if meta.get("classes") and meta["classes"] != classes:
        raise LeanvitError(f"The checkpoint was trained on the classes {meta['classes']} but {args.data} has "
                           f"{classes}. Evaluate it on data with the same classes.")
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = model
    if args.engine != "eager":
        from ..deploy import get_engine

        example = torch.zeros(args.batch_size, *data_config["input_size"])
        engine = get_engine(args.engine, **({"threads": args.threads} if args.threads else {}))
        predictor = engine.load(model, example)
    loader = make_loader(dataset, args.batch_size, workers=args.workers)
    result = evaluate(predictor, loader, classes=classes, progress=not args.no_progress)
    report = {"model": args.model, "checkpoint": args.checkpoint, "data": str(args.data),
              "engine": args.engine, "batch_size": args.batch_size, "data_config": data_config,
              **result.to_dict()}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print_json(report)
        return 0
    print(f"model    {args.model}" + (f"  ({args.checkpoint})" if args.checkpoint else ""))
    print(f"data     {args.data}: {result.images} images, {len(classes)} classes, {result.skipped} skipped")
    print(f"top-1    {result.top1:.2f} %")
    print(f"top-5    {result.top5:.2f} %")
    print(f"speed    {result.images_per_s:.1f} images/s (decode + pre-process + model, batch "
          f"{args.batch_size}, {args.engine})")
    worst = sorted(result.per_class.items(), key=lambda kv: kv[1])[:10]
    print("lowest per-class top-1: " + ", ".join(f"{c} {a:.1f}" for c, a in worst))
    print("most confused (true -> predicted): "
          + ", ".join(f"{c['true']} -> {c['predicted']} ({c['count']})" for c in result.most_confused[:5]))
    return 0
