"""Accuracy of a classifier on a dataset: top-1/top-5, per class, and its most common confusions.

The classifier is a PyTorch module or any callable from a float32 NCHW numpy batch to logits,
such as a runner of :mod:`leanvit.deploy`, so an exported or compressed model is scored by the
same code as its eager original. Such a callable always gets full batches (the last one padded),
so engines exported for a fixed batch size work.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader
from tqdm import tqdm

from .data import DecodedDataset, dataset_classes
from .errors import LeanvitError
from .modes import eval_mode


@dataclass
class EvalResult:
    """Accuracies in percent over the ``images`` that decoded; ``skipped`` ones could not."""

    top1: float
    top5: float
    images: int
    skipped: int
    seconds: float
    images_per_s: float  # the whole pipeline: decoding, pre-processing and the model
    per_class: dict[str, float] = field(default_factory=dict)
    most_confused: list[dict] = field(default_factory=list)  # {"true", "predicted", "count"}

    def to_dict(self) -> dict:
        return asdict(self)


def check_class_outputs(logits: torch.Tensor, classes: int) -> None:
    """A clear error unless ``logits`` is ``(batch, classes)``: a model made for other data."""
    if logits.ndim != 2 or logits.shape[1] != classes:
        raise LeanvitError(
            f"The model gives {tuple(logits.shape[1:])} outputs per image but the data has {classes} "
            "classes. Load a checkpoint trained on these classes (or create the model with "
            f"num_classes={classes})."
        )


def requested_images(loader: DataLoader) -> int | None:
    """How many samples one pass of ``loader`` asks its dataset for: its sampler's, less a ``drop_last``
    remainder. Not ``len(loader.dataset)``: a sampler over a subset, or a dropped last batch, reads fewer
    images, and those were not skipped. ``None`` where the loader cannot tell (no ``BatchSampler``, or a
    sampler without a length)."""
    batches = loader.batch_sampler
    if not isinstance(batches, BatchSampler):
        return None
    try:
        n = len(batches.sampler)
    except TypeError:
        return None
    return n - n % batches.batch_size if batches.drop_last else n


def evaluate(model: nn.Module | Callable[[np.ndarray], np.ndarray], loader: DataLoader, *,
             classes: Sequence[str] | None = None, device: str | torch.device | None = None,
             progress: bool = True, top_confusions: int = 10) -> EvalResult:
    """Score ``model`` on every batch of ``loader`` (see :func:`leanvit.data.make_loader`).

    ``classes`` names the dataset's labels 0, 1, ... in order (default: the dataset's own class names).

    A module is run in eval mode on ``device`` (default: CUDA if present), where it stays; its
    train/eval mode is restored afterwards, also when scoring fails. ``skipped`` counts the images the
    loader asked for that did not decode (dropped from their batch, :func:`collate_skipping_corrupt`), plus
    those a :class:`leanvit.data.DecodedDataset` dropped when it was built (all of them: which ones the sampler
    would have asked for is unknown). A loader that cannot say how many it asks for (a batch sampler without a
    length) is taken to ask for its whole dataset.
    """
    classes = list(classes) if classes is not None else dataset_classes(loader.dataset)
    n = len(classes)
    if isinstance(model, nn.Module):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(device)

        def predict(x: torch.Tensor) -> torch.Tensor:
            return model(x.to(device, non_blocking=True)).float().cpu()
    else:
        def predict(x: torch.Tensor) -> torch.Tensor:
            pad = (loader.batch_size or len(x)) - len(x)  # engines exported for a fixed batch
            batch = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad > 0 else x
            return torch.from_numpy(np.asarray(model(batch.numpy()), dtype=np.float32))[: len(x)]

    confusion = torch.zeros(n * n, dtype=torch.int64)
    top5_hits = images = 0
    start = time.perf_counter()
    with torch.inference_mode(), (eval_mode(model) if isinstance(model, nn.Module) else nullcontext()):
        for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
            if batch is None:  # every image of the batch was corrupt
                continue
            x, y = batch
            if len(y) and int(y.max()) >= n:
                raise LeanvitError(f"The data has label {int(y.max())}, beyond the {n} classes given "
                                   f"({', '.join(classes[:4])}{', ...' if n > 4 else ''}): pass one name per "
                                   "label of the dataset, in its label order (or leave classes out for its own).")
            logits = predict(x)
            check_class_outputs(logits, n)
            topk = logits.topk(min(5, n), dim=1).indices
            confusion += torch.bincount(y * n + topk[:, 0], minlength=n * n)
            top5_hits += int((topk == y[:, None]).any(dim=1).sum())
            images += len(y)
    seconds = time.perf_counter() - start
    if images == 0:
        raise LeanvitError("No image of the dataset could be decoded; see the warnings above.")

    requested = requested_images(loader)
    skipped = max((requested if requested is not None else len(loader.dataset)) - images, 0)
    if isinstance(loader.dataset, DecodedDataset):  # its corrupt images were dropped before any sampler
        skipped += loader.dataset.skipped
    confusion = confusion.view(n, n)
    per_class_total = confusion.sum(1)
    correct = confusion.diag()
    off = confusion.clone().fill_diagonal_(0).flatten()
    counts, flat = off.topk(min(top_confusions, n * n))
    return EvalResult(
        top1=round(100.0 * int(correct.sum()) / images, 4),
        top5=round(100.0 * top5_hits / images, 4),
        images=images,
        skipped=skipped,
        seconds=round(seconds, 3),
        images_per_s=round(images / seconds, 2),
        per_class={c: round(100.0 * int(correct[i]) / int(per_class_total[i]), 4)
                   for i, c in enumerate(classes) if per_class_total[i] > 0},
        most_confused=[{"true": classes[int(i) // n], "predicted": classes[int(i) % n], "count": int(k)}
                       for k, i in zip(counts, flat) if k > 0],
    )


@dataclass
class PairedComparison:
    """Two classifiers scored on the same images: the images only one of them gets right, and the exact
    two-sided McNemar p-value of that split (the chance of one at least this lopsided if both were
    equally accurate). Top-1 gaps of a few images are often chance; only the disagreements tell."""

    a_only: int
    b_only: int
    p_value: float


def compare_paired(preds_a: np.ndarray, preds_b: np.ndarray, labels: np.ndarray) -> PairedComparison:
    """McNemar's exact test on the top-1 predictions of two classifiers for the same ``labels``."""
    preds_a, preds_b, labels = (np.asarray(v).ravel() for v in (preds_a, preds_b, labels))
    if not len(preds_a) == len(preds_b) == len(labels):
        raise LeanvitError(f"Paired comparison needs one prediction per label: got {len(preds_a)}, {len(preds_b)} "
                           f"predictions for {len(labels)} labels.")
    right_a, right_b = preds_a == labels, preds_b == labels
    a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return PairedComparison(a_only, b_only, round(min(1.0, 2 * tail), 4))
