r"""Detached reference rows (a queue, a memory) in ``label_supcon_loss`` (and ``multihot_supcon_loss``): no copy
of them (label_supcon on the CPU) and no gradient work for them, at a number or a learned (tensor) temperature.

* :func:`queue_losses`: the ``label_supcon_queue`` op, where the backend has it, takes the queue as its own
  input (normalised in the kernel) and saves the softmax-weighted mean of its rows, so that the backward
  never revisits the queue.
* Elsewhere, ``label_supcon`` runs on the rows and the queue concatenated, with ``grad_stop`` at the queue.

A learned temperature's exact gradient without gradient work for the detached rows, in both cases:
:func:`mlcontrast._temperature.pair_scaled` runs the op on the rows times :math:`c = \tau^{-1/2}` at
temperature 1 and lets autograd differentiate the scaling. Through the scaling, :math:`\tau`'s gradient
needs every row's gradient, detached ones too: against a queue of M rows the backward would do the M rows'
share of the work that a number temperature skips (``grad_stop``).

:class:`DetachedRowsScaled` gets the exact gradient from the other rows' work alone. With the pair
gradients :math:`G_{ij} = \partial L / \partial s_{ij}` (non-zero for anchors i) and :math:`s_{ij} = z'_i
\cdot z'_j` of the scaled rows :math:`z' = c z`,

.. math::
    \frac{\partial L}{\partial c} = \frac{2}{c} T, \qquad T = \sum_{ij} G_{ij} s_{ij}.

The op's backward with ``grad_stop`` S gives each row k < S the gradient of its own loss and of its
contrast role, :math:`dz'_k = \sum_j G_{kj} z'_j + \sum_i G_{ik} z'_i`, so
:math:`\sum_{k<S} dz'_k \cdot z'_k = T + T_S` with :math:`T_S = \sum_i \sum_{k<S} G_{ik} s_{ik}`, the part
of T on the columns below S. :math:`2 T_S` is the same sum for the backward over the rows below S alone
given the full statistics (``lse``, ``n_pos``): an S x S problem, small next to the queue. Hence
:math:`T = \sum_{k<S} dz'_k \cdot z'_k - T_S`, exactly, and the detached rows cost no gradient work.
"""

from __future__ import annotations

import torch

from mlcontrast import _temperature
from mlcontrast._temperature import Temperature
from mlcontrast.ops import registry
from mlcontrast.ops.contract import FUSED_OPS

__all__ = ["DetachedRowsScaled", "QueueAtLearnedTemperature", "queue_losses", "queue_op_takes"]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The sum of the products of two equal-shape tensors, accumulated in fp32 (fp64 for fp64)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


class DetachedRowsScaled(torch.autograd.Function):
    """The outputs of the pairwise op ``name`` (``"label_supcon"``, or ``"multihot_supcon"`` but for mulsupcon,
    whose class weights span the whole set) on ``features * scale`` at temperature 1, with the rows from
    ``grad_stop`` on detached: they get no gradient and cost no gradient work, and ``scale`` gets its exact
    gradient (module docstring).

    ``apply(features, scale, labels, backend, name, others, grad_stop)``: ``features`` ``[R, D]``, ``scale`` a
    0-dim tensor (:math:`\tau^{-1/2}`), ``labels`` the op's ``[R]`` labels or ``[R, C]`` targets, a fused
    ``backend``, ``others`` the op's arguments between those two tensors and ``grad_stop`` (its last: both
    temperatures 1 and the anchors ``(start, stop)`` with ``stop <= grad_stop < R``). Returns the op's outputs;
    the statistics after the rows are not differentiable.
    """

    @staticmethod
    def forward(ctx, features, scale, labels, backend, name, others, grad_stop):
        z = features * scale
        outputs = registry.op(name, backend)(z, labels, *others, grad_stop)
        ctx.save_for_backward(z, labels, scale, *outputs[1:])
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.call = (backend, name, others, grad_stop)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_rows, *unused_stat_grads):
        z, labels, scale, *stats = ctx.saved_tensors
        backend, name, others, kept = ctx.call
        backward = registry.backward_op(name, backend)
        dz = backward(grad_rows, z, labels, *stats, *others, kept)  # 0 from kept on
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # The same pairs' gradient over the kept rows alone, from the full statistics: 2 T_S.
            kept_stats = (s[:kept] for s in stats)
            kept_only = backward(grad_rows[:kept], z[:kept], labels[:kept], *kept_stats, *others, None)
            t = _dot(dz[:kept], z[:kept]) - 0.5 * _dot(kept_only, z[:kept])
            grad_scale = (2 * t / scale).to(scale.dtype)
        if ctx.needs_input_grad[0]:
            dz[:kept].mul_(scale.to(dz.dtype))  # dz' = c dz of the rows z' = c z; the detached rows' are 0
        return (dz if ctx.needs_input_grad[0] else None), grad_scale, None, None, None, None, None


