r"""Label-level supervised contrastive loss in Triton, without an N x N matrix.

For valid rows :math:`V = \{i : y_i \ge 0\}`, :math:`A(i) = V \setminus \{i\}`,
:math:`P(i) = \{j \in A(i) : y_j = y_i\}`, :math:`n_i = |P(i)|` and :math:`s_{ij} = z_i \cdot z_j / \tau`:

.. math::
    \ell_i = \frac{\tau}{\tau_{base}} \Big( \mathrm{LSE}_i - \frac{1}{n_i} \sum_{p \in P(i)} s_{ip} \Big)
    \quad (n_i > 0), \qquad \ell_i = 0 \text{ otherwise}, \qquad
    \mathrm{LSE}_i = \log \sum_{j \in A(i)} e^{s_{ij}}.

Forward, with a fixed shift. :math:`|s_{ij}| \le c = R^2 / \tau` for :math:`R = \max_{i \in V} \lVert z_i
\rVert` (Cauchy-Schwarz), so every row sums :math:`e^{s_{ij} - c}` over its tiles with no online max:
the partial sums of different tiles add up as they are, :math:`\mathrm{LSE}_i = c + \log \sum_j
e^{s_{ij} - c}`. The sum of the positive logits is read from the same tiles: one label compare per
pair, no class sums, no atomics. (The class-sum split, sum_p z_p = M_{y_i} - z_i, needs ``index_add_``,
whose float atomics are not reproducible on CUDA, and ``torch.unique``, whose data-dependent output shape
breaks ``torch.compile(fullgraph=True)``; the compare costs a few ALU operations per pair against the exp
the pair needs anyway.) The counts :math:`n_i` come from a sort of the labels. Ignored rows enter the
exponents as a bias of -inf, and only tiles that meet the diagonal test i != j. Exponentials are
``exp2`` with :math:`\log_2 e / \tau` folded into the one scale of the tile. Only O(N) statistics (LSE
and positive count) are saved for backward.

* deterministic (default), ``_label_supcon_fwd_kernel``: one program per block of ``BLOCK_M`` anchor
  rows streams every column tile of ``BLOCK_N`` rows: 2 N^2 D flops, summed in a fixed order.
* atomic, ``_label_supcon_fwd_atomic_kernel``: S is symmetric, so each unordered pair of anchor row
  blocks is one tile, whose exponentials serve its rows and its columns (N^2 D flops, half the exps).
  Program I takes the diagonal tile and the blocks I + 1 .. I + B/2 (mod B, the B anchor blocks),
  which gives every program the same work; column sums go to the other rows with ``tl.atomic_add``.

A row whose shifted sum falls below ``SHIFTED_SUM_FLOOR`` (its largest logit is far below c: rows of
very different norms, or tiny temperatures) would lose precision to underflow; such rows are recomputed
by ``_label_supcon_lse_kernel``, the flash-style online max over every column tile, in the same stream
(the programs of blocks without such a row skip the sweep): never a host sync.

Backward: with upstream :math:`g_i`, :math:`w_i = g_i (\tau/\tau_{base}) / \tau \, [n_i > 0]`,
:math:`a_i = w_i / n_i` and :math:`E_{ij} = e^{s_{ij} - \mathrm{LSE}_i}`,

.. math::
    \frac{\partial L}{\partial z_k} = \sum_{j \ne k} G_{kj} z_j, \qquad
    G_{kj} = w_k E_{kj} + w_j E_{jk} - (a_k + a_j)\,[y_j = y_k],

over valid pairs. ``G`` is symmetric. With the forward's shift c, one exponential serves both terms:
:math:`w_k E_{kj} + w_j E_{jk} = e^{s_{kj} - c} (\alpha_k + \alpha_j)` with :math:`\alpha_k = w_k
e^{c - \mathrm{LSE}_k} \le w_k 2^{60}` (the rows the forward had to redo, if any, switch the kernels to two
exponentials). Two kernels compute it from recomputed tiles:

* deterministic (default), ``_label_supcon_bwd_kernel``: one program per row block visits every
  column tile, recomputes :math:`S_{IJ}` and accumulates :math:`dZ_I \mathrel{+}= G_{IJ} Z_J`. No
  atomics: bitwise reproducible. 4 N^2 D flops (6 N^2 D with the forward).
* atomic, ``_label_supcon_bwd_atomic_kernel``: only the tiles J >= I; each adds
  :math:`G_{IJ} Z_J` to its rows and :math:`G_{IJ}^\top Z_I` to the rows of J with ``tl.atomic_add``
  into an fp32 (fp64) buffer. 3 N^2 D flops (4 N^2 D with the symmetric forward) and half the exps,
  but the summation order, hence the last bits of the loss and the gradient, varies between runs on a
  GPU.

Select the atomic pair with ``MLCONTRAST_TRITON_ATOMIC=1`` or by setting :data:`ATOMIC` to True (read
when the forward and the backward run; under ``torch.compile``, when they are traced).

For fp16 features the gradient products ``G Z`` run in fp16 with each row of ``G`` scaled to a maximum
magnitude of 1 first, because its entries (about :math:`1/(N^2 \tau)`) would underflow fp16; bf16 has
fp32's exponent range and needs no scaling.
"""

