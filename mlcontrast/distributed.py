"""Cross-rank contrast sets: gathering rows from every rank of a ``torch.distributed`` group.

The losses of :mod:`mlcontrast.functional` take ``process_group=``: every rank's rows then join the
contrast set, the local rows are the anchors, and the result is built so that DDP's averaging of
parameter gradients reproduces single-process training on the concatenation of all ranks' rows.
This module holds the collective pieces they use:

- :func:`all_gather_with_grad`: concatenation of every rank's tensor along dim 0 (uneven sizes, empty
  shards allowed) whose backward sends each row's gradient, summed over ranks, back to its owner
  (:func:`reduce_scatter_rows`: one reduce-scatter);
- :func:`gather_sizes` (every rank's row count, checking dtypes and trailing shapes agree),
  :func:`gather_with_sizes`, :func:`all_gather_no_grad` (labels and targets, with known sizes),
  :func:`rank_offset`, :func:`all_reduce_sum` (global counts and sums, no host sync),
  :func:`check_process_group`, :func:`local_result` (global value, ``world_size`` × local gradient) and
  :func:`shard_result` (a loss's result on each rank from its anchors' losses).

Each rank computes only its own anchors' losses, against all gathered rows (the ops' anchor rows):
O(N_rank N D) work per rank instead of O(N^2 D). Its anchors' gradients with respect to the other
ranks' rows reach their owners through the gather's backward.

Every rank of the group must make the same calls in the same order (these are collectives), and every
rank must call ``backward()`` on a result that depends on a gathered tensor, or none may.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_with_grad",
    "reduce_scatter_rows",
    "gather_sizes",
    "gather_with_sizes",
    "all_gather_no_grad",
    "rank_offset",
    "all_reduce_sum",
    "check_process_group",
    "local_result",
    "shard_result",
]

# The per-rank header gathered before the data: [ndim, dtype code, *shape padded with zeros].
_MAX_DIMS = 64
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)


def check_process_group(group) -> tuple[int, int]:
    """``(rank in group, group size)``; ``RuntimeError`` when torch.distributed is not initialised,
    ``ValueError`` when this process is not a member of ``group``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() first, or pass process_group=None"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of process_group")
    return rank, dist.get_world_size(group)


def _header(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 0:
        raise ValueError("all_gather_with_grad needs a tensor with at least one dimension, got a 0-dim tensor")
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"all_gather_with_grad supports up to {_MAX_DIMS} dimensions, got {tensor.dim()}")
    code = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1
    values = [tensor.dim(), code, *tensor.shape] + [0] * (_MAX_DIMS - tensor.dim())
    return torch.tensor(values, dtype=torch.int64, device=tensor.device)


def gather_sizes(tensor: torch.Tensor, group=None) -> list[int]:
    """Every rank's ``tensor.shape[0]``, in rank order (one small all_gather and one host sync).

    Also checks that all ranks hold the same dtype and the same trailing shape, raising the same
    ``ValueError`` on every rank otherwise (so no rank is left waiting in a later collective).

    Example:
        >>> sizes = gather_sizes(torch.zeros(3, 8), group)  # doctest: +SKIP
        >>> sizes                                            # doctest: +SKIP
        [3, 0, 5]
    """
    header = _header(tensor)
    headers = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(headers, header, group=group)
    rows = torch.stack(headers).tolist()  # the one host sync: sizes are needed to slice
    first = rows[0]
    if any(r[0] != first[0] or r[1] != first[1] or r[3:] != first[3:] for r in rows):
        shapes = ", ".join(
            f"rank {i}: {tuple(r[2 : 2 + r[0]])} {_DTYPES[r[1]] if r[1] >= 0 else 'other dtype'}"
            for i, r in enumerate(rows)
        )
        raise ValueError(
            f"every rank must hold a tensor of the same dtype and trailing shape (only dim 0 may differ); got {shapes}"
        )
    return [r[2] for r in rows]


