"""Datasets, timm pre-processing and calibration sets.

``open_dataset(path)`` reads ImageFolder trees, ImageNet's flat validation layout with a label
file, CIFAR-10's python pickles and the CIFAR-10 test subset shipped with leanvit
(``"cifar10-test500"``); ``resolve_data_config`` / ``build_transform`` take mean, std, crop and
interpolation from the model's ``pretrained_cfg`` through timm.
"""
from __future__ import annotations

from .calibration import (
    CalibrationImages, calibration_images, calibration_shortfall, calibration_subset, without_calibration_images,
)
from .datasets import (
    BUNDLED_CIFAR10, CorruptImageWarning, IgnoredFilesWarning, LabelFileDataset, bundled_cifar10,
    collate_skipping_corrupt, dataset_classes, open_dataset, shared_images,
)
from .loader import DecodedDataset, make_loader
from .transforms import DATA_CONFIG_KEYS, build_transform, check_input_size, resolve_data_config

__all__ = [
    "BUNDLED_CIFAR10", "CalibrationImages", "CorruptImageWarning", "DATA_CONFIG_KEYS", "DecodedDataset",
    "IgnoredFilesWarning", "LabelFileDataset", "build_transform", "bundled_cifar10", "calibration_images",
    "calibration_shortfall", "calibration_subset", "check_input_size", "collate_skipping_corrupt", "dataset_classes",
    "make_loader", "open_dataset", "resolve_data_config", "shared_images", "without_calibration_images",
]
