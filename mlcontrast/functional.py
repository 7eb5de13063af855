"""The public loss functions (:func:`multihot_supcon_loss` is defined in :mod:`mlcontrast._multihot`). Each
validates its arguments (:mod:`mlcontrast._validation`), resolves the backend once, calls the dense reference
(``"torch"``) or the fused op that :mod:`mlcontrast.ops.registry` gives for the backend, and reduces.

Encodings everywhere: ``labels`` ``[N]`` int64 class ids with ``-1`` for a row that takes no part;
``targets`` ``[B, C]`` integers with ``1`` positive, ``0`` negative, ``-1`` unknown. Every function
accepts fp32, fp16 and bf16 features, accumulates in fp32 and returns the loss in fp32 (fp64 for fp64
features). Bad input raises before any work: ``ValueError`` for shapes, sizes, values and devices,
``TypeError`` for dtypes.
"""

from __future__ import annotations

import torch

from mlcontrast import _backends, _temperature, distributed, reference
from mlcontrast._detached_rows import DetachedRowsScaled, queue_losses, queue_op_takes
from mlcontrast._layout import legacy_sadcl_gate, multilabel_rows, unit_rows
from mlcontrast._multihot import multihot_supcon_loss
from mlcontrast._temperature import Temperature, pair_scaled
from mlcontrast._validation import (
    check_features,
    check_int,
    check_label_values,
    check_labels,
    check_momentum,
    check_reduction,
    check_ref_features,
    check_same_device,
    check_target_values,
    check_targets,
    check_temperature,
    check_temperatures,
)
from mlcontrast.ops import registry
from mlcontrast.reference import reduce_rows

__all__ = [
    "label_supcon_loss",
    "supcon_loss",
    "multilabel_supcon_loss",
    "multihot_supcon_loss",
    "prototype_nce_loss",
    "prototype_ce_loss",
    "update_prototypes_",
]


# ----------------------------------------------------------------------------------------------
# The fused backends' calls (the ops and their backends: mlcontrast.ops.registry)
# ----------------------------------------------------------------------------------------------


def _label_supcon_rows(
    backend: str,
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: Temperature,
    base_temperature: Temperature,
    anchor_start: int = 0,
    anchor_stop: int | None = None,
    grad_stop: int | None = None,
) -> torch.Tensor:
    """The ``[N]`` per-row losses of the fused ``backend``: those of the anchor rows, 0 elsewhere; the rows from
    ``grad_stop`` on get gradients only as anchors (detached reference rows: no gradient work). A tensor
    temperature scales the rows instead (:func:`mlcontrast._temperature.pair_scaled`)."""
    n = features.shape[0]
    if _temperature.learned(temperature) and grad_stop is not None and grad_stop < n:
        # τ's gradient flows through every scaled row, detached ones too: taken from the others' work alone.
        scale, factor = _temperature.row_scale(features, temperature, base_temperature)
        others = (1.0, 1.0, anchor_start, n if anchor_stop is None else anchor_stop, 0)
        rows = DetachedRowsScaled.apply(features, scale, labels, backend, "label_supcon", others, grad_stop)[0]
    else:
        z, tau, base, factor = pair_scaled(features, temperature, base_temperature)
        rows = registry.op("label_supcon", backend)(z, labels, tau, base, anchor_start, anchor_stop, 0, grad_stop)[0]
    return rows if factor is None else rows * factor


# ----------------------------------------------------------------------------------------------
# Cross-rank contrast sets (process_group=)
# ----------------------------------------------------------------------------------------------
# Every rank gathers all ranks' rows (with gradient) and computes the losses of its own rows, the
# anchors, against the whole set: O(N_rank N D) work per rank. The gradients that this rank's
# anchors send to other ranks' rows travel back through the gather's backward (a reduce-scatter).


