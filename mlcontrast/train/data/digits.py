"""The embedded default dataset: multi-label mosaics of scikit-learn's 8×8 handwritten digits.

``sklearn.datasets.load_digits`` ships its 1,797 images inside the pip package, so this dataset needs no
download. Each mosaic is a 2×2 grid of 8×8 digit images (16×16, upsampled ×2 to 32×32 by default) holding
1–4 *distinct* digits in random cells (empty cells are black); its targets are the 10 digit classes present.
Labels co-occur: digit d is paired with ``PARTNER[d]`` (0–6, 1–7, 2–5, 3–8, 4–9), and once d is drawn its partner
joins it with probability ``pair_prob`` if there is room. The 1,797 source images are split once (by ``seed``)
into disjoint train and test pools, so no source digit image appears in both splits.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from mlcontrast.train.data.base import MultiLabelDataset

__all__ = ["DigitMosaics", "digits", "PARTNER"]

PARTNER = {0: 6, 6: 0, 1: 7, 7: 1, 2: 5, 5: 2, 3: 8, 8: 3, 4: 9, 9: 4}
_COUNT_PROBS = (0.25, 0.35, 0.25, 0.15)  # P(1, 2, 3, 4 distinct digits)


def _source_split(seed: int, test_fraction: float):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float32)  # [1797, 8, 8], values 0..16
    labels = np.asarray(d.target, dtype=np.int64)
    perm = np.random.RandomState(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    return images, labels, {"test": np.sort(perm[:n_test]), "train": np.sort(perm[n_test:])}


class DigitMosaics(MultiLabelDataset):
    """Seeded multi-label digit mosaics; ``source_indices[i]`` lists the load_digits indices used (-1 = empty).

    ``__getitem__`` returns a float tensor ``[3, S, S]`` (grey replicated to RGB, scaled to [-1, 1]) passed
    through ``transform`` if given, and the int64 targets ``[10]``.
    """

    def __init__(self, split: str = "train", num_images: int | None = None, seed: int = 0, scale: int = 2,
                 pair_prob: float = 0.7, test_fraction: float = 0.4, transform: Callable | None = None) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if num_images is None:
            num_images = 3000 if split == "train" else 1000
        if num_images < 1 or scale < 1:
            raise ValueError(f"num_images and scale must be >= 1, got {num_images} and {scale}")
        images, labels, pools = _source_split(seed, test_fraction)
        pool = pools[split]
        by_digit = [pool[labels[pool] == d] for d in range(10)]
        rng = np.random.RandomState(seed * 2 + (0 if split == "train" else 1) + 12345)
        mosaics = np.zeros((num_images, 16, 16), dtype=np.float32)
        targets = np.zeros((num_images, 10), dtype=np.int8)
        sources = np.full((num_images, 4), -1, dtype=np.int64)
        for i in range(num_images):
            k = rng.choice(4, p=_COUNT_PROBS) + 1
            chosen = [int(rng.randint(10))]
            if k >= 2 and rng.random_sample() < pair_prob:
                chosen.append(PARTNER[chosen[0]])
            while len(chosen) < k:
                d = int(rng.randint(10))
                if d not in chosen:
                    chosen.append(d)
            cells = rng.permutation(4)[:k]
            for d, cell in zip(chosen, cells):
                src = int(by_digit[d][rng.randint(len(by_digit[d]))])
                r, c = divmod(int(cell), 2)
                mosaics[i, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = images[src]
                sources[i, cell] = src
                targets[i, d] = 1
        super().__init__(targets, [str(d) for d in range(10)])
        img = np.kron(mosaics, np.ones((scale, scale), dtype=np.float32)) / 16.0  # [N, S, S] in [0, 1]
        self.images = torch.from_numpy((img * 2.0 - 1.0).astype(np.float32))
        self.source_indices = sources
        self.split, self.seed, self.transform = split, seed, transform

    def load_image(self, index: int) -> torch.Tensor:
        x = self.images[index].unsqueeze(0).expand(3, -1, -1).clone()
        return self.transform(x) if self.transform is not None else x


def digits(split: str = "train", **kwargs) -> DigitMosaics:
    return DigitMosaics(split, **kwargs)
