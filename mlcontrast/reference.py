"""Readable dense PyTorch definitions of every loss: the specification and backend ``"torch"``.

These functions materialise the full similarity matrices and are written for clarity, not speed.
Tests and benchmarks compare every fused backend with them. They assume validated input: the public
functions of :mod:`mlcontrast.functional` check arguments and then call them.

Computation runs in fp32 (fp64 for fp64 input) whatever the input dtype, and the loss comes back in
that dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlcontrast._base import NORM_EPS


def _compute(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(_compute(x), dim=-1, eps=NORM_EPS)


def _masked_lse(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """log-sum-exp over the entries where ``mask`` holds; 0 (with zero gradient) where none does."""
    masked = logits.masked_fill(~mask, float("-inf"))
    any_entry = mask.any(dim, keepdim=True)
    # Rows without entries are replaced by zeros before the reduction so that their backward does
    # not produce NaN through exp(-inf - -inf).
    safe = torch.where(any_entry, masked, torch.zeros_like(masked))
    return torch.where(any_entry.squeeze(dim), torch.logsumexp(safe, dim), torch.zeros((), dtype=logits.dtype))


def reduce_rows(rows: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row losses to the result: ``"none"`` as is, ``"sum"``, or ``"mean"`` over ``count`` rows (0 if none)."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / count.clamp(min=1).to(rows.dtype)


def label_supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    reduction: str = "mean",
    normalize: bool = False,
    ref_features: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Label-level SupCon with the full N x (N + M) similarity matrix (see ``functional.label_supcon_loss``).
    The M ref rows join every contrast set (those with a label >= 0) and are never anchors."""
    rows, all_labels = features, labels
    if ref_features is not None:
        rows = torch.cat([features, ref_features.to(features.dtype)])
        all_labels = torch.cat([labels, ref_labels])
    losses = label_supcon_anchor_rows(rows, all_labels, temperature, base_temperature, normalize, 0, features.shape[0])
    return reduce_rows(losses, (labels >= 0).sum(), reduction)


