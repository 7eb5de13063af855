r"""In-place EMA of class prototypes towards the mean of each present class's rows, in Triton.

For every class c present among the rows with :math:`y_i \ge 0`:

.. math::
    p_c \leftarrow m\, p_c + (1 - m) \frac{1}{n_c} \sum_{i : y_i = c} z_i, \qquad
    p_c \leftarrow p_c / \max(\lVert p_c \rVert, \epsilon) \ \text{if normalize}.

Absent classes are never written, so they stay bit-for-bit unchanged. No host synchronisation:

1. The class sums. Up to :data:`ONE_HOT_MAX_CLASSES` classes, ``_class_sums_kernel`` forms them as
   matrix products on the tensor cores, :math:`M_C = [y = c]_{C \times I} Z_I` (the one-hot factor is
   exact in any dtype, so 16-bit rows are summed exactly in fp32, and fp32 rows through 3xTF32 to fp32
   accuracy even where torch allows TF32: single-pass TF32 would round every row to 10 bits), with grid (class blocks x D blocks x
   row splits): each program sums a fixed range of row blocks into its own partial ``[C, D]`` slab and
   class counts, which torch then adds (a fixed-order reduction, as for prototype_ce's prototype
   gradient). No atomics, so nothing contends for the few addresses of a small C and the result is
   bitwise reproducible. Past that many classes, where the products would read the features once per
   class block, ``_class_sums_atomic_kernel`` adds each valid row into one ``[C, D]`` total with
   ``tl.atomic_add`` (the last bits of the sums may then vary between runs on a GPU).
2. ``_ema_kernel`` (grid: class blocks) reads the totals and, for the classes with a count, forms the
   update, its norm (a first pass over D when normalising) and stores it in the prototypes' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlcontrast.ops import contract
from mlcontrast.ops.utils import (
    KERNEL_NORM_EPS,
    compute_dtype,
    dot_precision,
    interpreting,
    launch,
    pow2_block,
    scalar,
    split_count,
    triton_library_op,
)

__all__ = ["ONE_HOT_MAX_CLASSES", "update_prototypes_"]

#: Up to this many prototypes the class sums are one-hot matrix products (deterministic); past it, atomics.
ONE_HOT_MAX_CLASSES = 1024


@triton.jit
def _class_sums_kernel(
    SUMS,
    stride_sums_split,  # [S, C, D] partial class sums, compute dtype, every entry written
    COUNTS,  # [S, C] partial class counts, every entry written (by the programs of the first D block)
    Z,
    stride_z,
    Y,  # [N, D] features, [N] int64 labels (-1 = ignored)
    N,
    C,
    D,
    BLOCKS_PER_SPLIT,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (class block, D block, split s) sums the rows of the row blocks
    # [s * BLOCKS_PER_SPLIT, (s + 1) * BLOCKS_PER_SPLIT) by class: acc += onehot_CI Z_I, in a fixed order.
    cb = tl.program_id(0).to(tl.int64)
    db = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    acc_dtype = SUMS.dtype.element_ty
    cls = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < D
    acc = tl.zeros([BLOCK_C, BLOCK_D], acc_dtype)
    count = tl.zeros([BLOCK_C], acc_dtype)
    first = split * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, tl.cdiv(N, BLOCK_M))
    for b in range(first, last):
        rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < N
        y = tl.load(Y + rows, mask=row_in, other=-1)
        member = cls[:, None] == y[None, :]  # ignored rows (-1) and rows past N belong to no class
        z = tl.load(Z + rows[:, None] * stride_z + d[None, :], mask=row_in[:, None] & d_in[None, :], other=0.0)
        acc = tl.dot(member.to(z.dtype), z, acc, input_precision=PRECISION, out_dtype=acc_dtype)
        count += tl.sum(member.to(acc_dtype), 1)
    c_in = cls < C
    out = SUMS + split * stride_sums_split + cls[:, None] * D + d[None, :]
    tl.store(out, acc, mask=c_in[:, None] & d_in[None, :])
    if db == 0:
        tl.store(COUNTS + split * C + cls, count, mask=c_in)


@triton.jit
def _class_sums_atomic_kernel(
    SUMS,
    COUNTS,  # outputs [C, D] and [C], zero-initialised, accumulated atomically
    Z,
    stride_z,
    Y,
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
        scale = 1.0 / tl.maximum(tl.sqrt(sq), KERNEL_NORM_EPS)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask = present[:, None] & (d < D)[None, :]
        ptrs = PROTOS + cls[:, None] * stride_pc + d[None, :] * stride_pd
        p = tl.load(ptrs, mask=mask, other=0.0)
        s = tl.load(SUMS + cls[:, None] * D + d[None, :], mask=mask, other=0.0)
        new = momentum * p.to(acc_dtype) + (1.0 - momentum) * (s / safe_count[:, None])
        tl.store(ptrs, (new * scale[:, None]).to(PROTOS.dtype.element_ty), mask=mask)


def _sums_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the one-hot products: never single-pass TF32, which would round fp32 rows to a
    10-bit mantissa; 3xTF32 splits only the rows (the one-hot factor is exact in TF32), at fp32 accuracy."""
    precision = dot_precision(dtype)
    return "tf32x3" if precision == "tf32" else precision


