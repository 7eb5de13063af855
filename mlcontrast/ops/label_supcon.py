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
the pair needs anyway.) One sort of the labels gives the counts :math:`n_i` and dense int32 class ids
for that compare (any int64 ids). Ignored rows enter the
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

Roles (reference rows, a batch against a memory): the columns of every kernel start at ``contrast_start``,
and the rows before it that are no anchor enter as ignored rows. In the backward, a row block visits the
contrast columns if it holds anchors and the anchors' columns if it holds rows that take their contrast
role's gradient (``contrast_start <= i < grad_stop``); a block of neither (a detached queue) visits nothing.
When every anchor is a contrast row below ``grad_stop`` G stays symmetric and the kernels are the ones above
(rows past ``grad_stop`` take no side of a tile); otherwise (``ROLES``) each pair's two terms are gated by
the roles of its row and column. The atomic kernels need every anchor among the columns (forward) and no
``ROLES`` (backward); else the deterministic ones run.

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

from mlcontrast.ops import contract
from mlcontrast.ops.label_supcon_kernels import (
    _label_supcon_bwd_atomic_kernel,
    _label_supcon_bwd_kernel,
    _label_supcon_fwd_atomic_kernel,
    _label_supcon_fwd_kernel,
    _label_supcon_lse_kernel,
)
from mlcontrast.ops.utils import (
    LIBRARY,
    compute_dtype,
    dot_precision,
    interpreting,
    launch,
    pow2_block,
    triton_library_op,
    with_overrides,
)

__all__ = ["ATOMIC", "SHIFTED_SUM_FLOOR", "label_supcon", "label_supcon_backward"]

#: True: the symmetric-tile forward and backward with atomic accumulation; False: the deterministic
#: pair; None: decided by the environment variable ``MLCONTRAST_TRITON_ATOMIC`` ("1" selects atomics).
ATOMIC: bool | None = None

#: A row's fixed-shift sum :math:`\sum_j e^{s_{ij} - c}` below this is recomputed with an online max.
#: exp2 flushes results below 2^-126 to zero, so each of up to N terms may lose 2^-126; above 2^-60 that
#: is below fp32's rounding for any N < 2^40. With unit rows, rows fall below it only for
#: :math:`\tau < 2 / (60 \ln 2) \approx 0.048`.
SHIFTED_SUM_FLOOR = 2.0**-60

#: Shared memory that the tiles of all of D may take for the D chunks to be compile-time constants (see
#: :func:`_chunks`): under the ~100 KB of sm_86/89, with room for the rest.
STATIC_D_SHARED_BYTES = 96 * 1024

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _use_atomics() -> bool:
    if ATOMIC is not None:
        return bool(ATOMIC)
    return os.environ.get("MLCONTRAST_TRITON_ATOMIC", "0").strip() == "1"


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
    """Tile sizes and launch options. Small tiles under the interpreter keep the tests fast (and cross
    the D chunk and dZ slab boundaries of the tests' D = 40).

    ``BLOCK_D`` is the width of a D chunk (the launchers pass ``NUM_D_CHUNKS = cdiv(D, BLOCK_D)`` as a
    constant, so the column loop stays innermost and pipelined); the deterministic backward's programs
    own ``BLOCK_DZ`` columns of dZ each, accumulated in registers (wider D recomputes S per slab).
    On a GPU: one chunk and one slab hold D up to 256 in 16 bits, so the row block's Z_I and dZ_I stay
    on chip for the whole column sweep; two pipeline stages keep shared memory under ~100 KB (sm_86/89
    too), with backward column tiles of 32 rows. The atomic backward, which also holds G^T Z_I, takes
    chunks of 64. fp32: column tiles of 16 rows and dZ slabs of 128 columns keep the 3xTF32 kernels
    (split operands) within registers; its chunks of 32 (64 with TF32) are pipelined up to D = 128
    and looped at run time beyond. fp64 (gradcheck only) gets small tiles that fit any GPU. Register
    use and spills (ptxas, sm_90, D = 256, triton 3.6 and 3.8): ``MLCONTRAST_COMPILE_CHECK=1`` in
    tests/test_triton_compile.py; ``benchmarks.tune_triton`` measures better configurations.
    """
    if interpreting():
        config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "options": {}}
        return {**config, "BLOCK_DZ": 16} if phase == "bwd" else config
    if dtype == torch.float64:
        config = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": pow2_block(d, 16, 32), "BLOCK_DZ": pow2_block(d, 16, 64)}
        options = {"num_warps": 4, "num_stages": 1}
    elif dtype == torch.float32:
        config = {
            "BLOCK_M": 32 if phase == "bwd-atomic" else 64,
            "BLOCK_N": 16,
            "BLOCK_D": pow2_block(d, 16, 32 if dot_precision(dtype) == "tf32x3" else 64),
            "BLOCK_DZ": pow2_block(d, 16, 128),
        }
        options = {"num_warps": 8 if phase == "bwd-atomic" else 4, "num_stages": 2}
    else:
        config = {"BLOCK_M": 64, "BLOCK_N": 32 if phase == "bwd" else 64}
        config["BLOCK_D"] = config["BLOCK_DZ"] = pow2_block(d, 16, 64 if phase == "bwd-atomic" else 256)
        options = {"num_warps": 8, "num_stages": 2}
    if phase != "bwd":
        del config["BLOCK_DZ"]
    return {**config, "options": options}


