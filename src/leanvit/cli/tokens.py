"""``leanvit tokens MODEL --method evit --keep-rate 0.7``: token reduction, its MACs and accuracy.

Prints the tokens left after each block and the MACs before and after. With ``--eval DATA`` (any
layout ``leanvit eval`` reads, e.g. ``cifar10-test500``) it also prints the top-1 of both. There is
no fine-tuning; that is ``leanvit train``'s job.
"""
from __future__ import annotations

import argparse
import time

from timm.layers import to_2tuple

from ..checkpoint import model_from_checkpoint
from ..data import (
    build_transform, check_input_size, dataset_classes,
    make_loader, open_dataset, resolve_data_config, without_calibration_images,
)
from ..errors import LeanvitError, warn
from ..evaluate import evaluate
from ..models.registry import create_model
from ..profile import count_macs
from . import decode_calibration, eval_subset, note, number_in, positive_int, print_json
from .train import json_object


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("tokens", help="reduce a ViT's tokens (EViT, ToMe, DiffRate): MACs and accuracy")
    p.add_argument("model", help="a plain ViT: timm name such as deit_small_patch16_224")
    p.add_argument("--method", required=True, choices=("evit", "tome", "diffrate"))
    p.add_argument("--keep-rate", type=float, help="EViT: fraction of tokens kept (default 0.7)")
    p.add_argument("--layers", type=_index_list,
                   help="EViT: 0-based blocks that drop tokens (default 3,6,9)")
    p.add_argument("--no-fuse", action="store_true", help="EViT: drop tokens instead of fusing them into one")
    p.add_argument("--r",
                   help="ToMe: tokens merged per block (default 8); 1x6 = 1 in the first six blocks; "
                        "0,2,2,1 = one count per block")
    p.add_argument("--target-gmacs", type=float, help="DiffRate: target GMACs (required for diffrate)")
    p.add_argument("--calib", metavar="DATA", help="DiffRate: dataset whose training split the rates are searched on")
    p.add_argument("--calib-images", type=positive_int, help="DiffRate: images used (default 256)")
    p.add_argument("--steps", type=positive_int, help="DiffRate: search steps (default 300)")
    p.add_argument("--macs-weight", type=number_in(0, 1e9, "a weight such as 100"),
                   help="DiffRate: how much the search weighs the MAC target against accuracy (default 100)")
    p.add_argument("--checkpoint", help="weights: a `leanvit train` folder or .safetensors, or a timm/official .pth")
    p.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                   help="kwargs for timm.create_model, e.g. '{\"num_classes\": 10}'")
    p.add_argument("--eval", metavar="DATA", help="dataset to measure top-1 on (any layout `leanvit eval` reads)")
    p.add_argument("--eval-images", type=positive_int, help="evaluate on this many images (class-balanced)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def _index_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got '{text}'") from None


def _labels_fit(model, meta: dict, classes: list[str]) -> bool:
    """Whether labels of ``classes`` index ``model``'s outputs: as many classes, and the checkpoint's if it names them."""
    return model.num_classes == len(classes) and meta.get("classes", classes) == classes


#: each method's own flags (dest, flag) and their defaults
_METHOD_FLAGS = {
    "evit": {("keep_rate", "--keep-rate"): 0.7, ("layers", "--layers"): (3, 6, 9), ("no_fuse", "--no-fuse"): False},
    "tome": {("r", "--r"): "8"},
    "diffrate": {("target_gmacs", "--target-gmacs"): None, ("calib", "--calib"): None,
                 ("calib_images", "--calib-images"): 256, ("steps", "--steps"): 300,
                 ("macs_weight", "--macs-weight"): 100.0},
}


#: DiffRate flags that only its rate search reads: without --calib the published rates are used
_SEARCH_FLAGS = (("calib_images", "--calib-images"), ("steps", "--steps"), ("macs_weight", "--macs-weight"))


def _method_flags(args: argparse.Namespace) -> None:
    """Refuse another method's flags (they would be ignored) and fill in this method's defaults."""
    if args.method == "diffrate" and args.calib is None:
        for dest, flag in _SEARCH_FLAGS:
            if getattr(args, dest) is not None:
                raise LeanvitError(f"{flag} sets DiffRate's search, which needs --calib DATA; drop it or add "
                                   "--calib DATA (without it the published rates are used).")
    for method, flags in _METHOD_FLAGS.items():
        for (dest, flag), default in flags.items():
            value = getattr(args, dest)
            given = value is not None and value is not False  # (not `in`: 0 == False)
            if method != args.method and given:
                article = "an" if method == "evit" else "a"
                raise LeanvitError(f"{flag} is {article} {method} option; it has no effect with --method "
                                   f"{args.method}. Drop it, or use --method {method}.")
            if not given:
                setattr(args, dest, default)
    if args.eval_images is not None and not args.eval:
        raise LeanvitError("--eval-images has no effect without --eval DATA.")


