"""DataLoaders with the corrupt-image policy and, under DDP, a shard of the data per process."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler, TensorDataset

from ..errors import LeanvitError
from .datasets import collate_skipping_corrupt, dataset_classes


def make_loader(dataset: Dataset, batch_size: int, *, train: bool = False, seed: int = 0,
                workers: int = 0) -> DataLoader:
    """A loader over ``dataset``; batches may be ``None`` if every image in them was corrupt.

    Training always samples through a ``DistributedSampler`` (one replica when not distributed),
    so the global order of samples depends only on ``seed`` and the epoch
    (``loader.sampler.set_epoch``): a run on N processes sees the same global batches as one
    process with N times the per-process batch.
    """
    if train:
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                     seed=seed, drop_last=True)
    else:
        sampler = SequentialSampler(dataset)
    # Workers are not persistent: each epoch starts new ones, seeded from the re-seeded main process.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_skipping_corrupt, drop_last=train,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


class DecodedDataset(TensorDataset):
    """``dataset`` decoded and transformed once and held in memory as tensors.

    For benchmarks that score many variants of one model on the same images: at CIFAR sizes,
    decoding the JPEGs costs more than the model, once per variant. Deterministic (eval) transforms
    only; corrupt images are dropped once, with the usual warning, and counted in ``skipped``.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 256):
        batches = [b for b in make_loader(dataset, batch_size) if b is not None]
        if not batches:
            raise LeanvitError("No image of the dataset could be decoded; see the warnings above.")
        super().__init__(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        self.classes = dataset_classes(dataset)
        self.skipped = len(dataset) - len(self)
