"""``leanvit models``: the catalog of covered models with their published facts."""
from __future__ import annotations

import argparse

from ..catalog import CATALOG
from ..errors import LeanvitError, close_matches
from . import print_json


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list the models in scope with their published numbers")
    p.add_argument("--json", action="store_true", help="print the catalog as JSON")
    p.add_argument("--family", help="only this family (e.g. EfficientFormerV2)")
    p.set_defaults(func=run)
    return p


def _family_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def run(args: argparse.Namespace) -> int:
    rows = [f for f in CATALOG.values() if not args.family or _family_key(f.family) == _family_key(args.family)]
    if not rows:
        families = sorted({f.family for f in CATALOG.values()})
        hint = close_matches(args.family, families, key=_family_key)  # `vit`: TinyViT, Next-ViT
        raise LeanvitError(f"No family '{args.family}' in the catalog" + (f" (did you mean {', '.join(hint)}?)"
                                                                          if hint else "")
                           + f". Families: {', '.join(families)}.")
    if args.json:
        print_json([f.to_dict() for f in rows])
        return 0
    header = f"{'model':34} {'family':18} {'params M':>8} {'GMACs':>6} {'top-1':>5}  paper speed"
    print(header)
    print("-" * len(header))
    for f in rows:
        print(f"{f.name:34} {f.family:18} {f.params_m:8.2f} {f.gmacs:6.2f} {f.top1:5.1f}  {f.speed or '-'}")
    return 0
