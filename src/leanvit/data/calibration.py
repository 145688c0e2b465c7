"""Calibration sets for post-training methods: N images, class-balanced, reproducible."""
from __future__ import annotations

import random
from collections import defaultdict

from torch.utils.data import Dataset, Subset

from ..errors import check_range


def calibration_subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """``n`` samples of ``dataset`` spread over its classes as evenly as their sizes allow.

    Classes are visited in a seeded random order, one sample each per round, so with fewer
    samples than classes the classes covered are a random choice rather than the first ones,
    and a class too small for its share leaves the remainder to the others. Only
    ``dataset.targets`` is read: no image is decoded.
    """
    targets = list(dataset.targets)
    check_range("calibration size", n, 1, len(targets))
    rng = random.Random(seed)
    by_class = defaultdict(list)
    for index, target in enumerate(targets):
        by_class[target].append(index)
    pools = [rng.sample(members, len(members)) for _, members in sorted(by_class.items())]
    rng.shuffle(pools)
    chosen = []
    while len(chosen) < n:
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return Subset(dataset, sorted(chosen))
