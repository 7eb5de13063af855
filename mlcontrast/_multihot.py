"""Multi-hot (image-level) supervised contrastive loss: :func:`multihot_supcon_loss`, exported by
:mod:`mlcontrast.functional` (its own module to keep each file short).

The contrast set is this call's rows (all ranks' rows, in rank order, with a process group), then the
reference rows; the anchors are this call's (this rank's) rows. The fused op ``multihot_supcon`` gets the
contrast set, the targets as a uint8 present-mask and the anchor range, and returns per-row losses and
counts; the reduction is done here.
"""

from __future__ import annotations

import torch

from mlcontrast import _backends, _temperature, distributed, reference
from mlcontrast._detached_rows import DetachedRowsScaled
from mlcontrast._layout import unit_rows
from mlcontrast._temperature import Temperature, pair_scaled
from mlcontrast._validation import (
    check_features,
    check_multihot_targets,
    check_multihot_values,
    check_positives,
    check_reduction,
    check_ref_features,
    check_same_device,
    check_temperatures,
    check_threshold,
)
from mlcontrast.ops import registry
from mlcontrast.reference import reduce_rows

__all__ = ["multihot_supcon_loss"]


def _check_arguments(features, targets, temperature, base_temperature, positives, threshold, reduction,
                     ref_features, ref_targets) -> tuple[torch.Tensor, torch.Tensor | None, float]:  # fmt: skip
    """Every check of :func:`multihot_supcon_loss` before any work: ``(targets, ref_targets, base_temperature)``
    with integer targets as int64 and bool targets as they are."""
    check_features(features, "features", (2,), "[N, D]")
    n, d = features.shape
    targets = check_multihot_targets(targets, "targets", n, None, f"[N={n}, C]")
    c = targets.shape[1]
    m = check_ref_features(ref_features, ref_targets, "ref_targets", d)
    tensors = {"features": features, "targets": targets}
    if ref_features is not None:
        ref_targets = check_multihot_targets(ref_targets, "ref_targets", m, c, f"[M={m}, C={c}]")
        tensors.update(ref_features=ref_features, ref_targets=ref_targets)
    base_temperature = check_temperatures(temperature, base_temperature)
    check_positives(positives)
    check_threshold(threshold)
    check_reduction(reduction)
    check_same_device(**tensors)
    check_multihot_values(targets, "targets")
    if ref_targets is not None:
        check_multihot_values(ref_targets, "ref_targets")
    return targets, ref_targets, base_temperature


def _present(targets: torch.Tensor) -> torch.Tensor:
    """The op's encoding of targets: uint8, 1 = label present (1 or True), 0 = absent (0 and -1)."""
    return (targets == 1).to(torch.uint8)


