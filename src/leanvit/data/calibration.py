"""Calibration sets for post-training methods: N images, class-balanced, reproducible."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, Subset

from ..errors import LeanvitError, check_range


def calibration_subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """``n`` samples of ``dataset`` spread over its classes as evenly as their sizes allow.

    Classes are visited in a seeded random order, one sample each per round, so with fewer
    samples than classes the classes covered are a random choice rather than the first ones,
    and a class too small for its share leaves the remainder to the others. Only
    ``dataset.targets`` is read (through a ``Subset``'s indices): no image is decoded. A larger ``n`` with the same
    ``seed`` draws the same samples and more.
    """
    targets = _targets(dataset)
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


def _targets(dataset: Dataset) -> list:
    if isinstance(dataset, Subset):
        targets = _targets(dataset.dataset)
        return [targets[i] for i in dataset.indices]
    return list(dataset.targets)


class CalibrationImages(NamedTuple):
    batches: list[torch.Tensor]  #: the decoded images, ``(B, C, H, W)`` batches
    labels: list[torch.Tensor]  #: their targets, batched alike
    indices: list[int]  #: which samples of the dataset they are
    skipped: int  #: images drawn that did not decode (each named in a ``CorruptImageWarning``)


def calibration_images(dataset: Dataset, n: int, batch_size: int = 32, seed: int = 0) -> CalibrationImages:
    """The images of ``calibration_subset(dataset, n, seed)``, decoded and batched, each image that does not
    decode replaced by the next class-balanced draw: ``n`` images unless the dataset runs out of decodable ones."""
    n = min(n, len(dataset))
    tried, images, labels, indices = set(), [], [], []
    while len(indices) < n and len(tried) < len(dataset):
        # a larger draw holds the earlier one: its new samples stand in for the images that did not decode
        for index in calibration_subset(dataset, min(len(tried) + n - len(indices), len(dataset)), seed).indices:
            if index not in tried:
                tried.add(index)
                if (sample := dataset[index]) is not None:
                    images.append(sample[0])
                    labels.append(int(sample[1]))
                    indices.append(index)
    if not images:
        raise LeanvitError("No calibration image could be decoded; see the warnings above.")
    return CalibrationImages(list(torch.stack(images).split(batch_size)), list(torch.tensor(labels).split(batch_size)),
                             indices, len(tried) - len(indices))