def _anchor_losses(
    backend: str,
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: Temperature,
    base_temperature: Temperature,
    normalize: bool,
    anchors: tuple[int, int],
    grad_stop: int | None = None,
) -> torch.Tensor:
    """The per-row losses of :func:`label_supcon_loss` of the rows ``anchors[0] .. anchors[1]``, with every
    valid row in their contrast sets, on the resolved ``backend``; rows from ``grad_stop`` on (reference rows
    that do not require grad) are contrasted without gradient."""
    start, stop = anchors
    if backend == "torch":
        return reference.label_supcon_anchor_rows(
            features, labels, temperature, base_temperature, normalize, start, stop, grad_stop=grad_stop
        )
    z = unit_rows(features, backend) if normalize else features
    rows = _label_supcon_rows(backend, z, labels, temperature, base_temperature, start, stop, grad_stop)
    return rows[start:stop]


#: This rank's result from its anchors' losses (also read by benchmarks/distributed_table.py).
_shard_result = distributed.shard_result


def _with_ref_rows(rows, labels, ref_features, ref_labels) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """The contrast set: ``rows`` (this call's, or all ranks') then the reference rows (in the rows' dtype), their
    labels, and the op's ``grad_stop``: the count of ``rows`` when the reference rows do not require grad (no
    gradient work for them), else None."""
    if ref_features is None:
        return rows, labels, None
    grad_stop = None if ref_features.requires_grad else rows.shape[0]
    return torch.cat([rows, ref_features.to(rows.dtype)]), torch.cat([labels, ref_labels]), grad_stop


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def label_supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: Temperature = 0.1,
    base_temperature: float | None = None,
    reduction: str = "mean",
    normalize: bool = False,
    backend: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
    ref_features: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Label-level supervised contrastive loss, without an N x N (or N x (N + M)) matrix on the fused backends.

    With valid rows :math:`V = \{i : y_i \ge 0\}`, the valid reference rows :math:`V_{ref}` (a queue; none by
    default), :math:`A(i) = (V \cup V_{ref}) \setminus \{i\}`, :math:`P(i) = \{j \in A(i) : y_j = y_i\}` and
    :math:`s_{ij} = z_i \cdot z_j / \tau`, for the anchors :math:`i \in V`:

    .. math::
        \ell_i = \frac{\tau}{\tau_{base}} \Big( \log \sum_{j \in A(i)} e^{s_{ij}}
                 - \frac{1}{|P(i)|} \sum_{p \in P(i)} s_{ip} \Big)  \quad (P(i) \ne \emptyset),
        \qquad \ell_i = 0 \text{ otherwise.}

    Args:
        features: ``[N, D]`` rows z (L2-normalised first when ``normalize=True``).
        labels: ``[N]`` int64 class ids; ``-1`` marks a row that takes no part at all.
        temperature: :math:`\tau > 0`: a number, or a 0-dim floating tensor such as ``log_t.exp()`` (its
            exact gradient on every backend, without N x N memory).
        base_temperature: :math:`\tau_{base}` (a number); defaults to ``temperature``.
        reduction: ``"mean"`` (sum over :math:`|V|`, 0 when V is empty), ``"sum"`` or ``"none"`` (the ``[N]``
            vector, 0 outside V).
        normalize: L2-normalise the rows (reference rows included) first.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
        process_group: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``)
            to make every rank's rows part of the contrast set; None (default) for a single process
            (``torch.distributed.group.WORLD`` is None until ``init_process_group()`` has run).
            The rows of all ranks are gathered (in rank order; ranks may hold different numbers of
            rows, or none) and this rank's rows are the anchors. ``"mean"`` and ``"sum"`` return, on
            every rank, the loss of one process over the concatenation of all ranks' rows ("mean"
            divides by the global number of valid rows), and backward gives each rank's ``features``
            ``world_size`` × that loss's gradient for its rows, so that DDP's averaging of parameter
            gradients reproduces single-process training. ``"none"`` returns this rank's ``[N_r]`` rows
            of the global per-row losses, with the same gradient convention: backward of ``f(rows)`` on
            every rank gives each rank ``world_size`` × the gradient of the sum over ranks of ``f``
            (``rows.sum() / global_valid_count`` reproduces ``"mean"``). Every rank must make the call
            and call ``backward()`` (they are collectives), with the same arguments apart from the
            tensors. Each rank computes only its own rows' losses, against all rows (O(N_rank N D)
            work per rank on the fused backends). ``RuntimeError`` if torch.distributed is not
            initialised. This rank's reference rows are appended to the gathered rows as they are.
        ref_features: ``[M, D]`` reference rows (a MoCo queue, a cross-batch memory; cast to the dtype of
            ``features``): those with a label >= 0 join every anchor's contrast set (and P(i) by label); they
            are never anchors, so ``"mean"`` still divides by :math:`|V|`. Gradients reach them only if they
            require grad: a detached queue costs no gradient work.
        ref_labels: ``[M]`` their int64 class ids (-1: the row takes no part); given with ``ref_features`` or
            not at all.

    Shape:
        features ``[N, D]``, labels ``[N]`` (ref_features ``[M, D]``, ref_labels ``[M]``) → scalar, or ``[N]``
        with ``reduction="none"``.

    Example:
        >>> z = torch.randn(6, 8, requires_grad=True)
        >>> y = torch.tensor([0, 0, 1, 1, 2, -1])
        >>> loss = label_supcon_loss(z, y, temperature=0.1, normalize=True)
        >>> loss.backward()
        >>> queue, queue_labels = torch.randn(32, 8), torch.randint(0, 3, (32,))  # e.g. a ContrastQueue's
        >>> label_supcon_loss(z, y, normalize=True, ref_features=queue, ref_labels=queue_labels).backward()
    """
    check_features(features, "features", (2,), "[N, D]")
    n, d = features.shape
    labels = check_labels(labels, n)
    m = check_ref_features(ref_features, ref_labels, "ref_labels", d)
    refs = {}
    if ref_features is not None:
        ref_labels = check_labels(ref_labels, m, "ref_labels", "M")
        refs = {"ref_features": ref_features, "ref_labels": ref_labels}
    base_temperature = check_temperatures(temperature, base_temperature)
    check_reduction(reduction)
    device = check_same_device(features=features, labels=labels, **refs)
    check_label_values(labels)
    if ref_labels is not None:
        check_label_values(ref_labels, name="ref_labels")
    if process_group is not None:
        world_size = distributed.check_process_group(process_group)[1]
    backend = _backends.resolve(backend, device, "label_supcon", features, n + m)
    if process_group is not None or ref_features is not None:
        queue = queue_op_takes(backend, ref_features, temperature)
        queue_normalize = normalize
        if normalize and backend != "torch":
            # Row-wise, so it commutes with the gather and the cat: each part normalised on its own keeps a
            # detached queue out of the backward (normalising the cat would send an [N + M, D] gradient back);
            # the queue op normalises its queue itself, without a copy.
            features, normalize = unit_rows(features, backend), False
            if ref_features is not None and not queue:
                ref_features = unit_rows(ref_features, backend)
        rows, all_labels, start = features, labels, 0
        if process_group is not None:
            rows, sizes, start = distributed.gather_with_sizes(features, process_group)
            all_labels = distributed.all_gather_no_grad(labels, sizes, process_group)
        count = (all_labels >= 0).sum()  # the anchors of every rank: "mean"'s count
        if queue:
            args = (temperature, base_temperature, queue_normalize, (start, start + n))
            losses = queue_losses(backend, rows, all_labels, ref_features, ref_labels, *args)
        else:
            rows, all_labels, grad_stop = _with_ref_rows(rows, all_labels, ref_features, ref_labels)
            args = (temperature, base_temperature, normalize, (start, start + n), grad_stop)
            losses = _anchor_losses(backend, rows, all_labels, *args)
        if process_group is None:
            return reduce_rows(losses, count, reduction)
        return _shard_result(losses, count.clamp(min=1).to(losses.dtype), reduction, process_group, world_size)
    if backend == "torch":
        return reference.label_supcon_loss(features, labels, temperature, base_temperature, reduction, normalize)
    z = unit_rows(features, backend) if normalize else features
    rows = _label_supcon_rows(backend, z, labels, temperature, base_temperature)
    return reduce_rows(rows, (labels >= 0).sum(), reduction)


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: Temperature = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
    backend: str = "auto",
    process_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    r"""A drop-in for SupContrast's ``SupConLoss``: same value and gradients for the same call.

    The B*V views are the rows; a row's positives are the other views with the same label, or the
    other views of the same sample when ``labels`` is None (SimCLR). ``contrast_mode="all"`` makes
    every view an anchor; ``"one"`` makes view 0 the anchors, contrasted with all views. The loss is
    :math:`(\tau/\tau_{base})` times the mean over anchors of
    :math:`\log\sum_{a \ne i} e^{s_{ia}} - \text{mean}_{p} s_{ip}`; an anchor without positives
    contributes 0. Features are used as given (SupContrast expects them L2-normalised).

    Args:
        features: ``[B, V, D]`` (trailing dimensions beyond the third are flattened, as SupContrast does).
        labels: ``[B]`` integer class ids, or None.
        temperature, base_temperature: :math:`\tau, \tau_{base} > 0`; :math:`\tau` may be a 0-dim tensor (see
            :func:`label_supcon_loss`).
        contrast_mode: ``"all"`` or ``"one"``.
        backend: see :func:`label_supcon_loss`.
        process_group: see :func:`label_supcon_loss`. The global batch is the concatenation of all
            ranks' ``[B_r, V, D]`` features (and labels) along B, in rank order; with ``labels=None`` a
            sample's id is its index in that global batch, so each sample's positives are its own views.
            The anchors of this rank are all views of its samples (``"all"``), or their view 0
            (``"one"``); the result is the single-process loss over the global batch on every rank, with
            ``world_size`` × its gradient for this rank's rows. All ranks must pass labels, or none.

    Shape:
        features ``[B, V, D]``, labels ``[B]`` → scalar.

    Example:
        >>> z = F.normalize(torch.randn(4, 2, 16), dim=-1)
        >>> loss = supcon_loss(z, torch.tensor([0, 1, 0, 1]))
    """
    if isinstance(features, torch.Tensor) and features.dim() > 3:
        features = features.reshape(features.shape[0], features.shape[1], -1)
    check_features(features, "features", (3,), "[B, V, D]")
    b, v, _ = features.shape
    if contrast_mode not in ("all", "one"):
        raise ValueError(f'contrast_mode must be "all" or "one", got {contrast_mode!r}')
    base_temperature = check_temperatures(temperature, base_temperature)
    if labels is not None:
        labels = check_int(labels, "labels", f"[B={b}]")
        if labels.shape != (b,):
            raise ValueError(f"labels must be [B={b}], got shape {tuple(labels.shape)}")
        device = check_same_device(features=features, labels=labels)
    else:
        device = features.device
    if process_group is not None:
        world_size = distributed.check_process_group(process_group)[1]
    backend = _backends.resolve(backend, device, "label_supcon", features, b * v)
    if process_group is not None:
        everything, sizes, start = distributed.gather_with_sizes(features, process_group)  # [B_total, V, D]
        total = everything.shape[0]
        if labels is None:  # rank r's sample i gets the global id start_r + i
            all_labels = torch.arange(total, device=device)
        else:
            all_labels = distributed.all_gather_no_grad(labels, sizes, process_group)
            all_labels = all_labels - all_labels.min() if total > 0 else all_labels
        # Rows ordered so that this rank's anchors are contiguous: view-major for "one" (view 0 of
        # its samples), sample-major for "all" (all views of its samples). A row's loss does not
        # depend on the order of the others.
        if contrast_mode == "one":
            rows, row_labels, anchors = everything.transpose(0, 1), all_labels.repeat(v), (start, start + b)
        else:
            rows, row_labels, anchors = everything, all_labels.repeat_interleave(v), (start * v, (start + b) * v)
        losses = _anchor_losses(
            backend, rows.reshape(total * v, -1), row_labels, temperature, base_temperature, False, anchors
        )
        count = total if contrast_mode == "one" else total * v
        return _shard_result(losses, count, "mean", process_group, world_size)
    if backend == "torch":
        return reference.supcon_loss(features, labels, temperature, base_temperature, contrast_mode)
    if labels is None:
        labels = torch.arange(b, device=device)
    elif b > 0:
        labels = labels - labels.min()  # any integer is a class here; -1 must not mean "ignored"
    rows = features.transpose(0, 1).reshape(b * v, -1)  # view-major, as SupContrast
    # "one": the anchors are view 0, the first b rows; only their losses are computed.
    stop = b if contrast_mode == "one" else None
    losses = _label_supcon_rows(backend, rows, labels.repeat(v), temperature, base_temperature, 0, stop)
    return losses[:stop].mean()


def multilabel_supcon_loss(
    features: torch.Tensor,
    targets: torch.Tensor,
    temperature: Temperature = 0.2,
    base_temperature: float | None = None,
    backend: str = "auto",
    legacy_sadcl: bool = False,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    r"""SADCL's sample-to-sample contrastive loss (SSCL) on label-level features.

    Features are L2-normalised; the rows (v, b, c) with ``targets[b, c] == 1`` form the set, with the
    class c as their label, and the loss is :func:`label_supcon_loss` over that set with
    ``reduction="mean"``. Rows whose target is 0 or -1 take no part.

    Args:
        features: ``[B, C, D]`` or ``[B, V, C, D]`` label-level features (V views).
        targets: ``[B, C]`` with 1 positive, 0 negative, -1 unknown.
        temperature, base_temperature: :math:`\tau > 0` (a number or a 0-dim tensor, see :func:`label_supcon_loss`),
            :math:`\tau_{base}` (defaults to :math:`\tau`).
        backend: see :func:`label_supcon_loss`.
        legacy_sadcl: reproduce the released SADCL code's anchor mask, built in (b, v, c) order while the
            rows are in (v, b, c) order: row (v, b, c) is an anchor only if also
            ``targets[(v*B + b) // V, c] == 1``, and the mean still divides by V * (number of positives).
            Never the default. With a process group the mask is that of the global batch (B is the
            global batch size), i.e. the single-process legacy loss over the concatenation.
        process_group: see :func:`label_supcon_loss`. The global batch is the concatenation of all
            ranks' features and targets along B, in rank order; this rank's anchors are the rows of its
            samples, and the result is the single-process loss over the global batch on every rank
            (mean over the global number of positive rows), with ``world_size`` × its gradient for this
            rank's rows.

    Shape:
        features ``[B, C, D]`` or ``[B, V, C, D]``, targets ``[B, C]`` → scalar.

    Example:
        >>> z = torch.randn(4, 2, 5, 32, requires_grad=True)
        >>> t = torch.randint(0, 2, (4, 5))
        >>> multilabel_supcon_loss(z, t).backward()
    """
    check_features(features, "features", (3, 4), "[B, C, D] or [B, V, C, D]")
    if features.dim() == 3:
        features = features.unsqueeze(1)
    b, v, c, _ = features.shape
    targets = check_targets(targets, b, c)
    base_temperature = check_temperatures(temperature, base_temperature)
    device = check_same_device(features=features, targets=targets)
    check_target_values(targets)
    if process_group is not None:
        world_size = distributed.check_process_group(process_group)[1]
    backend = _backends.resolve(backend, device, "label_supcon", features, v * b * c)
    if process_group is not None:
        everything, sizes, start = distributed.gather_with_sizes(features, process_group)  # [B_total, V, C, D]
        all_targets = distributed.all_gather_no_grad(targets, sizes, process_group)
        # Sample-major rows: this rank's anchors, the rows of its samples, are contiguous.
        rows, labels = multilabel_rows(everything, all_targets, sample_major=True)
        anchors = (start * v * c, (start + b) * v * c)
        losses = _anchor_losses(backend, rows, labels, temperature, base_temperature, True, anchors)
        if legacy_sadcl:  # the global batch's mask, at this rank's rows
            losses = losses * legacy_sadcl_gate(all_targets, v, sample_major=True)[start : start + b].reshape(-1)
        count = (labels >= 0).sum().clamp(min=1).to(losses.dtype)
        return _shard_result(losses, count, "mean", process_group, world_size)
    if backend == "torch":
        return reference.multilabel_supcon_loss(features, targets, temperature, base_temperature, legacy_sadcl)
    rows, labels = multilabel_rows(features, targets, sample_major=False)  # SADCL's (v, b, c) order
    losses = _label_supcon_rows(backend, unit_rows(rows, backend), labels, temperature, base_temperature)
    if legacy_sadcl:
        losses = losses * legacy_sadcl_gate(targets, v, sample_major=False).reshape(-1)
    return reduce_rows(losses, (labels >= 0).sum(), "mean")


def prototype_nce_loss(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    targets: torch.Tensor,
    temperature: Temperature = 0.07,
    backend: str = "auto",
) -> torch.Tensor:
    r"""SADCL's prototype-to-sample contrastive loss (PSCL): each prototype against its class column.

    With :math:`s_{bc} = \cos(z_{bc}, p_c)/\tau`, known rows :math:`K_c = \{b : t_{bc} \ge 0\}` and
    positives :math:`P_c = \{b : t_{bc} = 1\}`:

    .. math::
        L = -\frac{1}{\sum_c |P_c|} \sum_{c : K_c \ne \emptyset}
            \Big( \log\sum_{b \in P_c} e^{s_{bc}} - \log\sum_{b \in K_c} e^{s_{bc}} \Big),

    an LSE over an empty set being 0, and L = 0 when there is no positive. A class without positives
    in the batch still pushes its known rows away from its prototype.

    Args:
        features: ``[B, C, D]`` label-level features.
        prototypes: ``[C, D]`` class prototypes (gradients flow to them too).
        targets: ``[B, C]`` with 1 positive, 0 negative, -1 unknown.
        temperature: :math:`\tau > 0`, a number or a 0-dim tensor (whose gradient is exact: from the op's
            saved statistics).
        backend: see :func:`label_supcon_loss`.

    Shape:
        features ``[B, C, D]``, prototypes ``[C, D]``, targets ``[B, C]`` → scalar.

    Example:
        >>> z, p = torch.randn(8, 5, 32, requires_grad=True), torch.randn(5, 32)
        >>> prototype_nce_loss(z, p, torch.randint(-1, 2, (8, 5))).backward()
    """
    check_features(features, "features", (3,), "[B, C, D]")
    b, c, d = features.shape
    check_features(prototypes, "prototypes", (2,), f"[C={c}, D={d}]")
    if prototypes.shape != (c, d):
        raise ValueError(f"prototypes must be [C={c}, D={d}], got shape {tuple(prototypes.shape)}")
    targets = check_targets(targets, b, c)
    check_temperature(temperature)
    device = check_same_device(features=features, prototypes=prototypes, targets=targets)
    check_target_values(targets)
    backend = _backends.resolve(backend, device, "prototype_nce", features, b * c)
    if backend == "torch":
        return reference.prototype_nce_loss(features, prototypes, targets, temperature)
    prototype_nce = registry.op("prototype_nce", backend)
    loss, stats, logits, _ = prototype_nce(features, prototypes, targets, _temperature.number(temperature))
    if not _temperature.learned(temperature):
        return loss
    derivative = _temperature.prototype_nce_derivative(stats, logits, targets, temperature)
    return _temperature.straight_through(loss, temperature, derivative)


def prototype_ce_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: Temperature = 0.1,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Cross-entropy of each row against all C prototypes, by cosine similarity.

    .. math::
        L = \frac{1}{|V|} \sum_{i \in V} -\log \operatorname{softmax}_c\big(\cos(z_i, p_c)/\tau\big)_{y_i},
        \qquad V = \{i : y_i \ge 0\}, \quad L = 0 \text{ when } V = \emptyset.

    This is TRM-ML's text-region / region-prototype matching shape, and a fused linear cross-entropy
    for small C. Gradients flow to features and prototypes.

    Args:
        features: ``[N, D]`` rows.
        labels: ``[N]`` int64 class ids in ``[0, C)``, or -1 to ignore a row.
        prototypes: ``[C, D]``.
        temperature: :math:`\tau > 0`, a number or a 0-dim tensor (whose gradient is exact: from the op's
            saved statistics).
        backend: see :func:`label_supcon_loss`.

    Shape:
        features ``[N, D]``, labels ``[N]``, prototypes ``[C, D]`` → scalar.

    Example:
        >>> z, p = torch.randn(10, 16, requires_grad=True), torch.randn(4, 16)
        >>> prototype_ce_loss(z, torch.randint(0, 4, (10,)), p).backward()
    """
    check_features(features, "features", (2,), "[N, D]")
    n, d = features.shape
    check_features(prototypes, "prototypes", (2,), f"[C, D={d}]")
    if prototypes.shape[1] != d or prototypes.shape[0] == 0:
        raise ValueError(f"prototypes must be [C >= 1, D={d}], got shape {tuple(prototypes.shape)}")
    labels = check_labels(labels, n)
    check_temperature(temperature)
    device = check_same_device(features=features, labels=labels, prototypes=prototypes)
    check_label_values(labels, num_classes=prototypes.shape[0])
    backend = _backends.resolve(backend, device, "prototype_ce", features)
    if backend == "torch":
        return reference.prototype_ce_loss(features, labels, prototypes, temperature)
    prototype_ce = registry.op("prototype_ce", backend)
    rows, lse, _ = prototype_ce(features, labels, prototypes, _temperature.number(temperature))
    if _temperature.learned(temperature):
        derivative = _temperature.prototype_ce_derivative(features, labels, prototypes, lse, temperature)
        rows = _temperature.straight_through(rows, temperature, derivative)
    return reduce_rows(rows, (labels >= 0).sum(), "mean")


def update_prototypes_(
    prototypes: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    momentum: float = 0.99,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Moves each present class's prototype towards the mean of its rows, in place, without gradient.

    .. math::
        p_c \leftarrow m\, p_c + (1 - m) \frac{1}{|\{i : y_i = c\}|} \sum_{i : y_i = c} z_i,
        \quad\text{then } p_c \leftarrow p_c / \max(\lVert p_c \rVert, 10^{-8}) \text{ if normalize},

    for every class c present among the rows with :math:`y_i \ge 0`. Absent classes are left
    bit-for-bit unchanged. Nothing is modified when an argument is invalid.

    Args:
        prototypes: ``[C, D]`` floating tensor, updated in place.
        features: ``[N, D]`` rows, or ``[B, C, D]`` label-level features.
        labels: ``[N]`` class ids (-1 ignores a row) for 2-D features, or ``[B, C]`` targets for 3-D
            features (rows with target 1 count, with their column as class).
        momentum: m in [0, 1].
        normalize: L2-normalise the updated prototypes.
        backend: see :func:`label_supcon_loss`.

    Returns:
        ``prototypes``.

    Example:
        >>> protos = F.normalize(torch.randn(3, 8), dim=1)
        >>> _ = update_prototypes_(protos, torch.randn(5, 8), torch.tensor([0, 0, 2, -1, 2]), momentum=0.9)
    """
    check_features(prototypes, "prototypes", (2,), "[C, D]")
    c, d = prototypes.shape
    check_features(features, "features", (2, 3), f"[N, D={d}] or [B, C={c}, D={d}]")
    check_momentum(momentum)
    if features.dim() == 3:
        if features.shape[1:] != (c, d):
            raise ValueError(f"features must be [B, C={c}, D={d}], got shape {tuple(features.shape)}")
        targets = check_targets(labels, features.shape[0], c)
        device = check_same_device(prototypes=prototypes, features=features, targets=targets)
        check_target_values(targets)
        features, labels = multilabel_rows(features.unsqueeze(1), targets, sample_major=True)
    else:
        if features.shape[1] != d:
            raise ValueError(f"features must be [N, D={d}], got shape {tuple(features.shape)}")
        labels = check_labels(labels, features.shape[0])
        device = check_same_device(prototypes=prototypes, features=features, labels=labels)
        check_label_values(labels, num_classes=c)
    backend = _backends.resolve(backend, device, "update_prototypes", features)
    with torch.no_grad():
        if backend == "torch":
            reference.update_prototypes_(prototypes, features, labels, momentum, normalize)
        else:
            update = registry.op("update_prototypes_", backend)
            update(prototypes, features.detach(), labels, float(momentum), bool(normalize))
    return prototypes