class QueueAtLearnedTemperature(torch.autograd.Function):
    """The per-row losses of the ``label_supcon_queue`` op (a batch against a detached queue) at a tensor
    temperature :math:`\\tau`, run at ``float(τ)`` (a host sync, as the temperature check makes anyway), with
    :math:`\\tau`'s exact gradient from the same identity: with the batch rows' gradient dz (queue share
    included) and ``2 T_S`` from ``label_supcon``'s backward over the batch alone,
    :math:`\\partial L/\\partial\\tau = \\frac{1}{\\tau}\\big(\\sum_i g_i \\ell_i [\\tau_{base}\\text{ a number}]
    - T\\big)`, :math:`T = \\sum_k dz_k \\cdot z_k - T_S`.

    ``apply(features, temperature, labels, queue, queue_labels, base_temperature, normalize_queue, anchors,
    backend)``: ``base_temperature`` a number, or None for the temperature itself.
    """

    @staticmethod
    def forward(ctx, features, temperature, labels, queue, queue_labels, base_temperature, normalize_queue, anchors,
                backend):  # fmt: skip
        t = float(temperature)
        base = t if base_temperature is None else float(base_temperature)
        queue_op = registry.op("label_supcon_queue", backend)
        rows, lse, n_pos, queue_mean = queue_op(features, labels, queue, queue_labels, t, base, normalize_queue,
                                                *anchors)  # fmt: skip
        ctx.save_for_backward(features, labels, queue, queue_labels, lse, n_pos, queue_mean, rows)
        ctx.others = (t, base, normalize_queue, anchors, backend, base_temperature is not None)
        ctx.temperature_like = (temperature.dtype, temperature.device)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        features, labels, queue, queue_labels, lse, n_pos, queue_mean, rows = ctx.saved_tensors
        t, base, normalize_queue, (start, stop), backend, base_is_number = ctx.others
        backward = registry.backward_op("label_supcon_queue", backend)
        dz = backward(grad_rows, features, labels, queue, queue_labels, lse, n_pos, queue_mean, t, base,
                      normalize_queue, start, stop)  # fmt: skip
        grad_temperature = None
        if ctx.needs_input_grad[1]:
            batch_only = registry.backward_op("label_supcon", backend)(grad_rows, features, labels, lse, n_pos, t,
                                                                       base, start, stop, 0, None)  # fmt: skip
            pairs = _dot(dz, features) - 0.5 * _dot(batch_only, features)
            own = _dot(grad_rows, rows) if base_is_number else 0.0
            dtype, device = ctx.temperature_like
            grad_temperature = ((own - pairs) / t).to(dtype=dtype, device=device)
        return dz, grad_temperature, None, None, None, None, None, None, None


def queue_op_takes(backend: str, ref_features: torch.Tensor | None, temperature: Temperature) -> bool:
    """Whether the ``label_supcon_queue`` op computes this call: detached reference rows on a backend that has
    it (a learned temperature under ``torch.compile`` takes the sync-free path of :func:`_label_supcon_rows`)."""
    if ref_features is None or ref_features.requires_grad or backend not in FUSED_OPS["label_supcon_queue"].backends:
        return False
    return not (_temperature.learned(temperature) and torch.compiler.is_compiling())


def queue_losses(
    backend: str,
    rows: torch.Tensor,
    labels: torch.Tensor,
    queue: torch.Tensor,
    queue_labels: torch.Tensor,
    temperature: Temperature,
    base_temperature: Temperature,
    normalize: bool,
    anchors: tuple[int, int],
) -> torch.Tensor:
    """The per-row losses of the anchors ``anchors[0] .. anchors[1]`` of ``rows`` (normalised already, if
    asked) against the other rows and a detached queue (normalised by the op, if asked), by the
    ``label_supcon_queue`` op: no copy of the queue, no gradient work for it."""
    queue = queue.to(rows.dtype)  # as documented: the queue in the features' dtype (no copy when it is)
    if _temperature.learned(temperature):
        base = None if base_temperature is temperature else base_temperature
        losses = QueueAtLearnedTemperature.apply(rows, temperature, labels, queue, queue_labels, base, normalize,
                                                 anchors, backend)  # fmt: skip
    else:
        queue_op = registry.op("label_supcon_queue", backend)
        t, base = _temperature.number(temperature), _temperature.number(base_temperature)
        losses = queue_op(rows, labels, queue, queue_labels, t, base, normalize, *anchors)[0]
    return losses[anchors[0] : anchors[1]]
