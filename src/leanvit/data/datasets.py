"""Image classification datasets behind one entry point, :func:`open_dataset`.

Every dataset here yields ``(image, class_index)`` and exposes ``classes`` (names, index order)
and ``targets`` (one index per sample, known without decoding an image), which is what the
calibration sampler and the per-class report need.

Corrupt images are skipped, not fatal: a file PIL cannot decode is reported with a warning and
its sample comes back as ``None``; :func:`collate_skipping_corrupt` drops it from the batch, and
:func:`leanvit.evaluate.evaluate` counts it (``skipped``) so an accuracy is never silently
computed over fewer images than the folder holds.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import warnings
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import LeanvitError, LeanvitWarning

#: Name of the CIFAR-10 test subset shipped inside the package (see ``assets/README.md``).
BUNDLED_CIFAR10 = "cifar10-test500"
_BUNDLED_FILE = "cifar10_test500.npz"
_HEADER_NAMES = {"imageid", "image", "filename", "file", "path", "name"}
#: torchvision's image types and the other photo formats Pillow decodes: a folder's GIFs are images too.
IMAGE_EXTENSIONS = tuple(sorted({*IMG_EXTENSIONS, ".gif", ".jfif", ".jpe", ".avif", ".apng", ".jp2", ".pnm", ".pbm",
                                 ".qoi", ".tga"}))
#: Sub-folder names of a dataset's splits, in any case (``Train``, Kaggle's ``Training`` / ``Testing``): an evaluation
#: reads the first of these that exists, a training the first of its own.
EVAL_SPLITS, TRAIN_SPLITS = ("val", "valid", "validation", "test", "testing"), ("train", "training")


def _hidden(name: str) -> bool:
    """Files and folders that operating systems and tools leave in a dataset, never classes or images: dot files
    (``.ipynb_checkpoints``, macOS's ``._*`` resource forks), macOS's ``__MACOSX`` from zip files, Synology's
    ``@eaDir``."""
    return name.startswith((".", "__MACOSX", "@eaDir"))


class CorruptImageWarning(LeanvitWarning):
    """An image file that could not be decoded and was skipped."""


class IgnoredFilesWarning(LeanvitWarning):
    """Files in a dataset folder that are not read: not an image type by name (:data:`IMAGE_EXTENSIONS`), or images
    inside a hidden or system folder (:func:`_hidden`)."""


class _FileFilter:
    """The image-file test of a walk of ``root`` (:func:`_image_name`) that also counts what it passes over, so that
    a folder's .psd or .ico images are not dropped without a word: other files by type, and the images inside a
    hidden or system folder anywhere below ``root`` (Synology's ``@eaDir`` thumbnails in every folder, ``__MACOSX``),
    which are not read, by that folder's name. Hidden and system files themselves are not counted."""

    def __init__(self, root: Path):
        self.depth = len(Path(root).expanduser().parts)
        self.ignored, self.in_hidden = Counter(), Counter()
        self.with_images = set()  # the folders right below root that hold an image passed (a class's)

    def __call__(self, path: str | Path) -> bool:
        path = Path(path)
        folder = next((part for part in path.parts[self.depth:-1] if _hidden(part)), None)
        if _image_name(path):
            if folder is None:
                self.with_images.add(path.parts[self.depth])
                return True
            self.in_hidden[folder] += 1
        elif folder is None and not _hidden(path.name):
            self.ignored[path.suffix.lower() or "(no extension)"] += 1
        return False

    def warn(self, root: Path) -> None:
        if self.ignored:
            kinds = ", ".join(f"{suffix} {n}" for suffix, n in self.ignored.most_common())
            warnings.warn(f"{root}: {sum(self.ignored.values())} file(s) not read, not an image type by name "
                          f"({kinds}). Image types: {', '.join(IMAGE_EXTENSIONS)}; convert the others (e.g. to PNG) "
                          "to use them.", IgnoredFilesWarning, stacklevel=3)
        if self.in_hidden:
            kinds = ", ".join(f"{folder} {n}" for folder, n in self.in_hidden.most_common())
            warnings.warn(f"{root}: {sum(self.in_hidden.values())} image file(s) not read, inside hidden or system "
                          f"folders ({kinds}), where tools keep thumbnails and metadata; move real images out of such "
                          "folders to use them.", IgnoredFilesWarning, stacklevel=3)


def _load_rgb(path: str | Path) -> Image.Image | None:
    """The image as RGB, or ``None`` (with a warning) when the file cannot be decoded. That includes a header
    claiming more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS`` (its ``DecompressionBombError``, not an
    ``OSError``), most often a corrupt one."""
    try:
        with open(path, "rb") as f:
            return _to_rgb(Image.open(f))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        warnings.warn(f"skipping corrupt image {path}: {e}", CorruptImageWarning, stacklevel=2)
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. Pillow's ``convert`` clips 16-bit grayscale (a medical or scientific PNG, mode
    ``I;16`` / ``I``) at 255, so nearly every pixel turns white; those are scaled to 8 bits first, and float images
    (mode ``F``) from [0, 1] where that is their range."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535 if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max() > 255) else (
            1.0 if image.mode == "F" and pixels.max() <= 1.0 else 255)
        image = Image.fromarray(np.clip(np.rint(pixels * (255 / top)), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def collate_skipping_corrupt(batch: Sequence) -> list | None:
    """``default_collate`` over the samples whose image decoded; ``None`` if none did."""
    batch = [s for s in batch if s is not None]
    return default_collate(batch) if batch else None


class ImageFolderDataset(ImageFolder):
    """torchvision's ``root/<class>/<image>`` layout, skipping undecodable and hidden files (:func:`_hidden`).

    Images in ``root`` itself, beside the class folders, have no class: they are left out with a warning, or, with
    ``root_images`` (where labels are not used: calibration), read as the images of one more class, ``"."``.
    """

    def __init__(self, root: Path, transform: Callable | None = None, root_images: bool = False):
        is_image = _FileFilter(root)
        try:
            super().__init__(str(root), transform=transform, loader=_load_rgb, is_valid_file=is_image)
        except FileNotFoundError:  # a class folder without a single image
            is_image.warn(root)  # (first: the files not read may be what that folder holds)
            folders = {p.name for p in Path(root).iterdir() if p.is_dir() and not _hidden(p.name)}
            if not folders:
                raise LeanvitError(f"{root} has no class folder; expected root/<class>/<image>.") from None
            empty = sorted(folders - is_image.with_images)
            raise LeanvitError(f"{root} has {_listing(empty, 'class folder(s) without an image')}. Remove the empty "
                               "class folders or add images to them.") from None
        is_image.warn(root)
        own = sorted(_images_in(Path(root)))
        if own and root_images:
            self.class_to_idx["."] = len(self.classes)
            self.classes.append(".")
            self.samples += [(str(path), self.class_to_idx["."]) for path in own]  # (self.imgs is the same list)
            self.targets += [self.class_to_idx["."]] * len(own)
        elif own:
            warnings.warn(f"{root}: {_listing([path.name for path in own], 'image file(s)')} not read, directly in "
                          "it beside its class folders, so of no class; move them into their class folders to use "
                          "them.", IgnoredFilesWarning, stacklevel=2)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(p.name for p in Path(directory).iterdir() if p.is_dir() and not _hidden(p.name))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}")
        return classes, {c: i for i, c in enumerate(classes)}

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = self.loader(path)
        if image is None:
            return None
        return (self.transform(image) if self.transform else image), target


class _ImageFiles(Dataset):
    """``samples``, a list of ``(image path, target)``, read on demand; ``None`` for an image that does not decode."""

    samples: list
    transform: Callable | None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = _load_rgb(path)
        if image is None:
            return None
        return (self.transform(image) if self.transform else image), target


class LabelFileDataset(_ImageFiles):
    """A flat folder of images and a file mapping each one to its class (ImageNet's val layout).

    The label file has one ``filename label`` line per image (comma or whitespace separated; an
    optional header line is skipped). ``label`` is a class index or a class name; names are
    indexed in sorted order (the ImageNet synset order timm's heads use) unless ``classes`` is
    given. Indices index ``classes``, else ``num_classes`` classes (a model's outputs: a subset's labels may not
    reach the last one), else as many as the largest label. ImageNet's ``LOC_val_solution.csv`` works as is: the
    image id has no extension and the first word of its ``PredictionString`` is the synset.
    """

    def __init__(self, root: Path, label_file: Path, transform: Callable | None = None,
                 classes: Sequence[str] | None = None, num_classes: int | None = None):
        self.root, self.transform = root, transform
        images = {p.name: p for p in _flat_images(root, Path(label_file))}
        if not images:
            if _holds_class_folders(root):  # a class-folder tree, which labels its images itself
                raise LeanvitError(f"{root} holds folders of images (class folders), no image of its own: a label "
                                   "file (--labels, labels=) is for a flat folder of images. Drop it (class folders "
                                   "give the labels), or pass the flat folder the label file belongs to.")
            raise LeanvitError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {root}.")
        rows = _read_label_file(Path(label_file), images)
        by_stem = {Path(n).stem: n for n in images}
        named, missing = {}, []
        for name, label in rows:
            key = name if name in images else by_stem.get(name)
            if key is None:
                missing.append(name)
            elif key in named:
                raise LeanvitError(f"{label_file} lists {name} twice; each image needs exactly one label.")
            else:
                named[key] = label
        unlabelled = sorted(set(images) - set(named))
        if missing or unlabelled:
            raise LeanvitError(
                f"Label file {label_file} disagrees with the folder {root}: "
                + _listing(missing, "listed image(s) not in the folder")
                + ("; " if missing and unlabelled else "")
                + _listing(unlabelled, "image(s) without a label")
                + ". Pass the label file that belongs to this folder."
            )
        labels = list(named.values())
        if all(label.isdigit() for label in labels):
            count = num_classes or max(map(int, labels)) + 1
            self.classes = list(classes) if classes else [str(i) for i in range(count)]
            index = {str(i): i for i in range(len(self.classes))}
        else:
            self.classes = list(classes) if classes else sorted(set(labels))
            index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            if all(label.isdigit() for label in labels):
                fix = ("its indices index (the model's outputs, or the checkpoint's classes). Evaluate a model with as "
                       "many outputs as the file has classes (its checkpoint, or --model-kwargs "
                       "'{\"num_classes\": N}'), or pass the label file made for this model; from Python, "
                       "open_dataset(..., num_classes=N) or classes=[the class names, in the model's output order].")
            else:
                fix = ("given (the checkpoint's class names, or an ImageNet model's synsets). Evaluate a checkpoint "
                       "trained on these classes (it names them), or write the labels as indices of the model's "
                       "outputs; from Python, open_dataset(..., classes=[the class names, in the model's output "
                       "order]).")
            raise LeanvitError(f"Label file {label_file} uses {_listing(unknown, 'label(s)')} outside the "
                               f"{len(self.classes)} classes {fix}")
        self.samples = [(images[n], index[named[n]]) for n in sorted(named)]
        self.targets = [t for _, t in self.samples]


class UnlabelledImages(_ImageFiles):
    """A flat folder of images without labels: calibration needs none. One class, so the class-balanced draws
    of :func:`calibration_subset` are plain random ones."""

    classes = ["unlabelled"]

    def __init__(self, root: Path, transform: Callable | None = None):
        self.transform = transform
        self.samples = [(path, 0) for path in sorted(_flat_images(root))]
        self.targets = [0] * len(self.samples)


class PackedJpegDataset(Dataset):
    """JPEG files packed into one ``.npz`` (bytes, offsets, labels): the shipped test subset.

    The bytes are the original JPEG files, so decoding gives exactly the pixels the unpacked
    ImageFolder would.
    """

    def __init__(self, npz: Path | str, transform: Callable | None = None):
        with np.load(npz) as z:
            self._bytes, self._offsets = z["jpeg"], z["offsets"]
            self.targets = z["labels"].tolist()
            self.classes = z["classes"].tolist()
            self.names = z["names"].tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        start, end = self._offsets[index], self._offsets[index + 1]
        image = Image.open(io.BytesIO(self._bytes[start:end].tobytes())).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


def bundled_cifar10(transform: Callable | None = None) -> PackedJpegDataset:
    """The 500-image class-balanced CIFAR-10 test subset that ships with leanvit."""
    return PackedJpegDataset(resources.files("leanvit").joinpath("assets", _BUNDLED_FILE), transform)


def open_dataset(source: str | Path, *, train: bool = False, transform: Callable | None = None,
                 labels: str | Path | None = None, classes: Sequence[str] | None = None,
                 num_classes: int | None = None, unlabelled: bool = False) -> Dataset:
    """Open ``source`` in whichever supported layout it has.

    - ``"cifar10-test500"``: the subset shipped with leanvit;
    - a folder holding ``cifar-10-batches-py`` (CIFAR-10's python pickles), train or test split;
    - a folder with ``train/`` (or ``training/``) and ``val/`` (or ``valid/``, ``validation/``, ``test/``,
      ``testing/``) sub-folders, in any case (``Train/``): the split ``train`` picks. Those are splits when every
      sub-folder is one. Otherwise they may be classes of the same name (CIFAR-100 has a class ``train``; a class's
      images may sit in sub-folders of it): they are splits when one holds class folders and no image of its own, as
      a split does, and either no other folder holds images or two such share a class name; classes when none does.
      One such beside other folders with images reads both ways: an error names them (pass the split folder itself);
    - an ImageFolder tree ``root/<class>/<image>`` (images beside the class folders are read only where the labels
      are not needed, ``unlabelled=True``: see :class:`ImageFolderDataset`);
    - a flat folder of images with ``labels``, a label file (see :class:`LabelFileDataset`), or, where the
      labels are not needed (``unlabelled=True``: calibration), without (:class:`UnlabelledImages`).
    """
    if str(source) == BUNDLED_CIFAR10:
        if labels is not None:
            raise LeanvitError(f"'{BUNDLED_CIFAR10}' has its own labels; a label file (--labels) is for a flat "
                               "folder of images: drop it, or pass that folder.")
        return bundled_cifar10(transform)
    root = Path(source).expanduser()
    if not root.exists():
        raise LeanvitError(f"Data path {root} does not exist.")
    if root.is_file():
        hint = (f" Extract it first (mkdir -p DIR && tar -xf {root} -C DIR) and pass DIR."
                if ".tar" in root.suffixes or root.suffix in {".tgz", ".zip"} else "")
        raise LeanvitError(f"Data path {root} is a file; expected a folder.{hint}")
    if labels is not None:
        return LabelFileDataset(root, Path(labels), transform, classes, num_classes)
    pickles = root if root.name == "cifar-10-batches-py" else root / "cifar-10-batches-py"
    if pickles.is_dir():
        try:
            return CIFAR10(str(pickles.parent), train=train, transform=transform, download=False)
        except RuntimeError as e:  # torchvision's checksum test failed
            raise LeanvitError(f"{pickles} is incomplete or corrupt (torchvision: {e}). Download and "
                               "extract CIFAR-10's python version again.") from None
    folders = {d.name for d in root.iterdir() if d.is_dir() and not _hidden(d.name)}
    splits = sorted(name for name in folders if name.lower() in {*TRAIN_SPLITS, *EVAL_SPLITS})
    if splits and _split_organised(root, folders, splits):
        wanted = TRAIN_SPLITS if train else EVAL_SPLITS
        split = next((named for name in wanted if (named := [f for f in splits if f.lower() == name])), None)
        if split is None:
            raise LeanvitError(f"{root} holds the split folder(s) {', '.join(splits)} but no {' / '.join(wanted)} "
                               f"split for {'training' if train else 'evaluation'}. Pass the split folder itself "
                               f"(e.g. {root / splits[0]}).")
        if len(split) > 1:
            raise LeanvitError(f"{root} holds the split folders {' and '.join(split)}, one name in {len(split)} cases: "
                               f"pass the one to read itself (e.g. {root / split[0]}), or merge them.")
        root = root / split[0]
    if _holds_class_folders(root):
        return ImageFolderDataset(root, transform, root_images=unlabelled)
    if unlabelled and any(_images_in(root)):  # (the dataset lists them: not here as well)
        return UnlabelledImages(root, transform)
    flat = list(_images_in(root))
    if flat:
        raise LeanvitError(
            f"{root} holds {len(flat)} images but no class folders. Pass a label file (--labels FILE, "
            "lines 'filename label', or ImageNet's LOC_val_solution.csv), or sort the images into "
            "one folder per class."
        )
    raise LeanvitError(
        f"No images found under {root}. Expected class folders (root/<class>/<image>), "
        f"a flat folder with a label file, or CIFAR-10's cifar-10-batches-py; image types: "
        f"{', '.join(IMAGE_EXTENSIONS)}."
    )


def _split_organised(root: Path, folders: set[str], splits: list[str]) -> bool:
    """Whether the split-named ``splits`` among ``root``'s sub-folders ``folders`` are splits, not classes of those
    names (CIFAR-100 has a class 'train', and a class's images may sit in sub-folders of it, as torchvision reads
    them). They are when every sub-folder is one, or when two of them hold class folders sharing a name, as splits
    do (a stray image beside those changes nothing). Otherwise a split holds class folders and no image of its own;
    when one does, it is a split if no other folder holds images (no other class), and otherwise the root reads both
    ways: a LeanvitError names the folders and both fixes rather than guess."""
    if folders == set(splits):
        return True
    holding = {name: set(_class_folders(root / name)) for name in splits}
    found = [names for names in holding.values() if names]
    if len(set().union(*found)) < sum(map(len, found)):
        return True
    split_like = [name for name in splits if holding[name] and not any(_images_in(root / name))]
    if not split_like:
        return False
    others = sorted(name for name in folders - set(splits) if any(_images_in(root / name, recursive=True)))
    if not others:
        return True
    one, first = len(split_like) == 1, root / split_like[0]
    raise LeanvitError(
        f"{root} reads two ways: {', '.join(split_like)} {'holds' if one else 'hold'} only sub-folders with images, "
        f"as a split holds its class folders{'' if one else ', but share no class name as splits would'}; beside "
        f"{'it' if one else 'them'}, {_listing(others, 'other folder(s) with images')} would be classes. If "
        + (f"{split_like[0]} is a split, pass it itself ({first}); if it is a class, move its images (at least one) "
           f"out of its sub-folders into {first}." if one else
           f"they are splits, pass the split folder itself (e.g. {first}); if classes, move each one's images (at "
           f"least one) out of its sub-folders into it (e.g. into {first}).")
    )


def _holds_class_folders(folder: Path) -> bool:
    """Whether ``folder`` has a sub-folder (not a hidden or system one) with an image in it or below it."""
    return any(_class_folders(folder))


def _class_folders(folder: Path):
    """The names of ``folder``'s sub-folders (not hidden or system ones) with an image in them or below them."""
    return (d.name for d in folder.iterdir() if d.is_dir() and not _hidden(d.name) and any(_images_in(d, recursive=True)))


def _images_in(folder: Path, recursive: bool = False):
    """The image files in ``folder``, or also below it (``recursive``: not inside hidden or system folders), by name.
    The walk follows folder links as torchvision's does (``Path.rglob`` does not), so a class whose images sit in a
    linked sub-folder is found."""
    if not recursive:
        yield from (p for p in folder.iterdir() if _image_name(p) and p.is_file())
        return
    for top, folders, names in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not _hidden(name)]
        yield from (p for p in map(Path(top).joinpath, names) if _image_name(p) and p.is_file())


