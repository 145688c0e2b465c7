"""Dataset layouts and the errors for bad data (empty folder, corrupt image, wrong label file)."""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leanvit.data import (
    BUNDLED_CIFAR10, CorruptImageWarning, DecodedDataset, IgnoredFilesWarning, bundled_cifar10, make_loader, open_dataset,
)
from leanvit.errors import LeanvitError

SHARED_CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _write_images(folder: Path, names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Random 8x8 images stored as PNG whatever the extension, so decoded pixels compare exactly."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels[name] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels[name]).save(path, format="PNG")
    return pixels


def test_image_folder_classes_targets_and_pixels(tmp_path):
    pixels = _write_images(tmp_path, ["cat/a.png", "cat/b.png", "dog/c.png"])
    ds = open_dataset(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 1]
    image, target = ds[2]
    assert target == 1 and np.array_equal(np.asarray(image), pixels["dog/c.png"])


def test_split_folders_pick_train_or_val(tmp_path):
    _write_images(tmp_path, ["train/a/1.png", "train/b/2.png", "train/b/3.png", "val/a/4.png", "val/b/5.png"])
    assert len(open_dataset(tmp_path, train=True)) == 3
    assert len(open_dataset(tmp_path, train=False)) == 2


def test_evaluation_reads_val_where_there_is_a_test_split_too(tmp_path):
    """The split names' order is a preference: val before test (a held-out test split stays unread), training
    before the rest."""
    _write_images(tmp_path, ["train/a/1.png", "training/a/2.png", "training/a/3.png", "val/a/4.png",
                             "test/a/5.png", "test/a/6.png"])
    assert len(open_dataset(tmp_path)) == 1 and len(open_dataset(tmp_path, train=True)) == 1


def test_every_evaluation_split_name_is_a_split_not_a_class(tmp_path):
    for name in ("valid", "validation"):
        _write_images(tmp_path / name, ["train/a/1.png", "train/b/2.png", f"{name}/a/4.png"])
        assert len(open_dataset(tmp_path / name)) == 1
    _write_images(tmp_path / "only", ["train/a/1.png", "train/b/2.png"])
    with pytest.raises(LeanvitError, match=r"split folder\(s\) train but no val / valid / validation / test / testing "
                                           r"split for evaluation. Pass the split folder itself \(e.g. .*only/train\)"):
        open_dataset(tmp_path / "only")


@pytest.mark.parametrize("train_name, eval_name", [("Train", "Test"), ("Training", "Testing"), ("TRAIN", "Val")])
def test_split_folders_are_splits_in_any_case_and_with_kaggles_names(tmp_path, train_name, eval_name):
    """Train/ and Test/ (Kaggle's Training/ and Testing/) were two classes, each split's images mixed into both."""
    _write_images(tmp_path, [f"{train_name}/cat/0.png", f"{train_name}/dog/1.png", f"{train_name}/dog/2.png",
                             f"{eval_name}/cat/3.png", f"{eval_name}/dog/4.png"])
    trainset, evalset = open_dataset(tmp_path, train=True), open_dataset(tmp_path)
    assert trainset.classes == evalset.classes == ["cat", "dog"]
    assert (trainset.targets, evalset.targets) == ([0, 1, 1], [0, 1])


def test_a_split_spelled_in_two_cases_is_an_error_and_a_capitalised_class_stays_a_class(tmp_path):
    _write_images(tmp_path / "twice", ["Train/cat/0.png", "train/cat/1.png", "val/cat/2.png"])
    with pytest.raises(LeanvitError, match=r"holds the split folders Train and train, one name in 2 cases: pass the "
                                           r"one to read itself \(e.g. .*twice/Train\), or merge them"):
        open_dataset(tmp_path / "twice", train=True)
    assert len(open_dataset(tmp_path / "twice")) == 1
    _write_images(tmp_path / "classes", ["Bicycle/0.png", "Test/1.png", "Training/2.png"])
    assert open_dataset(tmp_path / "classes", train=True).classes == ["Bicycle", "Test", "Training"]


def test_hidden_and_system_folders_are_not_classes_and_gifs_are_images(tmp_path):
    _write_images(tmp_path, ["cat/a.png", "dog/b.png", "dog/c.gif", "__MACOSX/cat/._a.png", "cat/._a.png",
                             "@eaDir/x/d.png", "dog/.thumb.png"])
    (tmp_path / ".ipynb_checkpoints").mkdir()
    ds = open_dataset(tmp_path)
    assert ds.classes == ["cat", "dog"] and [Path(p).name for p, _ in ds.samples] == ["a.png", "b.png", "c.gif"]


def test_files_that_are_not_read_are_named_by_type(tmp_path):
    _write_images(tmp_path / "tree", ["cat/a.png", "dog/b.png", "dog/c.psd", "cat/d.psd", "cat/._e.ico"])
    (tmp_path / "tree" / "cat" / "notes.txt").write_text("not an image")
    with pytest.warns(IgnoredFilesWarning, match=r"3 file\(s\) not read, not an image type by name \(\.psd 2, "
                                                 r"\.txt 1\)\. Image types: .*\.png"):
        assert len(open_dataset(tmp_path / "tree")) == 2

    _write_images(tmp_path / "flat", ["x1.png", "x2.ico"])  # the label file beside the images is not counted
    (tmp_path / "flat" / "labels.txt").write_text("x1.png 0\n")
    with pytest.warns(IgnoredFilesWarning, match=r"1 file\(s\) not read, not an image type by name \(\.ico 1\)"):
        open_dataset(tmp_path / "flat", labels=tmp_path / "flat" / "labels.txt")
    with pytest.warns(IgnoredFilesWarning, match=r"\(\.ico 1, \.txt 1\)"):
        assert len(open_dataset(tmp_path / "flat", unlabelled=True)) == 1


def test_images_beside_the_class_folders_are_named_and_read_where_no_label_is_needed(tmp_path):
    """They were dropped without a word, by calibration too (unlabelled: a folder of images with one sub-folder was
    read as that sub-folder alone)."""
    import warnings

    pixels = _write_images(tmp_path, ["cat/a.png", "dog/b.png", "x.png", "y.jpg", ".thumb.png"])
    with pytest.warns(IgnoredFilesWarning, match=r": 2 image file\(s\) \(x\.png, y\.jpg\) not read, directly in it "
                                                 r"beside its class folders, so of no class; move them into their "
                                                 r"class folders to use them\."):
        ds = open_dataset(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read, so no warning
        calib = open_dataset(tmp_path, train=True, unlabelled=True)
    assert calib.classes == ["cat", "dog", "."] and calib.targets == [0, 1, 2, 2] and len(calib) == 4
    assert np.array_equal(np.asarray(calib[3][0]), pixels["y.jpg"])


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(LeanvitError, match="No images found"):
        open_dataset(tmp_path)


def test_archive_instead_of_folder_says_extract(tmp_path):
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz"):
        pass
    with pytest.raises(LeanvitError, match="Extract it first"):
        open_dataset(archive)


def test_flat_images_without_label_file_ask_for_one(tmp_path):
    _write_images(tmp_path, ["a.png", "b.png"])
    with pytest.raises(LeanvitError, match="--labels"):
        open_dataset(tmp_path)


def test_corrupt_image_is_skipped_with_a_warning(tmp_path):
    _write_images(tmp_path, ["cat/a.png", "dog/b.png"])
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    ds = open_dataset(tmp_path, transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    with pytest.warns(CorruptImageWarning, match="broken.png"):
        batches = list(make_loader(ds, batch_size=8))
    images, targets = batches[0]
    assert len(ds) == 3 and images.shape[0] == 2 and targets.tolist() == [0, 1]


def test_an_image_whose_header_claims_a_huge_size_is_skipped_as_corrupt(tmp_path):
    """Pillow refuses it with a DecompressionBombError, not an OSError, which crashed the evaluation."""
    import io
    import struct

    _write_images(tmp_path, ["cat/a.png", "dog/b.png"])
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(gif, "GIF")
    header = bytearray(gif.getvalue())
    header[6:10] = struct.pack("<HH", 60000, 60000)  # the logical screen size, 3.6e9 pixels
    (tmp_path / "cat" / "bomb.gif").write_bytes(bytes(header))
    ds = open_dataset(tmp_path)
    with pytest.warns(CorruptImageWarning, match=r"skipping corrupt image .*bomb.gif: .*exceeds limit"):
        assert [ds[i] is None for i in range(len(ds))] == [False, True, False]


def test_a_class_folder_of_non_image_files_names_the_folder_and_the_files(tmp_path):
    """The error read 'Found no valid file for the classes b. . Remove ...', and came before the warning naming the
    files that were not read, so that was never shown."""
    _write_images(tmp_path, ["a/1.png"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("not an image")
    with pytest.warns(IgnoredFilesWarning, match=r"1 file\(s\) not read, not an image type by name \(\.txt 1\)"), \
            pytest.raises(LeanvitError, match=r"has 1 class folder\(s\) without an image \(b\)\. Remove the empty "
                                              r"class folders or add images to them\.$"):
        open_dataset(tmp_path)


def test_16_bit_and_float_grayscale_images_are_scaled_to_8_bits_not_clipped_white(tmp_path):
    levels = np.arange(64).reshape(8, 8)
    (tmp_path / "x").mkdir()
    Image.fromarray((levels * 1040).astype(np.uint16)).save(tmp_path / "x" / "a16.png")  # mode I;16
    Image.fromarray((levels / 63).astype(np.float32)).save(tmp_path / "x" / "f.tif")  # mode F, in [0, 1]
    Image.fromarray(levels.astype(np.uint8) * 4).save(tmp_path / "x" / "g8.png")
    ds = open_dataset(tmp_path, unlabelled=True)
    by_name = {Path(path).name: np.asarray(ds[i][0]) for i, (path, _) in enumerate(ds.samples)}
    np.testing.assert_array_equal(by_name["a16.png"][..., 0], np.rint(levels * 1040 * 255 / 65535))
    np.testing.assert_array_equal(by_name["f.tif"][..., 2], np.rint(levels / 63 * 255))
    np.testing.assert_array_equal(by_name["g8.png"][..., 1], levels * 4)


def test_decoded_dataset_holds_the_transformed_images_once(tmp_path):
    pixels = _write_images(tmp_path, ["cat/a.png", "cat/c.png", "dog/b.png"])
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    ds = open_dataset(tmp_path, transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    with pytest.warns(CorruptImageWarning, match="broken.png"):
        decoded = DecodedDataset(ds, batch_size=2)
    assert (len(decoded), decoded.skipped, decoded.classes) == (3, 1, ["cat", "dog"])
    x, y = next(iter(make_loader(decoded, batch_size=8)))
    assert y.tolist() == [0, 0, 1]
    assert torch.equal(x[2], torch.from_numpy(pixels["dog/b.png"]))


def test_label_file_with_names_ints_and_imagenet_csv(tmp_path):
    pixels = _write_images(tmp_path / "val", ["x1.JPEG", "x2.JPEG", "x3.JPEG"])
    names = tmp_path / "names.txt"
    names.write_text("x1.JPEG n02\nx2.JPEG n01\nx3.JPEG n02\n")
    ds = open_dataset(tmp_path / "val", labels=names)
    assert ds.classes == ["n01", "n02"] and ds.targets == [1, 0, 1]
    assert np.array_equal(np.asarray(ds[1][0]), pixels["x2.JPEG"])

    loc = tmp_path / "LOC_val_solution.csv"  # ImageNet's: no extension, synset first in a box list
    loc.write_text("ImageId,PredictionString\nx1,n02 1 2 3 4\nx2,n01 5 6 7 8 n01 1 1 2 2\nx3,n02 0 0 1 1\n")
    assert open_dataset(tmp_path / "val", labels=loc).targets == [1, 0, 1]

    ints = tmp_path / "ints.csv"
    ints.write_text("x1.JPEG,4\nx2.JPEG,0\nx3.JPEG,2\n")
    ds = open_dataset(tmp_path / "val", labels=ints, classes=[f"c{i}" for i in range(6)])
    assert ds.targets == [4, 0, 2] and len(ds.classes) == 6


def test_label_csv_with_more_columns_and_a_byte_order_mark(tmp_path):
    _write_images(tmp_path / "val", ["x1.png", "x2.png", "x3.png"])
    labels = tmp_path / "labels.csv"  # a spreadsheet's export: BOM, header, a third column, quoted names
    labels.write_bytes("\ufefffilename,label,synset\nx1.png,2,n02\n\"x2.png\",10,n10\nx3.png,2,n02\n".encode("utf-8"))
    ds = open_dataset(tmp_path / "val", labels=labels)
    assert ds.classes == [str(i) for i in range(11)] and ds.targets == [2, 10, 2]
    labels.write_bytes("x1.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(LeanvitError, match="is not UTF-8 text .*Save it as UTF-8"):
        open_dataset(tmp_path / "val", labels=labels)


@pytest.mark.parametrize("content, problem", [
    ("x1.png 0\nx2.png 1\nghost.png 1\n", "1 listed image(s) not in the folder (ghost.png)"),
    ("x1.png 0\n", "1 image(s) without a label (x2.png)"),
    ("x1.png 0\nx1.png 1\nx2.png 0\n", "lists x1.png twice"),
    ("0\n1\n", "expected 'filename label'"),
])
def test_label_file_that_disagrees_with_the_folder(tmp_path, content, problem):
    _write_images(tmp_path / "val", ["x1.png", "x2.png"])
    (tmp_path / "labels.txt").write_text(content)
    with pytest.raises(LeanvitError) as err:
        open_dataset(tmp_path / "val", labels=tmp_path / "labels.txt")
    assert problem in str(err.value)


def test_label_outside_given_classes_names_the_fix_from_the_cli_and_python(tmp_path):
    """The message said 'Pass the matching class list.', which no flag does."""
    _write_images(tmp_path / "val", ["x1.png"])
    (tmp_path / "labels.txt").write_text("x1.png n09\n")
    with pytest.raises(LeanvitError, match="n09") as err:
        open_dataset(tmp_path / "val", labels=tmp_path / "labels.txt", classes=["n01", "n02"])
    assert "Evaluate a checkpoint trained on these classes" in str(err.value)
    assert "open_dataset(..., classes=[" in str(err.value)
    (tmp_path / "labels.txt").write_text("x1.png 7\n")  # an index past a 5-class model's outputs
    with pytest.raises(LeanvitError, match=r"1 label\(s\) \(7\) outside the 5 classes its indices index") as err:
        open_dataset(tmp_path / "val", labels=tmp_path / "labels.txt", num_classes=5)
    assert "--model-kwargs '{\"num_classes\": N}'" in str(err.value) and "num_classes=N" in str(err.value)


def test_a_label_file_for_a_class_folder_tree_says_it_wants_a_flat_folder(tmp_path):
    """It said 'No images (...) in <dir>.' of a folder full of images."""
    _write_images(tmp_path / "tree", ["cat/a.png", "dog/b.png"])
    (tmp_path / "labels.txt").write_text("a.png 0\nb.png 1\n")
    with pytest.raises(LeanvitError, match="holds folders of images .* is for a flat folder of images. Drop it"):
        open_dataset(tmp_path / "tree", labels=tmp_path / "labels.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeanvitError, match="No images"):
        open_dataset(tmp_path / "empty", labels=tmp_path / "labels.txt")


def test_cifar10_python_pickles(tmp_path, monkeypatch):
    """torchvision's layout: 5 train batches + test_batch, rows of 3072 bytes in CHW order."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, 4).tolist()}
        (root / name).write_bytes(pickle.dumps(batches[name]))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))
    with pytest.raises(LeanvitError, match="incomplete or corrupt"):  # md5 sums of the real files
        open_dataset(tmp_path)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)

    test = open_dataset(tmp_path, train=False)
    assert len(test) == 4 and test.classes == classes and test.targets == batches["test_batch"]["labels"]
    expected = batches["test_batch"]["data"][2].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(test[2][0]), expected)
    train = open_dataset(root, train=True)
    assert len(train) == 20
    from torch.utils.data import Subset

    from leanvit.data import shared_images

    assert shared_images(test, open_dataset(tmp_path, train=False)) == [0, 1, 2, 3]  # the same pixels, compared
    assert shared_images(test, Subset(test, [2])) == [2]  # each row's own pixels
    assert shared_images(test, train) == []


def test_bundled_subset_is_balanced_and_decodes():
    ds = open_dataset(BUNDLED_CIFAR10)
    assert len(ds) == 500 and np.bincount(ds.targets).tolist() == [50] * 10
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck"
    image, target = ds[499]
    assert image.size == (32, 32) and target == 9 and ds.names[499].startswith("test/truck/")


def test_a_label_file_for_the_bundled_subset_is_an_error_not_ignored(tmp_path):
    (tmp_path / "labels.txt").write_text("a.jpg 0\n")
    with pytest.raises(LeanvitError, match="has its own labels.*flat folder"):
        open_dataset(BUNDLED_CIFAR10, labels=tmp_path / "labels.txt")


@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason="../shared/data/cifar10-jpeg.tar.gz is not present")
def test_bundled_subset_matches_the_archive():
    ds = bundled_cifar10()
    with tarfile.open(SHARED_CIFAR) as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers()}
        for i in (0, 137, 499):
            ref = Image.open(tar.extractfile(members[ds.names[i]])).convert("RGB")
            assert np.array_equal(np.asarray(ds[i][0]), np.asarray(ref))
            assert ds.classes[ds.targets[i]] == ds.names[i].split("/")[1]


def test_calibration_images_replace_the_ones_that_do_not_decode(tmp_path):
    from leanvit.data import calibration_images, calibration_subset

    _write_images(tmp_path, [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(5)])
    for c in ("cat", "dog"):
        (tmp_path / c / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    ds = open_dataset(tmp_path, transform=lambda im: torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    broken = {i for i, (path, _) in enumerate(ds.samples) if path.endswith("broken.png")}
    seed = next(s for s in range(100) if broken <= set(calibration_subset(ds, 6, seed=s).indices))
    with pytest.warns(CorruptImageWarning):  # the seed's draw of 6 holds both broken images
        found = calibration_images(ds, 6, batch_size=4, seed=seed)
    assert (len(found.indices), found.skipped) == (6, 2) and [b.shape[0] for b in found.batches] == [4, 2]
    assert not any(ds.samples[i][0].endswith("broken.png") for i in found.indices)
    with pytest.warns(CorruptImageWarning):  # more wanted than decode: what there is, the rest counted
        found = calibration_images(ds, 12)
    assert (len(found.indices), found.skipped) == (10, 2)


def test_shared_images_finds_the_same_image_under_any_path_name_or_layout(tmp_path):
    import shutil

    from torch.utils.data import Subset

    from leanvit.data import shared_images

    _write_images(tmp_path / "tree", ["cat/a.png", "dog/b.png", "dog/c.png"])
    first = open_dataset(tmp_path / "tree")
    second = open_dataset(str(tmp_path / "tree") + "/../tree")  # the same files by another path
    assert shared_images(second, Subset(first, [2])) == [2]
    flat = tmp_path / "flat"  # the same images copied, renamed, into a flat folder of another layout
    flat.mkdir()
    shutil.copy(tmp_path / "tree" / "dog" / "c.png", flat / "x.png")
    shutil.copy(tmp_path / "tree" / "cat" / "a.png", flat / "y.png")
    assert shared_images(first, open_dataset(flat, unlabelled=True)) == [0, 2]
    assert shared_images(Subset(first, [1, 2]), open_dataset(flat, unlabelled=True)) == [1]
    _write_images(tmp_path / "other", ["cat/a.png"], seed=1)  # same name, other pixels
    assert shared_images(first, open_dataset(tmp_path / "other")) == []
    # the shipped subset's JPEGs unpacked into a folder are the same images
    bundled = bundled_cifar10()
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    for i in (3, 7):
        start, end = bundled._offsets[i], bundled._offsets[i + 1]
        (unpacked / f"{i}.jpg").write_bytes(bundled._bytes[start:end].tobytes())
    assert shared_images(bundled, open_dataset(unpacked, unlabelled=True)) == [3, 7]
    assert shared_images(DecodedDataset(first.__class__(tmp_path / "tree", transform=lambda im: torch.zeros(1))),
                         first) is None


def test_a_file_that_cannot_be_stated_or_read_is_not_a_calibration_image(tmp_path, monkeypatch):
    """A broken link in --eval, which the evaluation skips as corrupt, crashed the check for calibration images in it
    (FileNotFoundError from a stat of every file)."""
    import shutil

    from leanvit.data import without_calibration_images

    _write_images(tmp_path, ["cat/0.png", "cat/1.png", "dog/2.png"])
    (tmp_path / "cat" / "link.png").symlink_to(tmp_path / "gone.png")
    shutil.copy(tmp_path / "cat" / "0.png", tmp_path / "dog" / "copy.png")  # a calibration image's size and bytes

    def read_bytes(path: Path, read=Path.read_bytes) -> bytes:  # as a file without read permission, even for root
        if path.name == "copy.png":
            raise PermissionError(13, "Permission denied", str(path))
        return read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    ds = open_dataset(tmp_path)
    names = [Path(path).name for path, _ in ds.samples]
    kept, note = without_calibration_images(ds, ds, [names.index("0.png")], tmp_path)
    assert [names[i] for i in kept.indices] == ["1.png", "link.png", "2.png", "copy.png"]
    assert note.startswith("1 of the --eval images are calibration images")


def test_images_in_linked_sub_folders_of_a_class_are_found_as_torchvision_finds_them(tmp_path):
    _write_images(tmp_path / "store", ["a/1.png", "a/2.png", "b/3.png"])
    for name, target in (("cat", "a"), ("dog", "b")):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "part1").symlink_to(tmp_path / "store" / target, target_is_directory=True)
    ds = open_dataset(tmp_path / "data")
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 1]


def test_hidden_and_system_folders_inside_a_class_are_not_read_and_are_counted(tmp_path):
    root = tmp_path / ".cache" / "data"  # a hidden folder above the root hides nothing
    _write_images(root, ["cat/a.png", "cat/@eaDir/a.png/SYNOPHOTO_THUMB_S.jpg", "cat/__MACOSX/y.jpg",
                         "cat/__MACOSX/._a.png", "dog/b.png", "dog/sub/.thumbnails/b.png", "dog/sub/c.png",
                         "dog/@eaDir/b.png/SYNOPHOTO_THUMB_S.jpg"])
    (root / "dog" / "@eaDir" / "b.png" / "SYNOINDEX_MEDIA_INFO").write_text("metadata")
    with pytest.warns(IgnoredFilesWarning, match=r"data: 4 image file\(s\) not read, inside hidden or system folders "
                                                 r"\(@eaDir 2, __MACOSX 1, \.thumbnails 1\), .*; move real images out") as caught:
        ds = open_dataset(root / ".." / "data", train=True)
    assert len(caught) == 1 and ds.classes == ["cat", "dog"]  # (the metadata file is not counted as a .psd would be)
    assert sorted(str(Path(p).relative_to(root / ".." / "data")) for p, _ in ds.samples) == [
        "cat/a.png", "dog/b.png", "dog/sub/c.png"]
    _write_images(tmp_path / "thumbs", ["cat/@eaDir/x.jpg/SYNOPHOTO_THUMB_S.jpg", "dog/__MACOSX/y.png"])
    with pytest.raises(LeanvitError, match="No images found under"):  # (not 2 classes of thumbnails)
        open_dataset(tmp_path / "thumbs")


def test_a_class_named_like_a_split_is_a_class_for_training_and_evaluation_alike(tmp_path):
    names = ["bicycle/1.png", "train/2.png", "train/3.png", "test/4.png", "train/@eaDir/2.png/THUMB.jpg"]
    _write_images(tmp_path / "c100", names)  # CIFAR-100 has a class 'train'
    for train in (True, False):
        with pytest.warns(IgnoredFilesWarning, match=r"\(@eaDir 1\)"):
            ds = open_dataset(tmp_path / "c100", train=train)
        assert ds.classes == ["bicycle", "test", "train"] and ds.targets == [0, 1, 2, 2]
    # splits beside a stray folder are still splits when they hold class folders
    _write_images(tmp_path / "splits", ["train/a/1.png", "train/b/2.png", "val/a/3.png", "notes/x.png"])
    assert len(open_dataset(tmp_path / "splits", train=True)) == 2 and len(open_dataset(tmp_path / "splits")) == 1


def test_a_class_named_like_a_split_whose_images_sit_in_sub_folders_is_not_read_as_a_split(tmp_path):
    # ImageNet-style classes and a class 'val' holding only a sub-folder: as a split it would be one class 'crops'
    _write_images(tmp_path / "inet", ["n01440764/a.png", "n01443537/b.png", "val/crops/c.png"])
    for train in (True, False):
        with pytest.raises(LeanvitError, match=r"inet reads two ways: val holds only sub-folders with images, .*; "
                                               r"beside it, 2 other folder\(s\) with images \(n01440764, n01443537\) "
                                               r"would be classes. If val is a split, pass it itself \(.*inet/val\); "
                                               r"if it is a class, move its images \(at least one\) out of its "
                                               r"sub-folders into .*inet/val\."):
            open_dataset(tmp_path / "inet", train=train)
    # a class with images of its own and a sub-folder is a class, as torchvision reads it, for training and evaluation
    _write_images(tmp_path / "c100", ["bicycle/1.png", "test/2.png", "test/extra/3.png"])
    for train in (True, False):
        ds = open_dataset(tmp_path / "c100", train=train)
        assert ds.classes == ["bicycle", "test"] and ds.targets == [0, 1, 1]
    # two split-named folders of sub-folders are splits only when they share a class name
    _write_images(tmp_path / "two", ["cat/1.png", "test/x/2.png", "train/y/3.png"])
    with pytest.raises(LeanvitError, match=r"test, train hold only sub-folders with images, .* but share no class "
                                           r"name as splits would; beside them, 1 other folder\(s\) with images \(cat\)"):
        open_dataset(tmp_path / "two")
    # one split beside folders without images, or beside a flat split (unlabelled test images), is still a split
    _write_images(tmp_path / "kaggle", ["train/a/1.png", "train/b/2.png", "test/3.png"])
    (tmp_path / "kaggle" / "meta").mkdir()
    (tmp_path / "kaggle" / "meta" / "notes.txt").write_text("not images")
    assert open_dataset(tmp_path / "kaggle", train=True).classes == ["a", "b"]
    assert len(open_dataset(tmp_path / "kaggle", unlabelled=True)) == 1


def test_splits_sharing_class_names_stay_splits_with_a_stray_image_beside_them(tmp_path):
    """A preview image at val's top level, and a samples/ folder of images, made such a root an error."""
    _write_images(tmp_path, ["train/cat/0.png", "train/dog/1.png", "val/cat/2.png", "val/dog/3.png", "val/preview.png",
                             "samples/4.png"])
    assert open_dataset(tmp_path, train=True).targets == [0, 1]
    with pytest.warns(IgnoredFilesWarning, match=r"val: 1 image file\(s\) \(preview\.png\) not read"):
        evalset = open_dataset(tmp_path)
    assert evalset.classes == ["cat", "dog"] and evalset.root == str(tmp_path / "val")


def test_decoded_dataset_drops_a_batch_of_only_corrupt_images_and_refuses_data_of_which_none_decodes(tmp_path):
    """A batch whose every image is corrupt comes out of the loader as ``None``: it is left out (not concatenated);
    a dataset of which no image decodes is the error naming it, not torch.cat's of an empty list."""
    _write_images(tmp_path, ["cat/a.png", "dog/b.png"])
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    ds = open_dataset(tmp_path, transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    with pytest.warns(CorruptImageWarning, match="broken.png"):
        decoded = DecodedDataset(ds, batch_size=1)  # the corrupt image is a batch of its own
    assert (len(decoded), decoded.skipped, decoded.tensors[1].tolist()) == (2, 1, [0, 1])
    with pytest.raises(LeanvitError, match="No image of the dataset could be decoded"):
        DecodedDataset([None, None])


def _train_order(data, batch_size, monkeypatch, world=1, rank=0, **kwargs):
    """The samples, batch by batch, one pass of a training loader over ``data`` gives on process ``rank`` of
    ``world`` (the distributed calls faked)."""
    import types

    import leanvit.data.loader as loader

    monkeypatch.setattr(loader, "dist", types.SimpleNamespace(
        is_initialized=lambda: world > 1, get_world_size=lambda: world, get_rank=lambda: rank))
    return [b[0].tolist() for b in make_loader(data, batch_size, train=True, **kwargs)]


def test_training_loader_shuffles_by_seed_and_drops_the_last_partial_batch(monkeypatch):
    """Training batches are full (drop_last: BatchNorm on a batch of one fails, a small last batch weighs its samples
    too much), in an order that is a shuffle fixed by ``seed`` (a resumed or repeated run sees the same order)."""
    data = torch.utils.data.TensorDataset(torch.arange(11), torch.zeros(11, dtype=torch.long))
    order = _train_order(data, 4, monkeypatch, seed=3)
    assert [len(b) for b in order] == [4, 4]  # 11 samples: the 3 left over are dropped
    flat = sum(order, [])
    assert len(set(flat)) == 8 and flat != sorted(flat)  # distinct samples, shuffled
    assert _train_order(data, 4, monkeypatch, seed=3) == order
    assert _train_order(data, 4, monkeypatch, seed=4) != order


def test_distributed_training_loaders_split_the_global_batches_of_one_process_between_ranks(monkeypatch):
    """On N processes each rank reads its own share (the sampler told the world size and the rank), and together
    they read the global batches one process reads with N times the batch: the same samples, the same order, each
    sample once (no padding with repeated samples: the sampler drops the remainder)."""
    data = torch.utils.data.TensorDataset(torch.arange(7), torch.zeros(7, dtype=torch.long))
    single = _train_order(data, 2, monkeypatch, seed=5)
    ranks = [_train_order(data, 1, monkeypatch, world=2, rank=r, seed=5) for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    assert [a + b for a, b in zip(*ranks)] == single


def test_not_read_files_are_counted_by_type_in_any_case_of_extension(tmp_path):
    _write_images(tmp_path, ["cat/a.png", "cat/b.PSD", "cat/c.psd", "cat/d.Psd"])
    with pytest.warns(IgnoredFilesWarning, match=r"3 file\(s\) not read, not an image type by name \(\.psd 3\)"):
        open_dataset(tmp_path)


def test_32_bit_integer_images_scale_by_their_range_and_float_images_beyond_one_are_read_as_0_to_255(tmp_path):
    """Mode I holds 8-bit levels (kept) or 16-bit ones (scaled from 65535); a float image in [0, 255] is not one in
    [0, 1] (which would turn it all white)."""
    levels = np.arange(64).reshape(8, 8)
    (tmp_path / "x").mkdir()
    Image.fromarray((levels * 1000).astype(np.int32)).save(tmp_path / "x" / "i16.tif")  # mode I, up to 63000
    Image.fromarray((levels * 4).astype(np.int32)).save(tmp_path / "x" / "i8.tif")  # mode I, up to 252
    Image.fromarray((levels * 4.0).astype(np.float32)).save(tmp_path / "x" / "f255.tif")  # mode F, up to 252
    ds = open_dataset(tmp_path, unlabelled=True)
    by_name = {Path(path).name: np.asarray(ds[i][0]) for i, (path, _) in enumerate(ds.samples)}
    assert {Image.open(tmp_path / "x" / n).mode for n in ("i16.tif", "i8.tif")} == {"I"}
    np.testing.assert_array_equal(by_name["i16.tif"][..., 0], np.rint(levels * 1000 * 255 / 65535))
    np.testing.assert_array_equal(by_name["i8.tif"][..., 1], levels * 4)
    np.testing.assert_array_equal(by_name["f255.tif"][..., 2], levels * 4)


def test_an_image_folder_without_any_class_folder_says_so(tmp_path):
    from leanvit.data.datasets import ImageFolderDataset

    _write_images(tmp_path, ["a.png"])
    (tmp_path / ".cache").mkdir()
    with pytest.raises(LeanvitError, match=r"has no class folder; expected root/<class>/<image>\.$"):
        ImageFolderDataset(tmp_path)


def test_label_file_samples_and_unlabelled_images_are_in_file_name_order(tmp_path):
    """Whatever the label file's order or the folder listing's, so a dataset's indices name the same images."""
    names = [f"x{i:02d}.png" for i in (7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6)]
    _write_images(tmp_path / "val", names)
    (tmp_path / "labels.txt").write_text("".join(f"{name} {i % 3}\n" for i, name in enumerate(names)))
    ds = open_dataset(tmp_path / "val", labels=tmp_path / "labels.txt")
    assert [Path(p).name for p, _ in ds.samples] == sorted(names)
    assert ds.targets == [names.index(name) % 3 for name in sorted(names)]
    flat = open_dataset(tmp_path / "val", unlabelled=True)
    assert [Path(p).name for p, _ in flat.samples] == sorted(names) and flat.targets == [0] * 12


@pytest.mark.parametrize("name", ["data.zip", "data.tgz", "data.tar"])
def test_every_archive_type_says_extract(tmp_path, name):
    (tmp_path / name).write_bytes(b"archive")
    with pytest.raises(LeanvitError, match=r"is a file; expected a folder\. Extract it first"):
        open_dataset(tmp_path / name)
    (tmp_path / "image.png").write_bytes(b"image")
    with pytest.raises(LeanvitError, match=r"is a file; expected a folder\.$"):
        open_dataset(tmp_path / "image.png")


def test_a_root_of_split_folders_alone_is_split_even_when_they_hold_no_class_folder(tmp_path):
    """train/ and test/ of unlabelled images (Kaggle's test split): calibration reads the split, not two classes."""
    _write_images(tmp_path, ["train/1.png", "train/2.png", "test/3.png"])
    for train, count in ((True, 2), (False, 1)):
        ds = open_dataset(tmp_path, train=train, unlabelled=True)
        assert len(ds) == count and ds.classes == ["unlabelled"]
    with pytest.raises(LeanvitError, match=r"test holds 1 images but no class folders"):
        open_dataset(tmp_path)


def test_a_split_named_folder_beside_folders_whose_images_sit_in_sub_folders_reads_two_ways(tmp_path):
    _write_images(tmp_path, ["cat/part1/a.png", "dog/part1/b.png", "val/crops/c.png"])
    with pytest.raises(LeanvitError, match=r"reads two ways: val holds only sub-folders with images, .*; beside it, 2 "
                                           r"other folder\(s\) with images \(cat, dog\) would be classes"):
        open_dataset(tmp_path)


def test_a_folder_named_like_an_image_is_a_class_not_an_image(tmp_path):
    _write_images(tmp_path, ["b/1.png", "logo.png/2.png"])
    for unlabelled in (False, True):
        ds = open_dataset(tmp_path, unlabelled=unlabelled)
        assert ds.classes == ["b", "logo.png"] and ds.targets == [0, 1]


def test_label_csv_class_names_keep_their_spaces_and_blank_spreadsheet_rows_are_skipped(tmp_path):
    _write_images(tmp_path / "val", ["x1.png", "x2.png"])
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nx1.png,tabby cat\nx2.png,golden retriever\n,\n,,\n")
    ds = open_dataset(tmp_path / "val", labels=labels)
    assert ds.classes == ["golden retriever", "tabby cat"] and ds.targets == [1, 0]


def test_a_long_list_of_images_without_a_label_names_five_and_counts_the_rest(tmp_path):
    _write_images(tmp_path / "val", [f"x{i}.png" for i in range(8)])
    (tmp_path / "labels.txt").write_text("x0.png 0\n")
    with pytest.raises(LeanvitError, match=r"7 image\(s\) without a label \(x1\.png, x2\.png, x3\.png, x4\.png, "
                                           r"x5\.png, \.\.\. \(2 more\)\)\. Pass the label file"):
        open_dataset(tmp_path / "val", labels=tmp_path / "labels.txt")


def test_dataset_classes_of_a_subset_of_a_subset(tmp_path):
    from torch.utils.data import Subset

    from leanvit.data import dataset_classes

    _write_images(tmp_path, ["cat/a.png", "dog/b.png", "eel/c.png"])
    ds = open_dataset(tmp_path)
    assert dataset_classes(Subset(Subset(ds, [1, 2]), [0])) == ["cat", "dog", "eel"]


def test_an_unreadable_calibration_image_matches_no_unreadable_eval_image(tmp_path, monkeypatch):
    """Two files of one size that cannot be read are not copies of each other (no bytes compared)."""
    from torch.utils.data import Subset

    from leanvit.data import shared_images

    _write_images(tmp_path / "calib", ["cat/0.png"])
    _write_images(tmp_path / "eval", ["cat/1.png"], seed=1)  # the same size (8x8 random PNG), other pixels
    (tmp_path / "eval" / "cat" / "2.png").write_bytes((tmp_path / "calib" / "cat" / "0.png").read_bytes())

    def read_bytes(path: Path, read=Path.read_bytes) -> bytes:
        if path.name in ("0.png", "1.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return read(path)

    calib, evalset = open_dataset(tmp_path / "calib"), open_dataset(tmp_path / "eval")
    assert (tmp_path / "eval" / "cat" / "1.png").stat().st_size == (tmp_path / "calib" / "cat" / "0.png").stat().st_size
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert shared_images(evalset, Subset(calib, [0])) == []


def test_calibration_images_come_with_their_labels(tmp_path):
    from leanvit.data import calibration_images

    _write_images(tmp_path, [f"{c}/{i}.png" for c in ("cat", "dog", "eel") for i in range(3)])
    ds = open_dataset(tmp_path, transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    found = calibration_images(ds, 7, batch_size=3, seed=1)
    assert torch.cat(found.labels).tolist() == [ds.targets[i] for i in found.indices]
    assert sorted(set(torch.cat(found.labels).tolist())) == [0, 1, 2] and [len(b) for b in found.labels] == [3, 3, 1]


def test_label_files_mixing_names_and_numbers_are_names_and_indices_stay_within_the_classes_given(tmp_path):
    _write_images(tmp_path / "val", ["x1.png", "x2.png"])
    labels = tmp_path / "labels.txt"
    labels.write_text("x1.png cat\nx2.png 3\n")
    assert open_dataset(tmp_path / "val", labels=labels).classes == ["3", "cat"]
    labels.write_text("x1.png 0\nx2.png 3\n")  # 3 is a model's output, but not one of the two classes named
    with pytest.raises(LeanvitError, match=r"1 label\(s\) \(3\) outside the 2 classes its indices index"):
        open_dataset(tmp_path / "val", labels=labels, classes=["a", "b"], num_classes=5)


def test_imagenet_loc_csv_with_spaced_header_and_an_image_without_boxes(tmp_path):
    _write_images(tmp_path / "val", ["x1.JPEG", "x2.JPEG"])
    loc = tmp_path / "LOC_val_solution.csv"
    loc.write_text("ImageId, PredictionString\nx1,n02 1 2 3 4\nx2,n01 5 6 7 8\n")  # the header's space: still LOC
    assert open_dataset(tmp_path / "val", labels=loc).classes == ["n01", "n02"]
    loc.write_text("ImageId,PredictionString\nx1,n02 1 2 3 4\nx2,\n")
    with pytest.raises(LeanvitError, match=r"LOC_val_solution.csv:3: expected 'filename label', got 'x2,'"):
        open_dataset(tmp_path / "val", labels=loc)


def test_a_stale_label_file_in_the_folder_is_counted_as_not_read_when_another_is_passed(tmp_path):
    _write_images(tmp_path / "val", ["x1.png"])
    (tmp_path / "val" / "labels.txt").write_text("old.png 0\n")
    (tmp_path / "labels.txt").write_text("x1.png 0\n")
    with pytest.warns(IgnoredFilesWarning, match=r"1 file\(s\) not read, not an image type by name \(\.txt 1\)"):
        assert len(open_dataset(tmp_path / "val", labels=tmp_path / "labels.txt")) == 1


def test_calibration_images_try_the_last_untried_image_for_one_that_did_not_decode(tmp_path):
    from leanvit.data import calibration_images, calibration_subset

    _write_images(tmp_path, ["cat/0.png", "cat/1.png", "cat/2.png"])
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    ds = open_dataset(tmp_path, transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    broken = next(i for i, (path, _) in enumerate(ds.samples) if path.endswith("broken.png"))
    seed = next(s for s in range(100) if broken in calibration_subset(ds, 3, seed=s).indices)
    with pytest.warns(CorruptImageWarning):
        found = calibration_images(ds, 3, seed=seed)
    assert (sorted(found.indices), found.skipped) == (sorted(set(range(4)) - {broken}), 1)