def rank_offset(sizes: list[int], rank: int) -> int:
    """Index of ``rank``'s first row in the concatenation of all ranks' rows."""
    return sum(sizes[:rank])


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks of ``group``, as a new tensor without gradient (no host sync).

    Example:
        >>> n_valid = all_reduce_sum((labels >= 0).sum(), group)  # doctest: +SKIP
    """
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def all_gather_no_grad(tensor: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """The concatenation along dim 0 of every rank's tensor, given every rank's size (no gradient).

    ``sizes`` are those of :func:`gather_sizes` (for example those of the features the tensor goes with),
    so no second size exchange is needed; rows are padded to the largest size for one all_gather.
    """
    most = max(sizes)
    trailing = tuple(tensor.shape[1:])
    if most == 0:
        return tensor.new_empty((0, *trailing))
    padded = tensor.new_zeros((most, *trailing))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def reduce_scatter_rows(grad: torch.Tensor, sizes: list[int], rank: int, group=None) -> torch.Tensor:
    """Rank ``rank``'s rows of the sum over the group of ``grad`` (``[sum(sizes), ...]`` on every rank).

    One reduce-scatter of the rows padded to the largest shard: each rank receives only its own rows,
    half the traffic of an all-reduce of the whole tensor. Where the process group's backend has no
    reduce-scatter, an all-reduce of the whole tensor gives the same rows.
    """
    most, world = max(sizes), len(sizes)
    if all(size == most for size in sizes):
        padded = grad.contiguous()
    else:
        padded = grad.new_zeros((world * most, *grad.shape[1:]))
        start = 0
        for r, size in enumerate(sizes):
            padded[r * most : r * most + size] = grad[start : start + size]
            start += size
    out = grad.new_empty((most, *grad.shape[1:]))
    try:
        dist.reduce_scatter_tensor(out, padded, op=dist.ReduceOp.SUM, group=group)
    except (RuntimeError, NotImplementedError):  # the same on every rank: the backend lacks the collective
        total = grad.contiguous().clone()  # autograd may share the incoming buffer with other nodes
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        start = rank_offset(sizes, rank)
        return total[start : start + sizes[rank]]
    return out[: sizes[rank]]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        return all_gather_no_grad(tensor.detach().contiguous(), sizes, group)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # Every rank used the whole gathered tensor: the gradient of a row is the sum over ranks of
        # what each rank's graph sent to it, and each rank needs only its own rows.
        if sum(ctx.sizes) == 0:  # every rank knows the sizes, so all skip together
            return grad[:0], None, None, None
        return reduce_scatter_rows(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


def gather_with_sizes(tensor: torch.Tensor, group=None) -> tuple[torch.Tensor, list[int], int]:
    """``(all_gather_with_grad(tensor, group), every rank's size, this rank's offset)``."""
    sizes = gather_sizes(tensor, group)
    rank = dist.get_rank(group)
    return _AllGatherWithGrad.apply(tensor, group, sizes, rank), sizes, rank_offset(sizes, rank)


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    r"""Concatenates every rank's ``tensor`` along dim 0, in rank order, with gradients to each row's owner.

    With :math:`x_r` the ``[n_r, ...]`` tensor of rank r (sizes may differ between ranks, 0 included),
    every rank gets :math:`X = [x_0; x_1; \dots; x_{W-1}]`. In backward, rank r holds
    :math:`G_r = \partial L_r / \partial X` for its own objective :math:`L_r`; the gradients are summed
    over the group and rank r receives its rows (one reduce-scatter, :func:`reduce_scatter_rows`):

    .. math::
        \frac{\partial}{\partial x_r} \sum_{r'} L_{r'} = \Big(\sum_{r'} G_{r'}\Big)[o_r : o_r + n_r],
        \qquad o_r = \sum_{r' < r} n_{r'}.

    So each rank receives the gradient of the sum of all ranks' objectives with respect to its rows.
    Every rank of the group must call it (it is a collective: one all_gather of a small header, which
    syncs with the host to learn the sizes, then one all_gather of the rows padded to the largest
    size), and every rank must call ``backward()`` through it, or none.

    Args:
        tensor: this rank's rows; all ranks must pass the same dtype and trailing shape (``ValueError``
            on every rank otherwise).
        group: the ``torch.distributed`` process group; None means the default group.

    Shape:
        ``[n_r, *S]`` on rank r → ``[sum_r n_r, *S]`` on every rank.

    Example:
        >>> # on each of 2 ranks, after torch.distributed.init_process_group("gloo", ...)
        >>> x = torch.randn(2 + dist.get_rank(), 8, requires_grad=True)  # doctest: +SKIP
        >>> everything = all_gather_with_grad(x)                         # [5, 8] on both ranks  # doctest: +SKIP
        >>> everything.sum().backward()                                  # x.grad == 2 (ranks) * ones  # doctest: +SKIP
    """
    check_process_group(group)
    return gather_with_sizes(tensor, group)[0]


def local_result(local: torch.Tensor, total: torch.Tensor | None, world_size: int) -> torch.Tensor:
    """A tensor whose value is ``total`` (``local`` when None) and whose gradient is ``world_size`` × ``local``'s.

    ``world_size * local - (world_size * local).detach()`` is exactly 0 in value and carries
    ``world_size`` × the gradient of ``local``; adding the detached value makes the result bit-exact.
    """
    scaled = world_size * local
    return (local.detach() if total is None else total) + (scaled - scaled.detach())


def shard_result(
    local_rows: torch.Tensor, count: torch.Tensor | int, reduction: str, group, world_size: int
) -> torch.Tensor:
    """This rank's result from the losses of its own anchors, ``local_rows`` (functions of all ranks' rows);
    ``count`` is the global count that ``"mean"`` divides by (>= 1).

    Why the gradients come out as the contract says: let ``l_r`` be rank r's share (its anchors' sum,
    divided by the global count for "mean"), so the global loss is ``L = sum_r l_r``. The result has the
    value of ``all_reduce(l_r) = L`` and the gradient of ``world_size * l_r`` (:func:`local_result`).
    Backward on rank r sends ``world_size * dl_r/dX`` to the gathered rows X; the gather's backward
    sums these over ranks, ``world_size * d(sum_r l_r)/dX = world_size * dL/dX``, and keeps rank r's slice:
    ``features.grad = world_size * dL/dx_r``, and DDP's average over ranks of the parameter gradients is
    then dL/dθ, as in single-process training. "none" keeps the local rows with the same scaling.
    """
    if reduction == "none":
        return local_result(local_rows, None, world_size)
    local = local_rows.sum() if reduction == "sum" else local_rows.sum() / count
    return local_result(local, all_reduce_sum(local, group), world_size)
