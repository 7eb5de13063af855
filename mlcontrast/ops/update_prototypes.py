r"""In-place EMA of class prototypes towards the mean of each present class's rows, in Triton.

For every class c present among the rows with :math:`y_i \ge 0`:

.. math::
    p_c \leftarrow m\, p_c + (1 - m) \frac{1}{n_c} \sum_{i : y_i = c} z_i, \qquad
    p_c \leftarrow p_c / \max(\lVert p_c \rVert, \epsilon) \ \text{if normalize}.

Absent classes are never written, so they stay bit-for-bit unchanged. Two launches and no host
synchronisation:

1. ``_class_sums_kernel`` (grid: row blocks x D chunks) adds each valid row into an fp32 (fp64 for
   fp64 prototypes) ``sums[C, D]`` and its count into ``counts[C]`` with ``tl.atomic_add``. On a GPU
   the order of the additions, hence the last bits of the sums, may vary between runs.
2. ``_ema_kernel`` (grid: class blocks) reads ``counts`` and, for the classes with a count, forms the
   update, its norm (a first pass over D when normalising) and stores it in the prototypes' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlcontrast.ops.utils import compute_dtype, interpreting, launch, pow2_block, scalar, triton_library_op

__all__ = ["update_prototypes_"]


@triton.jit
def _class_sums_kernel(
    SUMS,
    COUNTS,  # outputs [C, D] and [C], zero-initialised, accumulated atomically
    Z,
    stride_z,
    Y,  # [N, D] features, [N] int64 labels (-1 = ignored)
    N,
    C,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    db = tl.program_id(1)
    acc_dtype = SUMS.dtype.element_ty
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    y = tl.load(Y + rows, mask=rows < N, other=-1)
    valid = (y >= 0) & (y < C)
    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (d < D)[None, :]
    z = tl.load(Z + rows[:, None] * stride_z + d[None, :], mask=mask, other=0.0).to(acc_dtype)
    tl.atomic_add(SUMS + y[:, None] * D + d[None, :], z, mask=mask, sem="relaxed")
    if db == 0:
        tl.atomic_add(COUNTS + y, tl.full([BLOCK_M], 1.0, acc_dtype), mask=valid, sem="relaxed")


@triton.jit
def _ema_kernel(
    PROTOS,
    stride_pc,
    stride_pd,  # [C, D] prototypes, updated in place (any strides)
    SUMS,
    COUNTS,  # [C, D] class sums (contiguous) and [C] counts
    C,
    D,
    MOMENTUM,  # MOMENTUM: [1] tensor in the compute dtype
    NORMALIZE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    acc_dtype = SUMS.dtype.element_ty
    momentum = tl.load(MOMENTUM)
    cls = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    count = tl.load(COUNTS + cls, mask=cls < C, other=0.0)
    present = count > 0
    safe_count = tl.where(present, count, 1.0)
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.full([BLOCK_C], 1.0, acc_dtype)
    if NORMALIZE:
        # First pass: the norm of the updated rows, which the second pass divides by.
        sq = tl.zeros([BLOCK_C], acc_dtype)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            mask = present[:, None] & (d < D)[None, :]
            p = tl.load(PROTOS + cls[:, None] * stride_pc + d[None, :] * stride_pd, mask=mask, other=0.0)
            s = tl.load(SUMS + cls[:, None] * D + d[None, :], mask=mask, other=0.0)
            new = momentum * p.to(acc_dtype) + (1.0 - momentum) * (s / safe_count[:, None])
            sq += tl.sum(new * new, 1)
        scale = 1.0 / tl.maximum(tl.sqrt(sq), 1e-8)  # NORM_EPS
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask = present[:, None] & (d < D)[None, :]
        ptrs = PROTOS + cls[:, None] * stride_pc + d[None, :] * stride_pd
        p = tl.load(ptrs, mask=mask, other=0.0)
        s = tl.load(SUMS + cls[:, None] * D + d[None, :], mask=mask, other=0.0)
        new = momentum * p.to(acc_dtype) + (1.0 - momentum) * (s / safe_count[:, None])
        tl.store(ptrs, (new * scale[:, None]).to(PROTOS.dtype.element_ty), mask=mask)


def _config(c: int, d: int) -> dict:
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_C": 16, "BLOCK_D": 16, "options": {}}
    return {
        "BLOCK_M": 64,
        "BLOCK_C": pow2_block(c, 1, 16),
        "BLOCK_D": pow2_block(d, 16, 128),
        "options": {"num_warps": 4},
    }


def _fake_update_prototypes(prototypes, features, labels, momentum, normalize):
    return None


@triton_library_op("update_prototypes_", mutates_args=("prototypes",), fake=_fake_update_prototypes)
def _update_prototypes_op(
    prototypes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, momentum: float, normalize: bool
) -> None:
    z = features.detach().contiguous()
    y = labels.contiguous()
    n, d = z.shape
    c = prototypes.shape[0]
    if n == 0 or c == 0:
        return
    dtype = compute_dtype(prototypes.dtype)
    sums = torch.zeros((c, d), dtype=dtype, device=z.device)
    counts = torch.zeros(c, dtype=dtype, device=z.device)
    cfg = _config(c, d)
    launch(_class_sums_kernel, (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_D"])))(
        sums, counts, z, z.stride(0), y, n, c, d, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], **cfg["options"]
    )
    launch(_ema_kernel, (triton.cdiv(c, cfg["BLOCK_C"]),))(
        prototypes,
        prototypes.stride(0),
        prototypes.stride(1),
        sums,
        counts,
        c,
        d,
        scalar(momentum, dtype, z.device),
        NORMALIZE=normalize,
        BLOCK_C=cfg["BLOCK_C"],
        BLOCK_D=cfg["BLOCK_D"],
        **cfg["options"],
    )


def update_prototypes_(
    prototypes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, momentum: float, normalize: bool
) -> None:
    r"""Moves each present class's prototype towards the mean of its rows, in place, on the Triton backend.

    Args:
        prototypes: ``[C, D]`` floating tensor (fp32, fp16, bf16 or fp64), updated in place; the
            arithmetic runs in fp32 (fp64 for fp64 prototypes).
        features: ``[N, D]`` rows (no gradient is recorded).
        labels: ``[N]`` int64 class ids in ``[0, C)``, -1 for a row that takes no part.
        momentum: m in [0, 1].
        normalize: L2-normalise the updated prototypes (eps 1e-8).

    Shape:
        prototypes ``[C, D]``, features ``[N, D]``, labels ``[N]``; returns None.
    """
    _update_prototypes_op(prototypes, features.detach(), labels, float(momentum), bool(normalize))
