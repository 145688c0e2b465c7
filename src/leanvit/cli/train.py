"""``leanvit train MODEL --data DIR``: the flags are :class:`leanvit.train.TrainConfig`'s fields."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import MISSING, fields

from ..train import TrainConfig, fit
from . import print_json

_TYPES = {"str": str, "int": int, "float": float}
_METAVARS = {"int": "N", "float": "X"}

EPILOG = """\
examples:
  leanvit train deit_tiny_patch16_224 --data ~/.cache/leanvit/cifar10 --val-data ~/.cache/leanvit/cifar10 \\
      --img-size 32 --model-kwargs '{"img_size": 32, "patch_size": 4}' --epochs 100 --batch-size 256
  leanvit train deit_tiny_distilled_patch16_224 --data DIR --teacher resnet50 --teacher-checkpoint T.pth

several GPUs or nodes: launch the same command with torchrun, e.g.
  torchrun --nproc_per_node 8 -m leanvit train MODEL --data DIR ...   (--batch-size is the global batch)

32x32 data (CIFAR-10): --img-size sets the data pipeline's resolution; models that take an image
size (ViTs, most of the zoo) also need it as a model kwarg, and a smaller patch or stem stride keeps
enough tokens, e.g. --model-kwargs '{"img_size": 32, "patch_size": 4}'.
"""


def json_object(text: str) -> dict:
    """argparse type for ``--model-kwargs``: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"img_size\": 32}}', got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train or distil a model (resumable, DDP via torchrun)", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Supervised training or DeiT-style distillation with timm's recipe parts. Checkpoints "
                    "(safetensors + state.json) are written every epoch; --resume continues the run.",
    )
    for f in fields(TrainConfig):
        help_text = f.metadata["help"]
        if f.name == "model":
            p.add_argument("model", help=help_text)
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if default is MISSING and f.default_factory is MISSING:
            p.add_argument(flag, required=True, help=help_text)
        elif f.type == "bool" and not default:
            p.add_argument(flag, action="store_true", default=None, help=help_text)
        elif f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: on)")
        elif f.type == "dict":
            p.add_argument(flag, type=json_object, metavar="JSON", help=help_text)
        else:
            kind = f.type.replace(" | None", "")
            p.add_argument(flag, type=_TYPES[kind], metavar=_METAVARS.get(kind, f.name.split("_")[-1].upper()),
                           help=help_text if default is None else f"{help_text} (default: {default})")
    p.add_argument("--json", action="store_true", help="print the per-epoch log as JSON when done")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    result = fit(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        print_json({"output": result.output, "epochs": result.epochs})
    else:
        last = result.epochs[-1]
        print(f"trained {cfg.model}: {len(result.epochs)} epochs, last loss {last['loss']:.4f}"
              + (f", val top-1 {last['top1']:.2f} %" if "top1" in last else "")
              + f"; weights in {result.output}")
    return 0
