"""evaluate(): accuracies against a direct computation, engines' fixed batches, skipped images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset, SubsetRandomSampler

from leanvit.data import (
    DecodedDataset, build_transform, collate_skipping_corrupt, dataset_classes, make_loader, open_dataset,
    resolve_data_config,
)
from leanvit.errors import LeanvitError
from leanvit.evaluate import evaluate


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16,
                              num_heads=2, num_classes=10).eval()
    transform = build_transform(resolve_data_config(model, img_size=32, crop_pct=1.0))
    data = Subset(open_dataset("cifar10-test500", transform=transform), list(range(0, 500, 5)))
    return model, data


def _reference(model, data):
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = np.array([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        logits = model(x).numpy()
    order = np.argsort(-logits, axis=1)
    return y, order[:, 0], (order[:, :5] == y[:, None]).any(axis=1)


def test_matches_direct_computation(setup):
    model, data = setup
    y, pred, top5 = _reference(model, data)
    result = evaluate(model, make_loader(data, batch_size=32), progress=False)
    assert result.images == 100 and result.skipped == 0
    assert result.top1 == pytest.approx(100 * np.mean(pred == y))
    assert result.top5 == pytest.approx(100 * np.mean(top5))
    classes = data.dataset.classes
    for c, acc in result.per_class.items():
        k = classes.index(c)
        assert acc == pytest.approx(100 * np.mean(pred[y == k] == k))
    top = result.most_confused[0]
    pairs = [(classes[a], classes[b]) for a, b in zip(y, pred) if a != b]
    assert top["count"] == max(pairs.count(p) for p in set(pairs))
    assert pairs.count((top["true"], top["predicted"])) == top["count"]


def test_numpy_runner_with_fixed_batch_gets_padded_batches(setup):
    model, data = setup
    seen = []

    def runner(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape[0])
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    eager = evaluate(model, make_loader(data, batch_size=32), progress=False)
    result = evaluate(runner, make_loader(data, batch_size=32), progress=False)
    assert set(seen) == {32} and len(seen) == 4  # 100 images: 3 full batches + 1 padded
    assert (result.top1, result.top5, result.per_class) == (eager.top1, eager.top5, eager.per_class)


def test_wrong_number_of_classes(setup):
    model, data = setup
    wide = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16,
                             num_heads=2, num_classes=7)
    with pytest.raises(LeanvitError, match="7,\\) outputs per image but the data has 10 classes"):
        evaluate(wide, make_loader(data, batch_size=32), progress=False)


def test_corrupt_images_are_counted_as_skipped(tmp_path, setup):
    model, _ = setup
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / c / "ok.png")
    (tmp_path / "b" / "truncated.png").write_bytes((tmp_path / "b" / "ok.png").read_bytes()[:40])
    two_class = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16,
                                  num_heads=2, num_classes=2)
    data = open_dataset(tmp_path, transform=build_transform(resolve_data_config(two_class, img_size=32)))
    with pytest.warns(UserWarning, match="truncated.png"):
        result = evaluate(two_class, make_loader(data, batch_size=2), progress=False)
    assert (result.images, result.skipped) == (2, 1)


def test_skipped_counts_only_images_the_loader_asked_for(tmp_path, setup):
    model, data = setup
    subset = evaluate(model, DataLoader(data, batch_size=8, sampler=SubsetRandomSampler(range(20))), progress=False)
    assert (subset.images, subset.skipped) == (20, 0)  # 80 images never asked for were not skipped
    dropped = evaluate(model, DataLoader(data, batch_size=32, drop_last=True), progress=False)
    assert (dropped.images, dropped.skipped) == (96, 0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / c / f"ok{i}.png")
    (tmp_path / "b" / "truncated.png").write_bytes((tmp_path / "b" / "ok0.png").read_bytes()[:40])
    two_class = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16,
                                  num_heads=2, num_classes=2)
    folder = open_dataset(tmp_path, transform=build_transform(resolve_data_config(two_class, img_size=32)))
    corrupt = [Path(p).name for p, _ in folder.samples].index("truncated.png")
    asked = [0, corrupt]  # one good image, one corrupt; the other 3 are never read
    with pytest.warns(UserWarning, match="truncated.png"):
        result = evaluate(two_class, DataLoader(folder, batch_size=2, sampler=asked,
                                                collate_fn=collate_skipping_corrupt), progress=False)
    assert (result.images, result.skipped) == (1, 1)
    with pytest.warns(UserWarning, match="truncated.png"):  # a batch sampler without a length: the whole dataset
        result = evaluate(two_class, DataLoader(folder, batch_sampler=[[0, 1], [2, 3, 4]],
                                                collate_fn=collate_skipping_corrupt), progress=False)
    assert (result.images, result.skipped) == (4, 1)
    with pytest.warns(UserWarning, match="truncated.png"):
        decoded = DecodedDataset(folder)  # drops the corrupt image once, before any loader
    result = evaluate(two_class, make_loader(decoded, batch_size=2), progress=False)
    assert (result.images, result.skipped) == (4, 1)


def test_model_mode_is_restored_when_scoring_fails(setup):
    _, data = setup
    wide = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=16,
                             num_heads=2, num_classes=7).train()
    with pytest.raises(LeanvitError, match="outputs per image"):
        evaluate(wide, make_loader(data, batch_size=32), progress=False)
    assert wide.training


def test_paired_comparison_counts_disagreements_and_gives_mcnemars_exact_p():
    from leanvit.evaluate import compare_paired

    labels = np.zeros(20, dtype=int)
    a = np.zeros(20, dtype=int)
    b = a.copy()
    b[:5] = 1  # b wrong on 5 images a gets right
    result = compare_paired(a, b, labels)
    assert (result.a_only, result.b_only) == (5, 0)
    assert result.p_value == pytest.approx(2 * 0.5**5)  # both one-sided tails of Binomial(5, 1/2)
    b[5] = 1
    a[6:8] = 1  # now 6 vs 2: p = 2 * (1 + 8 + 28) / 2**8
    result = compare_paired(a, b, labels)
    assert (result.a_only, result.b_only) == (6, 2)
    assert result.p_value == pytest.approx(round(2 * 37 / 256, 4))
    assert compare_paired(a, a, labels).p_value == 1.0  # no disagreement: no evidence either way
    with pytest.raises(LeanvitError, match="one prediction per label"):
        compare_paired(a[:3], b, labels)


def test_fewer_class_names_than_labels_is_an_error_naming_the_fix(setup):
    """A classes list shorter than the dataset's labels failed with a tensor size error from the confusion matrix."""
    model, data = setup
    five = lambda images: np.zeros((len(images), 5), np.float32)  # noqa: E731  (an engine runner's signature)
    with pytest.raises(LeanvitError, match=r"label \d, beyond the 5 classes given \(airplane, .*pass one name per"):
        evaluate(five, DataLoader(data, batch_size=25), classes=dataset_classes(data)[:5], progress=False)


