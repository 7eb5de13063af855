"""How a multi-label batch of label-level features becomes the rows of label-level SupCon.

Features ``[B, V, C, D]`` (V views of B samples, one feature per class c) give V*B*C rows. The row of
(sample b, view v, class c) takes part with class c as its label when ``targets[b, c] == 1``, and is
ignored (label -1) otherwise. Rows come in one of two orders: view-major (v, b, c), the order of SADCL
(and of :func:`mlcontrast.reference.multilabel_supcon_loss`), or sample-major (b, v, c), in which the rows
of a range of samples (one rank's share of a gathered batch) are contiguous. A row's loss does not depend
on the order of the others.
"""

from __future__ import annotations

import torch

__all__ = ["legacy_sadcl_gate", "multilabel_rows"]


def multilabel_rows(
    features: torch.Tensor, targets: torch.Tensor, sample_major: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[V*B*C, D]`` rows of ``features`` ``[B, V, C, D]`` and their ``[V*B*C]`` labels (class c where
    ``targets[b, c] == 1``, else -1), in (b, v, c) order if ``sample_major`` else in (v, b, c) order.

    Example:
        >>> rows, labels = multilabel_rows(torch.randn(2, 1, 3, 4), torch.tensor([[1, 0, 1], [-1, 1, 0]]), True)
        >>> labels.tolist()
        [0, -1, 2, -1, 1, -1]
    """
    b, v, c, d = features.shape
    positive = (targets == 1).unsqueeze(1).expand(b, v, c)
    if not sample_major:
        features, positive = features.transpose(0, 1), positive.transpose(0, 1)
    classes = torch.arange(c, device=targets.device).expand_as(positive)
    return features.reshape(v * b * c, d), torch.where(positive, classes, -1).reshape(-1)


def legacy_sadcl_gate(targets: torch.Tensor, views: int, sample_major: bool) -> torch.Tensor:
    """The anchor mask of the released SADCL code, built in (b, v, c) order but applied to rows in
    (v, b, c) order: row (v, b, c) is an anchor only if ``targets[(v*B + b) // V, c] == 1``.

    Returns it as a bool ``[B, V, C]`` tensor if ``sample_major`` (to index by sample), else ``[V, B, C]``.
    """
    b, c = targets.shape
    sample = torch.arange(views * b, device=targets.device) // views  # of the flat (v, b) index v*B + b
    gate = (targets[sample] == 1).view(views, b, c)
    return gate.transpose(0, 1) if sample_major else gate
