r"""A drop-in :class:`SupConLoss` for pytorch-metric-learning 2.x (extra ``[pml]``), fused where it can be.

``mlcontrast.pml.SupConLoss`` subclasses PML's own ``SupConLoss`` (so ``CrossBatchMemory`` and
``DistributedLossWrapper`` accept it, and reducers, regularisers and recorded statistics work as they do
in PML) and returns the value and gradients of PML's loss for the same call. It replaces only the
per-anchor losses: with PML's cosine similarity :math:`s_{ij} = \cos(e_i, r_j)/\tau`, anchor i's pairs
:math:`C_i` (all ref rows, minus at most one "self" row) and positives :math:`P_i` (those with its label),

.. math::
    \ell_i = \log\sum_{j \in C_i} e^{s_{ij}} - \frac{1}{|P_i|}\sum_{p \in P_i} s_{ip}
    \quad (P_i \ne \emptyset), \qquad \ell_i = 0 \text{ otherwise},

computed by the fused ``label_supcon`` kernels (no N x M matrix) whenever the pairs are all pairs (minus
self) that PML would build or that ``CrossBatchMemory`` passes:

* ``loss(embeddings, labels)``: the batch against itself, minus self (both roles get gradients);
* ``loss(embeddings, labels, ref_emb=R, ref_labels=L)``: PML's meaning, the ref rows *replace* the contrast
  set (all pairs, no self);
* ``CrossBatchMemory(SupConLoss(...))``: ``ref_emb`` is the detached memory, which holds the batch, and
  ``indices_tuple`` is all pairs minus each anchor's own memory slot; the anchors get their gradient.

Anything else (another distance, triplet or mined ``indices_tuple``, ``labels=None``, a ref set that
requires grad and holds copies of the anchors) takes PML's dense path. PML's quirks are kept: the loss is 0
when there is no positive or no negative pair at all, and its default ``AvgNonZeroReducer`` averages the
anchors whose loss is > 0. PML's own index tuples (``CrossBatchMemory`` builds them) still cost
O(N M); this class checks them with O(N M) bits, not floats.

Example:
    >>> from pytorch_metric_learning.losses import CrossBatchMemory
    >>> loss_fn = CrossBatchMemory(SupConLoss(temperature=0.1), embedding_size=128, memory_size=4096)
    >>> loss = loss_fn(torch.randn(256, 128, requires_grad=True), torch.randint(0, 10, (256,)))
"""

from __future__ import annotations

import torch

try:
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import SupConLoss as _PMLSupConLoss
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mlcontrast.pml needs pytorch-metric-learning 2.x: pip install 'mlcontrast[pml]'"
    ) from error

from mlcontrast import _backends
from mlcontrast._layout import unit_rows
from mlcontrast._validation import check_backend
from mlcontrast.ops import registry

__all__ = ["SupConLoss"]


