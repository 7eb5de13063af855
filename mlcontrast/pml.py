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
O(N M); this class checks them in one O(pairs) pass of integer work, without an N x M matrix.

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
from mlcontrast._extension import EXTENSION_ERROR
from mlcontrast._layout import unit_rows
from mlcontrast._validation import check_backend
from mlcontrast.ops import registry
from mlcontrast.ops.contract import FUSED_OPS

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
        is None (no anchor skips a ref row) or the ``[N]`` ref row each anchor skips; ``ids`` holds the
        labels as dense class ids (:func:`_dense_ids`)."""
        if labels is None or ref_labels is None or not self._fusable_distance():
            return None
        if not isinstance(self.temperature, (int, float)) or embeddings.dim() != 2 or ref_emb.dim() != 2:
            return None
        n, m = embeddings.shape[0], ref_emb.shape[0]
        if n == 0 or m == 0 or labels.dim() != 1 or ref_labels.dim() != 1 or embeddings.is_complex():
            return None
        if self._backend(embeddings, n + m) == "torch":
            return None  # PML's own dense path is the reference
        ids = _dense_ids(labels, ref_labels)
        if indices_tuple is None:
            skipped = torch.arange(n, device=labels.device) if ref_labels is labels else None
        else:
            skipped = _all_pairs_but_self(indices_tuple, ids, n, m)
            if skipped is False:
                return None
        if skipped is None or (ref_emb is embeddings and ref_labels is labels):
            return {"self": skipped, "ids": ids}
        # An anchor skips a ref row: that row must be the anchor itself (its values and label), as in
        # CrossBatchMemory's memory; the ref rows are then contrast-only (no gradient to the copies).
        if ref_emb.requires_grad or skipped.unique().numel() != n:
            return None
        if not torch.equal(ref_emb[skipped].to(embeddings.dtype), embeddings.detach()):
            return None
        if not torch.equal(ids[1][skipped], ids[0]):
            return None
        return {"self": skipped, "ids": ids}

    def _backend(self, embeddings: torch.Tensor, rows: int) -> str:
        return _backends.resolve(self.backend, embeddings.device, "label_supcon", embeddings, rows)

    # ------------------------------------------------------------------ the fused losses

    def _fused_loss(self, embeddings, labels, ref_emb, ref_labels, plan):
        n, m = embeddings.shape[0], ref_emb.shape[0]
        skipped = plan["self"]
        # Any integer is a class in PML (-1 too): the kernels take the dense class ids >= 0 of the plan.
        ids, ref_ids, classes = plan["ids"]
        same_set = ref_emb is embeddings and ref_labels is labels
        if not _has_positive_and_negative_pairs(ids, ref_ids, classes, skipped):
            return self.zero_losses()
        backend = self._backend(embeddings, n + m)
        t = float(self.temperature)  # τ_base = τ: PML has no base temperature
        # Each part normalised on its own: a detached memory then stays out of the backward.
        anchors = unit_rows(embeddings, backend)
        if same_set:  # the batch against itself, minus self
            rows, row_ids = anchors, ids
            contrast_start, grad_stop = 0, None
        elif skipped is None:  # the ref rows replace the contrast set
            rows = torch.cat([anchors, unit_rows(ref_emb, backend).to(anchors.dtype)])
            row_ids = torch.cat([ids, ref_ids])
            contrast_start, grad_stop = n, (n + m if ref_emb.requires_grad else 0)
        else:  # the memory without the anchors' own slots, the anchors in their place
            keep = torch.ones(m, dtype=torch.bool, device=ref_emb.device)
            keep[skipped] = False
            memory, memory_ids = ref_emb[keep].detach().to(anchors.dtype), ref_ids[keep]
            if backend in FUSED_OPS["label_supcon_queue"].backends:
                # The rest of the memory as the queue op's queue (normalised in the kernel, no cat); the anchors
                # as contrast rows are the memory's detached copies: no contrast-role gradient (grad_stop 0).
                queue_op = registry.op("label_supcon_queue", backend)
                return _element_losses(queue_op(anchors, ids, memory, memory_ids, t, t, True, 0, n, 0)[0], embeddings)
            rows = torch.cat([anchors, unit_rows(memory, backend).to(anchors.dtype)])
            row_ids = torch.cat([ids, memory_ids])
            contrast_start, grad_stop = 0, 0
        losses = registry.op("label_supcon", backend)(rows, row_ids, t, t, 0, n, contrast_start, grad_stop)[0]
        return _element_losses(losses, embeddings)


def _element_losses(losses: torch.Tensor, embeddings: torch.Tensor) -> dict:
    """PML's loss dictionary for the per-anchor losses of the fused path."""
    n = embeddings.shape[0]
    return {
        "loss": {
            "losses": losses[:n].to(embeddings.dtype),
            "indices": torch.arange(n, device=embeddings.device),
            "reduction_type": "element",
        }
    }