def _flat_images(folder: Path, label_file: Path | None = None) -> list[Path]:
    """The image files in ``folder`` (not below), warning of the other files (but the label file), which are not
    read."""
    is_image, label_file = _FileFilter(folder), label_file and label_file.resolve()

    def the_label_file(p: Path) -> bool:  # resolved only for a file of its name, not for every image
        return bool(label_file) and p.name == label_file.name and p.resolve() == label_file

    images = [p for p in folder.iterdir() if p.is_file() and not the_label_file(p) and is_image(p)]
    is_image.warn(folder)
    return images


def _image_name(path: str | Path) -> bool:
    """By name alone (torchvision's folder walk lists files only: no stat per image)."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(path.name)


def _read_label_file(path: Path, images: dict) -> list[tuple[str, str]]:
    if not path.is_file():
        raise LeanvitError(f"Label file {path} does not exist.")
    try:  # utf-8-sig: the byte-order mark spreadsheet programs write is not part of the first name
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise LeanvitError(f"Label file {path} is not UTF-8 text ({e.reason} at byte {e.start}). Save it as "
                           "UTF-8.") from None
    rows, loc = [], lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring")
    for number, line in enumerate(lines, 1):
        # a comma-separated row's label is its second field (CSV quoting honoured), or with ImageNet's
        # LOC_val_solution.csv that field's first word (the synset before the boxes); otherwise whitespace separates
        fields = [f.strip() for f in next(csv.reader([line]))] if "," in line else line.split()
        if loc and len(fields) > 1:
            fields[1] = (fields[1].split() or [""])[0]
        fields = [f for f in fields if f]
        if not fields:
            continue
        if len(fields) < 2:
            raise LeanvitError(
                f"{path}:{number}: expected 'filename label', got '{line.strip()}'. (ImageNet's "
                "ILSVRC2012_validation_ground_truth.txt has no file names and uses another class "
                "order; use LOC_val_solution.csv.)"
            )
        rows.append((fields[0], fields[1]))
    if rows and rows[0][0].lower() in _HEADER_NAMES and rows[0][0] not in images:
        rows = rows[1:]
    return rows


def _listing(items: Sequence[str], what: str, n: int = 5) -> str:
    if not items:
        return ""
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return f"{len(items)} {what} ({', '.join(map(str, items[:n]))}{more})"


def dataset_classes(dataset: Dataset) -> list[str]:
    """Class names of ``dataset`` (or of the dataset a ``Subset`` draws from)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return list(dataset.classes)


