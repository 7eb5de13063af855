"""Datasets of the training package and the partial-label simulation."""

from __future__ import annotations

from typing import Callable

from mlcontrast.train.data.base import ImageFileDataset, MultiLabelDataset, default_transform
from mlcontrast.train.data.datasets import (VOC_CLASSES, coco2014, cub200, nuswide, visual_genome,
                                            visual_genome_200, voc2007)
from mlcontrast.train.data.digits import DigitMosaics, digits
from mlcontrast.train.data.mnist_mosaic import MNISTMosaics, mnist_mosaic
from mlcontrast.train.data.partial import simulate_partial_labels

__all__ = ["DATASETS", "EMBEDDED", "build_datasets", "simulate_partial_labels", "MultiLabelDataset",
           "ImageFileDataset", "DigitMosaics", "digits", "MNISTMosaics", "mnist_mosaic", "voc2007", "coco2014",
           "nuswide", "visual_genome", "visual_genome_200", "cub200", "default_transform", "VOC_CLASSES"]

# name → (loader, train split, test split)
DATASETS: dict[str, tuple[Callable, str, str]] = {
    "digits": (digits, "train", "test"),
    "mnist_mosaic": (mnist_mosaic, "train", "test"),
    "voc2007": (voc2007, "trainval", "test"),
    "coco2014": (coco2014, "train", "val"),
    "nuswide": (nuswide, "train", "test"),
    "vg": (visual_genome, "train", "test"),         # VG-500 (SADCL)
    "vg200": (visual_genome_200, "train", "test"),  # VG-200 (HST)
    "cub": (cub200, "train", "test"),
}

#: datasets made from files inside installed packages: no --data-root, no --img-size (their own image size)
EMBEDDED = ("digits", "mnist_mosaic")


def build_datasets(name: str, root=None, img_size: int = 224, seed: int = 0, augment: str = "flip"):
    """``(train, test)`` datasets by CLI name; file datasets need ``root``; ``augment`` names the training
    pipeline of the file datasets (:mod:`mlcontrast.train.data.transforms`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    fn, tr, te = DATASETS[name]
    if name in EMBEDDED:
        return fn(tr, seed=seed), fn(te, seed=seed)
    if root is None:
        raise ValueError(f"dataset {name!r} needs --data-root (the folder holding its files)")
    return (fn(root, tr, transform=default_transform(img_size, train=True, augment=augment)),
            fn(root, te, transform=default_transform(img_size, train=False, augment=augment)))