def _dense_ids(labels: torch.Tensor, ref_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The labels and ref labels as dense class ids ``0 .. K-1`` (one numbering for both), and K."""
    classes, inverse = torch.unique(torch.cat([labels, ref_labels.to(labels.dtype)]), return_inverse=True)
    return inverse[: labels.shape[0]], inverse[labels.shape[0] :], classes.numel()


#: Pairs checked at a time by the torch ops: the scratch stays in cache and no O(pairs) buffer is allocated.
_PAIR_CHUNK = 1 << 18
#: Whether the extension's one-pass CPU check (csrc/cpu/pair_lists.cpp) is there.
_NATIVE_CHECK = EXTENSION_ERROR is None and hasattr(torch.ops.mlcontrast_pml, "pairs_of_kind")


def _pairs_of_kind(rows: torch.Tensor, cols: torch.Tensor, n: int, m: int, same_pair: torch.Tensor, same: bool) -> bool:
    """Whether ``(rows, cols)`` are distinct pairs of ``[0, n) x [0, m)`` in row-major order, as
    ``torch.where`` lists them (and ``CrossBatchMemory`` keeps them), and all of one kind: same-label pairs
    (``same_pair``, the ``[N * M]`` flags) if ``same``, other-label pairs otherwise. Their positions
    ``rows * m + cols`` must strictly increase (with ``cols`` in range, ``rows`` then never decrease, so the
    ends bound them all). One O(pairs) pass, in chunks: no O(pairs) buffer is allocated."""
    if rows.dim() != 1 or rows.shape != cols.shape or rows.is_floating_point() or cols.is_floating_point():
        return False
    if _NATIVE_CHECK and rows.device.type == "cpu" and rows.dtype == cols.dtype == torch.int64:
        return torch.ops.mlcontrast_pml.pairs_of_kind(rows, cols, same_pair, n, m, same)  # one pass, in C++
    total = rows.numel()
    keys = torch.empty(min(total, _PAIR_CHUNK), dtype=torch.int64, device=rows.device)
    flags = torch.empty(keys.shape, dtype=torch.bool, device=rows.device)
    last = -1
    for start in range(0, total, _PAIR_CHUNK):
        count = min(_PAIR_CHUNK, total - start)
        c = cols[start : start + count]
        low, high = torch.aminmax(c)
        if int(low) < 0 or int(high) >= m:
            return False
        k, f = keys[:count], flags[:count]
        torch.add(c, rows[start : start + count], alpha=m, out=k)
        if int(k[0]) <= last or int(k[-1]) >= n * m:
            return False
        if count > 1 and not bool(torch.gt(k[1:], k[:-1], out=f[: count - 1]).all()):
            return False
        last = int(k[-1])
        torch.take(same_pair, k, out=f)
        if not (bool(f.all()) if same else not bool(f.any())):
            return False
    return True


def _all_pairs_but_self(indices_tuple, ids, n: int, m: int):
    """The ref row each anchor skips (``[N]``), None if none skips one, or False if ``indices_tuple`` is not
    all pairs by label minus one same-label ref row per anchor, or none, in row-major order (other orders
    take PML's dense path). Exact in O(pairs): distinct pairs of the right kind and the right number are
    the whole set."""
    if len(indices_tuple) != 4:
        return False
    a1, p, a2, q = indices_tuple
    lab, ref, classes = ids
    same = torch.bincount(ref, minlength=classes)[lab]  # each anchor's same-label ref rows
    if a2.numel() != n * m - int(same.sum()):
        return False
    same_pair = (lab[:, None] == ref[None, :]).view(-1)  # N x M bits, read at the listed pairs only
    if not (_pairs_of_kind(a2, q, n, m, same_pair, same=False) and _pairs_of_kind(a1, p, n, m, same_pair, same=True)):
        return False
    missing = same - torch.bincount(a1, minlength=n)
    if bool((missing == 0).all()):
        return None
    if not bool((missing == 1).all()):
        return False
    # The one positive each anchor lacks: its class's ref indices summed, minus those it lists.
    index_sums = torch.zeros(classes, dtype=torch.int64, device=ref.device)
    index_sums.index_add_(0, ref, torch.arange(m, device=ref.device))
    listed = torch.zeros(n, dtype=torch.int64, device=ref.device).index_add_(0, a1.to(torch.int64), p.to(torch.int64))
    return index_sums[lab] - listed


def _has_positive_and_negative_pairs(ids, ref_ids, classes: int, skipped) -> bool:
    """PML computes the loss only if some pair is positive and some pair is negative (and not when every
    index list has at most one entry), counted from the labels without pairs."""
    same = torch.bincount(ref_ids, minlength=classes)[ids]
    if skipped is not None:
        same = same - 1  # each anchor's skipped row is itself, of its own class
    pairs = ref_ids.shape[0] - (0 if skipped is None else 1)
    positives = int(same.sum())
    negatives = ids.shape[0] * pairs - positives
    return positives > 0 and negatives > 0 and not (positives <= 1 and negatives <= 1)
