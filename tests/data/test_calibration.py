"""Calibration subsets: exact size, class-balanced, reproducible from the seed."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from leanvit.data import calibration_subset
from leanvit.errors import LeanvitError


def _dataset(per_class: list[int]):
    return SimpleNamespace(targets=[c for c, n in enumerate(per_class) for _ in range(n)])


def _counts(subset) -> Counter:
    return Counter(subset.dataset.targets[i] for i in subset.indices)


def test_balanced_and_reproducible():
    ds = _dataset([30] * 10)
    a, b = calibration_subset(ds, 64, seed=3), calibration_subset(ds, 64, seed=3)
    assert a.indices == b.indices and len(set(a.indices)) == 64
    counts = _counts(a)
    assert sorted(counts.values()) == [6] * 6 + [7] * 4
    assert calibration_subset(ds, 64, seed=4).indices != a.indices


def test_fewer_samples_than_classes_pick_distinct_classes():
    counts = _counts(calibration_subset(_dataset([5] * 10), 4, seed=0))
    assert len(counts) == 4 and set(counts.values()) == {1}


def test_small_class_leaves_its_share_to_the_others():
    counts = _counts(calibration_subset(_dataset([2, 50, 50]), 30, seed=0))
    assert counts == {0: 2, 1: 14, 2: 14}


def test_size_out_of_range():
    with pytest.raises(LeanvitError, match="calibration size"):
        calibration_subset(_dataset([3, 3]), 7)


def test_the_draw_is_random_within_a_class_and_over_the_classes():
    """Which images of a class, and which classes when there are fewer images than classes, change with the seed:
    not a class's last images, not the classes in sorted order, every time."""
    one_class = [calibration_subset(_dataset([100]), 10, seed=seed).indices for seed in (0, 1)]
    assert one_class[0] != one_class[1] and one_class[0] != list(range(90, 100))
    classes = {frozenset(_counts(calibration_subset(_dataset([5] * 10), 4, seed=seed))) for seed in range(10)}
    assert len(classes) > 1  # (in sorted order: always classes 0-3)