def _chunks(d: int, cfg: dict, z: torch.Tensor, symmetric: bool = False, copies: int = 1) -> dict:
    """``BLOCK_D`` and ``NUM_D_CHUNKS`` for a kernel: the number of D chunks as a compile-time constant
    (the column loop pipelined), or 0 (the chunks loop at run time) when the row block and
    ``num_stages`` column tiles, all of D of each, would not fit :data:`STATIC_D_SHARED_BYTES`.
    ``copies``: how many times the kernel buffers each tile (3xTF32 keeps split operands too, the
    atomic backward loads its tiles again for its second product)."""
    chunks = max(1, triton.cdiv(d, cfg["BLOCK_D"]))
    block_n = cfg["BLOCK_M"] if symmetric else cfg["BLOCK_N"]
    tiles = cfg["BLOCK_M"] + cfg["options"].get("num_stages", 3) * block_n
    copies *= 2 if dot_precision(z.dtype) == "tf32x3" else 1
    fits = copies * tiles * chunks * cfg["BLOCK_D"] * z.element_size() <= STATIC_D_SHARED_BYTES
    return {"BLOCK_D": cfg["BLOCK_D"], "NUM_D_CHUNKS": chunks if fits else 0}


def _anchor_range(n: int, anchor_start: int, anchor_stop: int | None) -> tuple[int, int]:
    stop = n if anchor_stop is None else anchor_stop
    if not 0 <= anchor_start <= stop <= n:
        raise ValueError(
            f"anchor rows must satisfy 0 <= anchor_start <= anchor_stop <= N = {n}, got {anchor_start} and {stop}"
        )
    return anchor_start, stop


def _roles(n: int, contrast_start: int, grad_stop: int | None) -> tuple[int, int]:
    """``(contrast_start, grad_stop)`` checked, ``grad_stop`` None as N."""
    if not 0 <= contrast_start <= n:
        raise ValueError(f"contrast_start must satisfy 0 <= contrast_start <= N = {n}, got {contrast_start}")
    stop = n if grad_stop is None else grad_stop
    if not 0 <= stop <= n:
        raise ValueError(f"grad_stop must satisfy 0 <= grad_stop <= N = {n}, got {stop}")
    return contrast_start, stop