class SupConLoss(_PMLSupConLoss):
    """PML's ``SupConLoss`` with fused per-anchor losses (see :mod:`mlcontrast.pml`).

    Args:
        temperature: :math:`\\tau > 0`, as PML's.
        backend: the mlcontrast backend of the fused path (``"auto"`` by default).
        **kwargs: PML's (``distance``, ``reducer``, ``embedding_regularizer``, ...).
    """

    def __init__(self, temperature: float = 0.1, backend: str = "auto", **kwargs) -> None:
        super().__init__(temperature=temperature, **kwargs)
        self.backend = check_backend(backend)
        #: How the last call was computed: "fused" or "dense" (for tests and curious users).
        self.last_path: str | None = None

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        plan = self._fused_plan(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.last_path = "dense" if plan is None else "fused"
        if plan is None:
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return self._fused_loss(embeddings, labels, ref_emb, ref_labels, plan)

    # ------------------------------------------------------------------ which calls are fused

    def _fusable_distance(self) -> bool:
        d = self.distance
        return (type(d) is CosineSimilarity and d.normalize_embeddings and d.p == 2 and d.power == 1
                and d.is_inverted)  # fmt: skip

    def _fused_plan(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict | None:
        """How the fused kernels can compute this call, or None for PML's dense path. The plan's ``self``
        is None (no anchor skips a ref row) or the ``[N]`` ref row each anchor skips."""
        if labels is None or ref_labels is None or not self._fusable_distance():
            return None
        if not isinstance(self.temperature, (int, float)) or embeddings.dim() != 2 or ref_emb.dim() != 2:
            return None
        n, m = embeddings.shape[0], ref_emb.shape[0]
        if n == 0 or m == 0 or labels.dim() != 1 or ref_labels.dim() != 1 or embeddings.is_complex():
            return None
        if self._backend(embeddings, n + m) == "torch":
            return None  # PML's own dense path is the reference
        if indices_tuple is None:
            skipped = torch.arange(n, device=labels.device) if ref_labels is labels else None
        else:
            skipped = _all_pairs_but_self(indices_tuple, labels, ref_labels, n, m)
            if skipped is False:
                return None
        if skipped is None or (ref_emb is embeddings and ref_labels is labels):
            return {"self": skipped}
        # An anchor skips a ref row: that row must be the anchor itself (its values and label), as in
        # CrossBatchMemory's memory; the ref rows are then contrast-only (no gradient to the copies).
        if ref_emb.requires_grad or skipped.unique().numel() != n:
            return None
        if not torch.equal(ref_emb[skipped].to(embeddings.dtype), embeddings.detach()):
            return None
        if not torch.equal(ref_labels[skipped], labels.to(ref_labels.dtype)):
            return None
        return {"self": skipped}

    def _backend(self, embeddings: torch.Tensor, rows: int) -> str:
        return _backends.resolve(self.backend, embeddings.device, "label_supcon", embeddings, rows)

    # ------------------------------------------------------------------ the fused losses

    def _fused_loss(self, embeddings, labels, ref_emb, ref_labels, plan):
        n, m = embeddings.shape[0], ref_emb.shape[0]
        skipped = plan["self"]
        same_set = ref_emb is embeddings and ref_labels is labels
        if not _has_positive_and_negative_pairs(labels, ref_labels, skipped):
            return self.zero_losses()
        if same_set:  # the batch against itself, minus self
            rows, row_labels = embeddings, labels
            anchors, contrast_start, grad_stop = (0, n), 0, None
        elif skipped is None:  # the ref rows replace the contrast set
            rows = torch.cat([embeddings, ref_emb.to(embeddings.dtype)])
            row_labels = torch.cat([labels, ref_labels.to(labels.dtype)])
            anchors, contrast_start, grad_stop = (0, n), n, (n + m if ref_emb.requires_grad else 0)
        else:  # the memory without the anchors' own slots, the anchors in their place
            keep = torch.ones(m, dtype=torch.bool, device=ref_emb.device)
            keep[skipped] = False
            rows = torch.cat([embeddings, ref_emb[keep].detach().to(embeddings.dtype)])
            row_labels = torch.cat([labels, ref_labels[keep].to(labels.dtype)])
            anchors, contrast_start, grad_stop = (0, n), 0, 0
        # Any integer is a class in PML (-1 too): dense class ids >= 0 for the kernels.
        row_labels = torch.unique(row_labels, return_inverse=True)[1]
        backend = self._backend(embeddings, rows.shape[0])
        losses = _anchor_losses(backend, rows, row_labels, float(self.temperature), anchors, contrast_start,
                                grad_stop)  # fmt: skip
        return {
            "loss": {
                "losses": losses.to(embeddings.dtype),
                "indices": torch.arange(n, device=embeddings.device),
                "reduction_type": "element",
            }
        }


def _anchor_losses(backend, rows, labels, temperature, anchors, contrast_start, grad_stop) -> torch.Tensor:
    """The fused per-anchor losses of the L2-normalised ``rows`` (τ_base = τ: PML has no base temperature)."""
    label_supcon = registry.op("label_supcon", backend)
    z = unit_rows(rows, backend)
    out = label_supcon(z, labels, temperature, temperature, anchors[0], anchors[1], contrast_start, grad_stop)
    return out[0][anchors[0] : anchors[1]]


def _all_pairs_but_self(indices_tuple, labels, ref_labels, n: int, m: int):
    """The ref row each anchor skips (``[N]``), None if none skips one, or False if ``indices_tuple`` is not
    all pairs by label minus at most one ref row per anchor (the same number for every anchor)."""
    if len(indices_tuple) != 4:
        return False
    a1, p, a2, n_idx = indices_tuple
    device = labels.device
    positive = torch.zeros(n, m, dtype=torch.bool, device=device)
    negative = torch.zeros(n, m, dtype=torch.bool, device=device)
    positive[a1, p] = True
    negative[a2, n_idx] = True
    if int(positive.sum()) != a1.numel() or int(negative.sum()) != a2.numel() or (positive & negative).any():
        return False  # repeated or contradictory pairs
    same = labels[:, None] == ref_labels[None, :].to(labels.dtype)
    paired = positive | negative
    if not (torch.equal(positive, same & paired) and torch.equal(negative, ~same & paired)):
        return False  # pairs that are not "same label" / "other label"
    missing = m - paired.sum(dim=1)
    if bool((missing == 0).all()):
        return None
    if bool((missing == 1).all()):
        return (~paired).int().argmax(dim=1)
    return False


def _has_positive_and_negative_pairs(labels, ref_labels, skipped) -> bool:
    """PML computes the loss only if some pair is positive and some pair is negative (and not when every
    index list has at most one entry), counted from the labels without pairs."""
    classes, inverse = torch.unique(torch.cat([labels, ref_labels.to(labels.dtype)]), return_inverse=True)
    per_class = torch.bincount(inverse[labels.shape[0] :], minlength=classes.numel())
    same = per_class[inverse[: labels.shape[0]]]
    if skipped is not None:
        same = same - 1  # each anchor's skipped row is itself, of its own class
    pairs = ref_labels.shape[0] - (0 if skipped is None else 1)
    positives = int(same.sum())
    negatives = labels.shape[0] * pairs - positives
    return positives > 0 and negatives > 0 and not (positives <= 1 and negatives <= 1)
