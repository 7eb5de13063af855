"""How a multi-label batch of label-level features becomes the rows of label-level SupCon.

Also the normalisation of rows for a fused backend (:func:`unit_rows`).

Features ``[B, V, C, D]`` (V views of B samples, one feature per class c) give V*B*C rows. The row of
(sample b, view v, class c) takes part with class c as its label when ``targets[b, c] == 1``, and is
ignored (label -1) otherwise. Rows come in one of two orders: view-major (v, b, c), the order of SADCL
(and of :func:`mlcontrast.reference.multilabel_supcon_loss`), or sample-major (b, v, c), in which the rows
of a range of samples (one rank's share of a gathered batch) are contiguous. A row's loss does not depend
on the order of the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlcontrast._base import NORM_EPS
from mlcontrast.ops import registry

__all__ = ["legacy_sadcl_gate", "multilabel_rows", "unit_rows"]


def unit_rows(x: torch.Tensor, backend: str) -> torch.Tensor:
    """``x``'s rows L2-normalised for fused ``backend``: in fp32 (fp16/bf16 sums of squares lose precision),
    then in the caller's dtype for a backend that wants its rows so (:func:`registry.rows_in_input_dtype`).

    The GPU kernels then get unit rows in the caller's dtype: 16-bit rows keep the tensor cores' 16-bit
    rate and half the traffic, at one more rounding of the kind the caller's features already carry. The
    CPU kernels compute in fp32 anyway.
    """
    unit = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1, eps=NORM_EPS)
    return unit.to(x.dtype) if registry.rows_in_input_dtype(backend) else unit


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