def label_supcon_anchor_rows(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    normalize: bool = False,
    start: int = 0,
    stop: int | None = None,
    contrast_start: int = 0,
    grad_stop: int | None = None,
) -> torch.Tensor:
    """The per-row losses of :func:`label_supcon_loss` of the anchor rows ``start .. stop``, densely: the op
    ``label_supcon``'s definition (:mod:`mlcontrast.ops.contract`).

    Anchor i's contrast set is A(i) = {j != i : j >= contrast_start, labels[j] >= 0} and P(i) its rows of
    i's label; only the ``[stop - start, R]`` similarities of the anchors are formed (a process group's
    rows against all ranks' rows, a batch against reference rows). Rows from ``grad_stop`` on (None: none)
    enter the other anchors' contrast sets detached, so the gradient reaches them only through their own
    losses as anchors.
    """
    base_temperature = temperature if base_temperature is None else base_temperature
    z = _unit(features) if normalize else _compute(features)
    n = z.shape[0]
    stop = n if stop is None else stop
    if grad_stop is not None and grad_stop < n:
        contrasted = torch.cat([z[:grad_stop], z[grad_stop:].detach()])
    else:
        contrasted = z
    anchors = torch.arange(start, stop, device=z.device)
    columns = torch.arange(n, device=z.device)
    valid = labels >= 0
    logits = z[start:stop] @ contrasted.T / temperature
    not_self = anchors[:, None] != columns[None, :]
    contrast = valid[start:stop, None] & (valid & (columns >= contrast_start))[None, :] & not_self
    positive = contrast & (labels[start:stop, None] == labels[None, :])

    lse = _masked_lse(logits, contrast, dim=1)
    n_pos = positive.sum(1)
    mean_pos = (logits * positive).sum(1) / n_pos.clamp(min=1)
    return torch.where(valid[start:stop] & (n_pos > 0), (temperature / base_temperature) * (lse - mean_pos), 0.0)


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
) -> torch.Tensor:
    """SupContrast's ``SupConLoss`` on ``[B, V, D]`` features, written out densely.

    Rows are the B*V views; the positives of a row are the other views with the same label (the other
    views of the same sample when ``labels`` is None). ``contrast_mode="one"`` keeps only view 0 as
    anchors, contrasted with all views. The mean runs over all anchors; an anchor without positives
    contributes 0.
    """
    b, v = features.shape[:2]
    z = _compute(features).transpose(0, 1).reshape(b * v, -1)  # view-major rows, as SupContrast
    sample_labels = torch.arange(b, device=z.device) if labels is None else labels
    row_labels = sample_labels.repeat(v)
    anchors = b if contrast_mode == "one" else b * v

    logits = z[:anchors] @ z.T / temperature
    not_self = torch.ones_like(logits, dtype=torch.bool)
    not_self[torch.arange(anchors), torch.arange(anchors)] = False
    positive = (row_labels[:anchors, None] == row_labels[None, :]) & not_self
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    n_pos = positive.sum(1)
    mean_log_prob_pos = (log_prob * positive).sum(1) / n_pos.clamp(min=1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def multilabel_supcon_loss(
    features: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 0.2,
    base_temperature: float | None = None,
    legacy_sadcl: bool = False,
) -> torch.Tensor:
    """SADCL's SSCL: SupCon over the label-level features whose target is 1, class id as label.

    ``features`` is ``[B, C, D]`` or ``[B, V, C, D]``; rows are taken in (view, sample, class) order.
    With ``legacy_sadcl=True`` the anchor of row (v, b, c) is gated by ``targets[(v*B + b) // V, c]``
    (the released code's mask ordering) and the mean still divides by V * sum(targets == 1).
    """
    if features.dim() == 3:
        features = features.unsqueeze(1)
    b, v, c, _ = features.shape
    z = features.transpose(0, 1).reshape(v * b * c, -1)
    positive = (targets == 1).repeat(v, 1).reshape(-1)  # (v, b, c) order
    classes = torch.arange(c, device=targets.device).repeat(v * b)
    labels = torch.where(positive, classes, -1)
    rows = label_supcon_loss(z, labels, temperature, base_temperature, reduction="none", normalize=True)
    if legacy_sadcl:
        sample = (torch.arange(v * b, device=targets.device) // v).repeat_interleave(c)
        gate = targets[sample, classes] == 1
        rows = rows * gate
    return reduce_rows(rows, positive.sum(), "mean")


def prototype_nce_loss(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 0.07,
) -> torch.Tensor:
    """SADCL's PSCL: each prototype against its class column of the batch (see ``functional``)."""
    logits = (_unit(features) * _unit(prototypes)).sum(-1) / temperature  # [B, C]
    positive, known = targets == 1, targets >= 0
    lse_pos = _masked_lse(logits, positive, dim=0)
    lse_known = _masked_lse(logits, known, dim=0)
    n_pos = positive.sum()
    loss = -(lse_pos - lse_known).sum() / n_pos.clamp(min=1)
    return torch.where(n_pos > 0, loss, torch.zeros_like(loss))


def prototype_ce_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Cross-entropy of softmax_c(cos(z_i, p_c) / t) at labels[i], mean over rows with labels >= 0."""
    logits = _unit(features) @ _unit(prototypes).T / temperature
    valid = labels >= 0
    rows = F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * valid
    return reduce_rows(rows, valid.sum(), "mean")


@torch.no_grad()
def update_prototypes_(
    prototypes: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    momentum: float = 0.99,
    normalize: bool = True,
) -> torch.Tensor:
    """p_c <- m p_c + (1 - m) mean of the rows of class c, for the classes present; in place."""
    z = _compute(features)
    for c in torch.unique(labels[labels >= 0]).tolist():
        updated = momentum * _compute(prototypes[c]) + (1 - momentum) * z[labels == c].mean(0)
        if normalize:
            updated = F.normalize(updated, dim=0, eps=NORM_EPS)
        prototypes[c] = updated.to(prototypes.dtype)
    return prototypes


def multihot_supcon_loss(
    features: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    positives: str = "jaccard",
    threshold: float = 0.5,
    reduction: str = "mean",
    normalize: bool = False,
    ref_features: torch.Tensor | None = None,
    ref_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-hot (image-level) SupCon with the full N x (N + M) similarity matrix (see
    ``functional.multihot_supcon_loss``). The ref rows join the contrast set and are never anchors."""
    rows, targets_all = features, targets
    if ref_features is not None:
        rows = torch.cat([features, ref_features.to(features.dtype)])
        targets_all = torch.cat([targets.long(), ref_targets.long()])
    losses, counts = multihot_supcon_anchor_rows(
        rows, targets_all, temperature, base_temperature, positives, threshold, normalize, 0, features.shape[0]
    )
    return reduce_rows(losses, counts.sum(), reduction)


def multihot_supcon_anchor_rows(
    features: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    positives: str = "jaccard",
    threshold: float = 0.5,
    normalize: bool = False,
    start: int = 0,
    stop: int | None = None,
    grad_stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses of the anchor rows ``start .. stop`` of :func:`multihot_supcon_loss`, densely, against every
    row of ``features`` (the contrast set), and what each adds to the ``"mean"``'s count K: 1 for an anchor
    with positives (0 without) for jaccard / any / all, its number of label anchors for mulsupcon. Rows from
    ``grad_stop`` on (None: none) enter the other anchors' contrast sets detached: the op ``multihot_supcon``'s
    definition (:mod:`mlcontrast.ops.contract`).

    ``targets`` ``[R, C]``: 1 (or True) = label present, anything else absent.
    """
    base_temperature = temperature if base_temperature is None else base_temperature
    z = _unit(features) if normalize else _compute(features)
    r = z.shape[0]
    stop = r if stop is None else stop
    y = (targets == 1).to(z.dtype)  # [R, C] label sets as 0/1
    anchors = torch.arange(start, stop, device=z.device)
    contrasted = z if grad_stop is None or grad_stop >= r else torch.cat([z[:grad_stop], z[grad_stop:].detach()])
    logits = z[start:stop] @ contrasted.T / temperature  # s_ij, [n, R]
    not_self = anchors[:, None] != torch.arange(r, device=z.device)[None, :]  # A(i): every other row
    lse = _masked_lse(logits, not_self, dim=1)
    scale = temperature / base_temperature
    if positives == "mulsupcon":
        return _mulsupcon_rows(logits.masked_fill(~not_self, 0.0), lse, y, y[start:stop], scale)
    weight, positive = _multihot_positives(y[start:stop], y, not_self, positives, threshold)
    n_pos = positive.sum(1)
    # (1/|P|) sum_p w_ip (LSE_i - s_ip)
    per_row = (weight * (lse[:, None] - logits)).sum(1) / n_pos.clamp(min=1)
    has_pos = n_pos > 0
    return torch.where(has_pos, scale * per_row, 0.0), has_pos.long()


def _multihot_positives(
    y_anchor: torch.Tensor, y: torch.Tensor, not_self: torch.Tensor, positives: str, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights w_ij (0 off P(i)) and the mask of P(i), ``[n, R]`` each, for jaccard / any / all."""
    overlap = y_anchor @ y.T  # o_ij = |y_i ∩ y_j| (exact: sums of 0/1)
    size_i, size_j = y_anchor.sum(1)[:, None], y.sum(1)[None, :]
    union = size_i + size_j - overlap  # u_ij = |y_i ∪ y_j|
    if positives == "jaccard":
        # The ratio of the two counts in fp64, as the threshold is given: an overlap exactly at it counts.
        jaccard = torch.where(union > 0, overlap.double() / union.double().clamp(min=1), 0.0)
        positive = not_self & (jaccard > 0) & (jaccard >= threshold)
        return jaccard.to(y.dtype) * positive, positive
    if positives == "any":
        positive = not_self & (overlap > 0)
    else:  # "all": y_j = y_i ≠ ∅
        positive = not_self & (overlap == size_i) & (overlap == size_j) & (size_i > 0)
    return positive.to(y.dtype), positive


def _mulsupcon_rows(
    logits_off_diag: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, y_anchor: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MulSupCon's label anchors: (i, c) for c ∈ y_i with P(i, c) = {p ≠ i : c ∈ y_p} ≠ ∅, i.e. n_c ≥ 2.

    ℓ_i = scale · Σ_c (LSE_i − mean_{p ∈ P(i,c)} s_ip), with Σ_{p ∈ P(i,c)} s_ip = (S with its diagonal
    zeroed) @ y, and |P(i, c)| = n_c − 1.
    """
    n_c = y.sum(0)  # rows of the contrast set with label c
    valid = (y_anchor > 0) & (n_c >= 2)[None, :]  # [n, C] the label anchors
    mean_pos = (logits_off_diag @ y) / (n_c - 1).clamp(min=1)  # [n, C]
    per_label = torch.where(valid, lse[:, None] - mean_pos, 0.0)
    return scale * per_label.sum(1), valid.sum(1)
