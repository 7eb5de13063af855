"""Partial-label simulation with the seeded NumPy stream of HST (research/seeds_methods.md §1.2)."""

from __future__ import annotations

import numpy as np

__all__ = ["simulate_partial_labels"]


def simulate_partial_labels(targets, known_ratio: float, seed: int = 0) -> np.ndarray:
    """Keep each (image, class) entry with probability ``known_ratio``; dropped entries become -1.

    Bit-compatible with HST's recipe ``np.random.seed(seed); U = np.random.random((N, C)); keep = U < p``:
    one ``np.random.RandomState(seed).random((N, C))`` draw in the dataset's image order (the global
    NumPy state is not touched). Positives and negatives are dropped at the same rate.

    Args:
        targets: ``[N, C]`` full labels, 1 positive / 0 negative (any value > 0 counts as positive).
        known_ratio: p in (0, 1]; 1 keeps everything.
        seed: the RandomState seed (0 as in HST).

    Returns:
        ``[N, C]`` int8 array with 1 / 0 / -1 (unknown).
    """
    if isinstance(known_ratio, bool) or not 0.0 < float(known_ratio) <= 1.0:
        raise ValueError(f"known_ratio must lie in (0, 1], got {known_ratio}")
    y = np.asarray(targets)
    if y.ndim != 2:
        raise ValueError(f"targets must be [N, C], got shape {y.shape}")
    full = (y > 0).astype(np.int8)
    keep = np.random.RandomState(seed).random(y.shape) < known_ratio
    return np.where(keep, full, np.int8(-1)).astype(np.int8)