from __future__ import annotations

import math
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
    triton_library_op,
    with_overrides,
)

__all__ = ["ATOMIC", "SHIFTED_SUM_FLOOR", "label_supcon", "label_supcon_backward", "label_supcon_rows"]

#: True: the symmetric-tile forward and backward with atomic accumulation; False: the deterministic
#: pair; None: decided by the environment variable ``MLCONTRAST_TRITON_ATOMIC`` ("1" selects atomics).
ATOMIC: bool | None = None

#: A row's fixed-shift sum :math:`\sum_j e^{s_{ij} - c}` below this is recomputed with an online max.
#: exp2 flushes results below 2^-126 to zero, so each of up to N terms may lose 2^-126; above 2^-60 that
#: is below fp32's rounding for any N < 2^40. With unit rows, rows fall below it only for
#: :math:`\tau < 2 / (60 \ln 2) \approx 0.048`.
SHIFTED_SUM_FLOOR = 2.0**-60

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _use_atomics() -> bool:
    if ATOMIC is not None:
        return bool(ATOMIC)
    return os.environ.get("MLCONTRAST_TRITON_ATOMIC", "0").strip() == "1"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_chunk(Z, stride_z, idx, idx_in, d, D):
    # Z[idx, d]: a block of rows and a chunk of columns, 0 for the rows past N and the columns past D.
    return tl.load(Z + idx[:, None] * stride_z + d[None, :], mask=idx_in[:, None] & (d < D)[None, :], other=0.0)


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
        z_i = _row_chunk(Z, stride_z, rows, row_in, d, D)
        z_j = tl.load(Z + cols[None, :] * stride_z + d[:, None], mask=col_in[None, :] & d_in[:, None], other=0.0)
        acc = tl.dot(z_i, z_j, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _labels(Y, idx, idx_in, IGNORED: tl.constexpr):
    # int32 labels, IGNORED in place of -1 and past N (-1 for a tile's rows, -2 for its columns, so that
    # two ignored rows never match), and each row's exponent bias: 0, or -inf to drop an ignored row.
    y = tl.load(Y + idx, mask=idx_in, other=-1).to(tl.int32)
    valid = y >= 0
    return tl.where(valid, y, IGNORED), tl.where(valid, 0.0, float("-inf"))


@triton.jit
def _tile_terms(dots, scale, offset_i, offset_j, y_i, y_j, i0, j0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The exponents scale z_i.z_j + offset_i + offset_j of the tile rows i0 + [0, BLOCK_M) x columns
    # j0 + [0, BLOCK_N) (offsets of -inf drop ignored rows), and the positive pairs (same class). Only a
    # tile that meets the diagonal pays for the i != j test; its offsets fit 32 bits.
    x = dots * scale + (offset_i[:, None] + offset_j[None, :])
    positive = y_i[:, None] == y_j[None, :]
    if (j0 < i0 + BLOCK_M) & (i0 < j0 + BLOCK_N):
        not_self = tl.arange(0, BLOCK_M)[:, None] != tl.arange(0, BLOCK_N)[None, :] + (j0 - i0).to(tl.int32)
        x = tl.where(not_self, x, float("-inf"))
        positive = positive & not_self
    return x, positive


@triton.jit
def _shifted_row_sums(
    Z,
    stride_z,
    Y,
    rows,
    row_in,
    y_i,
    offset_i,
    z_i0,
    i0,
    j_begin,
    j_end,
    D,
    scale,
    sums,
    pos,
    offs_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Adds, for the rows, sum_j exp2(scale z_i.z_j - shift) (the shift is in offset_i) and the sum of
    # the positives' z_i.z_j over the columns j_begin .. j_end (scale = log2(e) / t).
    for j0 in range(j_begin, j_end, BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_in = cols < j_end
        y_j, offset_j = _labels(Y, cols, col_in, -2)
        dots = tl.zeros([BLOCK_M, BLOCK_N], sums.dtype)
        dots = _similarity_tile(Z, stride_z, rows, row_in, z_i0, cols, col_in, D, dots, offs_d, BLOCK_D, PRECISION)
        x, positive = _tile_terms(dots, scale, offset_i, offset_j, y_i, y_j, i0, j0, BLOCK_M, BLOCK_N)
        sums += tl.sum(tl.exp2(x), 1)
        pos += tl.sum(tl.where(positive, dots, 0.0), 1)
    return sums, pos


@triton.jit
def _label_supcon_fwd_kernel(
    SUMS,
    POS,  # outputs [N]: shifted exp sums, sums of the positives' dot products z_i.z_p
    Z,
    stride_z,  # [N, D] features, unit column stride
    Y,  # [N] int64 labels, -1 = ignored row
    N,
    D,
    ANCHOR_START,
    ANCHOR_STOP,  # the anchor rows, whose statistics are written
    SCALE_SHIFT,  # [2] in the compute dtype: log2(e) / temperature, and the shift c log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Deterministic: one program per BLOCK_M anchor rows sweeps all column tiles in order.
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: N * D may exceed 2^31
    acc_dtype = SUMS.dtype.element_ty
    scale = tl.load(SCALE_SHIFT)
    shift = tl.load(SCALE_SHIFT + 1)
    i0 = ANCHOR_START + pid * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    row_in = rows < ANCHOR_STOP
    y_i, bias_i = _labels(Y, rows, row_in, -1)
    offs_d = tl.arange(0, BLOCK_D)
    z_i0 = _row_chunk(Z, stride_z, rows, row_in, offs_d, D)
    zero = tl.zeros([BLOCK_M], acc_dtype)
    sums, pos = _shifted_row_sums(
        Z, stride_z, Y, rows, row_in, y_i, bias_i - shift, z_i0, i0, 0, N, D, scale, zero, zero, offs_d,
        BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
    )  # fmt: skip
    tl.store(SUMS + rows, sums, mask=row_in)
    tl.store(POS + rows, pos, mask=row_in)


@triton.jit
def _label_supcon_fwd_atomic_kernel(
    SUMS,
    POS,  # outputs [N], zero-initialised, accumulated atomically
    Z,
    stride_z,
    Y,
    N,
    D,
    ANCHOR_START,
    ANCHOR_STOP,
    SCALE_SHIFT,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Symmetric tiles among the B anchor blocks: program I takes the diagonal tile (its rows cover both
    # orders of its pairs) and the tiles (I, I + k mod B) for k = 1 .. (B - 1) // 2, plus k = B / 2 when
    # B is even and I < B / 2: every unordered pair of blocks exactly once, and the same number of
    # tiles for every program. Columns outside the anchors have no statistics: their tiles serve the rows.
    pid = tl.program_id(0).to(tl.int64)
    acc_dtype = SUMS.dtype.element_ty
    scale = tl.load(SCALE_SHIFT)
    shift = tl.load(SCALE_SHIFT + 1)
    blocks = tl.cdiv(ANCHOR_STOP - ANCHOR_START, BLOCK)
    i0 = ANCHOR_START + pid * BLOCK
    rows = i0 + tl.arange(0, BLOCK)
    row_in = rows < ANCHOR_STOP
    y_i, bias_i = _labels(Y, rows, row_in, -1)
    offset_i = bias_i - shift
    offs_d = tl.arange(0, BLOCK_D)
    z_i0 = _row_chunk(Z, stride_z, rows, row_in, offs_d, D)

    sums = tl.zeros([BLOCK], acc_dtype)
    pos = tl.zeros([BLOCK], acc_dtype)
    partners = (blocks - 1) // 2 + ((blocks % 2 == 0) & (pid < blocks // 2)).to(blocks.dtype)
    for k in range(0, partners + 1):
        j0 = ANCHOR_START + ((pid + k) % blocks) * BLOCK
        cols = j0 + tl.arange(0, BLOCK)
        col_in = cols < ANCHOR_STOP
        y_j, bias_j = _labels(Y, cols, col_in, -2)
        dots = tl.zeros([BLOCK, BLOCK], acc_dtype)
        dots = _similarity_tile(Z, stride_z, rows, row_in, z_i0, cols, col_in, D, dots, offs_d, BLOCK_D, PRECISION)
        x, positive = _tile_terms(dots, scale, offset_i, bias_j, y_i, y_j, i0, j0, BLOCK, BLOCK)
        e = tl.exp2(x)
        s_pos = tl.where(positive, dots, 0.0)
        sums += tl.sum(e, 1)
        pos += tl.sum(s_pos, 1)
        if k > 0:
            tl.atomic_add(SUMS + cols, tl.sum(e, 0), mask=col_in, sem="relaxed")
            tl.atomic_add(POS + cols, tl.sum(s_pos, 0), mask=col_in, sem="relaxed")
    sums, pos = _shifted_row_sums(
        Z, stride_z, Y, rows, row_in, y_i, offset_i, z_i0, i0, 0, ANCHOR_START, D, scale, sums, pos, offs_d,
        BLOCK, BLOCK, BLOCK_D, PRECISION,
    )  # fmt: skip
    sums, pos = _shifted_row_sums(
        Z, stride_z, Y, rows, row_in, y_i, offset_i, z_i0, i0, ANCHOR_STOP, N, D, scale, sums, pos, offs_d,
        BLOCK, BLOCK, BLOCK_D, PRECISION,
    )  # fmt: skip
    tl.atomic_add(SUMS + rows, sums, mask=row_in, sem="relaxed")
    tl.atomic_add(POS + rows, pos, mask=row_in, sem="relaxed")


@triton.jit
def _label_supcon_lse_kernel(
    LSE2,  # [N] row LSE in base 2 (LSE log2(e)), written for the rows recomputed here
    SUMS,  # [N] shifted sums of the fixed-shift forward: the valid anchors below FLOOR are recomputed
    FLOOR,
    Z,
    stride_z,
    Y,
    N,
    D,
    ANCHOR_START,
    ANCHOR_STOP,
    SCALE_SHIFT,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # The flash-style row LSE with an online max, for the rows whose fixed-shift sum underflowed. A block
    # without such a row sweeps nothing.
    pid = tl.program_id(0).to(tl.int64)
    acc_dtype = LSE2.dtype.element_ty
    scale = tl.load(SCALE_SHIFT)
    i0 = ANCHOR_START + pid * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    row_in = rows < ANCHOR_STOP
    y_i, bias_i = _labels(Y, rows, row_in, -1)
    redo = row_in & (y_i >= 0) & (tl.load(SUMS + rows, mask=row_in, other=1.0) < FLOOR)
    any_redo = tl.max(redo.to(tl.int32), 0) > 0
    j_end = tl.where(any_redo, N, 0)
    offs_d = tl.arange(0, BLOCK_D)
    # Nothing is read from Z by a block without such a row (the usual case): a launch, and no traffic.
    z_i0 = tl.load(
        Z + rows[:, None] * stride_z + offs_d[None, :],
        mask=(row_in & any_redo)[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), acc_dtype)
    l_i = tl.zeros([BLOCK_M], acc_dtype)
    for j0 in range(0, j_end, BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_in = cols < N
        y_j, bias_j = _labels(Y, cols, col_in, -2)
        dots = tl.zeros([BLOCK_M, BLOCK_N], acc_dtype)
        dots = _similarity_tile(Z, stride_z, rows, row_in, z_i0, cols, col_in, D, dots, offs_d, BLOCK_D, PRECISION)
        x, _ = _tile_terms(dots, scale, bias_i, bias_j, y_i, y_j, i0, j0, BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(x, 1))
        # A row with no valid column so far keeps max -inf; shift by 0 then, so that no -inf - -inf
        # (NaN) appears: its sum stays 0 and its LSE ends at -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), 1)
        m_i = m_new
    # l_i >= 1 once a row has a valid column (its max term is 2^0); l_i = 0 means none: LSE = -inf.
    tl.store(LSE2 + rows, tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1.0)), float("-inf")), mask=redo)


@triton.jit
def _row_stats(Y, LSE2, W, A, ALPHA, idx, idx_in, IGNORED: tl.constexpr):
    # Label and exponent bias (see _labels), saved base-2 LSE, row weights w, a and alpha = w 2^(shift -
    # lse2) of rows idx; rows past N read as ignored rows with weight 0.
    y, bias = _labels(Y, idx, idx_in, IGNORED)
    lse2 = tl.load(LSE2 + idx, mask=idx_in, other=float("inf"))
    w = tl.load(W + idx, mask=idx_in, other=0.0)
    a = tl.load(A + idx, mask=idx_in, other=0.0)
    alpha = tl.load(ALPHA + idx, mask=idx_in, other=0.0)
    return y, bias, lse2, w, a, alpha


@triton.jit
def _pair_weights(
    dots, scale, shift, two_exp, i0, j0, y_i, y_j, bias_i, bias_j, lse2_i, lse2_j, w_i, w_j, a_i, a_j, alpha_i,
    alpha_j, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # G_ij = w_i exp(s_ij - lse_i) + w_j exp(s_ij - lse_j) - (a_i + a_j) [y_i = y_j] over valid pairs
    # i != j. With the fixed shift, one exp serves both terms: G = 2^(scale dots - shift) (alpha_i +
    # alpha_j). That needs alpha <= w 2^60, i.e. no row far below the shift (two_exp = 0: the forward
    # redid none); otherwise each term gets its own exp, from base-2 logits and LSEs. Excluded pairs get
    # an exponent of -inf (the diagonal s_ii exceeds lse_i and would overflow; an ignored row may be
    # longer than the shift allows); rows with w = 0 carry alpha = 0 and lse = +inf, so their terms
    # are exactly 0, never NaN.
    s2, positive = _tile_terms(dots, scale, bias_i, bias_j, y_i, y_j, i0, j0, BLOCK_M, BLOCK_N)
    if two_exp:
        g = w_i[:, None] * tl.exp2(s2 - lse2_i[:, None]) + w_j[None, :] * tl.exp2(s2 - lse2_j[None, :])
    else:
        g = tl.exp2(s2 - shift) * (alpha_i[:, None] + alpha_j[None, :])
    return g - tl.where(positive, a_i[:, None] + a_j[None, :], 0.0)


@triton.jit
def _weighted_rows(g, z, PRECISION: tl.constexpr, SCALE_G: tl.constexpr):
    # g @ z with the operands of tl.dot in z's dtype and the result in g's (fp32/fp64) dtype. For fp16
    # z, every row of g is scaled to max |g| = 1 before the cast so that no weight underflows.
    if SCALE_G:
        c = tl.max(tl.abs(g), 1)
        c = tl.where(c > 0, c, 1.0)
        part = tl.dot((g / c[:, None]).to(z.dtype), z, out_dtype=tl.float32)
        return part.to(g.dtype) * c[:, None]
    else:
        return tl.dot(g.to(z.dtype), z, input_precision=PRECISION, out_dtype=g.dtype)


@triton.jit
def _label_supcon_bwd_kernel(
    DZ,
    stride_dz,  # [N, D] output gradient: fp32/fp64 and zero-initialised, or the features' dtype when D <= BLOCK_D
    Z,
    stride_z,
    Y,
    LSE2,
    W,
    A,
    ALPHA,  # labels, saved base-2 LSE (+inf where W = 0), row weights w, a and alpha (0 outside the anchors)
    N,
    D,
    ANCHOR_START,
    ANCHOR_STOP,
    SCALE_SHIFT,  # [2]: log2(e) / temperature and the shift, as in the forward
    TWO_EXP,  # [1] int32: 1 when a row with a loss is far below the shift (see _pair_weights)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    SCALE_G: tl.constexpr,
):
    # Deterministic: one program owns BLOCK_M rows of dZ and visits every column tile;
    # dZ_I = sum_J G_IJ Z_J. The first D chunk is accumulated in registers, further chunks by a
    # read-modify-write of rows no other program touches. A row block outside the anchors has
    # w = a = 0, so its G is 0 but for the anchors' columns: it visits only those. Every row of dZ is
    # written, in DZ's dtype (the features' when one chunk holds D: no fp32 buffer, no cast pass).
    pid = tl.program_id(0).to(tl.int64)
    acc_dtype = W.dtype.element_ty
    scale = tl.load(SCALE_SHIFT)
    shift = tl.load(SCALE_SHIFT + 1)
    two_exp = tl.load(TWO_EXP) != 0
    i0 = pid * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    row_in = rows < N
    y_i, bias_i, lse2_i, w_i, a_i, alpha_i = _row_stats(Y, LSE2, W, A, ALPHA, rows, row_in, -1)
    offs_d = tl.arange(0, BLOCK_D)
    d0_in = offs_d < D
    z_i0 = _row_chunk(Z, stride_z, rows, row_in, offs_d, D)

    anchor_block = (i0 < ANCHOR_STOP) & (i0 + BLOCK_M > ANCHOR_START)
    j_start = tl.where(anchor_block, 0, ANCHOR_START)
    j_stop = tl.where(anchor_block, N, ANCHOR_STOP)
    dz0 = tl.zeros([BLOCK_M, BLOCK_D], acc_dtype)
    for j0 in range(j_start, j_stop, BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_in = cols < N
        y_j, bias_j, lse2_j, w_j, a_j, alpha_j = _row_stats(Y, LSE2, W, A, ALPHA, cols, col_in, -2)
        s = tl.zeros([BLOCK_M, BLOCK_N], acc_dtype)
        s = _similarity_tile(Z, stride_z, rows, row_in, z_i0, cols, col_in, D, s, offs_d, BLOCK_D, PRECISION)
        g = _pair_weights(
            s, scale, shift, two_exp, i0, j0, y_i, y_j, bias_i, bias_j, lse2_i, lse2_j, w_i, w_j, a_i, a_j,
            alpha_i, alpha_j, BLOCK_M, BLOCK_N,
        )  # fmt: skip

        z_j = _row_chunk(Z, stride_z, cols, col_in, offs_d, D)
        dz0 += _weighted_rows(g, z_j, PRECISION, SCALE_G)
        for d0 in range(BLOCK_D, D, BLOCK_D):
            d = d0 + offs_d
            d_in = d < D
            z_j = _row_chunk(Z, stride_z, cols, col_in, d, D)
            ptrs = DZ + rows[:, None] * stride_dz + d[None, :]
            out_mask = row_in[:, None] & d_in[None, :]
            tl.store(
                ptrs,
                tl.load(ptrs, mask=out_mask, other=0.0) + _weighted_rows(g, z_j, PRECISION, SCALE_G),
                mask=out_mask,
            )
    tl.store(
        DZ + rows[:, None] * stride_dz + offs_d[None, :],
        dz0.to(DZ.dtype.element_ty),
        mask=row_in[:, None] & d0_in[None, :],
    )


@triton.jit
def _label_supcon_bwd_atomic_kernel(
    DZ,
    stride_dz,  # [N, D] output gradient (fp32/fp64), zero-initialised, accumulated atomically
    Z,
    stride_z,
    Y,
    LSE2,
    W,
    A,
    ALPHA,
    N,
    D,
    ANCHOR_START,
    ANCHOR_STOP,
    SCALE_SHIFT,
    TWO_EXP,
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
    scale = tl.load(SCALE_SHIFT)
    shift = tl.load(SCALE_SHIFT + 1)
    two_exp = tl.load(TWO_EXP) != 0
    i0 = pid * BLOCK
    rows = i0 + tl.arange(0, BLOCK)
    row_in = rows < N
    y_i, bias_i, lse2_i, w_i, a_i, alpha_i = _row_stats(Y, LSE2, W, A, ALPHA, rows, row_in, -1)
    offs_d = tl.arange(0, BLOCK_D)
    d0_in = offs_d < D
    z_i0 = _row_chunk(Z, stride_z, rows, row_in, offs_d, D)

    anchor_block = (i0 < ANCHOR_STOP) & (i0 + BLOCK > ANCHOR_START)
    j_start = i0 + tl.where(anchor_block, 0, tl.maximum(ANCHOR_START - i0, 0) // BLOCK * BLOCK)
    j_stop = tl.where(anchor_block, N, ANCHOR_STOP)
    dz0 = tl.zeros([BLOCK, BLOCK_D], acc_dtype)
    for j0 in range(j_start, j_stop, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        col_in = cols < N
        y_j, bias_j, lse2_j, w_j, a_j, alpha_j = _row_stats(Y, LSE2, W, A, ALPHA, cols, col_in, -2)
        s = tl.zeros([BLOCK, BLOCK], acc_dtype)
        s = _similarity_tile(Z, stride_z, rows, row_in, z_i0, cols, col_in, D, s, offs_d, BLOCK_D, PRECISION)
        g = _pair_weights(
            s, scale, shift, two_exp, i0, j0, y_i, y_j, bias_i, bias_j, lse2_i, lse2_j, w_i, w_j, a_i, a_j,
            alpha_i, alpha_j, BLOCK, BLOCK,
        )  # fmt: skip
        off_diagonal = j0 != i0

        z_j = _row_chunk(Z, stride_z, cols, col_in, offs_d, D)
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
            z_j = _row_chunk(Z, stride_z, cols, col_in, d, D)
            tl.atomic_add(
                DZ + rows[:, None] * stride_dz + d[None, :],
                _weighted_rows(g, z_j, PRECISION, SCALE_G),
                mask=row_in[:, None] & d_in[None, :],
                sem="relaxed",
            )
            if off_diagonal:
                z_i = _row_chunk(Z, stride_z, rows, row_in, d, D)
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

#: The launch configurations, by phase: the forward and backward kernels of each mode.
PHASES = ("fwd", "fwd-atomic", "bwd", "bwd-atomic")


def _config(d: int, dtype: torch.dtype, phase: str) -> dict:
    """Tile sizes and launch options of the ``phase`` kernel (one of :data:`PHASES`), with
    ``CONFIG_OVERRIDES["label_supcon.<phase>:<dtype>"]`` (or, if unset, ``["label_supcon.<phase>"]``)
    applied. The atomic kernels take square ``BLOCK_M`` tiles; the online-max LSE of the rows that need
    it uses the ``fwd`` configuration."""
    return with_overrides(f"label_supcon.{phase}", _default_config(d, dtype, phase), dtype)


def _default_config(d: int, dtype: torch.dtype, phase: str = "fwd") -> dict:
    """Tile sizes and launch options. Small tiles under the interpreter keep the tests fast.

    On a GPU: D in one chunk up to 128 (16-bit) or 64 (fp32) columns, so that the row block's Z_I and
    dZ_I stay on chip for the whole column sweep; two pipeline stages keep shared memory under ~100 KB
    (sm_86/89 too). Register use, from ptxas for sm_90 at bf16, D = 256: with 4 warps the backward
    spills (456 bytes; the atomic one 1272), with 8 nothing does; the atomic backward, which also holds
    G^T Z_I, needs D chunks of 64 for that. 3xTF32 keeps three copies of its operands: fp32 without TF32
    takes chunks of 32 and narrower backward tiles. fp64 (gradcheck only) gets small tiles that fit any
    GPU. ``benchmarks.tune_triton`` measures better ones.
    """
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "options": {}}
    backward = phase.startswith("bwd")
    if dtype == torch.float64:
        return {
            "BLOCK_M": 32,
            "BLOCK_N": 32,
            "BLOCK_D": pow2_block(d, 16, 32),
            "options": {"num_warps": 4, "num_stages": 1},
        }
    if dot_precision(dtype) == "tf32x3":
        return {
            "BLOCK_M": 32 if phase == "bwd-atomic" else 64,
            "BLOCK_N": 32 if backward else 64,
            "BLOCK_D": pow2_block(d, 16, 32),
            "options": {"num_warps": 8 if backward else 4, "num_stages": 2},
        }
    chunk = 128 if dtype in (torch.float16, torch.bfloat16) else 64
    return {
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_D": pow2_block(d, 16, chunk // 2 if phase == "bwd-atomic" else chunk),
        "options": {"num_warps": 8, "num_stages": 2},
    }


def _anchor_range(n: int, anchor_start: int, anchor_stop: int | None) -> tuple[int, int]:
    stop = n if anchor_stop is None else anchor_stop
    if not 0 <= anchor_start <= stop <= n:
        raise ValueError(
            f"anchor rows must satisfy 0 <= anchor_start <= anchor_stop <= N = {n}, got {anchor_start} and {stop}"
        )
    return anchor_start, stop


def _scale_and_shift(z: torch.Tensor, labels: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``[log2(e) / t, c log2(e)]`` in ``dtype``, where c = R^2 / t bounds every logit of the valid rows
    (R: their largest norm). On the device: no host sync."""
    norms = torch.linalg.vector_norm(z, dim=1, dtype=dtype)
    largest = torch.where(labels >= 0, norms, torch.zeros((), dtype=dtype, device=z.device)).amax()
    scale = _LOG2E / temperature
    return torch.stack([torch.full((), scale, dtype=dtype, device=z.device), largest * largest * scale])


def _positive_counts(labels: torch.Tensor, anchors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|P(i)|, the other valid rows of row i's class, for the valid anchors (0 elsewhere): a sort and two
    binary searches (static shapes, no host sync), so that the kernels need not count pairs."""
    valid = labels >= 0
    ordered = torch.sort(torch.where(valid, labels, torch.full_like(labels, -1))).values
    members = torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)
    return torch.where(valid & anchors, members - 1, 0).to(dtype)


def _fake_label_supcon(
    features, labels, temperature, base_temperature, anchor_start=0, anchor_stop=None, atomic=False
):
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
    atomic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-row loss, row LSE and positive count of label-level SupCon (forward launcher).

    Args:
        features: ``[N, D]`` rows z, fp32, fp16, bf16 or fp64.
        labels: ``[N]`` int64 class ids, -1 for a row that takes no part.
        temperature: :math:`\tau > 0`.
        base_temperature: :math:`\tau_{base} > 0`.
        anchor_start, anchor_stop: the anchor rows (``anchor_stop=None``: N). Only they get a loss;
            every valid row stays in their contrast sets (a process group's rows against all rows).
        atomic: the symmetric-tile kernel (half the flops; atomics, so the last bits vary between runs)
            instead of the deterministic one.

    Returns:
        ``(loss, lse, n_pos)``, each ``[N]`` in fp32 (fp64 for fp64 features): :math:`\ell_i` (0 on
        ignored rows, rows without positives and rows outside the anchors), :math:`\mathrm{LSE}_i`
        (-inf for a row with nothing to contrast with, ignored rows included) and :math:`n_i` (both 0
        outside the anchors). Only ``loss`` is differentiable.
    """
    z = features.contiguous()
    y = labels.contiguous()
    n, d = z.shape
    start, stop = _anchor_range(n, anchor_start, anchor_stop)
    dtype = compute_dtype(z.dtype)
    sums = torch.zeros(n, dtype=dtype, device=z.device)
    pos_dots = torch.zeros(n, dtype=dtype, device=z.device)
    lse2 = torch.zeros(n, dtype=dtype, device=z.device)
    rows = torch.arange(n, device=z.device)
    anchors = (rows >= start) & (rows < stop)
    n_pos = _positive_counts(y, anchors, dtype)
    if stop > start:
        scale_shift = _scale_and_shift(z, y, temperature, dtype)
        precision = dot_precision(z.dtype)
        common = (z, z.stride(0), y, n, d, start, stop, scale_shift)
        if atomic:
            cfg = _config(d, z.dtype, "fwd-atomic")
            launch(_label_supcon_fwd_atomic_kernel, (triton.cdiv(stop - start, cfg["BLOCK_M"]),))(
                sums, pos_dots, *common,
                BLOCK=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], PRECISION=precision, **cfg["options"],
            )  # fmt: skip
        else:
            cfg = _config(d, z.dtype, "fwd")
            launch(_label_supcon_fwd_kernel, (triton.cdiv(stop - start, cfg["BLOCK_M"]),))(
                sums, pos_dots, *common,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], PRECISION=precision,
                **cfg["options"],
            )  # fmt: skip
        lse2 = torch.where(anchors, scale_shift[1] + torch.log2(sums), torch.zeros((), dtype=dtype, device=z.device))
        cfg = _config(d, z.dtype, "fwd")
        launch(_label_supcon_lse_kernel, (triton.cdiv(stop - start, cfg["BLOCK_M"]),))(
            lse2, sums, SHIFTED_SUM_FLOOR, *common,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], PRECISION=precision,
            **cfg["options"],
        )  # fmt: skip
    lse = lse2 * _LN2
    scale = temperature / base_temperature
    mean_positive = pos_dots / (temperature * n_pos.clamp(min=1))
    loss = torch.where(n_pos > 0, (lse - mean_positive) * scale, torch.zeros((), dtype=dtype, device=z.device))
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
    # Rows that contribute nothing get LSE = +inf and alpha = 0, which makes their terms exactly 0.
    lse2 = torch.where(w != 0, lse.to(dtype) * _LOG2E, torch.full((), float("inf"), dtype=dtype, device=z.device))
    cfg = _config(d, z.dtype, "bwd-atomic" if atomic else "bwd")
    if not atomic and d <= cfg["BLOCK_D"] and stop > start:
        # The deterministic kernel then writes every row once, in the features' dtype.
        grad = torch.empty((n, d), dtype=features.dtype, device=z.device)
    else:
        grad = torch.zeros((n, d), dtype=dtype, device=z.device)
    if stop > start:
        scale_shift = _scale_and_shift(z, y, temperature, dtype)
        # -log2 of each row's shifted sum: at most `limit` (60) unless the forward redid the row.
        below_shift, limit = scale_shift[1] - lse2, -math.log2(SHIFTED_SUM_FLOOR)
        alpha = torch.where(w != 0, w * torch.exp2(below_shift.clamp(max=limit)), zero)
        two_exp = ((w != 0) & (below_shift > limit)).any().to(torch.int32).reshape(1)
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
            lse2,
            w,
            a,
            alpha,
            n,
            d,
            start,
            stop,
            scale_shift,
            two_exp,
            BLOCK_D=cfg["BLOCK_D"],
            PRECISION=dot_precision(z.dtype),
            SCALE_G=z.dtype == torch.float16,
            **blocks,
            **cfg["options"],
        )
    return grad.to(features.dtype)


def _setup_context(ctx, inputs, output):
    features, labels, ctx.temperature, ctx.base_temperature, ctx.anchor_start, ctx.anchor_stop, ctx.atomic = inputs
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
        ctx.atomic,
        ctx.anchor_start,
        ctx.anchor_stop,
    )
    return grad, None, None, None, None, None, None


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

    The forward and backward kernels are the deterministic pair, or the atomic one when :data:`ATOMIC`
    (or ``MLCONTRAST_TRITON_ATOMIC=1``) says so.

    Args:
        features: ``[N, D]`` rows (used as given; normalise them first if the loss asks for it).
        labels: ``[N]`` int64 class ids, -1 for a row that takes no part.
        temperature: :math:`\tau > 0`.
        base_temperature: :math:`\tau_{base} > 0`.
        anchor_start, anchor_stop: the rows that get a loss (``None``: up to N); all rows are contrasted.

    Shape:
        features ``[N, D]``, labels ``[N]`` → ``[N]`` in fp32 (fp64 for fp64 features), 0 on ignored rows,
        on rows without positives and outside the anchors.

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(256, 128, device="cuda"), dim=1).requires_grad_()
        >>> rows = label_supcon_rows(z, torch.randint(0, 8, (256,), device="cuda"), 0.1, 0.1)
        >>> rows.mean().backward()
    """
    return label_supcon(
        features, labels, float(temperature), float(base_temperature), anchor_start, anchor_stop, _use_atomics()
    )[0]
