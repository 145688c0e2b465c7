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
    with pytest.raises(LeanvitError, match="calibration size"):
        calibration_subset(_dataset([3, 3]), 0)


def test_the_draw_is_random_within_a_class_and_over_the_classes():
    """Which images of a class, and which classes when there are fewer images than classes, change with the seed:
    not a class's last images, not the classes in sorted order, every time."""
    one_class = [calibration_subset(_dataset([100]), 10, seed=seed).indices for seed in (0, 1)]
    assert one_class[0] != one_class[1] and one_class[0] != list(range(90, 100))
    classes = {frozenset(_counts(calibration_subset(_dataset([5] * 10), 4, seed=seed))) for seed in range(10)}
    assert len(classes) > 1  # (in sorted order: always classes 0-3)


def test_the_draw_lists_its_indices_in_dataset_order():
    """The subset reads the dataset front to back (sequential file reads), whatever order the classes were drawn in."""
    for seed in range(5):
        indices = calibration_subset(_dataset([7, 5, 9]), 10, seed=seed).indices
        assert indices == sorted(indices) and len(set(indices)) == 10


def test_shortfall_says_whether_others_were_drawn_for_images_that_did_not_decode_or_none_were_left():
    from leanvit.data import CalibrationImages, calibration_shortfall

    def calib(found: int, skipped: int) -> CalibrationImages:
        return CalibrationImages([], [], list(range(found)), skipped)

    assert calibration_shortfall(calib(8, 2), 8, "data") == ("2 calibration images could not be decoded (named above); "
                                                             "others were drawn instead: calibrating on 8")
    assert calibration_shortfall(calib(7, 3), 8, "data") == ("3 calibration images could not be decoded (named above); "
                                                             "no others were left: calibrating on 7")
    assert calibration_shortfall(calib(5, 0), 8, "data") == ("data holds 5 images, fewer than --calib-images 8: "
                                                             "calibrating on all of them")
    assert calibration_shortfall(calib(8, 0), 8, "data") is None


def test_an_eval_set_not_stored_as_image_files_is_kept_with_a_note_that_it_was_not_checked():
    import torch

    from leanvit.data import without_calibration_images

    evalset = torch.utils.data.TensorDataset(torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))
    kept, note = without_calibration_images(evalset, evalset, [0, 1], "tensors")
    assert kept is evalset
    assert note == "--eval tensors is not stored as image files, so it was not checked for calibration images"


def test_an_eval_set_of_image_files_without_calibration_images_is_kept_without_a_note(tmp_path):
    import numpy as np
    from PIL import Image

    from leanvit.data import open_dataset, without_calibration_images

    rng = np.random.default_rng(0)
    for name in ("calib/a.png", "calib/b.png", "eval/c.png", "eval/d.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
    evalset = open_dataset(tmp_path / "eval", unlabelled=True)
    calibset = open_dataset(tmp_path / "calib", unlabelled=True)
    assert without_calibration_images(evalset, calibset, [0, 1], tmp_path / "eval") == (evalset, None)


def test_a_subset_is_balanced_over_its_own_samples_classes():
    from torch.utils.data import Subset

    ds = _dataset([10, 10, 10])
    subset = Subset(ds, [10, *range(20, 30)])  # one image of class 1, ten of class 2
    for seed in range(5):
        drawn = calibration_subset(subset, 2, seed=seed)
        assert Counter(ds.targets[subset.indices[i]] for i in drawn.indices) == {1: 1, 2: 1}