def _anchor_rows(
    backend: str,
    features: torch.Tensor,
    present: torch.Tensor,
    temperature: Temperature,
    base_temperature: Temperature,
    positives: str,
    threshold: float,
    normalize: bool,
    anchors: tuple[int, int],
    grad_stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses of the anchor rows ``anchors[0] .. anchors[1]`` of the contrast set ``features``, and what
    each adds to the ``"mean"``'s count K (its label anchors for mulsupcon, else 1 if it has positives); rows
    from ``grad_stop`` on (detached reference rows) get no gradient and cost no gradient work."""
    start, stop = anchors
    if backend == "torch":
        return reference.multihot_supcon_anchor_rows(
            features, present, temperature, base_temperature, positives, threshold, normalize, start, stop, grad_stop
        )
    z = unit_rows(features, backend) if normalize else features
    if _temperature.learned(temperature) and grad_stop is not None:
        # τ's gradient flows through every scaled row, detached ones too: taken from the others' work alone.
        scale, factor = _temperature.row_scale(z, temperature, base_temperature)
        others = (1.0, 1.0, positives, float(threshold), start, stop)
        loss, _, _, count = DetachedRowsScaled.apply(z, scale, present, backend, "multihot_supcon", others, grad_stop)
    else:
        z, tau, base, factor = pair_scaled(z, temperature, base_temperature)
        op = registry.op("multihot_supcon", backend)
        loss, _, _, count = op(z, present, tau, base, positives, float(threshold), start, stop, grad_stop)
    loss, count = loss[start:stop], count[start:stop]
    loss = loss if factor is None else loss * factor
    return loss, (count if positives == "mulsupcon" else count > 0)


def multihot_supcon_loss(
    features: torch.Tensor,
    targets: torch.Tensor,
    temperature: Temperature = 0.1,
    base_temperature: float | None = None,
    positives: str = "jaccard",
    threshold: float = 0.5,
    reduction: str = "mean",
    normalize: bool = False,
    ref_features: torch.Tensor | None = None,
    ref_targets: torch.Tensor | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Supervised contrastive loss over image-level rows with multi-hot targets, without an N x (N + M)
    matrix on the fused backends.

    With :math:`y_i` the labels present in row i, :math:`o_{ij} = |y_i \cap y_j|`,
    :math:`u_{ij} = |y_i \cup y_j|`, :math:`s_{ij} = z_i \cdot z_j / \tau` and :math:`A(i)` every other row
    of the contrast set (the N rows, then the M ref rows; whatever their labels):

    - ``"jaccard"``: :math:`w_{ij} = o_{ij}/u_{ij}` (0 when :math:`u_{ij} = 0`),
      :math:`P(i) = \{j \in A(i) : w_{ij} > 0,\ w_{ij} \ge \text{threshold}\}`;
      ``"any"``: :math:`w = 1`, :math:`P(i) = \{j : o_{ij} > 0\}`; ``"all"``: :math:`w = 1`,
      :math:`P(i) = \{j : y_j = y_i \ne \emptyset\}`. Then

      .. math::
          \ell_i = \frac{\tau}{\tau_{base}} \frac{1}{|P(i)|} \sum_{p \in P(i)} w_{ip}
                   \Big(\log \sum_{j \in A(i)} e^{s_{ij}} - s_{ip}\Big) \quad (P(i) \ne \emptyset),
          \qquad K = |\{i : P(i) \ne \emptyset\}|.

    - ``"mulsupcon"`` (label anchors, MulSupCon, AAAI 2024): for each c ∈ y_i with
      :math:`P(i,c) = \{p \in A(i) : c \in y_p\} \ne \emptyset`,
      :math:`\ell_{ic} = \log \sum_{j \in A(i)} e^{s_{ij}} - \operatorname{mean}_{p \in P(i,c)} s_{ip}`;
      :math:`\ell_i = (\tau/\tau_{base}) \sum_c \ell_{ic}`, K = the number of such (i, c).

    A row without positives (or without labels) contributes 0 but stays in the others' contrast sets.

    Args:
        features: ``[N, D]`` rows z, one per image (L2-normalised first when ``normalize=True``); the anchors.
        targets: ``[N, C]`` integer or bool; 1 (True) = label present, 0 and -1 (unknown) = absent.
        temperature: :math:`\tau > 0`: a number or a 0-dim floating tensor (its exact gradient, as in
            :func:`mlcontrast.label_supcon_loss`).
        base_temperature: :math:`\tau_{base}`; defaults to ``temperature``.
        positives: ``"jaccard"``, ``"any"``, ``"all"`` or ``"mulsupcon"``.
        threshold: the least Jaccard overlap of a positive, in (0, 1] (inclusive); ``"jaccard"`` only.
        reduction: ``"mean"`` (:math:`\sum_i \ell_i / K`, 0 when K = 0), ``"sum"`` or ``"none"`` (``[N]``).
        normalize: L2-normalise the rows (ref rows included) first.
        ref_features: ``[M, D]`` reference rows (a MoCo queue, a cross-batch memory) that join every
            anchor's contrast set and are never anchors; gradients reach them only if they require grad.
            Cast to the dtype of ``features``.
        ref_targets: ``[M, C]`` their targets; given with ``ref_features`` or not at all.
        process_group: as in :func:`mlcontrast.label_supcon_loss`: every rank's N rows (and targets) are
            gathered in rank order and this rank's rows are the anchors; this rank's ref rows are appended
            as they are. The result is the single-process loss over the concatenation on every rank
            ("mean" divides by the global K), with ``world_size`` × its gradient for this rank's rows.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Shape:
        features ``[N, D]``, targets ``[N, C]`` (ref_features ``[M, D]``, ref_targets ``[M, C]``) → scalar,
        or ``[N]`` with ``reduction="none"``.

    Example:
        >>> z = torch.randn(6, 16, requires_grad=True)
        >>> y = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 1], [-1, 1, 0]])
        >>> loss = multihot_supcon_loss(z, y, temperature=0.1, normalize=True)  # Jaccard >= 0.5
        >>> loss.backward()
    """
    targets, ref_targets, base_temperature = _check_arguments(
        features, targets, temperature, base_temperature, positives, threshold, reduction, ref_features, ref_targets
    )
    if process_group is not None:
        world_size = distributed.check_process_group(process_group)[1]
    n, m = features.shape[0], 0 if ref_features is None else ref_features.shape[0]
    backend = _backends.resolve(backend, features.device, "multihot_supcon", features, n + m)
    rows, present, start = features, _present(targets), 0
    unit = normalize and backend != "torch"
    if unit:  # row-wise, so it commutes with the gather and the cat: a detached queue stays out of the backward
        rows, normalize = unit_rows(features, backend), False
    if process_group is not None:
        rows, sizes, start = distributed.gather_with_sizes(rows, process_group)
        present = distributed.all_gather_no_grad(present, sizes, process_group)
    grad_stop = None
    if ref_features is not None:
        # Detached ref rows cost no gradient work; with a learned temperature too (DetachedRowsScaled) but for
        # mulsupcon, whose class weights span the whole set (its refs then take their gradient work).
        mulsupcon_learned = positives == "mulsupcon" and _temperature.learned(temperature)
        grad_stop = None if ref_features.requires_grad or mulsupcon_learned else rows.shape[0]
        refs = unit_rows(ref_features, backend) if unit else ref_features
        rows = torch.cat([rows, refs.to(rows.dtype)])
        present = torch.cat([present, _present(ref_targets)])
    args = (temperature, base_temperature, positives, threshold, normalize)
    losses, counts = _anchor_rows(backend, rows, present, *args, (start, start + n), grad_stop)
    count = counts.sum()
    if process_group is None:
        return reduce_rows(losses, count, reduction)
    total = distributed.all_reduce_sum(count, process_group).clamp(min=1).to(losses.dtype)
    return distributed.shard_result(losses, total, reduction, process_group, world_size)