def _search_batches(args: argparse.Namespace, model, meta: dict, calibset, calib) -> list:
    """DiffRate's search batches from the decoded ``--calib`` images: with their labels where they are the model's
    classes, else the images alone (DiffRate's own fallback: the unreduced model's top-1 is the target), said."""
    listed = dataset_classes(calibset)
    classes = [c for c in listed if c != "."]  # ".": images beside the class folders
    fit = _labels_fit(model, meta, classes)
    if fit and len(classes) == len(listed):
        return list(zip(calib.batches, calib.labels))
    why = (f"some images of {args.calib} lie beside its class folders, of no class (move them into "
           "their class folders to use the labels)" if fit else
           f"the labels of {args.calib} are not the model's {model.num_classes} classes")
    note("tokens", f"{why}; the search matches the unreduced model's own top-1 instead")
    return calib.batches


def _print_summary(args: argparse.Namespace, result: dict) -> None:
    """The human-readable lines of what ``run`` measured (``--json`` prints ``result`` instead)."""
    height, width = to_2tuple(result["img_size"])
    print(f"model    {args.model} @ {height}x{width}"
          + (f"  ({args.checkpoint})" if args.checkpoint else ""))
    print(f"method   {result['method']}")
    print(f"tokens   {' '.join(map(str, result['tokens_per_block']))}  (after each block)")
    print(f"MACs     {result['macs'] / 1e9:.3f} G -> {result['reduced_macs'] / 1e9:.3f} G"
          f"  (-{result['macs_cut_pct']:.1f} %)")
    if args.eval:
        print(f"top-1    {result['top1']:.2f} % -> {result['reduced_top1']:.2f} %  on {result['eval_images']} "
              f"images of {args.eval} (no fine-tuning)")


def run(args: argparse.Namespace) -> int:
    from .. import tokens

    _method_flags(args)
    if args.method == "evit":
        method = tokens.EViT(keep_rate=args.keep_rate, fuse=not args.no_fuse, layers=args.layers)
    elif args.method == "tome":
        method = tokens.ToMe(r=tokens.parse_r(args.r))
    elif args.target_gmacs is None:
        raise LeanvitError("--method diffrate needs --target-gmacs (e.g. 2.9).")

    if args.checkpoint:
        # the "before" figures are the unreduced model's, not those of the reduction it was trained with
        model, meta = model_from_checkpoint(args.model, args.checkpoint, with_tokens=False, **args.model_kwargs)
        if meta.get("tokens"):
            note("tokens", f"{args.checkpoint} was trained with the reduction {meta['tokens']}: measured unreduced "
                           f"first, then with --method {args.method}")
    else:
        model, meta = create_model(args.model, **args.model_kwargs), {}
        if args.eval:
            warn("no --checkpoint, evaluating random weights")
    tokens.check_plain_vit(model)
    # the size the model was built for (an img_size model kwarg wins over the checkpoint's), its saved crop and statistics
    data_config = resolve_data_config(model, img_size=model.patch_embed.img_size, saved=meta.get("data_config"))
    check_input_size(model, data_config, args.model)  # (a size that is not a multiple of the patch size: warned)
    transform = build_transform(data_config)
    calibset = calib = None
    if args.method == "diffrate":
        if args.calib:
            calibset = open_dataset(args.calib, train=True, transform=transform, unlabelled=True)
            calib = decode_calibration(calibset, args)
        method = tokens.DiffRate(target_macs=args.target_gmacs * 1e9, steps=args.steps, macs_weight=args.macs_weight,
                                 calib=None if calib is None else _search_batches(args, model, meta, calibset, calib))

    input_size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    height, width = input_size[1:]  # (the img_size model kwarg's form: a side, or a pair where they differ)
    result = {"model": args.model, "checkpoint": args.checkpoint,
              "img_size": width if height == width else [height, width], "macs": count_macs(model, input_size)}
    if args.eval:
        dataset = open_dataset(args.eval, transform=transform)
        if meta.get("classes") and meta["classes"] != dataset_classes(dataset):
            raise LeanvitError(f"The checkpoint was trained on the classes {meta['classes']}, not those of "
                               f"{args.eval}. Evaluate it on data with the same classes.")
        if calibset is not None:  # scored on the images the rates were searched on, it would look better than it is
            dataset, left_out = without_calibration_images(dataset, calibset, calib.indices, args.eval)
            if left_out:
                note("tokens", left_out)
        loader = make_loader(eval_subset(dataset, args.eval_images), args.batch_size)
        before = evaluate(model, loader, classes=dataset_classes(dataset), device="cpu", progress=False)

    started = time.perf_counter()
    tokens.apply(model, method)
    result.update(
        method=repr(tokens.applied(model)),
        setup_s=round(time.perf_counter() - started, 2),
        tokens_per_block=tokens.token_counts(model),
        reduced_macs=count_macs(model, input_size),
    )
    result["macs_cut_pct"] = round(100.0 * (1 - result["reduced_macs"] / result["macs"]), 2)
    if args.eval:
        after = evaluate(model, loader, classes=dataset_classes(dataset), device="cpu", progress=False)
        result.update(eval_data=str(args.eval), eval_images=before.images, top1=before.top1,
                      reduced_top1=after.top1)

    if args.json:
        print_json(result)
        return 0
    _print_summary(args, result)
    return 0
