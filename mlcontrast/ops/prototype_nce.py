r"""Prototype-to-sample NCE (SADCL's PSCL) in Triton.

With :math:`s_{bc} = \cos(z_{bc}, p_c) / \tau`, known rows :math:`K_c = \{b : t_{bc} \ge 0\}` and
positives :math:`P_c = \{b : t_{bc} = 1\}`:

.. math::
    L = -\frac{1}{\sum_c |P_c|} \sum_{c : K_c \ne \emptyset}
        \Big( \mathrm{LSE}_{b \in P_c}\, s_{bc} - \mathrm{LSE}_{b \in K_c}\, s_{bc} \Big),

an LSE over an empty set being 0, and :math:`L = 0` when there is no positive at all.

The only pass over the ``[B, C, D]`` features is the cosine: ``_prototype_nce_fwd_kernel`` (one
program per ``BLOCK_R`` of the B*C rows, D in ``BLOCK_D`` chunks) writes :math:`s` and the clamped
row norms, with the normalisation fused into the dot products. The per-class LSEs and the loss work
on the ``[B, C]`` logits in torch (tiny). Backward: torch forms
:math:`\partial L / \partial s_{bc}` (``[B, C]``), and ``_prototype_nce_bwd_kernel`` (grid: class
blocks x D chunks x sample splits, each program looping over its range of samples) writes
:math:`\partial L/\partial z_{bc} = \frac{\delta_{bc}}{\tau} (\hat p_c - \hat z_{bc} \cos_{bc}) /
\max(\lVert z_{bc} \rVert, \epsilon)` and sums :math:`\frac{\delta_{bc}}{\tau} \hat z_{bc}` over its
samples into its own partial of :math:`\partial L/\partial \hat p_c`; torch adds the partials in a fixed
order (deterministic, no atomics). The splits give the grid enough programs to fill a GPU (a few
hundred at C = 80, D = 256 from B = 64 on) where one program per (class block, D chunk) would be 40
(:func:`mlcontrast.ops.utils.split_count`). The prototype
normalisation (``[C, D]``) and its gradient are done in torch. Saved for backward: the logits,
norms and per-class LSEs, O(B C).
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
    interpreting,
    launch,
    pow2_block,
    scalar,
    split_count,
    triton_library_op,
)

__all__ = ["prototype_nce", "prototype_nce_backward"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _prototype_nce_fwd_kernel(
    LOGITS,
    NORM,  # outputs [R = B * C]: s_r and max(||z_r||, eps), compute dtype
    Z,
    stride_z,  # [R, D] features (row r = b * C + c)
    P,  # [C, D] unit prototypes, compute dtype, contiguous
    R,
    C,
    D,
    INV_T,  # INV_T: [1] tensor, 1 / temperature in the compute dtype
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Row r meets prototype r % C only: a batched row-wise dot product, not a matrix product.
    pid = tl.program_id(0).to(tl.int64)
    acc_dtype = LOGITS.dtype.element_ty
    inv_t = tl.load(INV_T)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < R
    cls = rows % C
    offs_d = tl.arange(0, BLOCK_D)
    dot = tl.zeros([BLOCK_R], acc_dtype)
    sq = tl.zeros([BLOCK_R], acc_dtype)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask = row_in[:, None] & (d < D)[None, :]
        z = tl.load(Z + rows[:, None] * stride_z + d[None, :], mask=mask, other=0.0).to(acc_dtype)
        p = tl.load(P + cls[:, None] * D + d[None, :], mask=mask, other=0.0)
        dot += tl.sum(z * p, 1)
        sq += tl.sum(z * z, 1)
    norm = tl.maximum(tl.sqrt(sq), KERNEL_NORM_EPS)
    tl.store(LOGITS + rows, dot / norm * inv_t, mask=row_in)
    tl.store(NORM + rows, norm, mask=row_in)


@triton.jit
def _prototype_nce_bwd_kernel(
    DZ,
    stride_dz,  # [R, D] output d L / d z (compute dtype)
    DPU,  # [S, C, D] output partials of d L / d unit prototypes (compute dtype, contiguous), every entry written
    Z,
    stride_z,
    P,
    LOGITS,
    NORM,
    DLOGITS,  # DLOGITS: [R] d L / d s
    B,
    C,
    D,
    TEMPERATURE,  # TEMPERATURE: [1] tensor in the compute dtype
    SAMPLES_PER_SPLIT,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (class block, D chunk, split s) walks the samples [s * SAMPLES_PER_SPLIT, (s + 1) *
    # SAMPLES_PER_SPLIT) in order: it owns its slice of dZ and of partial s of the prototype gradient,
    # so nothing is shared between programs.
    cb = tl.program_id(0).to(tl.int64)
    db = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    acc_dtype = DPU.dtype.element_ty
    temperature = tl.load(TEMPERATURE)
    inv_t = 1.0 / temperature
    cls = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cls < C
    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = c_in[:, None] & (d < D)[None, :]
    p = tl.load(P + cls[:, None] * D + d[None, :], mask=mask, other=0.0)
    dp = tl.zeros([BLOCK_C, BLOCK_D], acc_dtype)
    first = split * SAMPLES_PER_SPLIT
    for b in range(first, tl.minimum(first + SAMPLES_PER_SPLIT, B)):
        rows = b * C + cls
        z = tl.load(Z + rows[:, None] * stride_z + d[None, :], mask=mask, other=0.0).to(acc_dtype)
        norm = tl.load(NORM + rows, mask=c_in, other=1.0)
        cos = tl.load(LOGITS + rows, mask=c_in, other=0.0) * temperature
        ds = tl.load(DLOGITS + rows, mask=c_in, other=0.0) * inv_t
        unit = z / norm[:, None]
        # The radial part of the normalisation's gradient exists only where the norm is not clamped.
        radial = tl.where(norm > KERNEL_NORM_EPS, cos, 0.0)
        dz = ds[:, None] * (p - unit * radial[:, None]) / norm[:, None]
        tl.store(DZ + rows[:, None] * stride_dz + d[None, :], dz, mask=mask)
        dp += ds[:, None] * unit
    tl.store(DPU + (split * C + cls[:, None]) * D + d[None, :], dp, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers and torch.library glue
# ----------------------------------------------------------------------------------------------


#: Programs the backward aims at (about 8 per SM of an H100 / H200), through splits of the samples.
BWD_PROGRAMS = 1024
#: Fewest samples per split: a split costs a ``[C, D]`` partial written and read back.
MIN_SAMPLES_PER_SPLIT = 4


def _config(c: int, d: int) -> dict:
    if interpreting():
        return {"BLOCK_R": 16, "BLOCK_C": 16, "BLOCK_D": 16, "options": {}}
    return {
        "BLOCK_R": 64,
        "BLOCK_C": pow2_block(c, 1, 16),
        # The backward grid is (class blocks x D chunks x splits): narrow chunks give it more programs.
        "BLOCK_D": pow2_block(d, 16, 32),
        "options": {"num_warps": 4},
    }


def _backward_grid(b: int, c: int, d: int, dtype: torch.dtype, cfg: dict) -> tuple[tuple[int, int, int], int]:
    """``((class blocks, D chunks, splits), samples per split)`` of the backward kernel."""
    tiles = max(1, triton.cdiv(c, cfg["BLOCK_C"]) * triton.cdiv(d, cfg["BLOCK_D"]))
    most = max(1, min(BWD_PROGRAMS // tiles, b // MIN_SAMPLES_PER_SPLIT))
    splits, per_split = split_count(b, c * d * torch.finfo(dtype).bits // 8, most=most)
    return (triton.cdiv(c, cfg["BLOCK_C"]), triton.cdiv(d, cfg["BLOCK_D"]), splits), per_split


def _unit_prototypes(prototypes: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    p = prototypes.to(dtype)
    clamped = torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp(min=NORM_EPS)
    return (p / clamped).contiguous(), clamped


def _masked_column_lse(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    lse = logits.masked_fill(~mask, float("-inf")).logsumexp(0)
    return torch.where(mask.any(0), lse, torch.zeros((), dtype=logits.dtype, device=logits.device))


@triton_library_op("prototype_nce", fake=contract.fake("prototype_nce"))
def prototype_nce(
    features: torch.Tensor, prototypes: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""PSCL loss and the statistics its backward needs (forward launcher).

    Args:
        features: ``[B, C, D]`` label-level features.
        prototypes: ``[C, D]``.
        targets: ``[B, C]`` int64, 1 positive, 0 negative, -1 unknown.
        temperature: :math:`\tau > 0`.

    Returns:
        ``(loss, stats, logits, norm)``: the scalar loss, ``[2, C]`` per-class LSE over positives and
        over known rows, ``[B, C]`` logits :math:`s` and clamped feature norms; fp32 (fp64 for fp64
        features). Only ``loss`` is differentiable.
    """
    b, c, d = features.shape
    dtype = compute_dtype(features.dtype)
    z = features.reshape(b * c, d).contiguous()
    p_unit, _ = _unit_prototypes(prototypes, dtype)
    logits = torch.empty(b * c, dtype=dtype, device=z.device)
    norm = torch.empty(b * c, dtype=dtype, device=z.device)
    if b * c > 0:
        cfg = _config(c, d)
        launch(_prototype_nce_fwd_kernel, (triton.cdiv(b * c, cfg["BLOCK_R"]),))(
            LOGITS=logits, NORM=norm, Z=z, stride_z=z.stride(0), P=p_unit, R=b * c, C=c, D=d,
            INV_T=scalar(1.0 / temperature, dtype, z.device), BLOCK_R=cfg["BLOCK_R"],
            BLOCK_D=cfg["BLOCK_D"],
            **cfg["options"],
        )
    logits = logits.view(b, c)
    norm = norm.view(b, c)
    positive, known = targets == 1, targets >= 0
    stats = torch.stack([_masked_column_lse(logits, positive), _masked_column_lse(logits, known)])
    n_pos = positive.sum().to(dtype)
    # Columns without known rows have both LSEs at 0 and add nothing.
    loss = torch.where(n_pos > 0, (stats[1] - stats[0]).sum() / n_pos.clamp(min=1), torch.zeros_like(n_pos))
    return loss, stats, logits, norm


