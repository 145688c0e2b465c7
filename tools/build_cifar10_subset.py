"""Rebuild ``src/leanvit/assets/cifar10_test500.npz`` from the CIFAR-10 JPEG archive.

    python tools/build_cifar10_subset.py ../shared/data/cifar10-jpeg.tar.gz

Takes 50 images per class from the archive's ``test/`` split, chosen by a seeded shuffle of each
class's sorted file names, and packs the JPEG files unchanged (bytes + offsets, no pickle) with
their labels, file names and the class names. The output is byte-for-byte reproducible. An archive
whose ``test/`` split (at its top or under one folder) is not 10 classes of at least 50 images is
refused before anything is written: the default output is the shipped asset.
"""
from __future__ import annotations

import argparse
import random
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

PER_CLASS = 50
CLASSES = 10
SEED = 0
OUT = Path(__file__).resolve().parents[1] / "src" / "leanvit" / "assets" / "cifar10_test500.npz"


def find_test_split(names) -> dict[str, dict[str, str]]:
    """The archive's ``test/<class>/<image>.jpg`` members by class, each under its name from ``test/`` on (the name
    the asset stores), the split at the archive's top or under one top folder (``cifar10/test/...``)."""
    by_top = defaultdict(lambda: defaultdict(dict))
    for name in names:
        parts = name.split("/")
        if len(parts) in (3, 4) and parts[-3] == "test" and parts[-1].endswith(".jpg"):
            by_top["/".join(parts[:-3])][parts[-2]]["/".join(parts[-3:])] = name
    if len(by_top) > 1:
        raise ValueError(f"test/ splits under {len(by_top)} folders ({', '.join(repr(t) for t in sorted(by_top))})")
    return next(iter(by_top.values()), {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path, help="cifar10-jpeg.tar.gz")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    try:
        with tarfile.open(args.archive) as tar:
            members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
            by_class = find_test_split(members)
            # the shipped asset is replaced: anything but CIFAR-10's whole test split is refused, not packed
            short = [f"{c} ({len(by_class[c])})" for c in sorted(by_class) if len(by_class[c]) < PER_CLASS]
            if len(by_class) != CLASSES or short:
                raise ValueError(f"its test/ split has {len(by_class)} classes"
                                 + (f", {', '.join(short)} under {PER_CLASS} images" if short else "")
                                 + f"; CIFAR-10 has {CLASSES} with {PER_CLASS} or more .jpg images each "
                                 "(test/<class>/<image>.jpg, at the top or under one folder)")
            classes = sorted(by_class)
            rng = random.Random(SEED)
            picked = [(c, n) for c in classes for n in sorted(rng.sample(sorted(by_class[c]), PER_CLASS))]
            blobs = [tar.extractfile(members[by_class[c][n]]).read() for c, n in picked]
    except (OSError, tarfile.TarError, ValueError) as e:
        print(f"error: {args.archive}: {e}; nothing written.", file=sys.stderr)
        return 2

    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    np.savez_compressed(
        args.out,
        jpeg=np.frombuffer(b"".join(blobs), dtype=np.uint8),
        offsets=offsets,
        labels=np.array([classes.index(c) for c, _ in picked], dtype=np.int64),
        names=np.array([n for _, n in picked]),
        classes=np.array(classes),
    )
    print(f"{args.out}: {len(picked)} images, {len(classes)} classes, {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
