r"""Cosine cross-entropy of rows against C prototypes in Triton (a fused linear cross-entropy for small C).

With :math:`\hat z_i = z_i / \max(\lVert z_i \rVert, \epsilon)`, :math:`\hat p_c` likewise and
:math:`u_{ic} = \hat z_i \cdot \hat p_c / \tau`:

.. math::
    \ell_i = \mathrm{LSE}_c\, u_{ic} - u_{i y_i} \quad (y_i \ge 0), \qquad \ell_i = 0 \quad (y_i = -1).

Forward (``_prototype_ce_fwd_kernel``): one program per ``BLOCK_M`` rows computes the row norms, then
streams the prototypes in ``BLOCK_C`` chunks (D in ``BLOCK_D`` chunks), keeping an online max and sum
and picking the target logit. The feature normalisation is fused (the norm divides the logits);
the prototypes (``[C, D]``, small) are normalised and scaled by :math:`1/\tau` once in torch. Saved for
backward: the row LSE and the clamped row norm, O(N).

Backward, with :math:`\delta_{ic} = g_i (\mathrm{softmax}_c(u_i) - [c = y_i])` recomputed from the saved
LSE (never stored: no ``[N, C]`` tensor in memory):

* ``_prototype_ce_bwd_dz_kernel``: one program per row block, :math:`\partial L/\partial \hat z_I =
  \delta_{I} \hat P / \tau`;
* ``_prototype_ce_bwd_dp_kernel``: grid (class blocks x row splits); each program sums
  :math:`\delta_{I c}^\top \hat z_I / \tau` over a fixed range of row blocks into its own partial
  ``[C, D]`` accumulator, and torch adds the partials in a fixed order. No atomics: the gradient is
  bitwise reproducible. The number of splits trades parallelism for scratch memory
  (:func:`mlcontrast.ops.utils.split_count`).

The gradient of the features' normalisation, :math:`(d\hat z - \hat z (\hat z \cdot d\hat z)) / \max(\lVert z
\rVert, \epsilon)` (radial part only where the norm exceeds :math:`\epsilon`), is applied by the dz kernel
to its own rows, which it then writes once in the features' dtype (an fp32 scratch holds the D chunks past
the first while classes are summed, when D exceeds one chunk); that of the prototypes (``[C, D]``) in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlcontrast.ops import contract
from mlcontrast.ops.utils import (
    LIBRARY,
    KERNEL_NORM_EPS,
    NORM_EPS,
    compute_dtype,
    dot_precision,
    interpreting,
    launch,
    pow2_block,
    split_count,
    triton_library_op,
)

__all__ = ["prototype_ce", "prototype_ce_backward"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_norms(
    Z, stride_z, rows, row_in, D, offs_d, acc_dtype: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    # max(||z_i||, eps) of a block of rows, in the accumulation dtype.
    sq = tl.zeros([BLOCK_M], acc_dtype)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        z = tl.load(Z + rows[:, None] * stride_z + d[None, :], mask=row_in[:, None] & (d < D)[None, :], other=0.0)
        z = z.to(acc_dtype)
        sq += tl.sum(z * z, 1)
    return tl.maximum(tl.sqrt(sq), KERNEL_NORM_EPS)


@triton.jit
def _logits_tile(
    Z,
    stride_z,
    rows,
    row_in,
    z_i0,
    P,
    stride_p,
    cls,
    c_in,
    D,
    inv_norm,
    offs_d,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # u = (Z[rows] / norm) @ P[cls]^T with P = unit prototypes / t; classes past C get -inf.
    acc = tl.zeros([BLOCK_M, BLOCK_C], P.dtype.element_ty)
    d_in = offs_d < D
    p = tl.load(P + cls[None, :] * stride_p + offs_d[:, None], mask=c_in[None, :] & d_in[:, None], other=0.0)
    acc = tl.dot(z_i0, p, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    for d0 in range(BLOCK_D, D, BLOCK_D):
        d = d0 + offs_d
        d_in = d < D
        z = tl.load(Z + rows[:, None] * stride_z + d[None, :], mask=row_in[:, None] & d_in[None, :], other=0.0)
        p = tl.load(P + cls[None, :] * stride_p + d[:, None], mask=c_in[None, :] & d_in[:, None], other=0.0)
        acc = tl.dot(z.to(acc.dtype), p, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return tl.where(c_in[None, :], acc * inv_norm[:, None], float("-inf"))


@triton.jit
def _prototype_ce_fwd_kernel(
    LOSS,
    LSE,
    NORM,  # outputs [N]: row loss, row LSE over classes, max(||z_i||, eps)
    Z,
    stride_z,  # [N, D] features
    Y,  # [N] int64 labels, -1 = ignored row
    P,
    stride_p,  # [C, D] unit prototypes / t, compute dtype
    N,
    C,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    acc_dtype = LSE.dtype.element_ty
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < N
    y_i = tl.load(Y + rows, mask=row_in, other=-1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    norm = _row_norms(Z, stride_z, rows, row_in, D, offs_d, acc_dtype, BLOCK_M, BLOCK_D)
    inv_norm = 1.0 / norm
    z_i0 = tl.load(
        Z + rows[:, None] * stride_z + offs_d[None, :], mask=row_in[:, None] & (offs_d < D)[None, :], other=0.0
    ).to(acc_dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), acc_dtype)
    l_i = tl.zeros([BLOCK_M], acc_dtype)
    target = tl.zeros([BLOCK_M], acc_dtype)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + offs_c
        c_in = cls < C
        u = _logits_tile(
            Z,
            stride_z,
            rows,
            row_in,
            z_i0,
            P,
            stride_p,
            cls,
            c_in,
            D,
            inv_norm,
            offs_d,
            BLOCK_M,
            BLOCK_C,
            BLOCK_D,
            PRECISION,
        )
        target += tl.sum(tl.where(cls[None, :] == y_i[:, None], u, 0.0), 1)
        # The first chunk holds class 0 (C >= 1), so m_new is finite from the start.
        m_new = tl.maximum(m_i, tl.max(u, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(u - m_new[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(LOSS + rows, tl.where(y_i >= 0, lse - target, 0.0), mask=row_in)
    tl.store(LSE + rows, lse, mask=row_in)
    tl.store(NORM + rows, norm, mask=row_in)


@triton.jit
def _prototype_ce_bwd_dz_kernel(
    DZ,
    stride_dz,  # [N, D] output: d loss / d features, in the features' dtype, every row written
    DZU,
    stride_dzu,  # [N, D] fp32/fp64 scratch for d loss / d unit rows past the first D chunk (a dummy if D <= BLOCK_D)
    Z,
    stride_z,
    Y,
    P,
    stride_p,
    LSE,
    NORM,
    G,  # G: [N] upstream gradient, 0 on ignored rows
    N,
    C,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program owns BLOCK_M rows: dZU_I = sum over class chunks of delta_IC P_C, the gradient with
    # respect to the unit rows. The first D chunk accumulates in registers; further chunks
    # read-modify-write rows of DZU owned by this program. Then the normalisation's chain rule,
    # dz = (dzu - zhat (zhat . dzu)) / norm (radial part only where norm > eps), over the whole row.
    pid = tl.program_id(0).to(tl.int64)
    acc_dtype = LSE.dtype.element_ty
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < N
    y_i = tl.load(Y + rows, mask=row_in, other=-1)
    lse_i = tl.load(LSE + rows, mask=row_in, other=0.0)
    g_i = tl.load(G + rows, mask=row_in, other=0.0)
    norm = tl.load(NORM + rows, mask=row_in, other=1.0)
    inv_norm = 1.0 / norm
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    d0_in = offs_d < D
    z_i0 = tl.load(Z + rows[:, None] * stride_z + offs_d[None, :], mask=row_in[:, None] & d0_in[None, :], other=0.0).to(
        acc_dtype
    )

    dz0 = tl.zeros([BLOCK_M, BLOCK_D], acc_dtype)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + offs_c
        c_in = cls < C
        u = _logits_tile(
            Z, stride_z, rows, row_in, z_i0, P, stride_p, cls, c_in, D, inv_norm, offs_d,
            BLOCK_M, BLOCK_C, BLOCK_D, PRECISION,
        )  # fmt: skip
        onehot = (cls[None, :] == y_i[:, None]).to(acc_dtype)
        delta = g_i[:, None] * (tl.exp(u - lse_i[:, None]) - onehot)  # exp(-inf) = 0 past C
        p = tl.load(P + cls[:, None] * stride_p + offs_d[None, :], mask=c_in[:, None] & d0_in[None, :], other=0.0)
        dz0 = tl.dot(delta, p, dz0, input_precision=PRECISION, out_dtype=acc_dtype)
        for d0 in range(BLOCK_D, D, BLOCK_D):
            d = d0 + offs_d
            d_in = d < D
            p = tl.load(P + cls[:, None] * stride_p + d[None, :], mask=c_in[:, None] & d_in[None, :], other=0.0)
            ptrs = DZU + rows[:, None] * stride_dzu + d[None, :]
            out_mask = row_in[:, None] & d_in[None, :]
            part = tl.dot(delta, p, input_precision=PRECISION, out_dtype=acc_dtype)
            tl.store(ptrs, tl.load(ptrs, mask=out_mask, other=0.0) + part, mask=out_mask)
            # The load and the store of a chunk get different layouts: the next read of this chunk (the
            # next class chunk, or the chain rule below) may be by another warp, so wait for the store.
            tl.debug_barrier()

    # The chain rule of the normalisation; the chunks past the first are read back from DZU.
    radial = tl.sum(z_i0 * dz0, 1)
    for d0 in range(BLOCK_D, D, BLOCK_D):
        d = d0 + offs_d
        mask = row_in[:, None] & (d < D)[None, :]
        z = tl.load(Z + rows[:, None] * stride_z + d[None, :], mask=mask, other=0.0).to(acc_dtype)
        radial += tl.sum(z * tl.load(DZU + rows[:, None] * stride_dzu + d[None, :], mask=mask, other=0.0), 1)
    # zhat . dzu / norm, where the norm exceeds eps (below it the norm is the constant eps).
    radial = tl.where(norm > KERNEL_NORM_EPS, radial * inv_norm * inv_norm, 0.0)
    out_dtype = DZ.dtype.element_ty
    dz = (dz0 - z_i0 * radial[:, None]) * inv_norm[:, None]
    tl.store(DZ + rows[:, None] * stride_dz + offs_d[None, :], dz.to(out_dtype), mask=row_in[:, None] & d0_in[None, :])
    for d0 in range(BLOCK_D, D, BLOCK_D):
        d = d0 + offs_d
        mask = row_in[:, None] & (d < D)[None, :]
        z = tl.load(Z + rows[:, None] * stride_z + d[None, :], mask=mask, other=0.0).to(acc_dtype)
        dzu = tl.load(DZU + rows[:, None] * stride_dzu + d[None, :], mask=mask, other=0.0)
        dz = (dzu - z * radial[:, None]) * inv_norm[:, None]
        tl.store(DZ + rows[:, None] * stride_dz + d[None, :], dz.to(out_dtype), mask=mask)


@triton.jit
def _prototype_ce_bwd_dp_kernel(
    DPU,
    stride_split,
    stride_dpu,  # [S, C, D] output partials of d loss / d unit prototypes * t, zeroed
    Z,
    stride_z,
    Y,
    P,
    stride_p,
    LSE,
    NORM,
    G,
    N,
    C,
    D,
    BLOCKS_PER_SPLIT,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (class block, split s) sums delta_IC^T zhat_I over the row blocks
    # [s * BLOCKS_PER_SPLIT, (s + 1) * BLOCKS_PER_SPLIT) into partial s: fixed order, no atomics.
    cb = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    acc_dtype = DPU.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cls = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cls < C
    d0_in = offs_d < D
    out = DPU + split * stride_split

    dp0 = tl.zeros([BLOCK_C, BLOCK_D], acc_dtype)
    first = split * BLOCKS_PER_SPLIT
    last = tl.minimum(first + BLOCKS_PER_SPLIT, tl.cdiv(N, BLOCK_M))
    for b in range(first, last):
        rows = b * BLOCK_M + offs_m
        row_in = rows < N
        y_i = tl.load(Y + rows, mask=row_in, other=-1)
        lse_i = tl.load(LSE + rows, mask=row_in, other=0.0)
        g_i = tl.load(G + rows, mask=row_in, other=0.0)
        inv_norm = 1.0 / tl.load(NORM + rows, mask=row_in, other=1.0)
        z_i0 = tl.load(
            Z + rows[:, None] * stride_z + offs_d[None, :], mask=row_in[:, None] & d0_in[None, :], other=0.0
        ).to(acc_dtype)
        u = _logits_tile(
            Z,
            stride_z,
            rows,
            row_in,
            z_i0,
            P,
            stride_p,
            cls,
            c_in,
            D,
            inv_norm,
            offs_d,
            BLOCK_M,
            BLOCK_C,
            BLOCK_D,
            PRECISION,
        )
        onehot = (cls[None, :] == y_i[:, None]).to(acc_dtype)
        delta_t = tl.trans(g_i[:, None] * (tl.exp(u - lse_i[:, None]) - onehot))  # [BLOCK_C, BLOCK_M]
        dp0 = tl.dot(delta_t, z_i0 * inv_norm[:, None], dp0, input_precision=PRECISION, out_dtype=acc_dtype)
        for d0 in range(BLOCK_D, D, BLOCK_D):
            d = d0 + offs_d
            d_in = d < D
            z = tl.load(Z + rows[:, None] * stride_z + d[None, :], mask=row_in[:, None] & d_in[None, :], other=0.0).to(
                acc_dtype
            )
            ptrs = out + cls[:, None] * stride_dpu + d[None, :]
            out_mask = c_in[:, None] & d_in[None, :]
            part = tl.dot(delta_t, z * inv_norm[:, None], input_precision=PRECISION, out_dtype=acc_dtype)
            tl.store(ptrs, tl.load(ptrs, mask=out_mask, other=0.0) + part, mask=out_mask)
            tl.debug_barrier()  # the next row block's read of this chunk may be by another warp
    tl.store(out + cls[:, None] * stride_dpu + offs_d[None, :], dp0, mask=c_in[:, None] & d0_in[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers and torch.library glue
# ----------------------------------------------------------------------------------------------


def _config(c: int, d: int, dtype: torch.dtype, kernel: str = "rows") -> dict:
    """Block sizes and launch options of the row kernels (``"rows"``: forward, dz) or of the prototype
    gradient (``"classes"``: dp)."""
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_C": 16, "BLOCK_D": 16, "options": {}}
    # The dot operands are in the compute dtype (features upcast on load, so the normalised rows
    # keep full precision): D chunks of at most 64 fp32 (32 fp64) columns.
    if dtype == torch.float64:
        # fp64 is for gradcheck: small tiles. 16 classes a chunk: with 32, triton 3.6 spills 104 bytes in
        # the prototype gradient on sm_90 (255 registers; 206 with 16, 240 in the dz kernel).
        return {"BLOCK_M": 32, "BLOCK_C": 16, "BLOCK_D": pow2_block(d, 16, 32),
                "options": {"num_warps": 4, "num_stages": 1}}  # fmt: skip
    if dot_precision(dtype) == "tf32x3":
        # 3xTF32 (fp32 products when TF32 is not allowed) keeps split copies of its operands. These
        # tiles are the ones ptxas compiles without spills for sm_90 (D = 256, C = 80); the
        # 64-class, 4-warp ones spill 64 (dz) and 112 bytes (dp).
        if kernel == "classes":
            return {"BLOCK_M": 32, "BLOCK_C": pow2_block(c, 16, 32), "BLOCK_D": pow2_block(d, 16, 32),
                    "options": {"num_warps": 8, "num_stages": 1}}  # fmt: skip
        return {"BLOCK_M": 64, "BLOCK_C": pow2_block(c, 16, 32), "BLOCK_D": pow2_block(d, 16, 32),
                "options": {"num_warps": 4, "num_stages": 2}}  # fmt: skip
    return {
        "BLOCK_M": 64,
        "BLOCK_C": pow2_block(c, 16, 64),
        "BLOCK_D": pow2_block(d, 16, 64),
        "options": {"num_warps": 4, "num_stages": 2},
    }


def _launch_meta(cfg: dict, dtype: torch.dtype) -> dict:
    return dict(
        BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], BLOCK_D=cfg["BLOCK_D"], PRECISION=dot_precision(dtype),
        **cfg["options"],
    )  # fmt: skip


def _unit_prototypes(prototypes: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    p = prototypes.to(dtype)
    clamped = torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp(min=NORM_EPS)
    return p / clamped, clamped


def _unit_backward(grad_unit: torch.Tensor, unit: torch.Tensor, clamped: torch.Tensor) -> torch.Tensor:
    # d/dx of x / max(||x||, eps): the radial part only where ||x|| > eps (elsewhere the norm is the
    # constant eps).
    radial = (unit * grad_unit).sum(-1, keepdim=True) * (clamped > NORM_EPS)
    return (grad_unit - unit * radial) / clamped


@triton_library_op("prototype_ce", fake=contract.fake("prototype_ce"))
def prototype_ce(
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-row cosine cross-entropy against all prototypes (forward launcher).

    Args:
        features: ``[N, D]`` rows.
        labels: ``[N]`` int64 class ids in ``[0, C)``, -1 for an ignored row.
        prototypes: ``[C, D]`` with C >= 1.
        temperature: :math:`\tau > 0`.

    Returns:
        ``(loss, lse, norm)``, each ``[N]`` in fp32 (fp64 for fp64 features): :math:`\ell_i` (0 on
        ignored rows), :math:`\mathrm{LSE}_c u_{ic}` and :math:`\max(\lVert z_i \rVert, \epsilon)`.
        Only ``loss`` is differentiable.
    """
    z = features.contiguous()
    y = labels.contiguous()
    n, d = z.shape
    c = prototypes.shape[0]
    dtype = compute_dtype(z.dtype)
    p = (_unit_prototypes(prototypes, dtype)[0] * (1.0 / temperature)).contiguous()
    loss = torch.empty(n, dtype=dtype, device=z.device)
    lse = torch.empty(n, dtype=dtype, device=z.device)
    norm = torch.empty(n, dtype=dtype, device=z.device)
    if n > 0:
        cfg = _config(c, d, dtype)
        launch(_prototype_ce_fwd_kernel, (triton.cdiv(n, cfg["BLOCK_M"]),))(
            LOSS=loss, LSE=lse, NORM=norm, Z=z, stride_z=z.stride(0), Y=y, P=p, stride_p=p.stride(0), N=n, C=c, D=d,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_C=cfg["BLOCK_C"],
            BLOCK_D=cfg["BLOCK_D"],
            PRECISION=dot_precision(dtype),
            **cfg["options"],
        )
    return loss, lse, norm


