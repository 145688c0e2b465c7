"""Re-evaluate the shipped checkpoints on the full CIFAR-10 test split against their model cards.

    python benchmarks/eval_checkpoints.py [--manifest benchmarks/checkpoints.json]
                                          [--data ~/.cache/leanvit/cifar10/test] [--out FILE]

The manifest (``benchmarks/manifest.py`` describes it) gives each checkpoint's model card accuracy on
the 10,000-image JPEG test split (``../shared/data/cifar10-jpeg.tar.gz``, extracted) and a tolerance.
Pre-processing comes from each checkpoint's metadata, exactly as ``leanvit eval`` does. Writes one JSON report
and exits with status 1 if any checkpoint misses its card.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from leanvit.checkpoint import model_from_checkpoint
from leanvit.data import build_transform, make_loader, open_dataset
from leanvit.errors import LeanvitError
from leanvit.evaluate import evaluate
from manifest import DEFAULT as DEFAULT_MANIFEST, read_manifest

HERE = Path(__file__).resolve().parent
FULL_TEST_SPLIT = 10_000


def check(entry: dict, data: Path, batch_size: int, workers: int) -> dict:
    model, meta = model_from_checkpoint(entry["model"], entry["path"])
    dataset = open_dataset(data, transform=build_transform(meta["data_config"]))
    if len(dataset) != FULL_TEST_SPLIT:
        raise LeanvitError(f"{data} has {len(dataset)} images; the model cards are for the full "
                           f"{FULL_TEST_SPLIT}-image test split.")
    result = evaluate(model, make_loader(dataset, batch_size, workers=workers))
    tolerance = entry.get("tolerance", 0.05)
    diff = round(result.top1 - entry["top1"], 4)
    card = {k: v for k, v in entry.items() if k != "path"}  # the report keeps the manifest's relative path
    return {**card, "measured_top1": result.top1, "measured_top5": result.top5, "diff": diff,
            "ok": abs(diff) <= tolerance and result.skipped == 0, "skipped": result.skipped,
            "images_per_s": result.images_per_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--data", type=Path, default=Path("~/.cache/leanvit/cifar10/test").expanduser(),
                        help="the extracted test split (default: ~/.cache/leanvit/cifar10/test)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "eval-checkpoints.json")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))),
                        help="JPEG decoding processes (default: the usable CPUs, at most 4)")
    args = parser.parse_args()

    entries = read_manifest(args.manifest)
    if not entries:
        print(f"{args.manifest} lists no checkpoints; nothing to check.")
        return 0
    try:
        rows = [check(e, args.data, args.batch_size, args.workers) for e in entries]
    except LeanvitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    for r in rows:
        print(f"{'ok  ' if r['ok'] else 'MISS'} {r['model']:36} card {r['top1']:6.2f}  measured "
              f"{r['measured_top1']:6.2f}  ({r['diff']:+.2f})  {r['checkpoint']}")
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