def test_a_module_in_training_mode_is_scored_in_eval_mode_and_left_in_training_mode(setup):
    """Called mid-training (--val-data), the model is in training mode: scored so, dropout would drop and BatchNorm
    normalise with each batch's statistics (and update its running ones). It is scored as deployed, and handed back
    in the mode it came in."""
    import torch.nn as nn

    _, data = setup
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10), nn.BatchNorm1d(10), nn.Dropout(0.5))
    with torch.no_grad():
        model[2].running_mean.normal_()
        model[2].running_var.uniform_(0.5, 2.0)
    y, pred, top5 = _reference(model.eval(), data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate(model.train(), make_loader(data, batch_size=32), progress=False)
    assert result.top1 == pytest.approx(100 * np.mean(pred == y))
    assert result.top5 == pytest.approx(100 * np.mean(top5))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running statistics untouched
    evaluate(model.eval(), make_loader(data, batch_size=32), progress=False)
    assert not any(m.training for m in model.modules())  # and a model in eval mode stays so


def _predicting(n: int):
    """An engine runner whose top-1 is the class written in pixel (0, 0, 0) of each image, the rest ranked by
    distance from it: the test chooses every prediction."""
    def runner(images: np.ndarray) -> np.ndarray:
        chosen = images[:, 0, 0, 0][:, None]
        return -np.abs(np.arange(n, dtype=np.float32)[None] - chosen)
    return runner


def _images(labels, predictions):
    return [(torch.full((3, 4, 4), float(p)), y) for y, p in zip(labels, predictions)]


def test_most_confused_lists_only_confusions_that_happened_and_at_most_top_confusions():
    """With fewer distinct confusions than ``top_confusions``, pairs never confused (count 0) and the diagonal filled
    the list; and ``top_confusions`` must cut it, most frequent first."""
    data = _images([0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 1, 2, 2])  # a -> b twice, b -> c once
    classes = ["a", "b", "c"]
    result = evaluate(_predicting(3), make_loader(data, batch_size=4), classes=classes, progress=False)
    assert result.most_confused == [{"true": "a", "predicted": "b", "count": 2},
                                    {"true": "b", "predicted": "c", "count": 1}]
    assert result.top1 == pytest.approx(100 * 4 / 7, abs=1e-4) and result.top5 == 100.0  # 3 classes: top-5 is all
    assert result.per_class == pytest.approx({"a": 100 / 3, "b": 50.0, "c": 100.0}, abs=1e-4)
    one = evaluate(_predicting(3), make_loader(data, batch_size=4), classes=classes, top_confusions=1, progress=False)
    assert one.most_confused == [{"true": "a", "predicted": "b", "count": 2}]


def test_accuracies_are_over_the_images_that_decoded_not_the_skipped_ones():
    """A corrupt image is counted in ``skipped``, not as a wrong answer: top-1 and per-class are over the images
    scored."""
    data = [*_images([0, 1], [0, 0]), None]  # a dataset item of None: an image that did not decode
    result = evaluate(_predicting(2), make_loader(data, batch_size=3), classes=["a", "b"], progress=False)
    assert (result.images, result.skipped) == (2, 1)
    assert (result.top1, result.per_class) == (50.0, {"a": 100.0, "b": 0.0})


def test_a_dataset_of_which_no_image_decodes_is_an_error_not_a_division_by_zero():
    with pytest.raises(LeanvitError, match="No image of the dataset could be decoded"):
        evaluate(_predicting(2), make_loader([None, None, None], batch_size=2), classes=["a", "b"], progress=False)


def test_a_label_equal_to_the_number_of_classes_given_is_beyond_them():
    """The check is ``label >= classes``: label 1 with one class named must be the error naming the fix, not a tensor
    size error from the confusion matrix."""
    with pytest.raises(LeanvitError, match=r"label 1, beyond the 1 classes given \(a\)"):
        evaluate(_predicting(1), make_loader(_images([0, 1], [0, 0]), batch_size=2), classes=["a"], progress=False)


def test_outputs_of_more_than_one_dimension_per_image_are_refused_even_with_the_classes_first():
    """A model giving (batch, classes, k), such as a feature map with ``classes`` channels, is not a classifier: it
    must be refused, not scored by the ``topk`` of a 3-D tensor."""
    data = _images([0, 1, 2], [0, 1, 2])
    runner = lambda images: np.zeros((len(images), 3, 2), np.float32)  # noqa: E731
    with pytest.raises(LeanvitError, match=r"gives \(3, 2\) outputs per image but the data has 3 classes"):
        evaluate(runner, make_loader(data, batch_size=3), classes=["a", "b", "c"], progress=False)


def test_a_sampler_without_a_length_that_draws_images_twice_skips_none():
    """A sampler without ``len`` (a generator) is taken to ask for the whole dataset: it must not crash the count, and
    one that draws more images than the dataset holds (with replacement) skipped none, not a negative number."""
    data = _images([0, 1, 0], [0, 1, 1])
    draws = (i % 3 for i in range(5))  # 5 draws from 3 images
    loader = DataLoader(data, batch_size=2, sampler=draws, collate_fn=collate_skipping_corrupt)
    result = evaluate(_predicting(2), loader, classes=["a", "b"], progress=False)
    assert (result.images, result.skipped) == (5, 0)


def test_a_last_batch_one_short_is_padded_too_and_the_speed_is_images_per_second():
    """A fixed-batch engine gets full batches, a last one a single image short included; the speed counts images per
    second of the whole pass, timed here by a runner that takes 20 ms a batch."""
    import time

    seen, inner = [], _predicting(2)

    def slow(images: np.ndarray) -> np.ndarray:
        seen.append(len(images))
        time.sleep(0.02)
        return inner(images)

    data = _images([0, 1, 0, 1, 0], [0, 1, 0, 1, 0])
    started = time.perf_counter()
    result = evaluate(slow, make_loader(data, batch_size=3), classes=["a", "b"], progress=False)
    elapsed = time.perf_counter() - started
    assert seen == [3, 3] and (result.images, result.top1) == (5, 100.0)
    assert 0.04 <= result.seconds <= elapsed + 1e-3
    assert 5 / (elapsed + 0.01) <= result.images_per_s <= 5 / 0.04


def test_top5_is_over_the_images_that_decoded():
    data = [*_images([0, 6], [0, 0]), None]  # label 6 ranks 7th of 7 behind a prediction of 0: no top-5 hit
    result = evaluate(_predicting(7), make_loader(data, batch_size=3), classes=list("abcdefg"), progress=False)
    assert (result.images, result.skipped, result.top5) == (2, 1, 50.0)


def test_most_confused_can_list_more_pairs_than_classes():
    """``top_confusions`` caps the n * n - n off-diagonal pairs, not the n classes: 4 distinct confusions of 3 classes,
    most frequent first."""
    data = _images([0, 0, 0, 1, 1, 2, 2], [1, 1, 1, 0, 2, 0, 1])  # a->b 3 times, b->a, b->c, c->a, c->b once
    result = evaluate(_predicting(3), make_loader(data, batch_size=8), classes=["a", "b", "c"], progress=False)
    assert result.most_confused[0] == {"true": "a", "predicted": "b", "count": 3}
    assert len(result.most_confused) == 5 and all(c["count"] == 1 for c in result.most_confused[1:])


def test_paired_comparison_checks_the_labels_length_and_takes_column_vectors():
    from leanvit.evaluate import compare_paired

    labels = np.array([0, 1, 1, 0])
    a, b = np.array([0, 1, 0, 0]), np.array([1, 1, 1, 1])  # a alone right on 0 and 3, b alone on 2
    with pytest.raises(LeanvitError, match="got 4, 4 predictions for 3 labels"):
        compare_paired(a, b, labels[:3])
    column = compare_paired(a[:, None], b[:, None], labels)  # (n, 1) arrays, as a model's argmax(keepdim) gives
    assert (column.a_only, column.b_only) == (2, 1) and column.p_value == 1.0  # 2 * (1 + 3) / 8, capped at 1
