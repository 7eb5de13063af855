"""The Triton kernels of label_supcon (the math and the launchers are in :mod:`mlcontrast.ops.label_supcon`).

Every kernel sweeps column tiles of ``BLOCK_N`` rows in one runtime loop. D enters as ``NUM_D_CHUNKS``
chunks of ``BLOCK_D`` columns, a compile-time count (``tl.static_range``): the D chunks unroll inside
the column loop, which stays the innermost loop, the one Triton software-pipelines (with a runtime
chunk loop nested in it, only the chunk loop would be, and the column tiles would be loaded
synchronously). The program's own rows are loop invariant: their first D chunk is loaded once, the
others Triton hoists out of the sweep, so all of them stay on chip. Buffering every chunk of the column
tiles costs shared memory in proportion to D; past what fits, the launchers pass ``NUM_D_CHUNKS = 0``
and the chunks loop at run time (correct for any D, but not pipelined).

Labels arrive as dense int32 class ids (the launchers rank the int64 ids; -1 = ignored row), so one
32-bit compare per pair tells positives apart whatever the range of the original ids.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_chunk(Z, stride_z, idx, idx_in, d, D):
    # Z[idx, d]: a block of rows and a chunk of columns, 0 for the rows past N and the columns past D.
    return tl.load(Z + idx[:, None] * stride_z + d[None, :], mask=idx_in[:, None] & (d < D)[None, :], other=0.0)


@triton.jit
def _similarity_tile(
    Z, stride_z, rows, row_in, z_i0, cols, col_in, D, acc,
    BLOCK_D: tl.constexpr, NUM_D_CHUNKS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # acc + Z[rows] @ Z[cols]^T over all of D, and Z[cols] in its first D chunk (z_j0, which the backward
    # reuses). z_i0, the first chunk of Z[rows], is the caller's; further chunks are reloaded (loop
    # invariant: Triton hoists them). NUM_D_CHUNKS = 0: D is too wide for every chunk of a tile to be
    # buffered on chip, and the chunks loop at run time (the column loop is then not pipelined).
    offs_d = tl.arange(0, BLOCK_D)
    z_j0 = _row_chunk(Z, stride_z, cols, col_in, offs_d, D)
    acc = tl.dot(z_i0, tl.trans(z_j0), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    for k in tl.static_range(1, NUM_D_CHUNKS):
        acc = _chunk_product(Z, stride_z, rows, row_in, cols, col_in, k * BLOCK_D + offs_d, D, acc, PRECISION)
    if NUM_D_CHUNKS == 0:
        for d0 in range(BLOCK_D, D, BLOCK_D):
            acc = _chunk_product(Z, stride_z, rows, row_in, cols, col_in, d0 + offs_d, D, acc, PRECISION)
    return acc, z_j0


@triton.jit
def _chunk_product(Z, stride_z, rows, row_in, cols, col_in, d, D, acc, PRECISION: tl.constexpr):
    # acc + Z[rows, d] @ Z[cols, d]^T for the D chunk d.
    z_i = _row_chunk(Z, stride_z, rows, row_in, d, D)
    z_j = _row_chunk(Z, stride_z, cols, col_in, d, D)
    return tl.dot(z_i, tl.trans(z_j), acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _labels(Y, idx, idx_in, IGNORED: tl.constexpr):
    # Dense int32 class ids, IGNORED in place of -1 and past N (-1 for a tile's rows, -2 for its columns,
    # so that two ignored rows never match), and each row's exponent bias: 0, or -inf to drop an ignored row.
    y = tl.load(Y + idx, mask=idx_in, other=-1)
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
    Z, stride_z, Y, rows, row_in, y_i, offset_i, z_i0, i0, j_begin, j_end, D, scale, sums, pos,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D_CHUNKS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # Adds, for the rows, sum_j exp2(scale z_i.z_j - shift) (the shift is in offset_i) and the sum of
    # the positives' z_i.z_j over the columns j_begin .. j_end (scale = log2(e) / t).
    for j0 in range(j_begin, j_end, BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_in = cols < j_end
        y_j, offset_j = _labels(Y, cols, col_in, -2)
        dots = tl.zeros([BLOCK_M, BLOCK_N], sums.dtype)
        dots, _ = _similarity_tile(
            Z, stride_z, rows, row_in, z_i0, cols, col_in, D, dots, BLOCK_D, NUM_D_CHUNKS, PRECISION
        )
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
    Y,  # [N] int32 dense class ids, -1 = ignored row
    N,
    D,
    ANCHOR_START,
    ANCHOR_STOP,  # the anchor rows, whose statistics are written
    CONTRAST_START,  # the columns: rows CONTRAST_START .. N (rows before it are in no contrast set)
    SCALE_SHIFT,  # [2] in the compute dtype: log2(e) / temperature, and the shift c log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_D_CHUNKS: tl.constexpr,  # cdiv(D, BLOCK_D), or 0 to loop over the chunks at run time
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
    z_i0 = _row_chunk(Z, stride_z, rows, row_in, tl.arange(0, BLOCK_D), D)
    zero = tl.zeros([BLOCK_M], acc_dtype)
    sums, pos = _shifted_row_sums(
        Z, stride_z, Y, rows, row_in, y_i, bias_i - shift, z_i0, i0, CONTRAST_START, N, D, scale, zero, zero,
        BLOCK_M, BLOCK_N, BLOCK_D, NUM_D_CHUNKS, PRECISION,
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
    CONTRAST_START,  # at most ANCHOR_START: every anchor is a column of the others
    SCALE_SHIFT,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_D_CHUNKS: tl.constexpr,
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
    z_i0 = _row_chunk(Z, stride_z, rows, row_in, tl.arange(0, BLOCK_D), D)

    sums = tl.zeros([BLOCK], acc_dtype)
    pos = tl.zeros([BLOCK], acc_dtype)
    partners = (blocks - 1) // 2 + ((blocks % 2 == 0) & (pid < blocks // 2)).to(blocks.dtype)
    for k in range(0, partners + 1):
        j0 = ANCHOR_START + ((pid + k) % blocks) * BLOCK
        cols = j0 + tl.arange(0, BLOCK)
        col_in = cols < ANCHOR_STOP
        y_j, bias_j = _labels(Y, cols, col_in, -2)
        dots = tl.zeros([BLOCK, BLOCK], acc_dtype)
        dots, _ = _similarity_tile(
            Z, stride_z, rows, row_in, z_i0, cols, col_in, D, dots, BLOCK_D, NUM_D_CHUNKS, PRECISION
        )
        x, positive = _tile_terms(dots, scale, offset_i, bias_j, y_i, y_j, i0, j0, BLOCK, BLOCK)
        e = tl.exp2(x)
        s_pos = tl.where(positive, dots, 0.0)
        sums += tl.sum(e, 1)
        pos += tl.sum(s_pos, 1)
        if k > 0:
            tl.atomic_add(SUMS + cols, tl.sum(e, 0), mask=col_in, sem="relaxed")
            tl.atomic_add(POS + cols, tl.sum(s_pos, 0), mask=col_in, sem="relaxed")
    sums, pos = _shifted_row_sums(
        Z, stride_z, Y, rows, row_in, y_i, offset_i, z_i0, i0, CONTRAST_START, ANCHOR_START, D, scale, sums, pos,
        BLOCK, BLOCK, BLOCK_D, NUM_D_CHUNKS, PRECISION,
    )  # fmt: skip
    sums, pos = _shifted_row_sums(
        Z, stride_z, Y, rows, row_in, y_i, offset_i, z_i0, i0, ANCHOR_STOP, N, D, scale, sums, pos,
        BLOCK, BLOCK, BLOCK_D, NUM_D_CHUNKS, PRECISION,
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
    CONTRAST_START,
    SCALE_SHIFT,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_D_CHUNKS: tl.constexpr,
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
    j_end = tl.where(any_redo, N, CONTRAST_START)
    # Nothing is read from Z by a block without such a row (the usual case): a launch, and no traffic.
    z_i0 = _row_chunk(Z, stride_z, rows, row_in & any_redo, tl.arange(0, BLOCK_D), D)

    m_i = tl.full([BLOCK_M], float("-inf"), acc_dtype)
    l_i = tl.zeros([BLOCK_M], acc_dtype)
    for j0 in range(CONTRAST_START, j_end, BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_in = cols < N
        y_j, bias_j = _labels(Y, cols, col_in, -2)
        dots = tl.zeros([BLOCK_M, BLOCK_N], acc_dtype)
        dots, _ = _similarity_tile(
            Z, stride_z, rows, row_in, z_i0, cols, col_in, D, dots, BLOCK_D, NUM_D_CHUNKS, PRECISION
        )
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
    # (See _role_pair_weights for rows with different roles.)
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
def _role_pair_weights(
    dots, scale, shift, two_exp, i0, j0, y_i, y_j, bias_i, bias_j, lse2_i, lse2_j, w_i, w_j, a_i, a_j, alpha_i,
    alpha_j, contrast_j, side_i, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # _pair_weights when the rows have roles: row i's own terms (w_i, a_i) count only for the columns j of
    # its contrast set (contrast_j), and the terms of anchor j's loss only for the rows i that take their
    # contrast role's gradient (side_i): G_ij = [contrast_j] (w_i E_ij - a_i [j in P(i)]) + [side_i] (w_j E_ji
    # - a_j [i in P(j)]). G is not symmetric then; every row gets exactly its own gradient.
    s2, positive = _tile_terms(dots, scale, bias_i, bias_j, y_i, y_j, i0, j0, BLOCK_M, BLOCK_N)
    own = contrast_j[None, :]
    side = side_i[:, None]
    if two_exp:
        g = tl.where(own, w_i[:, None] * tl.exp2(s2 - lse2_i[:, None]), 0.0) + tl.where(
            side, w_j[None, :] * tl.exp2(s2 - lse2_j[None, :]), 0.0
        )
    else:
        g = tl.exp2(s2 - shift) * (tl.where(own, alpha_i[:, None], 0.0) + tl.where(side, alpha_j[None, :], 0.0))
    pair = tl.where(own, a_i[:, None], 0.0) + tl.where(side, a_j[None, :], 0.0)
    return g - tl.where(positive, pair, 0.0)


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
    stride_dz,  # [N, D] output gradient in the features' dtype; every element is written once
    Z,
    stride_z,
    Y,
    LSE2,
    W,
    A,
    ALPHA,  # dense labels, saved base-2 LSE (+inf where W = 0), row weights w, a and alpha (0 outside the anchors)
    N,
    D,
    ANCHOR_START,
    ANCHOR_STOP,
    CONTRAST_START,  # the contrast rows: CONTRAST_START .. N
    GRAD_STOP,  # the rows that take their contrast role's gradient: 0 .. GRAD_STOP
    SCALE_SHIFT,  # [2]: log2(e) / temperature and the shift, as in the forward
    TWO_EXP,  # [1] int32: 1 when a row with a loss is far below the shift (see _pair_weights)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_D_CHUNKS: tl.constexpr,
    BLOCK_DZ: tl.constexpr,  # the columns of dZ a program owns (program_id(1) picks which)
    PRECISION: tl.constexpr,
    SCALE_G: tl.constexpr,
    ROLES: tl.constexpr,  # some anchor is no contrast row, or at or past GRAD_STOP: _role_pair_weights
):
    # Deterministic: program (I, c) owns the rows I and the columns c BLOCK_DZ + [0, BLOCK_DZ) of dZ,
    # visits every column tile and accumulates dZ_I,c += G_IJ Z_J,c in registers: each element of dZ is
    # stored once, never read back (no read-modify-write through global memory). G needs S over all of
    # D, so when D spans several slabs (D > BLOCK_DZ) each slab's program recomputes it. A row block
    # visits the columns of its anchors' contrast sets (CONTRAST_START .. N) and, if it holds rows that take
    # their contrast role's gradient, the anchors' columns: a block of neither (a detached memory) visits
    # nothing and writes zeros. Without ROLES every anchor is a contrast row below GRAD_STOP, the rows
    # before CONTRAST_START come as ignored rows and G is symmetric; rows past GRAD_STOP that are no anchor
    # are zeroed at the store.
    pid = tl.program_id(0).to(tl.int64)
    slab = tl.program_id(1)
    acc_dtype = W.dtype.element_ty
    scale = tl.load(SCALE_SHIFT)
    shift = tl.load(SCALE_SHIFT + 1)
    two_exp = tl.load(TWO_EXP) != 0
    i0 = pid * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    row_in = rows < N
    y_i, bias_i, lse2_i, w_i, a_i, alpha_i = _row_stats(Y, LSE2, W, A, ALPHA, rows, row_in, -1)
    z_i0 = _row_chunk(Z, stride_z, rows, row_in, tl.arange(0, BLOCK_D), D)
    offs_dz = slab * BLOCK_DZ + tl.arange(0, BLOCK_DZ)

    anchor_block = (i0 < ANCHOR_STOP) & (i0 + BLOCK_M > ANCHOR_START)
    side_block = (i0 < GRAD_STOP) & (i0 + BLOCK_M > CONTRAST_START) & (ANCHOR_START < ANCHOR_STOP)
    j_start = tl.minimum(tl.where(anchor_block, CONTRAST_START, N), tl.where(side_block, ANCHOR_START, N))
    j_stop = tl.maximum(tl.where(anchor_block, N, 0), tl.where(side_block, ANCHOR_STOP, 0))
    side_i = (rows >= CONTRAST_START) & (rows < GRAD_STOP)
    dz = tl.zeros([BLOCK_M, BLOCK_DZ], acc_dtype)
    for j0 in range(j_start, j_stop, BLOCK_N):
        cols = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_in = cols < N
        y_j, bias_j, lse2_j, w_j, a_j, alpha_j = _row_stats(Y, LSE2, W, A, ALPHA, cols, col_in, -2)
        s = tl.zeros([BLOCK_M, BLOCK_N], acc_dtype)
        s, z_j0 = _similarity_tile(
            Z, stride_z, rows, row_in, z_i0, cols, col_in, D, s, BLOCK_D, NUM_D_CHUNKS, PRECISION
        )
        if ROLES:
            g = _role_pair_weights(
                s, scale, shift, two_exp, i0, j0, y_i, y_j, bias_i, bias_j, lse2_i, lse2_j, w_i, w_j, a_i, a_j,
                alpha_i, alpha_j, cols >= CONTRAST_START, side_i, BLOCK_M, BLOCK_N,
            )  # fmt: skip
        else:
            g = _pair_weights(
                s, scale, shift, two_exp, i0, j0, y_i, y_j, bias_i, bias_j, lse2_i, lse2_j, w_i, w_j, a_i, a_j,
                alpha_i, alpha_j, BLOCK_M, BLOCK_N,
            )  # fmt: skip
        if (NUM_D_CHUNKS == 1) and (BLOCK_DZ == BLOCK_D):
            z_j = z_j0  # one chunk is all of D and the slab: the tile already loaded
        else:
            z_j = _row_chunk(Z, stride_z, cols, col_in, offs_dz, D)
        dz += _weighted_rows(g, z_j, PRECISION, SCALE_G)
    if not ROLES:  # rows past GRAD_STOP but the anchors take no gradient
        dz = tl.where(((rows < GRAD_STOP) | ((rows >= ANCHOR_START) & (rows < ANCHOR_STOP)))[:, None], dz, 0.0)
    tl.store(
        DZ + rows[:, None] * stride_dz + offs_dz[None, :],
        dz.to(DZ.dtype.element_ty),
        mask=row_in[:, None] & (offs_dz < D)[None, :],
    )


@triton.jit
def _add_chunk_atomic(
    DZ, stride_dz, Z, stride_z, g, rows, row_in, row_out, cols, col_in, col_out, d, D, off_diagonal,
    PRECISION: tl.constexpr, SCALE_G: tl.constexpr,
):  # fmt: skip
    # The D chunk d of both sides of a symmetric tile: dZ[rows, d] += G Z[cols, d] and, off the
    # diagonal, dZ[cols, d] += G^T Z[rows, d] (row_out, col_out: the rows that take a gradient).
    d_in = d < D
    z_j = _row_chunk(Z, stride_z, cols, col_in, d, D)
    tl.atomic_add(
        DZ + rows[:, None] * stride_dz + d[None, :],
        _weighted_rows(g, z_j, PRECISION, SCALE_G),
        mask=row_out[:, None] & d_in[None, :],
        sem="relaxed",
    )
    if off_diagonal:
        z_i = _row_chunk(Z, stride_z, rows, row_in, d, D)
        tl.atomic_add(
            DZ + cols[:, None] * stride_dz + d[None, :],
            _weighted_rows(tl.trans(g), z_i, PRECISION, SCALE_G),
            mask=col_out[:, None] & d_in[None, :],
            sem="relaxed",
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
    GRAD_STOP,  # at least ANCHOR_STOP: the rows past it take no gradient
    SCALE_SHIFT,
    TWO_EXP,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_D_CHUNKS: tl.constexpr,
    PRECISION: tl.constexpr,
    SCALE_G: tl.constexpr,
):
    # Symmetric tiles: the program of row block I visits the column tiles J >= I (square tiles, so
    # the diagonal block is J = I). G is symmetric, so one tile serves both sides:
    # dZ_I += G_IJ Z_J, and for J > I also dZ_J += G_IJ^T Z_I. The diagonal tile's row side already
    # covers both orders of its pairs. Other programs add into the same rows: atomics throughout (the
    # first D chunk of the program's own rows accumulates in registers until the end).
    # Outside the anchors w = a = 0, so a tile of two blocks outside them is 0: a row block outside
    # the anchors visits only the tiles J >= I that overlap them. Rows past GRAD_STOP (no anchors) take no
    # gradient: their sides of the tiles are not added.
    pid = tl.program_id(0).to(tl.int64)
    acc_dtype = DZ.dtype.element_ty
    scale = tl.load(SCALE_SHIFT)
    shift = tl.load(SCALE_SHIFT + 1)
    two_exp = tl.load(TWO_EXP) != 0
    i0 = pid * BLOCK
    rows = i0 + tl.arange(0, BLOCK)
    row_in = rows < N
    y_i, bias_i, lse2_i, w_i, a_i, alpha_i = _row_stats(Y, LSE2, W, A, ALPHA, rows, row_in, -1)
    row_out = rows < GRAD_STOP
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
        s, z_j0 = _similarity_tile(
            Z, stride_z, rows, row_in, z_i0, cols, col_in, D, s, BLOCK_D, NUM_D_CHUNKS, PRECISION
        )
        g = _pair_weights(
            s, scale, shift, two_exp, i0, j0, y_i, y_j, bias_i, bias_j, lse2_i, lse2_j, w_i, w_j, a_i, a_j,
            alpha_i, alpha_j, BLOCK, BLOCK,
        )  # fmt: skip
        # The columns' side, but on the diagonal (its rows cover it) and for columns past GRAD_STOP (none
        # of a tile past it: a detached queue costs no product for it).
        off_diagonal = (j0 != i0) & (j0 < GRAD_STOP)
        col_out = cols < GRAD_STOP
        dz0 += _weighted_rows(g, z_j0, PRECISION, SCALE_G)
        if off_diagonal:
            tl.atomic_add(
                DZ + cols[:, None] * stride_dz + offs_d[None, :],
                _weighted_rows(tl.trans(g), z_i0, PRECISION, SCALE_G),
                mask=col_out[:, None] & d0_in[None, :],
                sem="relaxed",
            )
        for k in tl.static_range(1, NUM_D_CHUNKS):
            _add_chunk_atomic(DZ, stride_dz, Z, stride_z, g, rows, row_in, row_out, cols, col_in, col_out,
                              k * BLOCK_D + offs_d, D, off_diagonal, PRECISION, SCALE_G)  # fmt: skip
        if NUM_D_CHUNKS == 0:
            for d0 in range(BLOCK_D, D, BLOCK_D):
                _add_chunk_atomic(DZ, stride_dz, Z, stride_z, g, rows, row_in, row_out, cols, col_in, col_out,
                                  d0 + offs_d, D, off_diagonal, PRECISION, SCALE_G)  # fmt: skip
    tl.atomic_add(
        DZ + rows[:, None] * stride_dz + offs_d[None, :], dz0, mask=row_out[:, None] & d0_in[None, :], sem="relaxed"
    )
