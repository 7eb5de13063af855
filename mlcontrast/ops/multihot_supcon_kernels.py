"""The Triton kernels of multihot_supcon (the math and the launchers are in :mod:`mlcontrast.ops.multihot_supcon`).

The similarity tiles are label_supcon's (:mod:`mlcontrast.ops.label_supcon_kernels`: D in ``NUM_D_CHUNKS``
compile-time chunks, so that the column loop stays innermost and pipelined). Each tile's overlap counts
:math:`o_{ij} = |y_i \\cap y_j|` are one more product, of the rows' multi-hot target tiles: int8 0/1
operands with int32 accumulation on the tensor cores, exact for any C, in ``NUM_C_CHUNKS`` chunks of
``BLOCK_C`` labels (0: a run-time chunk loop, for wide C). With the rows' label counts :math:`|y_i|` the
union is :math:`u_{ij} = |y_i| + |y_j| - o_{ij}`, and a mode (``MODE``, a compile-time constant) turns
the two counts into the pair weight :math:`w_{ij} [j \\in P(i)]`. ``MODE = MULSUPCON`` skips the targets
altogether: its positives come from class sums outside the kernels, which then only need the
label-free LSE and its softmax terms.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mlcontrast.ops.label_supcon_kernels import _row_chunk, _similarity_tile, _weighted_rows

#: The positives modes, as the kernels' ``MODE``.
JACCARD = tl.constexpr(0)
ANY = tl.constexpr(1)
ALL = tl.constexpr(2)
MULSUPCON = tl.constexpr(3)


@triton.jit
def _target_chunk(Y, stride_y, idx, idx_in, c, C):
    # Y[idx, c]: int8 0/1 targets of a block of rows and a chunk of labels, 0 past R and past C.
    return tl.load(Y + idx[:, None] * stride_y + c[None, :], mask=idx_in[:, None] & (c < C)[None, :], other=0)


@triton.jit
def _overlap_tile(
    Y, stride_y, rows, row_in, y_i0, cols, col_in, C, o,
    BLOCK_C: tl.constexpr, NUM_C_CHUNKS: tl.constexpr,
):  # fmt: skip
    # o + |y_i & y_j| for the tile, as the int8 product Y[rows] @ Y[cols]^T with int32 accumulation (exact).
    # y_i0, the first label chunk of the rows, is the caller's; later chunks are reloaded (loop invariant).
    offs_c = tl.arange(0, BLOCK_C)
    o = tl.dot(y_i0, tl.trans(_target_chunk(Y, stride_y, cols, col_in, offs_c, C)), o, out_dtype=tl.int32)
    for k in tl.static_range(1, NUM_C_CHUNKS):
        c = k * BLOCK_C + offs_c
        y_i = _target_chunk(Y, stride_y, rows, row_in, c, C)
        o = tl.dot(y_i, tl.trans(_target_chunk(Y, stride_y, cols, col_in, c, C)), o, out_dtype=tl.int32)
    if NUM_C_CHUNKS == 0:
        for c0 in range(BLOCK_C, C, BLOCK_C):
            y_i = _target_chunk(Y, stride_y, rows, row_in, c0 + offs_c, C)
            o = tl.dot(y_i, tl.trans(_target_chunk(Y, stride_y, cols, col_in, c0 + offs_c, C)), o, out_dtype=tl.int32)
    return o


@triton.jit
def _pair_weight(
    dots, Y, stride_y, rows, row_in, y_i0, n_i, cols, col_in, n_j, C, O_STAR, U_STAR,
    MODE: tl.constexpr, BLOCK_C: tl.constexpr, NUM_C_CHUNKS: tl.constexpr,
):  # fmt: skip
    # w_ij [j in P(i)] of the tile, in the dtype of dots (the diagonal is the caller's). Rows and columns
    # past R have no labels (o = n = 0), so they are never positive. Jaccard's threshold test is exact on
    # integers: w >= threshold (the ratio in fp64, as the caller gives it) <=> o U_STAR >= O_STAR u, where
    # O_STAR / U_STAR is the least ratio of counts up to C that passes (the launcher finds it).
    if MODE == MULSUPCON:
        weight = tl.zeros_like(dots)
    else:
        o = tl.zeros(dots.shape, tl.int32)
        o = _overlap_tile(Y, stride_y, rows, row_in, y_i0, cols, col_in, C, o, BLOCK_C, NUM_C_CHUNKS)
        if MODE == JACCARD:
            u = n_i[:, None] + n_j[None, :] - o
            positive = (o > 0) & (o * U_STAR >= O_STAR * u)
            weight = tl.where(positive, o.to(dots.dtype) / tl.maximum(u, 1).to(dots.dtype), 0.0)
        elif MODE == ANY:
            weight = tl.where(o > 0, 1.0, 0.0).to(dots.dtype)
        else:  # ALL: y_j = y_i, not empty
            positive = (o == n_i[:, None]) & (o == n_j[None, :]) & (n_i[:, None] > 0)
            weight = tl.where(positive, 1.0, 0.0).to(dots.dtype)
    return weight


@triton.jit
def _off_diagonal(x, weight, i0, j0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Drops the pairs i = j: exponent -inf, weight 0. Only a tile that meets the diagonal pays for the test.
    if (j0 < i0 + BLOCK_M) & (i0 < j0 + BLOCK_N):
        not_self = tl.arange(0, BLOCK_M)[:, None] != tl.arange(0, BLOCK_N)[None, :] + (j0 - i0).to(tl.int32)
        x = tl.where(not_self, x, float("-inf"))
        weight = tl.where(not_self, weight, 0.0)
    return x, weight


@triton.jit
def _multihot_supcon_fwd_kernel(
    SUMS,  # [R] out: sum_{j != i} exp2(scale z_i.z_j - shift) of the anchors
    COUNT,  # [R] out: |P(i)| (pair modes)
    WSUM,  # [R] out: sum_p w_ip (pair modes)
    WDOT,  # [R] out: sum_p w_ip z_i.z_p (pair modes)
    Z,
    stride_z,  # [R, D] features, unit column stride
    Y,
    stride_y,  # [R, C] int8 targets, 1 = label present
    NY,  # [R] int32 label counts |y_i|
    N,
    D,
    C,
    ANCHOR_START,
    ANCHOR_STOP,
    SCALE_SHIFT,  # [2] in the compute dtype: log2(e) / temperature, and the shift c log2(e)
    O_STAR,
    U_STAR,  # Jaccard's threshold as the least passing ratio of counts (see _pair_weight)
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_D_CHUNKS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_C_CHUNKS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Deterministic: one program per BLOCK_M anchor rows sweeps every column tile in order, summing the
    # fixed-shift exponentials (every row j != i: the LSE is label-free) and its positives' statistics.
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: R * D may exceed 2^31
    acc_dtype = SUMS.dtype.element_ty
    scale = tl.load(SCALE_SHIFT)
    shift = tl.load(SCALE_SHIFT + 1)
    i0 = ANCHOR_START + pid * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    row_in = rows < ANCHOR_STOP
    z_i0 = _row_chunk(Z, stride_z, rows, row_in, tl.arange(0, BLOCK_D), D)
    n_i = tl.load(NY + rows, mask=row_in, other=0)
    y_i0 = _target_chunk(Y, stride_y, rows, row_in & (MODE != MULSUPCON), tl.arange(0, BLOCK_C), C)

    sums = tl.zeros([BLOCK_M], acc_dtype)
    count = tl.zeros([BLOCK_M], acc_dtype)
    wsum = tl.zeros([BLOCK_M], acc_dtype)
    wdot = tl.zeros([BLOCK_M], acc_dtype)
    for j0 in range(0, N, BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_in = cols < N
        n_j = tl.load(NY + cols, mask=col_in, other=0)
        dots = tl.zeros([BLOCK_M, BLOCK_N], acc_dtype)
        dots, _ = _similarity_tile(
            Z, stride_z, rows, row_in, z_i0, cols, col_in, D, dots, BLOCK_D, NUM_D_CHUNKS, PRECISION
        )
        weight = _pair_weight(
            dots, Y, stride_y, rows, row_in, y_i0, n_i, cols, col_in, n_j, C, O_STAR, U_STAR, MODE, BLOCK_C,
            NUM_C_CHUNKS,
        )  # fmt: skip
        x = dots * scale - shift + tl.where(col_in, 0.0, float("-inf"))[None, :]
        x, weight = _off_diagonal(x, weight, i0, j0, BLOCK_M, BLOCK_N)
        sums += tl.sum(tl.exp2(x), 1)
        if MODE != MULSUPCON:
            count += tl.sum(tl.where(weight > 0, 1.0, 0.0).to(acc_dtype), 1)
            wsum += tl.sum(weight, 1)
            wdot += tl.sum(weight * dots, 1)
    tl.store(SUMS + rows, sums, mask=row_in)
    if MODE != MULSUPCON:
        tl.store(COUNT + rows, count, mask=row_in)
        tl.store(WSUM + rows, wsum, mask=row_in)
        tl.store(WDOT + rows, wdot, mask=row_in)


@triton.jit
def _row_stats(NY, LSE2, W, P, ALPHA, idx, idx_in):
    # Label count, exponent bias (-inf past R), saved base-2 LSE (+inf where W = 0), the softmax weight
    # W, the pair weight P and alpha = W 2^(shift - lse2) of rows idx; rows past R read as weight 0.
    n = tl.load(NY + idx, mask=idx_in, other=0)
    bias = tl.where(idx_in, 0.0, float("-inf"))
    lse2 = tl.load(LSE2 + idx, mask=idx_in, other=float("inf"))
    w = tl.load(W + idx, mask=idx_in, other=0.0)
    p = tl.load(P + idx, mask=idx_in, other=0.0)
    alpha = tl.load(ALPHA + idx, mask=idx_in, other=0.0)
    return n, bias, lse2, w, p, alpha


@triton.jit
def _gradient_weights(
    dots, weight, scale, shift, two_exp, i0, j0, bias_i, bias_j, lse2_i, lse2_j, w_i, w_j, p_i, p_j, alpha_i,
    alpha_j, side_i, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # G_ij = W_i 2^(s2_ij - lse2_i) + [i side] W_j 2^(s2_ij - lse2_j) - w_ij [j in P(i)] (P_i + [i side] P_j),
    # i != j (the pair relation and w are symmetric): row i's own loss, and its contrast role in row j's
    # loss where it takes that gradient (side_i: below grad_stop). With the fixed shift one exp serves both
    # softmax terms: 2^(s2 - shift) (alpha_i + alpha_j), valid while no row is far below the shift
    # (two_exp = 0; else one exp each). Rows with W = 0 carry alpha = 0 and lse2 = +inf: their terms are
    # exactly 0, never NaN.
    s2 = dots * scale + (bias_i[:, None] + bias_j[None, :])
    s2, weight = _off_diagonal(s2, weight, i0, j0, BLOCK_M, BLOCK_N)
    side = side_i[:, None]
    if two_exp:
        g = w_i[:, None] * tl.exp2(s2 - lse2_i[:, None]) + tl.where(side, w_j[None, :], 0.0) * tl.exp2(
            s2 - lse2_j[None, :]
        )
    else:
        g = tl.exp2(s2 - shift) * (alpha_i[:, None] + tl.where(side, alpha_j[None, :], 0.0))
    return g - weight * (p_i[:, None] + tl.where(side, p_j[None, :], 0.0))


@triton.jit
def _multihot_supcon_bwd_kernel(
    DZ,
    stride_dz,  # [R, D] output gradient in the features' dtype; every element is written once
    EXTRA,
    stride_extra,  # [R, D] compute dtype, added to dZ before the store (HAS_EXTRA: mulsupcon's positives)
    Z,
    stride_z,
    Y,
    stride_y,
    NY,
    LSE2,
    W,
    P,
    ALPHA,  # base-2 LSE (+inf where W = 0), softmax weight W, pair weight P, alpha (0 outside the anchors)
    N,
    D,
    C,
    ANCHOR_START,
    ANCHOR_STOP,
    SCALE_SHIFT,  # [2]: log2(e) / temperature and the shift, as in the forward
    TWO_EXP,  # [1] int32: 1 when a row with a loss is far below the shift (see _gradient_weights)
    GRAD_STOP,  # rows below it take the gradient of their contrast role; anchors always that of their loss
    O_STAR,
    U_STAR,
    MODE: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_D_CHUNKS: tl.constexpr,
    BLOCK_DZ: tl.constexpr,  # the columns of dZ a program owns (program_id(1) picks which)
    BLOCK_C: tl.constexpr,
    NUM_C_CHUNKS: tl.constexpr,
    PRECISION: tl.constexpr,
    SCALE_G: tl.constexpr,
):
    # Deterministic, as label_supcon's: program (I, c) owns rows I and the dZ columns c BLOCK_DZ + [0,
    # BLOCK_DZ), visits every column tile (the column loop innermost), recomputes S and the overlaps, and
    # accumulates dZ_I,c += G_IJ Z_J,c in registers; each element of dZ is stored once. A row block outside
    # the anchors has W = P = 0, so its G is 0 but for the anchors' columns: it visits only those.
    pid = tl.program_id(0).to(tl.int64)
    slab = tl.program_id(1)
    acc_dtype = W.dtype.element_ty
    scale = tl.load(SCALE_SHIFT)
    shift = tl.load(SCALE_SHIFT + 1)
    two_exp = tl.load(TWO_EXP) != 0
    i0 = pid * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    row_in = rows < N
    n_i, bias_i, lse2_i, w_i, p_i, alpha_i = _row_stats(NY, LSE2, W, P, ALPHA, rows, row_in)
    z_i0 = _row_chunk(Z, stride_z, rows, row_in, tl.arange(0, BLOCK_D), D)
    y_i0 = _target_chunk(Y, stride_y, rows, row_in & (MODE != MULSUPCON), tl.arange(0, BLOCK_C), C)
    offs_dz = slab * BLOCK_DZ + tl.arange(0, BLOCK_DZ)

    side_i = rows < GRAD_STOP
    anchor_block = (i0 < ANCHOR_STOP) & (i0 + BLOCK_M > ANCHOR_START)
    j_start = tl.where(anchor_block, 0, ANCHOR_START)
    # A block of neither anchors nor rows below GRAD_STOP (a detached memory) visits nothing: dZ = 0.
    j_stop = tl.where(anchor_block, N, tl.where(i0 < GRAD_STOP, ANCHOR_STOP, ANCHOR_START))
    dz = tl.zeros([BLOCK_M, BLOCK_DZ], acc_dtype)
    for j0 in range(j_start, j_stop, BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_in = cols < N
        n_j, bias_j, lse2_j, w_j, p_j, alpha_j = _row_stats(NY, LSE2, W, P, ALPHA, cols, col_in)
        s = tl.zeros([BLOCK_M, BLOCK_N], acc_dtype)
        s, z_j0 = _similarity_tile(
            Z, stride_z, rows, row_in, z_i0, cols, col_in, D, s, BLOCK_D, NUM_D_CHUNKS, PRECISION
        )
        weight = _pair_weight(
            s, Y, stride_y, rows, row_in, y_i0, n_i, cols, col_in, n_j, C, O_STAR, U_STAR, MODE, BLOCK_C,
            NUM_C_CHUNKS,
        )  # fmt: skip
        g = _gradient_weights(
            s, weight, scale, shift, two_exp, i0, j0, bias_i, bias_j, lse2_i, lse2_j, w_i, w_j, p_i, p_j, alpha_i,
            alpha_j, side_i, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        if (NUM_D_CHUNKS == 1) and (BLOCK_DZ == BLOCK_D):
            z_j = z_j0  # one chunk is all of D and the slab: the tile already loaded
        else:
            z_j = _row_chunk(Z, stride_z, cols, col_in, offs_dz, D)
        dz += _weighted_rows(g, z_j, PRECISION, SCALE_G)
    mask = row_in[:, None] & (offs_dz < D)[None, :]
    if HAS_EXTRA:
        dz += tl.load(EXTRA + rows[:, None] * stride_extra + offs_dz[None, :], mask=mask, other=0.0)
    tl.store(DZ + rows[:, None] * stride_dz + offs_dz[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