def _scale_and_shift(
    z: torch.Tensor, labels: torch.Tensor | None, temperature: float, dtype: torch.dtype
) -> torch.Tensor:
    """``[log2(e) / t, c log2(e)]`` in ``dtype``, where c = R^2 / t bounds every logit of the valid rows
    (R: their largest norm; ``labels=None``: every row is valid). On the device: no host sync."""
    norms = torch.linalg.vector_norm(z, dim=1, dtype=dtype)
    if labels is not None:
        norms = torch.where(labels >= 0, norms, torch.zeros((), dtype=dtype, device=z.device))
    largest = norms.amax()
    scale = _LOG2E / temperature
    return torch.stack([torch.full((), scale, dtype=dtype, device=z.device), largest * largest * scale])


def _class_ids(
    labels: torch.Tensor, anchors: torch.Tensor, dtype: torch.dtype, contrast_start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense int32 class ids (-1 for ignored rows, and for the rows before ``contrast_start`` that are no
    anchor: they take no part) and |P(i)|, the other contrast rows of row i's class, for the valid anchors
    (0 elsewhere).

    One sort of the labels serves both: a valid row's id is the position of its class's first row in
    the sorted labels (below N, so 32 bits hold it whatever the int64 ids are: ids equal modulo 2^32
    stay apart), and its class's size is the distance to the class's end (the contrast rows' size, from a
    second sort of theirs, when ``contrast_start > 0``). Static shapes and no host sync, unlike
    ``torch.unique``, so ``torch.compile(fullgraph=True)`` traces it; the kernels then compare 32-bit ids
    and need not count pairs.
    """
    labels = labels.contiguous()  # searchsorted copies (and warns about) a strided query
    valid = labels >= 0
    ordered = torch.sort(torch.where(valid, labels, torch.full_like(labels, -1))).values
    first = torch.searchsorted(ordered, labels)
    members = torch.searchsorted(ordered, labels, right=True) - first - 1
    if contrast_start > 0:
        contrast = valid & (torch.arange(labels.shape[0], device=labels.device) >= contrast_start)
        in_contrast = torch.sort(torch.where(contrast, labels, torch.full_like(labels, -1))).values
        members = torch.searchsorted(in_contrast, labels, right=True) - torch.searchsorted(in_contrast, labels)
        members = members - contrast.to(members.dtype)  # an anchor among the contrast rows is not its own positive
        valid = valid & (anchors | contrast)
    ids = torch.where(valid, first, torch.full_like(first, -1)).to(torch.int32)
    return ids, torch.where(valid & anchors, members, 0).to(dtype)


@triton_library_op("label_supcon", fake=contract.fake("label_supcon"))
def label_supcon(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    base_temperature: float,
    anchor_start: int = 0,
    anchor_stop: int | None = None,
    contrast_start: int = 0,
    grad_stop: int | None = None,
    atomic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-row loss, row LSE and positive count of label-level SupCon (forward launcher).

    Args:
        features: ``[N, D]`` rows z, fp32, fp16, bf16 or fp64.
        labels: ``[N]`` int64 class ids, -1 for a row that takes no part.
        temperature: :math:`\tau > 0`.
        base_temperature: :math:`\tau_{base} > 0`.
        anchor_start, anchor_stop: the anchor rows (``anchor_stop=None``: N). Only they get a loss (a process
            group's rows against all rows, a batch against reference rows).
        contrast_start: anchor i's contrast set is the valid rows j != i from ``contrast_start`` on.
        grad_stop: the backward's (see :func:`label_supcon_backward`); checked here.
        atomic: the symmetric-tile kernel (half the flops; atomics, so the last bits vary between runs)
            instead of the deterministic one, when every anchor is a contrast row (else the deterministic one).

    Returns:
        ``(loss, lse, n_pos)``, each ``[N]`` in fp32 (fp64 for fp64 features): :math:`\ell_i` (0 on
        ignored rows, rows without positives and rows outside the anchors), :math:`\mathrm{LSE}_i`
        (0 on ignored rows, -inf for a valid anchor with nothing to contrast with) and :math:`n_i` (both
        0 outside the anchors), as :data:`mlcontrast.ops.contract.FUSED_OPS` states for every backend.
        Only ``loss`` is differentiable.
    """
    z = features.contiguous()
    n, d = z.shape
    start, stop = _anchor_range(n, anchor_start, anchor_stop)
    contrast_start, _ = _roles(n, contrast_start, grad_stop)
    dtype = compute_dtype(z.dtype)
    sums = torch.zeros(n, dtype=dtype, device=z.device)
    pos_dots = torch.zeros(n, dtype=dtype, device=z.device)
    lse2 = torch.zeros(n, dtype=dtype, device=z.device)
    rows = torch.arange(n, device=z.device)
    anchors = (rows >= start) & (rows < stop)
    ids, n_pos = _class_ids(labels, anchors, dtype, contrast_start)
    if stop > start:
        scale_shift = _scale_and_shift(z, ids, temperature, dtype)
        common = {"Z": z, "stride_z": z.stride(0), "Y": ids, "N": n, "D": d, "ANCHOR_START": start,
                  "ANCHOR_STOP": stop, "CONTRAST_START": contrast_start, "SCALE_SHIFT": scale_shift,
                  "PRECISION": dot_precision(z.dtype)}  # fmt: skip
        if atomic and contrast_start <= start:  # the symmetric tiles need every anchor among the columns
            cfg = _config(d, z.dtype, "fwd-atomic")
            launch(_label_supcon_fwd_atomic_kernel, (triton.cdiv(stop - start, cfg["BLOCK_M"]),))(
                SUMS=sums, POS=pos_dots, **common, BLOCK=cfg["BLOCK_M"], **_chunks(d, cfg, z, True),
                **cfg["options"],
            )  # fmt: skip
        else:
            cfg = _config(d, z.dtype, "fwd")
            launch(_label_supcon_fwd_kernel, (triton.cdiv(stop - start, cfg["BLOCK_M"]),))(
                SUMS=sums, POS=pos_dots, **common, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                **_chunks(d, cfg, z), **cfg["options"],
            )  # fmt: skip
        lse2 = torch.where(anchors, scale_shift[1] + torch.log2(sums), torch.zeros((), dtype=dtype, device=z.device))
        cfg = _config(d, z.dtype, "fwd")
        launch(_label_supcon_lse_kernel, (triton.cdiv(stop - start, cfg["BLOCK_M"]),))(
            LSE2=lse2, SUMS=sums, FLOOR=SHIFTED_SUM_FLOOR, **common, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            **_chunks(d, cfg, z), **cfg["options"],
        )  # fmt: skip
    # The contract's LSE: 0 on ignored rows (and outside the anchors), -inf only for an anchor with nothing to
    # contrast with.
    lse = torch.where(labels >= 0, lse2 * _LN2, torch.zeros((), dtype=dtype, device=z.device))
    scale = temperature / base_temperature
    mean_positive = pos_dots / (temperature * n_pos.clamp(min=1))
    loss = torch.where(n_pos > 0, (lse - mean_positive) * scale, torch.zeros((), dtype=dtype, device=z.device))
    return loss, lse, n_pos


@triton_library_op("label_supcon_backward", fake=contract.fake("label_supcon_backward"))
def label_supcon_backward(
    grad_rows: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    n_pos: torch.Tensor,
    temperature: float,
    base_temperature: float,
    anchor_start: int = 0,
    anchor_stop: int | None = None,
    contrast_start: int = 0,
    grad_stop: int | None = None,
    atomic: bool = False,
) -> torch.Tensor:
    r"""Gradient of :math:`\sum_i g_i \ell_i` with respect to the features (backward launcher).

    Args:
        grad_rows: ``[N]`` upstream gradient :math:`g` of the per-row loss (rows outside the anchors,
            whose loss is the constant 0, contribute nothing).
        features, labels, temperature, base_temperature, anchor_start, anchor_stop, contrast_start: as given
            to :func:`label_supcon`.
        lse, n_pos: ``[N]`` statistics saved by :func:`label_supcon`.
        grad_stop: the rows before it (None: N) get the gradient of their contrast role (their terms in the
            other anchors' losses); the anchors get that of their own loss. Other rows get 0, and their
            blocks no work.
        atomic: use the symmetric-tile kernel with atomic accumulation instead of the deterministic one,
            when every anchor is a contrast row before ``grad_stop`` (else the deterministic one).

    Returns:
        ``[N, D]`` gradient in the dtype of ``features``.
    """
    z = features.contiguous()
    n, d = z.shape
    start, stop = _anchor_range(n, anchor_start, anchor_stop)
    contrast_start, grad_stop = _roles(n, contrast_start, grad_stop)
    # Without roles every anchor is a contrast row below grad_stop: G is symmetric (the rows before
    # contrast_start that are no anchor come as ignored rows).
    roles = stop > start and not (contrast_start <= start and stop <= grad_stop)
    atomic = atomic and not roles
    dtype = compute_dtype(z.dtype)
    inv_t = 1.0 / temperature
    zero = torch.zeros((), dtype=dtype, device=z.device)
    rows = torch.arange(n, device=z.device)
    anchors = (rows >= start) & (rows < stop)
    has_loss = (n_pos > 0) & anchors
    w = torch.where(has_loss, grad_rows.to(dtype) * (temperature / base_temperature * inv_t), zero)
    a = w / n_pos.clamp(min=1)
    # Rows that contribute nothing get LSE = +inf and alpha = 0, which makes their terms exactly 0.
    lse2 = torch.where(w != 0, lse.to(dtype) * _LOG2E, torch.full((), float("inf"), dtype=dtype, device=z.device))
    if stop == start:
        return torch.zeros((n, d), dtype=features.dtype, device=z.device)
    cfg = _config(d, z.dtype, "bwd-atomic" if atomic else "bwd")
    # The deterministic kernel writes every element once, in the features' dtype; the atomic one adds
    # into a zeroed fp32 (fp64) buffer.
    grad = torch.zeros_like(z, dtype=dtype) if atomic else torch.empty((n, d), dtype=features.dtype, device=z.device)
    ids = _class_ids(labels, anchors, dtype, contrast_start)[0]
    scale_shift = _scale_and_shift(z, ids, temperature, dtype)
    # -log2 of each row's shifted sum: at most `limit` (60) unless the forward redid the row.
    below_shift, limit = scale_shift[1] - lse2, -math.log2(SHIFTED_SUM_FLOOR)
    alpha = torch.where(w != 0, w * torch.exp2(below_shift.clamp(max=limit)), zero)
    two_exp = ((w != 0) & (below_shift > limit)).any().to(torch.int32).reshape(1)
    args = {"DZ": grad, "stride_dz": grad.stride(0), "Z": z, "stride_z": z.stride(0),
            "Y": ids, "LSE2": lse2, "W": w, "A": a, "ALPHA": alpha, "N": n, "D": d, "ANCHOR_START": start,
            "ANCHOR_STOP": stop, "GRAD_STOP": grad_stop, "SCALE_SHIFT": scale_shift, "TWO_EXP": two_exp,
            "PRECISION": dot_precision(z.dtype), "SCALE_G": z.dtype == torch.float16,
            **_chunks(d, cfg, z, atomic, 2 if atomic else 1)}  # fmt: skip
    row_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    if atomic:
        launch(_label_supcon_bwd_atomic_kernel, (row_blocks,))(**args, BLOCK=cfg["BLOCK_M"], **cfg["options"])
    else:
        slabs = max(1, triton.cdiv(d, cfg["BLOCK_DZ"]))
        launch(_label_supcon_bwd_kernel, (row_blocks, slabs))(
            **args, CONTRAST_START=contrast_start, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_DZ=cfg["BLOCK_DZ"], ROLES=roles, **cfg["options"],
        )  # fmt: skip
    return grad.to(features.dtype)


contract.register_autograd(LIBRARY, "label_supcon")