def _config(c: int, d: int, dtype: torch.dtype) -> dict:
    """Block sizes; ``BLOCK_CS``: the class block of the one-hot products (``tl.dot`` needs >= 16)."""
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_C": 16, "BLOCK_CS": 16, "BLOCK_D": 16, "options": {}}
    wide = dtype == torch.float64 or _sums_precision(dtype) == "tf32x3"  # operands of 8 bytes, or split in 3
    return {
        "BLOCK_M": 32 if wide else 64,
        "BLOCK_C": pow2_block(c, 1, 16),
        "BLOCK_CS": pow2_block(c, 16, 64 if wide else 128),
        "BLOCK_D": pow2_block(d, 16, 64 if wide else 128),
        "options": {"num_warps": 4},
    }


@triton_library_op("update_prototypes_", mutates_args=("prototypes",), fake=contract.fake("update_prototypes_"))
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

    Example:
        >>> protos = torch.nn.functional.normalize(torch.randn(80, 256, device="cuda"), dim=1)
        >>> rows, labels = torch.randn(4096, 256, device="cuda"), torch.randint(0, 80, (4096,), device="cuda")
        >>> update_prototypes_(protos, rows, labels, 0.99, True)
    """
    z = features.detach().contiguous()
    y = labels.contiguous()
    n, d = z.shape
    c = prototypes.shape[0]
    if n == 0 or c == 0:
        return
    dtype = compute_dtype(prototypes.dtype)
    if (dtype == torch.float64) != (z.dtype == torch.float64):
        z = z.to(dtype)  # tl.dot takes fp64 operands only for an fp64 result, and gives one only from them
    cfg = _config(c, d, z.dtype)
    if c <= ONE_HOT_MAX_CLASSES:
        blocks = triton.cdiv(n, cfg["BLOCK_M"])
        class_blocks, d_blocks = triton.cdiv(c, cfg["BLOCK_CS"]), triton.cdiv(d, cfg["BLOCK_D"])
        # Enough splits to fill the GPU (about 256 programs), each a [C, D] slab of scratch.
        slab_bytes = c * d * torch.finfo(dtype).bits // 8
        splits, per_split = split_count(blocks, slab_bytes, most=max(1, 256 // (class_blocks * d_blocks)))
        sums = torch.empty((splits, c, d), dtype=dtype, device=z.device)
        counts = torch.empty((splits, c), dtype=dtype, device=z.device)
        launch(_class_sums_kernel, (class_blocks, d_blocks, splits))(
            SUMS=sums, stride_sums_split=sums.stride(0), COUNTS=counts, Z=z, stride_z=z.stride(0), Y=y, N=n, C=c, D=d,
            BLOCKS_PER_SPLIT=per_split, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_CS"], BLOCK_D=cfg["BLOCK_D"],
            PRECISION=_sums_precision(z.dtype), **cfg["options"],
        )  # fmt: skip
        # The slabs in a fixed order, over the whole GPU (the EMA kernel has only C / BLOCK_C programs).
        sums, counts = sums.sum(0), counts.sum(0)
    else:
        sums = torch.zeros((c, d), dtype=dtype, device=z.device)
        counts = torch.zeros(c, dtype=dtype, device=z.device)
        launch(_class_sums_atomic_kernel, (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_D"])))(
            SUMS=sums, COUNTS=counts, Z=z, stride_z=z.stride(0), Y=y, N=n, C=c, D=d,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], **cfg["options"],
        )  # fmt: skip
    launch(_ema_kernel, (triton.cdiv(c, cfg["BLOCK_C"]),))(
        PROTOS=prototypes, stride_pc=prototypes.stride(0), stride_pd=prototypes.stride(1), SUMS=sums, COUNTS=counts,
        C=c, D=d, MOMENTUM=scalar(momentum, dtype, z.device), NORMALIZE=normalize,
        BLOCK_C=cfg["BLOCK_C"],
        BLOCK_D=cfg["BLOCK_D"],
        **cfg["options"],
    )
