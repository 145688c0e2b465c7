"""Calibration sets for post-training methods: N images, class-balanced, reproducible.

:func:`calibration_shortfall` and :func:`without_calibration_images` are what the commands that calibrate
(``leanvit quantize``, ``leanvit tokens --calib``) say and do about a short calibration set and an ``--eval`` set
that holds calibration images: worded for the command line, which prints them as its own.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, Subset

from ..errors import LeanvitError, check_range
from .datasets import shared_images


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


def calibration_shortfall(calib: CalibrationImages, requested: int, source) -> str | None:
    """The warning for ``calib``, ``calibration_images`` of ``source`` (the ``--calib`` data) asked for ``requested``
    images, where it holds fewer: some did not decode, or ``source`` has fewer. None where it holds them all."""
    if calib.skipped:
        short = len(calib.indices) < requested  # (the draw stops short only once every image was tried)
        return (f"{calib.skipped} calibration images could not be decoded (named above); "
                f"{'no others were left' if short else 'others were drawn instead'}: calibrating on "
                f"{len(calib.indices)}")
    if len(calib.indices) < requested:
        return (f"{source} holds {len(calib.indices)} images, fewer than --calib-images {requested}: calibrating on "
                "all of them")
    return None


def without_calibration_images(evalset: Dataset, calibset: Dataset, calib_indices: list[int],
                               eval_source) -> tuple[Dataset, str | None]:
    """``evalset`` less the calibration images it holds (``--eval`` and ``--calib`` on the same split, or the same
    images in two layouts, found by their bytes: :func:`shared_images`), and a note saying what was left out or
    not checked (None where nothing was): a model scored on the images it was calibrated on would look better than
    it is. An ``evalset`` of calibration images alone is a :class:`LeanvitError`."""
    shared = shared_images(evalset, Subset(calibset, calib_indices))
    if shared is None:
        return evalset, (f"--eval {eval_source} is not stored as image files, so it was not checked for calibration "
                         "images")
    if not shared:
        return evalset, None
    if len(shared) == len(evalset):
        raise LeanvitError(f"Every image of --eval {eval_source} is a calibration image: evaluate on other images "
                           "(a test split) than those --calib draws from.")
    kept = sorted(set(range(len(evalset))) - set(shared))
    return Subset(evalset, kept), (f"{len(shared)} of the --eval images are calibration images; they are left out "
                                   f"of the evaluation ({len(kept)} remain)")