def stored_images(dataset: Dataset) -> tuple[list[int | None], Callable[[int], bytes | None]] | None:
    """Each sample's image as stored (its file's bytes, the shipped subset's JPEG bytes, CIFAR-10's pixel row): their
    sizes, and a reader of one; None for a dataset whose images are not stored as such (decoded tensors, a custom
    dataset). What :func:`shared_images` compares. A file that cannot be stat'ed or read (a broken link, which the
    evaluation skips as corrupt) has the size and the bytes None."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = stored_images(dataset.dataset)
        if inner is None:
            return None
        sizes, read = inner
        return [sizes[i] for i in dataset.indices], lambda i: read(dataset.indices[i])
    if isinstance(dataset, (ImageFolderDataset, LabelFileDataset, UnlabelledImages)):
        paths = [Path(path) for path, _ in dataset.samples]
        return [_file_size(p) for p in paths], lambda i: _file_bytes(paths[i])
    if isinstance(dataset, CIFAR10):
        return [dataset.data[0].nbytes] * len(dataset), lambda i: dataset.data[i].tobytes()
    if isinstance(dataset, PackedJpegDataset):
        offsets = dataset._offsets
        return np.diff(offsets).tolist(), lambda i: dataset._bytes[offsets[i]:offsets[i + 1]].tobytes()
    return None


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _file_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def shared_images(dataset: Dataset, others: Dataset) -> list[int] | None:
    """The indices of ``dataset``'s samples whose stored image is byte for byte one of ``others``' (a calibration
    draw): the same file under another path or name, a copy, the shipped subset's JPEGs unpacked into a folder.
    Only same-sized images are read, so a large ``dataset`` costs one ``stat`` per file. None where either's images
    are not stored as files or bytes. (CIFAR-10's pickled pixels and their JPEG re-encodings differ in bytes, so
    those two layouts of one image do not compare.) A file that cannot be stat'ed or read is no one's copy."""
    theirs = stored_images(others)  # the small side first: no stat of every file when it cannot be compared
    mine = stored_images(dataset) if theirs is not None else None
    if mine is None:
        return None
    (sizes, read), (their_sizes, their_read) = mine, theirs

    def digest(read: Callable[[int], bytes | None], i: int) -> bytes | None:
        stored = read(i)
        return None if stored is None else hashlib.sha1(stored).digest()

    digests = {digest(their_read, i) for i in range(len(their_sizes))} - {None}
    wanted = set(their_sizes) - {None}
    return [i for i, size in enumerate(sizes) if size in wanted and digest(read, i) in digests]
