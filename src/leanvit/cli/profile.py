"""``leanvit profile MODEL``: parameters and MACs, against the published numbers."""
from __future__ import annotations

import argparse

from ..profile import profile_model
from . import positive_int, print_json


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("profile", help="count parameters and MACs, compare with the paper")
    p.add_argument("model", help="timm or leanvit model name")
    p.add_argument("--img-size", type=positive_int, help="input resolution (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def _fmt_diff(pct: float | None) -> str:
    return "" if pct is None else f"  ({pct:+.2f} % vs published)"


def run(args: argparse.Namespace) -> int:
    prof = profile_model(args.model, args.img_size)
    if args.json:
        print_json(prof.to_dict())
        return 0
    print(f"model   {prof.model} @ {prof.img_size}x{prof.img_size}")
    print(f"params  {prof.params / 1e6:.3f} M{_fmt_diff(prof.params_diff_pct)}")
    print(f"MACs    {prof.macs / 1e9:.3f} G{_fmt_diff(prof.macs_diff_pct)}")
    print(f"        {prof.mac_convention}")
    if prof.published_note:
        print(f"note    published figures: {prof.published_note}")
    if prof.not_compared:
        print(f"note    not compared with the published figures: {prof.not_compared}")
    return 0
