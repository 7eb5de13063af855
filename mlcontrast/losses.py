"""``nn.Module`` wrappers of :mod:`mlcontrast.functional`: hyper-parameters in ``__init__``, tensors in
``forward``. See the functional docstrings for the math."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlcontrast import functional
from mlcontrast._validation import (
    check_backend,
    check_positives,
    check_reduction,
    check_temperature,
    check_temperatures,
    check_threshold,
)

__all__ = [
    "LabelSupConLoss",
    "SupConLoss",
    "MultiLabelSupConLoss",
    "MultiHotSupConLoss",
    "PrototypeNCELoss",
    "PrototypeCELoss",
    "PrototypeBank",
]


class LabelSupConLoss(nn.Module):
    """Label-level SupCon (:func:`mlcontrast.functional.label_supcon_loss`).

    ``process_group``: a ``torch.distributed`` group whose ranks' rows all join the contrast set (see the
    functional docstring); None for a single process. ``forward`` takes optional reference rows (a queue).

    Example:
        >>> loss_fn = LabelSupConLoss(temperature=0.1, normalize=True)
        >>> loss = loss_fn(torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, -1]))
        >>> loss = loss_fn(torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, -1]), torch.randn(16, 8),
        ...                torch.randint(0, 3, (16,)))
    """

    def __init__(
        self,
        temperature: float = 0.1,
        base_temperature: float | None = None,
        reduction: str = "mean",
        normalize: bool = False,
        backend: str = "auto",
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        check_temperatures(temperature, base_temperature)
        check_reduction(reduction)
        self.temperature, self.base_temperature = temperature, base_temperature
        self.reduction, self.normalize, self.backend = reduction, normalize, check_backend(backend)
        self.process_group = process_group

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        ref_features: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of ``features`` ``[N, D]`` with ``labels`` ``[N]``, and optionally reference rows
        ``ref_features`` ``[M, D]`` with ``ref_labels`` ``[M]`` (a queue) in every anchor's contrast set."""
        return functional.label_supcon_loss(
            features,
            labels,
            self.temperature,
            self.base_temperature,
            self.reduction,
            self.normalize,
            self.backend,
            process_group=self.process_group,
            ref_features=ref_features,
            ref_labels=ref_labels,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, normalize={self.normalize}"


class SupConLoss(nn.Module):
    """A drop-in for SupContrast's ``SupConLoss`` (:func:`mlcontrast.functional.supcon_loss`).

    ``process_group``: a ``torch.distributed`` group whose ranks' samples all join the contrast set (see
    the functional docstring); None for a single process.

    Example:
        >>> loss_fn = SupConLoss(temperature=0.07)
        >>> loss = loss_fn(F.normalize(torch.randn(4, 2, 16), dim=-1), torch.tensor([0, 1, 0, 1]))
    """

    def __init__(
        self,
        temperature: float = 0.07,
        contrast_mode: str = "all",
        base_temperature: float = 0.07,
        backend: str = "auto",
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        check_temperatures(temperature, base_temperature)
        if contrast_mode not in ("all", "one"):
            raise ValueError(f'contrast_mode must be "all" or "one", got {contrast_mode!r}')
        self.temperature, self.contrast_mode, self.base_temperature = temperature, contrast_mode, base_temperature
        self.backend = check_backend(backend)
        self.process_group = process_group

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return functional.supcon_loss(
            features,
            labels,
            self.temperature,
            self.base_temperature,
            self.contrast_mode,
            self.backend,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, contrast_mode={self.contrast_mode!r}"


class MultiLabelSupConLoss(nn.Module):
    """SADCL's SSCL (:func:`mlcontrast.functional.multilabel_supcon_loss`).

    ``process_group``: a ``torch.distributed`` group whose ranks' samples all join the contrast set (see
    the functional docstring); None for a single process.

    Example:
        >>> loss_fn = MultiLabelSupConLoss(temperature=0.2)
        >>> loss = loss_fn(torch.randn(4, 2, 5, 32), torch.randint(0, 2, (4, 5)))
    """

    def __init__(
        self,
        temperature: float = 0.2,
        base_temperature: float | None = None,
        backend: str = "auto",
        legacy_sadcl: bool = False,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        check_temperatures(temperature, base_temperature)
        self.temperature, self.base_temperature = temperature, base_temperature
        self.backend, self.legacy_sadcl = check_backend(backend), legacy_sadcl
        self.process_group = process_group

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return functional.multilabel_supcon_loss(
            features,
            targets,
            self.temperature,
            self.base_temperature,
            self.backend,
            self.legacy_sadcl,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, legacy_sadcl={self.legacy_sadcl}"


class MultiHotSupConLoss(nn.Module):
    """Multi-hot (image-level) SupCon (:func:`mlcontrast.functional.multihot_supcon_loss`).

    ``forward(features, targets, ref_features=None, ref_targets=None)``: ``[N, D]`` rows with ``[N, C]``
    multi-hot targets, and optional ``[M, D]`` reference rows (e.g. a queue) with their ``[M, C]`` targets,
    which join the contrast set but are never anchors. ``process_group``: a ``torch.distributed`` group
    whose ranks' rows all join the contrast set (see the functional docstring); None for a single process.

    Example:
        >>> loss_fn = MultiHotSupConLoss(temperature=0.1, positives="jaccard", threshold=0.5, normalize=True)
        >>> loss = loss_fn(torch.randn(6, 16), torch.randint(0, 2, (6, 4)))
    """

    def __init__(
        self,
        temperature: float = 0.1,
        base_temperature: float | None = None,
        positives: str = "jaccard",
        threshold: float = 0.5,
        reduction: str = "mean",
        normalize: bool = False,
        backend: str = "auto",
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        check_temperatures(temperature, base_temperature)
        check_positives(positives)
        check_threshold(threshold)
        check_reduction(reduction)
        self.temperature, self.base_temperature = temperature, base_temperature
        self.positives, self.threshold = positives, threshold
        self.reduction, self.normalize, self.backend = reduction, normalize, check_backend(backend)
        self.process_group = process_group

    def forward(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        ref_features: torch.Tensor | None = None,
        ref_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return functional.multihot_supcon_loss(
            features,
            targets,
            self.temperature,
            self.base_temperature,
            self.positives,
            self.threshold,
            self.reduction,
            self.normalize,
            ref_features,
            ref_targets,
            process_group=self.process_group,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, positives={self.positives!r}, threshold={self.threshold}, "
            f"reduction={self.reduction!r}, normalize={self.normalize}"
        )


class PrototypeNCELoss(nn.Module):
    """SADCL's PSCL (:func:`mlcontrast.functional.prototype_nce_loss`).

    Example:
        >>> loss_fn = PrototypeNCELoss(temperature=0.07)
        >>> loss = loss_fn(torch.randn(8, 5, 32), torch.randn(5, 32), torch.randint(-1, 2, (8, 5)))
    """

    def __init__(self, temperature: float = 0.07, backend: str = "auto") -> None:
        super().__init__()
        check_temperature(temperature)
        self.temperature, self.backend = temperature, check_backend(backend)

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return functional.prototype_nce_loss(features, prototypes, targets, self.temperature, self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class PrototypeCELoss(nn.Module):
    """Sample-to-prototype cross-entropy (:func:`mlcontrast.functional.prototype_ce_loss`).

    Example:
        >>> loss_fn = PrototypeCELoss(temperature=0.1)
        >>> loss = loss_fn(torch.randn(10, 16), torch.randint(0, 4, (10,)), torch.randn(4, 16))
    """

    def __init__(self, temperature: float = 0.1, backend: str = "auto") -> None:
        super().__init__()
        check_temperature(temperature)
        self.temperature, self.backend = temperature, check_backend(backend)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        return functional.prototype_ce_loss(features, labels, prototypes, self.temperature, self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class PrototypeBank(nn.Module):
    """A ``[C, D]`` buffer of class prototypes updated by EMA (:func:`mlcontrast.functional.update_prototypes_`).

    The prototypes are a buffer, so they are saved in ``state_dict`` and move with ``.to()``; they get
    no gradient from the update. ``forward()`` returns them.

    Args:
        num_classes: C.
        dim: D.
        momentum: EMA momentum m in [0, 1].
        normalize: keep the prototypes L2-normalised.
        init: optional ``[C, D]`` initial prototypes (copied); default random unit rows.
        backend: see :func:`mlcontrast.functional.label_supcon_loss`.

    Example:
        >>> bank = PrototypeBank(num_classes=3, dim=8, momentum=0.9)
        >>> _ = bank.update(torch.randn(5, 8), torch.tensor([0, 0, 2, -1, 2]))
        >>> bank().shape
        torch.Size([3, 8])
    """

    prototypes: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        momentum: float = 0.99,
        normalize: bool = True,
        init: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes} and {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        if init is None:
            init = torch.randn(num_classes, dim)
            init = F.normalize(init, dim=1) if normalize else init
        elif tuple(init.shape) != (num_classes, dim):
            raise ValueError(f"init must be [C={num_classes}, D={dim}], got shape {tuple(init.shape)}")
        self.register_buffer("prototypes", init.detach().clone())
        self.momentum, self.normalize, self.backend = momentum, normalize, check_backend(backend)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels_or_targets: torch.Tensor) -> torch.Tensor:
        """EMA update from ``[N, D]`` rows with ``[N]`` labels, or ``[B, C, D]`` features with ``[B, C]`` targets."""
        return functional.update_prototypes_(
            self.prototypes, features.detach(), labels_or_targets, self.momentum, self.normalize, self.backend
        )

    def forward(self) -> torch.Tensor:
        return self.prototypes

    def extra_repr(self) -> str:
        c, d = self.prototypes.shape
        return f"num_classes={c}, dim={d}, momentum={self.momentum}, normalize={self.normalize}"
