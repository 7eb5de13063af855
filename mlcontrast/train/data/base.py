"""The common dataset type: image files (or in-memory images) with ``[N, C]`` 1/0/-1 targets."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mlcontrast.train.data.partial import simulate_partial_labels
from mlcontrast.train.data.transforms import build_transform

__all__ = ["MultiLabelDataset", "ImageFileDataset", "default_transform", "require_dir", "require_file"]


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path} (expected {what})")
    return path


def require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path} (expected {what})")
    return path


def default_transform(img_size: int = 224, train: bool = False, augment: str = "flip") -> Callable:
    """PIL image → normalised float tensor ``[3, S, S]``: resize to a square, then (training) the ``augment``
    pipeline of :func:`mlcontrast.train.data.transforms.build_transform` (default: a flip)."""
    return build_transform(img_size, train, augment)


class MultiLabelDataset(Dataset):
    """Base class: ``targets`` is an ``[N, C]`` int8 array (1 / 0 / -1); ``full_targets`` the labels before
    partial-label simulation. ``__getitem__`` returns ``(image tensor, int64 targets [C])``."""

    classes: list[str]

    def __init__(self, targets: np.ndarray, classes: Sequence[str]) -> None:
        self.full_targets = np.asarray(targets, dtype=np.int8)
        self.targets = self.full_targets.copy()
        self.classes = list(classes)
        if self.targets.ndim != 2 or self.targets.shape[1] != len(self.classes):
            raise ValueError(f"targets must be [N, C={len(self.classes)}], got {self.targets.shape}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.targets.shape[0]

    def apply_partial_labels(self, known_ratio: float, seed: int = 0) -> "MultiLabelDataset":
        """Hide labels (§1.2); ``full_targets`` keeps the truth for pseudo-label metrics."""
        self.targets = simulate_partial_labels(self.full_targets, known_ratio, seed)
        return self

    def load_image(self, index: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int):
        return self.load_image(index), torch.from_numpy(self.targets[index].astype(np.int64))


class ImageFileDataset(MultiLabelDataset):
    """Images read from files with PIL (RGB) and passed through ``transform``."""

    def __init__(self, paths: Sequence[Path], targets: np.ndarray, classes: Sequence[str],
                 transform: Callable | None = None) -> None:
        super().__init__(targets, classes)
        self.paths = [Path(p) for p in paths]
        if len(self.paths) != len(self.targets):
            raise ValueError(f"{len(self.paths)} image paths for {len(self.targets)} target rows")
        self.transform = transform if transform is not None else default_transform()

    def load_image(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as im:
            img = im.convert("RGB")
        return self.transform(img)
