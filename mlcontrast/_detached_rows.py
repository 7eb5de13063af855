r"""``label_supcon`` at a learned (tensor) temperature with detached rows (a queue, a memory), without
gradient work for them.

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

from mlcontrast.ops import registry

__all__ = ["DetachedRowsScaled"]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The sum of the products of two equal-shape tensors, accumulated in fp32 (fp64 for fp64)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


class DetachedRowsScaled(torch.autograd.Function):
    """The per-row losses of ``label_supcon`` on ``features * scale`` at temperature 1 (anchors ``anchors``,
    every row a contrast row), with the rows from ``grad_stop`` on detached: they get no gradient and cost
    no gradient work, and ``scale`` gets its exact gradient (module docstring).

    ``apply(features, scale, labels, backend, anchors, grad_stop)``: ``features`` ``[R, D]``, ``scale`` a
    0-dim tensor (:math:`\\tau^{-1/2}`), ``labels`` ``[R]``, a fused ``backend``, ``anchors`` ``(start,
    stop)`` with ``stop <= grad_stop < R``.
    """

    @staticmethod
    def forward(ctx, features, scale, labels, backend, anchors, grad_stop):
        start, stop = anchors
        z = features * scale
        rows, lse, n_pos = registry.op("label_supcon", backend)(z, labels, 1.0, 1.0, start, stop, 0, grad_stop)
        ctx.save_for_backward(z, labels, lse, n_pos, scale)
        ctx.backend, ctx.anchors, ctx.grad_stop = backend, anchors, grad_stop
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        z, labels, lse, n_pos, scale = ctx.saved_tensors
        start, stop = ctx.anchors
        kept = ctx.grad_stop
        backward = registry.backward_op("label_supcon", ctx.backend)
        dz = backward(grad_rows, z, labels, lse, n_pos, 1.0, 1.0, start, stop, 0, kept)  # 0 from kept on
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # The same pairs' gradient over the kept rows alone, from the full statistics: 2 T_S.
            kept_only = backward(grad_rows[:kept], z[:kept], labels[:kept], lse[:kept], n_pos[:kept], 1.0, 1.0,
                                 start, stop, 0, None)  # fmt: skip
            t = _dot(dz[:kept], z[:kept]) - 0.5 * _dot(kept_only, z[:kept])
            grad_scale = (2 * t / scale).to(scale.dtype)
        if ctx.needs_input_grad[0]:
            dz[:kept].mul_(scale.to(dz.dtype))  # dz' = c dz of the rows z' = c z; the detached rows' are 0
        return (dz if ctx.needs_input_grad[0] else None), grad_scale, None, None, None, None