@triton_library_op("prototype_nce_backward", fake=contract.fake("prototype_nce_backward"))
def prototype_nce_backward(
    grad: torch.Tensor,
    features: torch.Tensor,
    prototypes: torch.Tensor,
    targets: torch.Tensor,
    stats: torch.Tensor,
    logits: torch.Tensor,
    norm: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Gradients of ``grad * L`` w.r.t. features and prototypes (backward launcher).

    Args:
        grad: scalar upstream gradient.
        features, prototypes, targets, temperature: as given to :func:`prototype_nce`.
        stats, logits, norm: saved by :func:`prototype_nce`.

    Returns:
        ``(grad_features [B, C, D], grad_prototypes [C, D])`` in the input dtypes; deterministic.
    """
    b, c, d = features.shape
    dtype = compute_dtype(features.dtype)
    z = features.reshape(b * c, d).contiguous()
    p_unit, p_clamped = _unit_prototypes(prototypes, dtype)
    positive, known = targets == 1, targets >= 0
    n_pos = positive.sum().to(dtype)
    zero = torch.zeros((), dtype=dtype, device=z.device)
    coef = torch.where(n_pos > 0, -grad.to(dtype) / n_pos.clamp(min=1), zero)
    stats = stats.to(dtype)
    logits = logits.to(dtype)
    # d L / d s_bc = coef * (softmax over P_c - softmax over K_c); [B, C], small.
    dlogits = coef * (
        torch.where(positive, (logits - stats[0]).exp(), zero) - torch.where(known, (logits - stats[1]).exp(), zero)
    )
    grad_z = torch.empty((b * c, d), dtype=dtype, device=z.device)
    if b * c > 0:
        cfg = _config(c, d)
        grid, per_split = _backward_grid(b, c, d, dtype, cfg)
        partials = torch.empty((grid[2], c, d), dtype=dtype, device=z.device)
        launch(_prototype_nce_bwd_kernel, grid)(
            DZ=grad_z, stride_dz=grad_z.stride(0), DPU=partials, Z=z, stride_z=z.stride(0), P=p_unit,
            LOGITS=logits.contiguous(), NORM=norm.to(dtype).contiguous(), DLOGITS=dlogits.contiguous(), B=b, C=c,
            D=d, TEMPERATURE=scalar(temperature, dtype, z.device), SAMPLES_PER_SPLIT=per_split,
            BLOCK_C=cfg["BLOCK_C"], BLOCK_D=cfg["BLOCK_D"], **cfg["options"],
        )  # fmt: skip
        grad_unit_p = partials.sum(0)  # the partials in a fixed order
    else:
        grad_unit_p = torch.zeros((c, d), dtype=dtype, device=z.device)
    radial = (p_unit * grad_unit_p).sum(1, keepdim=True) * (p_clamped > NORM_EPS)
    grad_p = (grad_unit_p - p_unit * radial) / p_clamped
    return grad_z.view(b, c, d).to(features.dtype), grad_p.to(prototypes.dtype)


contract.register_autograd(LIBRARY, "prototype_nce")