@triton_library_op("prototype_ce_backward", fake=contract.fake("prototype_ce_backward"))
def prototype_ce_backward(
    grad_rows: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    lse: torch.Tensor,
    norm: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Gradients of :math:`\sum_i g_i \ell_i` w.r.t. features and prototypes (backward launcher).

    Args:
        grad_rows: ``[N]`` upstream gradient :math:`g`.
        features, labels, prototypes, temperature: as given to :func:`prototype_ce`.
        lse, norm: ``[N]`` statistics saved by :func:`prototype_ce`.

    Returns:
        ``(grad_features [N, D], grad_prototypes [C, D])`` in the dtypes of the inputs; deterministic.
    """
    z = features.contiguous()
    y = labels.contiguous()
    n, d = z.shape
    c = prototypes.shape[0]
    dtype = compute_dtype(z.dtype)
    inv_t = 1.0 / temperature
    p_unit, p_clamped = _unit_prototypes(prototypes, dtype)
    p = (p_unit * inv_t).contiguous()
    g = torch.where(y >= 0, grad_rows.to(dtype), torch.zeros((), dtype=dtype, device=z.device)).contiguous()
    lse = lse.to(dtype).contiguous()
    norm = norm.to(dtype).contiguous()
    grad_z = torch.empty((n, d), dtype=features.dtype, device=z.device)
    if n > 0:
        rows_cfg, classes_cfg = _config(c, d, dtype), _config(c, d, dtype, "classes")
        # fp32 (fp64) scratch for the D chunks past the first, when there are any; else a dummy that the
        # kernel never touches. Never grad_z itself: under torch.compile each mutated argument of a
        # kernel is cloned on its own, and the graph would return the clone that was not written.
        chunked = d > rows_cfg["BLOCK_D"]
        scratch = torch.zeros((n, d) if chunked else (1, 1), dtype=dtype, device=z.device)
        launch(_prototype_ce_bwd_dz_kernel, (triton.cdiv(n, rows_cfg["BLOCK_M"]),))(
            DZ=grad_z, stride_dz=grad_z.stride(0), DZU=scratch, stride_dzu=scratch.stride(0), Z=z, stride_z=z.stride(0),
            Y=y, P=p, stride_p=p.stride(0), LSE=lse, NORM=norm, G=g, N=n, C=c, D=d, **_launch_meta(rows_cfg, dtype),
        )  # fmt: skip
        blocks = triton.cdiv(n, classes_cfg["BLOCK_M"])
        splits, per_split = split_count(blocks, c * d * torch.finfo(dtype).bits // 8)
        partials = torch.zeros((splits, c, d), dtype=dtype, device=z.device)
        launch(_prototype_ce_bwd_dp_kernel, (triton.cdiv(c, classes_cfg["BLOCK_C"]), splits))(
            DPU=partials, stride_split=partials.stride(0), stride_dpu=partials.stride(1), Z=z, stride_z=z.stride(0),
            Y=y, P=p, stride_p=p.stride(0), LSE=lse, NORM=norm, G=g, N=n, C=c, D=d, BLOCKS_PER_SPLIT=per_split,
            **_launch_meta(classes_cfg, dtype),
        )
        grad_unit_p = partials.sum(0) * inv_t
    else:
        grad_unit_p = torch.zeros((c, d), dtype=dtype, device=z.device)
    grad_p = _unit_backward(grad_unit_p, p_unit, p_clamped)
    return grad_z, grad_p.to(prototypes.dtype)


contract.register_autograd(LIBRARY, "prototype_ce")
