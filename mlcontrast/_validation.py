"""The argument checks of the public functions: bad input raises before any work.

``ValueError`` for shapes, sizes, values and devices, ``TypeError`` for types and dtypes; every message
names the argument. Type and shape checks come first, then the device check, then the checks of values
(which read the tensors, and so need them on one readable device); value checks are skipped while
``torch.compile`` traces (they read tensor data: a host sync).
"""

from __future__ import annotations

import math

import torch

from mlcontrast._base import BACKENDS
from mlcontrast._temperature import Temperature, check_temperature

__all__ = [
    "MULTIHOT_POSITIVES",
    "REDUCTIONS",
    "check_backend",
    "check_features",
    "check_int",
    "check_label_values",
    "check_labels",
    "check_momentum",
    "check_multihot_targets",
    "check_multihot_values",
    "check_positive",
    "check_positives",
    "check_reduction",
    "check_ref_features",
    "check_same_device",
    "check_target_values",
    "check_targets",
    "check_temperature",
    "check_temperatures",
    "check_threshold",
]

REDUCTIONS = ("mean", "sum", "none")
MULTIHOT_POSITIVES = ("jaccard", "any", "all", "mulsupcon")


def _checking_values() -> bool:
    # Value checks read tensor data (a host sync); torch.compile traces without them.
    return not torch.compiler.is_compiling()


def check_features(x: torch.Tensor, name: str, dims: tuple[int, ...], shape: str) -> None:
    """A floating tensor of one of the ranks ``dims`` with at least one feature (``shape`` describes it)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point (fp32, fp16, bf16 or fp64), got {x.dtype}")
    if x.dim() not in dims:
        raise ValueError(f"{name} must be {shape}, got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one feature dimension, got shape {tuple(x.shape)}")


def check_int(x: torch.Tensor, name: str, shape: str) -> torch.Tensor:
    """An integer tensor, returned as int64."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor {shape}, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor {shape}, got {x.dtype}")
    return x.long()


def check_labels(labels: torch.Tensor, n: int, name: str = "labels", rows: str = "N") -> torch.Tensor:
    """``[n]`` integer class ids (not bool), returned as int64 (``rows``: the name of n in messages)."""
    if isinstance(labels, torch.Tensor) and labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold int64 class ids, got torch.bool")
    labels = check_int(labels, name, f"[{rows}={n}]")
    if labels.shape != (n,):
        raise ValueError(f"{name} must be [{rows}={n}], got shape {tuple(labels.shape)}")
    return labels


def check_label_values(labels: torch.Tensor, num_classes: int | None = None, name: str = "labels") -> None:
    """Class ids >= -1, and < ``num_classes`` when given."""
    if not _checking_values() or labels.numel() == 0:
        return
    if labels.min() < -1:
        raise ValueError(f"{name} must be class ids >= 0, or -1 for a row that takes no part")
    if num_classes is not None and labels.max() >= num_classes:
        raise ValueError(f"labels must be < C = {num_classes} (the number of prototypes), got {labels.max()}")


def check_targets(targets: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """``[B, C]`` integer targets, returned as int64."""
    targets = check_int(targets, "targets", f"[B={b}, C={c}]")
    if targets.shape != (b, c):
        raise ValueError(f"targets must be [B={b}, C={c}], got shape {tuple(targets.shape)}")
    return targets


def check_target_values(targets: torch.Tensor) -> None:
    """Targets in {1, 0, -1}."""
    if _checking_values() and targets.numel() > 0 and ((targets < -1) | (targets > 1)).any():
        raise ValueError("targets must hold 1 (positive), 0 (negative) or -1 (unknown)")


def check_multihot_targets(targets: torch.Tensor, name: str, rows: int, c: int | None, shape: str) -> torch.Tensor:
    """``[rows, C]`` integer or bool multi-hot targets with C >= 1 (``C = c`` when given), ``shape``
    describing them; returned as they are if bool, else as int64."""
    if not (isinstance(targets, torch.Tensor) and targets.dtype == torch.bool):
        targets = check_int(targets, name, shape)
    if targets.dim() != 2 or targets.shape[0] != rows or (c is not None and targets.shape[1] != c):
        raise ValueError(f"{name} must be {shape}, got shape {tuple(targets.shape)}")
    if targets.shape[1] == 0:
        raise ValueError(f"{name} must have at least one class column, got shape {tuple(targets.shape)}")
    return targets


def check_multihot_values(targets: torch.Tensor, name: str) -> None:
    """Multi-hot targets in {1, 0, -1} (bool targets always are)."""
    if targets.dtype == torch.bool or not _checking_values() or targets.numel() == 0:
        return
    if ((targets < -1) | (targets > 1)).any():
        raise ValueError(f"{name} must hold 1 (label present), 0 (absent) or -1 (unknown: absent)")


def check_ref_features(ref_features: torch.Tensor | None, ref_other, other_name: str, d: int) -> int:
    """Reference rows (a queue, a cross-batch memory): ``ref_features`` ``[M, D]`` with the D of the features,
    given together with ``ref_other`` (their labels or targets, named ``other_name``) or not at all. Returns M
    (0 without reference rows); the caller checks ``ref_other``'s shape with M."""
    if (ref_features is None) != (ref_other is None):
        raise ValueError(f"ref_features and {other_name} must be given together (or neither)")
    if ref_features is None:
        return 0
    check_features(ref_features, "ref_features", (2,), f"[M, D={d}]")
    if ref_features.shape[1] != d:
        raise ValueError(f"ref_features must be [M, D={d}] (D of features), got shape {tuple(ref_features.shape)}")
    return ref_features.shape[0]


def check_threshold(threshold: float) -> None:
    """A number in (0, 1] (not a bool)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")


def check_positives(positives: str) -> None:
    if positives not in MULTIHOT_POSITIVES:
        raise ValueError(f"positives must be one of {MULTIHOT_POSITIVES}, got {positives!r}")


def check_positive(value: float, name: str) -> None:
    """A finite real number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_temperatures(temperature: Temperature, base_temperature: float | None) -> Temperature:
    """Both temperatures > 0 (``temperature`` a number or a 0-dim floating tensor, §12 of the contract;
    ``base_temperature`` a number); returns the base temperature: a float, or ``temperature`` itself when
    None (so a tensor temperature's default base is recognisably the temperature)."""
    check_temperature(temperature)
    if base_temperature is None:
        return temperature if isinstance(temperature, torch.Tensor) else float(temperature)
    check_positive(base_temperature, "base_temperature")
    return float(base_temperature)


def check_momentum(momentum: float) -> None:
    """A number in [0, 1] (not a bool)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a number, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """The one device of all ``tensors`` (named by keyword, for the message)."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        found = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {found}")
    return first


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend
