"""The ``leanvit`` console script.

Each sub-command lives in its own module of this package and exposes
``register(subparsers) -> argparse.ArgumentParser``, setting ``func=run`` on its parser; ``run(args)``
returns the exit status. User errors (:class:`leanvit.errors.LeanvitError`) are printed as one
line without a traceback and exit with status 2, like argparse's own usage errors; warnings are printed as the
command's own (``leanvit eval: warning: ...``), with their source only when it is not leanvit.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..data import calibration_images, calibration_shortfall, calibration_subset, resolve_data_config
from ..errors import LeanvitError, warn
from ..files import write_problem

#: Sub-command modules, in the order ``leanvit --help`` lists them.
COMMANDS = ("models", "profile", "bench", "eval", "train", "tokens", "quantize")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="leanvit",
        description="Efficient vision transformers, compressed and measured on real inference engines.",
    )
    parser.add_argument("--version", action="version", version=f"leanvit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def _warning_format(command: str):
    """``warnings.formatwarning`` for the CLI: a user of a command has no use for the line of leanvit (or of their
    console script) that warned, only for what it says; another library's warning keeps its category and source.
    (Formatting, not showing: a caller recording warnings around :func:`main` still records them.)"""
    def format(message, category, filename, lineno, line=None):
        if category.__module__.partition(".")[0] == "leanvit":
            return f"leanvit {command}: warning: {message}\n"
        return f"leanvit {command}: warning ({category.__name__} from {filename}:{lineno}): {message}\n"
    return format


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        formatwarning, warnings.formatwarning = warnings.formatwarning, _warning_format(args.command)
        try:
            return int(args.func(args) or 0)
        finally:
            warnings.formatwarning = formatwarning
    except LeanvitError as e:
        print(f"leanvit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `leanvit models --json | head`: the reader left; not an error of ours
        # Python flushes stdout again at exit, which would raise once more: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command killed by SIGPIPE


def note(command: str, text: str) -> None:
    """A line the user should read that is neither a result nor a warning (what was left out, what a step fell back
    to), on stderr so that ``--json`` output stays clean."""
    print(f"leanvit {command}: note: {text}", file=sys.stderr)


def eval_subset(dataset, n: int | None):
    """``--eval-images``: ``n`` class-balanced images of ``dataset`` (all of them when ``n`` is None or not fewer)."""
    return dataset if n is None or n >= len(dataset) else calibration_subset(dataset, n)


def decode_calibration(calibset, args: argparse.Namespace):
    """``--calib-images`` images of ``calibset`` (the ``--calib`` data) decoded once, in batches of ``--batch-size``
    (:func:`~leanvit.data.calibration_images`), warned about where fewer could be had."""
    calib = calibration_images(calibset, args.calib_images, args.batch_size)
    if shortfall := calibration_shortfall(calib, args.calib_images, args.calib):
        warn(shortfall)
    return calib


def label_classes(model, meta: dict) -> dict:
    """What a ``--labels`` file's labels index, so that one covering some of the classes keeps the model's order:
    the checkpoint's class names, else an ImageNet model's synsets (timm's order), else the model's outputs."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    if meta.get("classes"):
        return {"classes": meta["classes"]}
    subset = infer_imagenet_subset(model)
    if subset is not None:
        return {"classes": ImageNetInfo(subset).label_names()}
    return {"num_classes": getattr(model, "num_classes", None) or None}


def print_json(obj: Any) -> None:
    """Machine-readable output: one JSON document on stdout."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def prepare_out_dir(out: str | Path, holds: str) -> Path:
    """Create ``--out``, the directory for what the command writes (``holds``), and check a file can be written
    there, before the command's work: a path that cannot hold it fails in a second, not with a traceback after
    minutes of measuring or calibrating."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LeanvitError(f"--out {out} is a file, not a directory: give a directory for {holds} (it is created if "
                           "missing).")
    _check_writable(out, out, holds, "a directory")
    return out


def prepare_out_file(out: str | Path, holds: str, example: str) -> Path:
    """:func:`prepare_out_dir` for an ``--out`` that is one file (``example``: a file name to suggest)."""
    out = Path(out)
    if out.is_dir():
        raise LeanvitError(f"--out {out} is a folder; give the file to write {holds} to, e.g. {out / example}.")
    if out.exists():  # (also /dev/stdout, a pipe's /dev/fd/N: no file can be created beside those)
        if not os.access(out, os.W_OK):
            raise LeanvitError(f"--out {out}: cannot write {holds} there (permission denied); give a path you can "
                               "write to.")
        return out
    _check_writable(out.parent, out, holds, "a path")
    return out


def _check_writable(folder: Path, out: Path, holds: str, give: str) -> None:
    problem = write_problem(folder)
    if problem:
        raise LeanvitError(f"--out {out}: cannot write {holds} there ({problem}); give {give} you can write to.")


def whole_number(minimum: int):
    """argparse type for a count of at least ``minimum``: a clear message instead of a traceback."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {'at least 1' if minimum == 1 else f'{minimum} or more'}, "
                                             f"got {value}")
        return value
    return parse


positive_int = whole_number(1)  #: batch, threads, ...
count = whole_number(0)  #: data loader processes


def number_in(lo: float, hi: float, unit: str):
    """argparse type for a number in ``(lo, hi]``: a clear message instead of a traceback or a silent default."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unit}, got '{text}'") from None
        if not lo < value <= hi:
            raise argparse.ArgumentTypeError(f"must be in ({lo:g}, {hi:g}] ({unit}), got {value}")
        return value
    return parse


crop_fraction = number_in(0, 1, "the fraction of the image kept, such as 0.875")  #: ``--crop-pct``


def input_data_config(model, meta: dict, args: argparse.Namespace) -> dict:
    """Pre-processing for a command that runs a model on images: ``--img-size`` (else the ``img_size`` model kwarg,
    a side or a (height, width) pair, the command line's over the checkpoint's recorded ones, as the model is
    built) and ``--crop-pct`` where the command has one, over the checkpoint's saved data config, else over the
    model's timm test-time config (``--use-train-size``: its training one)."""
    kwarg = {**meta.get("model_kwargs", {}), **args.model_kwargs}.get("img_size")
    if not (isinstance(kwarg, int) or isinstance(kwarg, (list, tuple)) and len(kwarg) == 2):
        kwarg = None  # (the model's constructor refused anything else already)
    img_size = args.img_size or kwarg
    return resolve_data_config(model, img_size=img_size, crop_pct=getattr(args, "crop_pct", None),
                               saved=meta.get("data_config"), use_test_size=not getattr(args, "use_train_size", False))
