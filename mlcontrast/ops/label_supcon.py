r"""Label-level supervised contrastive loss in Triton, without an N x N matrix.

For valid rows :math:`V = \{i : y_i \ge 0\}`, :math:`A(i) = V \setminus \{i\}`,
:math:`P(i) = \{j \in A(i) : y_j = y_i\}`, :math:`n_i = |P(i)|` and :math:`s_{ij} = z_i \cdot z_j / \tau`:

.. math::
    \ell_i = \frac{\tau}{\tau_{base}} \Big( \mathrm{LSE}_i - \frac{1}{n_i} \sum_{p \in P(i)} s_{ip} \Big)
    \quad (n_i > 0), \qquad \ell_i = 0 \text{ otherwise}, \qquad
    \mathrm{LSE}_i = \log \sum_{j \in A(i)} e^{s_{ij}}.

Forward (``_label_supcon_fwd_kernel``): one program per block of ``BLOCK_M`` rows streams the column
tiles of ``BLOCK_N`` rows, computes :math:`S_{IJ} = Z_I Z_J^\top / \tau` with ``tl.dot`` (fp32
accumulation, D in ``BLOCK_D`` chunks) and keeps, per row, an online max and sum for the LSE plus the
sum and count of its positive logits. The positive term is therefore read from the same tiles: one
label compare per pair, no class sums, no atomics, exact and deterministic. (The class-sum split,
sum_p z_p = M_{y_i} - z_i, needs ``index_add_``, whose float atomics are not reproducible on CUDA,
and ``torch.unique``, whose data-dependent output shape breaks ``torch.compile(fullgraph=True)``;
the compare costs a few ALU operations per pair against the exp the pair needs anyway.) Only O(N)
statistics (LSE and positive count) are saved for backward.

Backward: with upstream :math:`g_i`, :math:`w_i = g_i (\tau/\tau_{base}) / \tau \, [n_i > 0]`,
:math:`a_i = w_i / n_i` and :math:`E_{ij} = e^{s_{ij} - \mathrm{LSE}_i}`,

.. math::
    \frac{\partial L}{\partial z_k} = \sum_{j \ne k} G_{kj} z_j, \qquad
    G_{kj} = w_k E_{kj} + w_j E_{jk} - (a_k + a_j)\,[y_j = y_k],

over valid pairs. ``G`` is symmetric. Two kernels compute it from recomputed tiles:

* deterministic (default), ``_label_supcon_bwd_kernel``: one program per row block visits every
  column tile, recomputes :math:`S_{IJ}` and accumulates :math:`dZ_I \mathrel{+}= G_{IJ} Z_J`. No
  atomics: bitwise reproducible. 4 N^2 D flops (6 N^2 D with the forward).
* atomic, ``_label_supcon_bwd_atomic_kernel``: only the tiles J >= I; each adds
  :math:`G_{IJ} Z_J` to its rows and :math:`G_{IJ}^\top Z_I` to the rows of J with ``tl.atomic_add``
  into an fp32 (fp64) buffer. 3 N^2 D flops and half the exps, but the summation order, hence the
  last bits, varies between runs on a GPU. Select it with ``MLCONTRAST_TRITON_ATOMIC=1`` or by setting
  :data:`ATOMIC_BACKWARD` to True (read when the backward runs; under ``torch.compile`` when it is
  traced).

For 16-bit features the gradient products ``G Z`` run in the feature dtype; each row of ``G`` is
scaled to a maximum magnitude of 1 first, because its entries (about :math:`1/(N^2 \tau)`) would
underflow fp16.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mlcontrast.ops.utils import (
    compute_dtype,
    dot_precision,
    interpreting,
    launch,
    pow2_block,
    scalar,
    triton_library_op,
    with_overrides,
)

__all__ = ["ATOMIC_BACKWARD", "label_supcon", "label_supcon_backward", "label_supcon_rows"]

#: True: the atomic (symmetric-tile) backward; False: the deterministic one; None: decided by the
#: environment variable ``MLCONTRAST_TRITON_ATOMIC`` ("1" selects the atomic kernel).
ATOMIC_BACKWARD: bool | None = None


def _use_atomic_backward() -> bool:
    if ATOMIC_BACKWARD is not None:
        return bool(ATOMIC_BACKWARD)
    return os.environ.get("MLCONTRAST_TRITON_ATOMIC", "0").strip() == "1"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _similarity_tile(
    Z,
    stride_z,
    rows,
    row_in,
    z_i0,
    cols,
    col_in,
    D,
    acc,
    offs_d,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # acc + Z[rows] @ Z[cols]^T over all of D. The first D chunk of Z[rows] (z_i0) is loaded once by
    # the caller and reused for every column tile; further chunks (D > BLOCK_D) are reloaded.
    d_in = offs_d < D
    z_j = tl.load(Z + cols[None, :] * stride_z + offs_d[:, None], mask=col_in[None, :] & d_in[:, None], other=0.0)
    acc = tl.dot(z_i0, z_j, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    for d0 in range(BLOCK_D, D, BLOCK_D):
        d = d0 + offs_d
        d_in = d < D
        z_i = tl.load(Z + rows[:, None] * stride_z + d[None, :], mask=row_in[:, None] & d_in[None, :], other=0.0)
        z_j = tl.load(Z + cols[None, :] * stride_z + d[:, None], mask=col_in[None, :] & d_in[:, None], other=0.0)
        acc = tl.dot(z_i, z_j, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _row_stats(Y, LSE, W, A, idx, idx_in):
    # Label, saved LSE, row weight w and a of rows idx; rows past N read as ignored rows with weight 0.
    y = tl.load(Y + idx, mask=idx_in, other=-1)
    lse = tl.load(LSE + idx, mask=idx_in, other=float("inf"))
    w = tl.load(W + idx, mask=idx_in, other=0.0)
    a = tl.load(A + idx, mask=idx_in, other=0.0)
    return y, lse, w, a


@triton.jit
def _pair_weights(s, rows, cols, y_i, y_j, lse_i, lse_j, w_i, w_j, a_i, a_j):
    # G_ij = w_i exp(s_ij - lse_i) + w_j exp(s_ij - lse_j) - (a_i + a_j) [y_i = y_j] over valid pairs
    # i != j. Excluded pairs get s = -inf before the exp (the diagonal s_ii exceeds lse_i and would
    # overflow); rows with w = 0 carry lse = +inf, so their exp terms are exactly 0, never NaN.
    keep = (y_i[:, None] >= 0) & (y_j[None, :] >= 0) & (rows[:, None] != cols[None, :])
    s = tl.where(keep, s, float("-inf"))
    g = w_i[:, None] * tl.exp(s - lse_i[:, None]) + w_j[None, :] * tl.exp(s - lse_j[None, :])
    positive = keep & (y_i[:, None] == y_j[None, :])
    return g - tl.where(positive, a_i[:, None] + a_j[None, :], 0.0)


@triton.jit
def _weighted_rows(g, z, PRECISION: tl.constexpr, SCALE_G: tl.constexpr):
    # g @ z with the operands of tl.dot in z's dtype and the result in g's (fp32/fp64) dtype. For
    # 16-bit z, every row of g is scaled to max |g| = 1 before the cast so that no weight underflows.
    if SCALE_G:
        c = tl.max(tl.abs(g), 1)
        c = tl.where(c > 0, c, 1.0)
        part = tl.dot((g / c[:, None]).to(z.dtype), z, out_dtype=tl.float32)
        return part.to(g.dtype) * c[:, None]
    else:
        return tl.dot(g.to(z.dtype), z, input_precision=PRECISION, out_dtype=g.dtype)


@triton.jit
def _label_supcon_fwd_kernel(
    LSE,
    POS,
    NPOS,  # outputs [N]: row LSE, sum of positive logits, number of positives
    Z,
    stride_z,  # [N, D] features, unit column stride
    Y,  # [N] int64 labels, -1 = ignored row
    N,
    D,
    ANCHOR_START,
    ANCHOR_STOP,  # the anchor rows, whose statistics are written
    INV_T,  # INV_T: [1] tensor holding 1 / temperature in the compute dtype
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program per BLOCK_M anchor rows; streams all column tiles with an online log-sum-exp.
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: N * D may exceed 2^31
    acc_dtype = LSE.dtype.element_ty
    inv_t = tl.load(INV_T)
    rows = ANCHOR_START + pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < ANCHOR_STOP
    y_i = tl.load(Y + rows, mask=row_in, other=-1)
    offs_d = tl.arange(0, BLOCK_D)
    z_i0 = tl.load(
        Z + rows[:, None] * stride_z + offs_d[None, :], mask=row_in[:, None] & (offs_d < D)[None, :], other=0.0
    )

    m_i = tl.full([BLOCK_M], float("-inf"), acc_dtype)
    l_i = tl.zeros([BLOCK_M], acc_dtype)
    pos_i = tl.zeros([BLOCK_M], acc_dtype)
    npos_i = tl.zeros([BLOCK_M], acc_dtype)
    for j0 in range(0, N, BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_in = cols < N
        y_j = tl.load(Y + cols, mask=col_in, other=-1)  # out-of-range columns read as ignored rows
        s = tl.zeros([BLOCK_M, BLOCK_N], acc_dtype)
        s = _similarity_tile(Z, stride_z, rows, row_in, z_i0, cols, col_in, D, s, offs_d, BLOCK_D, PRECISION)
        s = s * inv_t
        keep = (y_j[None, :] >= 0) & (rows[:, None] != cols[None, :])
        positive = keep & (y_j[None, :] == y_i[:, None])
        pos_i += tl.sum(tl.where(positive, s, 0.0), 1)
        npos_i += tl.sum(positive.to(acc_dtype), 1)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no valid column so far keeps max -inf; shift by 0 then, so that no -inf - -inf
        # (NaN) appears: its sum stays 0 and its LSE ends at -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    # l_i >= 1 once a row has a valid column (its max term is exp(0)); l_i = 0 means none: LSE = -inf.
    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1.0)), float("-inf"))
    tl.store(LSE + rows, lse, mask=row_in)
    tl.store(POS + rows, pos_i, mask=row_in)
    tl.store(NPOS + rows, npos_i, mask=row_in)


@triton.jit
def _label_supcon_bwd_kernel(
    DZ,
    stride_dz,  # [N, D] output gradient (fp32/fp64), zero-initialised
    Z,
    stride_z,
    Y,
    LSE,
    W,
    A,  # features, labels, saved LSE (+inf where W = 0), row weights w and a (0 outside the anchors)
    N,
    D,
    ANCHOR_START,
    ANCHOR_STOP,
    INV_T,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    SCALE_G: tl.constexpr,
):
    # Deterministic: one program owns BLOCK_M rows of dZ and visits every column tile;
    # dZ_I = sum_J G_IJ Z_J. The first D chunk is accumulated in registers, further chunks by a
    # read-modify-write of rows no other program touches. A row block outside the anchors has
    # w = a = 0, so its G is 0 but for the anchors' columns: it visits only those.
    pid = tl.program_id(0).to(tl.int64)
    acc_dtype = DZ.dtype.element_ty
    inv_t = tl.load(INV_T)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < N
    y_i, lse_i, w_i, a_i = _row_stats(Y, LSE, W, A, rows, row_in)
    offs_d = tl.arange(0, BLOCK_D)
    d0_in = offs_d < D
    z_i0 = tl.load(Z + rows[:, None] * stride_z + offs_d[None, :], mask=row_in[:, None] & d0_in[None, :], other=0.0)

    anchor_block = (pid * BLOCK_M < ANCHOR_STOP) & (pid * BLOCK_M + BLOCK_M > ANCHOR_START)
    j_start = tl.where(anchor_block, 0, ANCHOR_START)
    j_stop = tl.where(anchor_block, N, ANCHOR_STOP)
    dz0 = tl.zeros([BLOCK_M, BLOCK_D], acc_dtype)
    for j0 in range(j_start, j_stop, BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_in = cols < N
        y_j, lse_j, w_j, a_j = _row_stats(Y, LSE, W, A, cols, col_in)
        s = tl.zeros([BLOCK_M, BLOCK_N], acc_dtype)
        s = _similarity_tile(Z, stride_z, rows, row_in, z_i0, cols, col_in, D, s, offs_d, BLOCK_D, PRECISION)
        g = _pair_weights(s * inv_t, rows, cols, y_i, y_j, lse_i, lse_j, w_i, w_j, a_i, a_j)

        z_j = tl.load(Z + cols[:, None] * stride_z + offs_d[None, :], mask=col_in[:, None] & d0_in[None, :], other=0.0)
        dz0 += _weighted_rows(g, z_j, PRECISION, SCALE_G)
        for d0 in range(BLOCK_D, D, BLOCK_D):
            d = d0 + offs_d
            d_in = d < D
            z_j = tl.load(Z + cols[:, None] * stride_z + d[None, :], mask=col_in[:, None] & d_in[None, :], other=0.0)
            ptrs = DZ + rows[:, None] * stride_dz + d[None, :]
            out_mask = row_in[:, None] & d_in[None, :]
            tl.store(
                ptrs,
                tl.load(ptrs, mask=out_mask, other=0.0) + _weighted_rows(g, z_j, PRECISION, SCALE_G),
                mask=out_mask,
            )
    tl.store(DZ + rows[:, None] * stride_dz + offs_d[None, :], dz0, mask=row_in[:, None] & d0_in[None, :])


@triton.jit
def _label_supcon_bwd_atomic_kernel(
    DZ,
    stride_dz,  # [N, D] output gradient (fp32/fp64), zero-initialised, accumulated atomically
    Z,
    stride_z,
    Y,
    LSE,
    W,
    A,
    N,
    D,
    ANCHOR_START,
    ANCHOR_STOP,
    INV_T,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    SCALE_G: tl.constexpr,
):
    # Symmetric tiles: the program of row block I visits the column tiles J >= I (square tiles, so
    # the diagonal block is J = I). G is symmetric, so one tile serves both sides:
    # dZ_I += G_IJ Z_J, and for J > I also dZ_J += G_IJ^T Z_I. The diagonal tile's row side already
    # covers both orders of its pairs. Other programs add into the same rows: atomics throughout.
    # Outside the anchors w = a = 0, so a tile of two blocks outside them is 0: a row block outside
    # the anchors visits only the tiles J >= I that overlap them.
    pid = tl.program_id(0).to(tl.int64)
    acc_dtype = DZ.dtype.element_ty
    inv_t = tl.load(INV_T)
    i0 = pid * BLOCK
    rows = i0 + tl.arange(0, BLOCK)
    row_in = rows < N
    y_i, lse_i, w_i, a_i = _row_stats(Y, LSE, W, A, rows, row_in)
    offs_d = tl.arange(0, BLOCK_D)
    d0_in = offs_d < D
    z_i0 = tl.load(Z + rows[:, None] * stride_z + offs_d[None, :], mask=row_in[:, None] & d0_in[None, :], other=0.0)

    anchor_block = (i0 < ANCHOR_STOP) & (i0 + BLOCK > ANCHOR_START)
    j_start = i0 + tl.where(anchor_block, 0, tl.maximum(ANCHOR_START - i0, 0) // BLOCK * BLOCK)
    j_stop = tl.where(anchor_block, N, ANCHOR_STOP)
    dz0 = tl.zeros([BLOCK, BLOCK_D], acc_dtype)
    for j0 in range(j_start, j_stop, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        col_in = cols < N
        y_j, lse_j, w_j, a_j = _row_stats(Y, LSE, W, A, cols, col_in)
        s = tl.zeros([BLOCK, BLOCK], acc_dtype)
        s = _similarity_tile(Z, stride_z, rows, row_in, z_i0, cols, col_in, D, s, offs_d, BLOCK_D, PRECISION)
        g = _pair_weights(s * inv_t, rows, cols, y_i, y_j, lse_i, lse_j, w_i, w_j, a_i, a_j)
        off_diagonal = j0 != i0

        z_j = tl.load(Z + cols[:, None] * stride_z + offs_d[None, :], mask=col_in[:, None] & d0_in[None, :], other=0.0)
        dz0 += _weighted_rows(g, z_j, PRECISION, SCALE_G)
        if off_diagonal:
            tl.atomic_add(
                DZ + cols[:, None] * stride_dz + offs_d[None, :],
                _weighted_rows(tl.trans(g), z_i0, PRECISION, SCALE_G),
                mask=col_in[:, None] & d0_in[None, :],
                sem="relaxed",
            )
        for d0 in range(BLOCK_D, D, BLOCK_D):
            d = d0 + offs_d
            d_in = d < D
            z_j = tl.load(Z + cols[:, None] * stride_z + d[None, :], mask=col_in[:, None] & d_in[None, :], other=0.0)
            tl.atomic_add(
                DZ + rows[:, None] * stride_dz + d[None, :],
                _weighted_rows(g, z_j, PRECISION, SCALE_G),
                mask=row_in[:, None] & d_in[None, :],
                sem="relaxed",
            )
            if off_diagonal:
                z_i = tl.load(
                    Z + rows[:, None] * stride_z + d[None, :], mask=row_in[:, None] & d_in[None, :], other=0.0
                )
                tl.atomic_add(
                    DZ + cols[:, None] * stride_dz + d[None, :],
                    _weighted_rows(tl.trans(g), z_i, PRECISION, SCALE_G),
                    mask=col_in[:, None] & d_in[None, :],
                    sem="relaxed",
                )
    tl.atomic_add(
        DZ + rows[:, None] * stride_dz + offs_d[None, :], dz0, mask=row_in[:, None] & d0_in[None, :], sem="relaxed"
    )


# ----------------------------------------------------------------------------------------------
# Launchers and torch.library glue
# ----------------------------------------------------------------------------------------------


def _config(d: int, dtype: torch.dtype, phase: str) -> dict:
    """Tile sizes and launch options of the ``phase`` ("fwd" or "bwd") kernels, with
    ``CONFIG_OVERRIDES["label_supcon.<phase>"]`` applied (the atomic backward uses ``BLOCK_M`` square tiles)."""
    return with_overrides(f"label_supcon.{phase}", _default_config(d, dtype))


def _default_config(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options. Small tiles under the interpreter keep the tests fast."""
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "options": {}}
    # D in one chunk up to 128 (16-bit) or 64 (fp32) columns: the row block's Z_I and dZ_I then stay
    # on chip for the whole column sweep. fp64 (gradcheck only) gets small tiles so that it fits the
    # shared memory of any GPU. Two pipeline stages keep shared memory under ~100 KB (sm_86/89 too).
    if dtype == torch.float64:
        return {
            "BLOCK_M": 32,
            "BLOCK_N": 32,
            "BLOCK_D": pow2_block(d, 16, 32),
            "options": {"num_warps": 4, "num_stages": 1},
        }
    high = 128 if dtype in (torch.float16, torch.bfloat16) else 64
    return {
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_D": pow2_block(d, 16, high),
        "options": {"num_warps": 4, "num_stages": 2},
    }


