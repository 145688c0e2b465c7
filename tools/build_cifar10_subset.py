"""Rebuild ``src/leanvit/assets/cifar10_test500.npz`` from the CIFAR-10 JPEG archive.

    python tools/build_cifar10_subset.py ../shared/data/cifar10-jpeg.tar.gz

Takes 50 images per class from the archive's ``test/`` split, chosen by a seeded shuffle of each
class's sorted file names, and packs the JPEG files unchanged (bytes + offsets, no pickle) with
their labels, file names and the class names. The output is byte-for-byte reproducible.
"""
from __future__ import annotations

import argparse
import random
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

PER_CLASS = 50
SEED = 0
OUT = Path(__file__).resolve().parents[1] / "src" / "leanvit" / "assets" / "cifar10_test500.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path, help="cifar10-jpeg.tar.gz")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    with tarfile.open(args.archive) as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
        by_class = defaultdict(list)
        for name in members:
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == "test" and parts[2].endswith(".jpg"):
                by_class[parts[1]].append(name)
        classes = sorted(by_class)
        rng = random.Random(SEED)
        picked = [(c, n) for c in classes for n in sorted(rng.sample(sorted(by_class[c]), PER_CLASS))]
        blobs = [tar.extractfile(members[n]).read() for _, n in picked]

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


if __name__ == "__main__":
    main()