def _anchor_range(n: int, anchor_start: int, anchor_stop: int | None) -> tuple[int, int]:
    stop = n if anchor_stop is None else anchor_stop
    if not 0 <= anchor_start <= stop <= n:
        raise ValueError(
            f"anchor rows must satisfy 0 <= anchor_start <= anchor_stop <= N = {n}, got {anchor_start} and {stop}"
        )
    return anchor_start, stop


def _fake_label_supcon(features, labels, temperature, base_temperature, anchor_start=0, anchor_stop=None):
    n, dtype = features.shape[0], compute_dtype(features.dtype)
    return features.new_empty(n, dtype=dtype), features.new_empty(n, dtype=dtype), features.new_empty(n, dtype=dtype)


@triton_library_op("label_supcon", fake=_fake_label_supcon)
def label_supcon(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    base_temperature: float,
    anchor_start: int = 0,
    anchor_stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-row loss, row LSE and positive count of label-level SupCon (forward launcher).

    Args:
        features: ``[N, D]`` rows z, fp32, fp16, bf16 or fp64.
        labels: ``[N]`` int64 class ids, -1 for a row that takes no part.
        temperature: :math:`\tau > 0`.
        base_temperature: :math:`\tau_{base} > 0`.
        anchor_start, anchor_stop: the anchor rows (``anchor_stop=None``: N). Only they get a loss;
            every valid row stays in their contrast sets (a process group's rows against all rows).

    Returns:
        ``(loss, lse, n_pos)``, each ``[N]`` in fp32 (fp64 for fp64 features): :math:`\ell_i` (0 on
        ignored rows, rows without positives and rows outside the anchors), :math:`\mathrm{LSE}_i`
        (-inf for a row with nothing to contrast with) and :math:`n_i` (both 0 outside the anchors).
        Only ``loss`` is differentiable.
    """
    z = features.contiguous()
    y = labels.contiguous()
    n, d = z.shape
    start, stop = _anchor_range(n, anchor_start, anchor_stop)
    dtype = compute_dtype(z.dtype)
    lse = torch.zeros(n, dtype=dtype, device=z.device)
    pos = torch.zeros(n, dtype=dtype, device=z.device)
    n_pos = torch.zeros(n, dtype=dtype, device=z.device)
    if stop > start:
        cfg = _config(d, z.dtype, "fwd")
        launch(_label_supcon_fwd_kernel, (triton.cdiv(stop - start, cfg["BLOCK_M"]),))(
            lse,
            pos,
            n_pos,
            z,
            z.stride(0),
            y,
            n,
            d,
            start,
            stop,
            scalar(1.0 / temperature, dtype, z.device),
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_D=cfg["BLOCK_D"],
            PRECISION=dot_precision(z.dtype),
            **cfg["options"],
        )
    scale = temperature / base_temperature
    loss = torch.where(
        n_pos > 0, (lse - pos / n_pos.clamp(min=1)) * scale, torch.zeros((), dtype=dtype, device=z.device)
    )
    return loss, lse, n_pos


def _fake_label_supcon_backward(
    grad_rows, features, labels, lse, n_pos, temperature, base_temperature, atomic, anchor_start=0, anchor_stop=None
):
    return torch.empty_like(features, memory_format=torch.contiguous_format)


@triton_library_op("label_supcon_backward", fake=_fake_label_supcon_backward)
def label_supcon_backward(
    grad_rows: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    n_pos: torch.Tensor,
    temperature: float,
    base_temperature: float,
    atomic: bool,
    anchor_start: int = 0,
    anchor_stop: int | None = None,
) -> torch.Tensor:
    r"""Gradient of :math:`\sum_i g_i \ell_i` with respect to the features (backward launcher).

    Args:
        grad_rows: ``[N]`` upstream gradient :math:`g` of the per-row loss (rows outside the anchors,
            whose loss is the constant 0, contribute nothing).
        features, labels, temperature, base_temperature, anchor_start, anchor_stop: as given to
            :func:`label_supcon`.
        lse, n_pos: ``[N]`` statistics saved by :func:`label_supcon`.
        atomic: use the symmetric-tile kernel with atomic accumulation instead of the deterministic one.

    Returns:
        ``[N, D]`` gradient in the dtype of ``features``.
    """
    z = features.contiguous()
    y = labels.contiguous()
    n, d = z.shape
    start, stop = _anchor_range(n, anchor_start, anchor_stop)
    dtype = compute_dtype(z.dtype)
    inv_t = 1.0 / temperature
    zero = torch.zeros((), dtype=dtype, device=z.device)
    anchors = torch.arange(n, device=z.device)
    has_loss = (n_pos > 0) & (anchors >= start) & (anchors < stop)
    w = torch.where(has_loss, grad_rows.to(dtype) * (temperature / base_temperature * inv_t), zero)
    a = w / n_pos.clamp(min=1)
    # Rows that contribute nothing get LSE = +inf, which makes their exp terms exactly 0 in the kernel.
    lse_eff = torch.where(w != 0, lse.to(dtype), torch.full((), float("inf"), dtype=dtype, device=z.device))
    grad = torch.zeros((n, d), dtype=dtype, device=z.device)
    inv_t_arg = scalar(inv_t, dtype, z.device)
    if stop > start:
        cfg = _config(d, z.dtype, "bwd")
        kernel, blocks = (
            (_label_supcon_bwd_atomic_kernel, {"BLOCK": cfg["BLOCK_M"]})
            if atomic
            else (_label_supcon_bwd_kernel, {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]})
        )
        launch(kernel, (triton.cdiv(n, cfg["BLOCK_M"]),))(
            grad,
            grad.stride(0),
            z,
            z.stride(0),
            y,
            lse_eff,
            w,
            a,
            n,
            d,
            start,
            stop,
            inv_t_arg,
            BLOCK_D=cfg["BLOCK_D"],
            PRECISION=dot_precision(z.dtype),
            SCALE_G=z.dtype in (torch.float16, torch.bfloat16),
            **blocks,
            **cfg["options"],
        )
    return grad.to(features.dtype)


def _setup_context(ctx, inputs, output):
    features, labels, ctx.temperature, ctx.base_temperature, ctx.anchor_start, ctx.anchor_stop = inputs
    _, lse, n_pos = output
    ctx.save_for_backward(features, labels, lse, n_pos)


def _backward(ctx, grad_loss, grad_lse, grad_n_pos):
    features, labels, lse, n_pos = ctx.saved_tensors
    grad = label_supcon_backward(
        grad_loss,
        features,
        labels,
        lse,
        n_pos,
        ctx.temperature,
        ctx.base_temperature,
        _use_atomic_backward(),
        ctx.anchor_start,
        ctx.anchor_stop,
    )
    return grad, None, None, None, None, None


label_supcon.register_autograd(_backward, setup_context=_setup_context)


def label_supcon_rows(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    base_temperature: float,
    anchor_start: int = 0,
    anchor_stop: int | None = None,
) -> torch.Tensor:
    r"""Per-row label-level SupCon loss :math:`\ell` on the Triton backend, differentiable w.r.t. ``features``.

    Args:
        features: ``[N, D]`` rows (used as given; normalise them first if the loss asks for it).
        labels: ``[N]`` int64 class ids, -1 for a row that takes no part.
        temperature: :math:`\tau > 0`.
        base_temperature: :math:`\tau_{base} > 0`.
        anchor_start, anchor_stop: the rows that get a loss (``None``: up to N); all rows are contrasted.

    Shape:
        features ``[N, D]``, labels ``[N]`` → ``[N]`` in fp32 (fp64 for fp64 features), 0 on ignored rows,
        on rows without positives and outside the anchors.
    """
    return label_supcon(features, labels, float(temperature), float(base_temperature), anchor_start, anchor_stop)[0]
