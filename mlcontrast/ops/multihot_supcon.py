r"""Multi-hot (image-level) supervised contrastive loss in Triton, without an R x R matrix.

Rows i of the contrast set (R rows; the anchors are ``[anchor_start, anchor_stop)``), label sets
:math:`y_i`, :math:`o_{ij} = |y_i \cap y_j|`, :math:`u_{ij} = |y_i \cup y_j|`, :math:`s_{ij} = z_i \cdot
z_j / \tau` and the label-free :math:`\mathrm{LSE}_i = \log \sum_{j \ne i} e^{s_{ij}}`:

* ``"jaccard"``: :math:`w_{ij} = o_{ij}/u_{ij}`, :math:`P(i) = \{j \ne i : w_{ij} > 0, w_{ij} \ge
  \text{threshold}\}`; ``"any"``: :math:`w = 1`, :math:`P(i) = \{j \ne i : o_{ij} > 0\}`; ``"all"``:
  :math:`w = 1`, :math:`P(i) = \{j \ne i : y_j = y_i \ne \emptyset\}`. With :math:`n_i = |P(i)|`,

  .. math::
      \mathrm{coef}_i = \frac{1}{n_i} \sum_{p \in P(i)} w_{ip}, \qquad
      b_i = \frac{1}{n_i} \sum_{p \in P(i)} w_{ip} s_{ip}, \qquad
      \ell_i = \frac{\tau}{\tau_{base}} (\mathrm{coef}_i \mathrm{LSE}_i - b_i) \quad (n_i > 0).

* ``"mulsupcon"``: the label anchors c ∈ y_i of labels held by :math:`n_c \ge 2` rows;
  :math:`\mathrm{coef}_i = n_i` = their number and :math:`b_i = \sum_c (z_i \cdot M_c - \lVert z_i
  \rVert^2) / (\tau (n_c - 1))` with the class sums :math:`M_c = \sum_{p : c \in y_p} z_p` (O(R C D), torch).

Forward: label_supcon's fixed shift (:mod:`mlcontrast.ops.label_supcon`): :math:`|s_{ij}| \le c = R_z^2
/ \tau`, so each anchor row block sums :math:`2^{\log_2 e \, (s_{ij} - c)}` over every column tile with no
online max, in a fixed order (deterministic); rows whose shifted sum underflows get their LSE again from
label_supcon's online-max kernel. In the same tiles, for the pair modes, each tile's overlap counts come
from the int8 product of the rows' target tiles (one more :math:`R^2 C` of tensor-core work), and a row
accumulates :math:`n_i`, :math:`\sum_p w_{ip}` and :math:`\sum_p w_{ip} z_i \cdot z_p`. Only O(R)
statistics (LSE, coef, count) are saved for backward.

Backward: with upstream :math:`g_i`, :math:`a_i = g_i (\tau/\tau_{base}) / \tau` on the anchors with
positives, :math:`W_i = a_i \mathrm{coef}_i` and :math:`E_{ij} = e^{s_{ij} - \mathrm{LSE}_i}`,

.. math::
    \frac{\partial L}{\partial z_k} = \sum_{j \ne k} G_{kj} z_j, \qquad
    G_{kj} = W_k E_{kj} + W_j E_{jk} - w_{kj} [j \in P(k)] \Big(\frac{a_k}{n_k} + \frac{a_j}{n_j}\Big),

(``G`` symmetric), from recomputed tiles by one program per (row block, dZ slab), as label_supcon's
deterministic backward: every element of dZ stored once, bitwise reproducible. For ``"mulsupcon"`` the
kernel takes the softmax terms only; the positives' part, :math:`-(a_k (Y V M)_k + (Y V A)_k - 2 a_k q_k
z_k)` with :math:`V = \mathrm{diag}(1/(n_c - 1))` on the valid labels, :math:`A_c = \sum_{i : c \in y_i}
a_i z_i` and :math:`q_k = \sum_{c \in y_k} v_c`, comes from class sums and is added before the store.

Jaccard's threshold test is exact: the reference decides ``o / u >= threshold`` on the fp64 ratio; since
fp64 rounding is monotone, that holds exactly when :math:`o / u \ge o^* / u^*`, the least ratio of counts
up to C that passes (:func:`_least_passing_ratio`), an integer comparison :math:`o u^* \ge o^* u` in the
kernels.
"""

from __future__ import annotations

import math

import torch
import triton

from mlcontrast.ops import contract
from mlcontrast.ops.label_supcon import (
    _LN2,
    _LOG2E,
    SHIFTED_SUM_FLOOR,
    STATIC_D_SHARED_BYTES,
    _anchor_range,
    _scale_and_shift,
)
from mlcontrast.ops.label_supcon_kernels import _label_supcon_lse_kernel
from mlcontrast.ops.multihot_supcon_kernels import _multihot_supcon_bwd_kernel, _multihot_supcon_fwd_kernel
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

__all__ = ["MODES", "multihot_supcon", "multihot_supcon_backward"]

#: The kernels' ``MODE`` of each ``positives``.
MODES = {"jaccard": 0, "any": 1, "all": 2, "mulsupcon": 3}

#: Shared memory that the target tiles of all of C may take for the label chunks to be compile-time
#: constants (int8 tiles: 64 rows of 128 labels are 8 KB); wider C loops over its chunks at run time.
STATIC_C_SHARED_BYTES = 32 * 1024


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------


def _config(d: int, dtype: torch.dtype, phase: str) -> dict:
    """Tile sizes and launch options of the ``phase`` (``"fwd"`` or ``"bwd"``) kernel, with
    ``CONFIG_OVERRIDES["multihot_supcon.<phase>:<dtype>"]`` (or ``["multihot_supcon.<phase>"]``) applied."""
    return with_overrides(f"multihot_supcon.{phase}", _default_config(d, dtype, phase), dtype)


def _default_config(d: int, dtype: torch.dtype, phase: str) -> dict:
    """label_supcon's deterministic tiles (:func:`mlcontrast.ops.label_supcon._default_config`), with the
    target tiles' shared memory taken into account: 16-bit forward column tiles of 32 rows past D = 128
    (64 up to it), so that Z and the targets both stay pipelined within ~100 KB; fp32 row blocks of 32.
    Label chunks of up to 128 (C = 80: one chunk). Small tiles under the interpreter (they cross the
    chunk and slab boundaries of the tests' sizes)."""
    if interpreting():
        config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "BLOCK_C": 16, "options": {}}
        return {**config, "BLOCK_DZ": 16} if phase == "bwd" else config
    if dtype == torch.float64:
        config = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": pow2_block(d, 16, 32), "BLOCK_DZ": pow2_block(d, 16, 64)}
        options = {"num_warps": 4, "num_stages": 1}
    elif dtype == torch.float32:
        config = {
            "BLOCK_M": 32 if phase == "fwd" else 64,
            "BLOCK_N": 16,
            "BLOCK_D": pow2_block(d, 16, 32 if dot_precision(dtype) == "tf32x3" else 64),
            "BLOCK_DZ": pow2_block(d, 16, 128),
        }
        options = {"num_warps": 4, "num_stages": 2}
    else:
        config = {"BLOCK_M": 64, "BLOCK_N": 32 if phase == "bwd" or d > 128 else 64}
        config["BLOCK_D"] = config["BLOCK_DZ"] = pow2_block(d, 16, 256)
        options = {"num_warps": 8, "num_stages": 2}
    if phase != "bwd":
        del config["BLOCK_DZ"]
    return {**config, "BLOCK_C": 128, "options": options}


def _chunks(d: int, c: int, cfg: dict, z: torch.Tensor, labels: bool = True) -> dict:
    """``BLOCK_D``/``NUM_D_CHUNKS`` and ``BLOCK_C``/``NUM_C_CHUNKS``: the chunk counts as compile-time
    constants (the column loop pipelined with every chunk of its tiles buffered), or 0 (a run-time chunk
    loop) for a dimension whose tiles would not fit: C against :data:`STATIC_C_SHARED_BYTES`, then D against
    what is left of label_supcon's ``STATIC_D_SHARED_BYTES``. ``labels=False``: a kernel that reads no
    targets (mulsupcon's, label_supcon's LSE)."""
    tiles = cfg["BLOCK_M"] + cfg["options"].get("num_stages", 3) * cfg["BLOCK_N"]
    block_c = pow2_block(c, 16, cfg["BLOCK_C"])
    c_chunks = max(1, triton.cdiv(c, block_c))
    c_fits = tiles * c_chunks * block_c <= STATIC_C_SHARED_BYTES
    target_bytes = tiles * (c_chunks if c_fits else 1) * block_c if labels else 0
    d_chunks = max(1, triton.cdiv(d, cfg["BLOCK_D"]))
    copies = 2 if dot_precision(z.dtype) == "tf32x3" else 1
    d_fits = copies * tiles * d_chunks * cfg["BLOCK_D"] * z.element_size() + target_bytes <= STATIC_D_SHARED_BYTES
    return {"BLOCK_D": cfg["BLOCK_D"], "NUM_D_CHUNKS": d_chunks if d_fits else 0, "BLOCK_C": block_c,
            "NUM_C_CHUNKS": c_chunks if c_fits else 0}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Host-side pieces: arguments, the threshold, the shift, the class sums
# ----------------------------------------------------------------------------------------------


def _mode(positives: str, threshold: float) -> int:
    if positives not in MODES:
        raise ValueError(f"positives must be one of {tuple(MODES)}, got {positives!r}")
    if positives == "jaccard" and not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    return MODES[positives]


#: :func:`_least_passing_ratio` by (threshold, C). A plain dict: torch.compile guards on the types of the
#: ops modules' globals, and the type of a ``functools.lru_cache`` wrapper fails its own guard (torch 2.14).
_RATIOS: dict[tuple[float, int], tuple[int, int]] = {}


def _least_passing_ratio(threshold: float, c: int) -> tuple[int, int]:
    """``(o*, u*)``: the least ratio o/u of counts 1 <= o <= u <= max(c, 1) whose fp64 quotient is at least
    ``threshold``. For such counts, ``o / u >= threshold`` in fp64 exactly when ``o u* >= o* u``. O(C),
    once per (threshold, C).

    Example:
        >>> _least_passing_ratio(1 / 3, 80), _least_passing_ratio(0.5, 80), _least_passing_ratio(1.0, 3)
        ((1, 3), (1, 2), (1, 1))
    """
    key = (threshold, c)
    if key not in _RATIOS:
        best = (1, 1)  # o = u always passes: threshold <= 1
        for u in range(1, max(c, 1) + 1):
            o = max(1, math.ceil(threshold * u) - 1)
            while o / u < threshold:
                o += 1
            if o * best[1] < best[0] * u:
                best = (o, u)
        _RATIOS[key] = best
    return _RATIOS[key]


def _targets(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets as contiguous int8 0/1 (the tensor cores' operands) and each row's label count (int32)."""
    present = (targets != 0).to(torch.int8).contiguous()
    return present, present.sum(1, dtype=torch.int32)


def _class_terms(z: torch.Tensor, present: torch.Tensor, dtype: torch.dtype):
    """mulsupcon's ``(y, v, sums)`` in ``dtype``: y [R, C] 0/1, v [C] = 1 / (n_c - 1) on the labels of at
    least two rows (0 on the others), and the class sums M = Y^T Z [C, D]."""
    y = present.to(dtype)
    n_c = y.sum(0)
    v = torch.where(n_c >= 2, 1.0 / (n_c - 1).clamp(min=1), torch.zeros((), dtype=dtype, device=z.device))
    return y, v, y.T @ z.to(dtype)


def _mulsupcon_positives(z, present, start, stop, temperature, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(count, b)`` of every row (0 outside the anchors): the valid label anchors and
    :math:`b_i = \\sum_c y_{ic} v_c (z_i \\cdot M_c - |z_i|^2) / \\tau`, through class sums."""
    y, v, sums = _class_terms(z, present, dtype)
    count = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
    b = torch.zeros_like(count)
    z_a, yv = z[start:stop].to(dtype), y[start:stop] * v
    count[start:stop] = y[start:stop] @ (v > 0).to(dtype)
    b[start:stop] = ((yv * (z_a @ sums.T)).sum(1) - yv.sum(1) * z_a.square().sum(1)) / temperature
    return count, b


def _mulsupcon_positive_grad(z, present, a, dtype, grad_stop: int | None = None) -> torch.Tensor:
    """d/dZ of :math:`-\\sum_i a_i \\tau b_i` (mulsupcon's positives), [R, D] in ``dtype``: with
    :math:`\\tau b_i = \\sum_{p \\ne i} B_{ip} z_i \\cdot z_p`, :math:`B = Y V Y^T`, the gradient at row k is
    :math:`-(a_k ((Y V M)_k - q_k z_k) + [k < \\text{grad\\_stop}] ((Y V A)_k - a_k q_k z_k))` (its own loss,
    then its contrast role), :math:`A = Y^T \\mathrm{diag}(a) Z`, :math:`q = Y v`."""
    y, v, sums = _class_terms(z, present, dtype)
    zc, yv = z.to(dtype), y * v
    self_weight = (a * yv.sum(1))[:, None]
    grad = (yv @ sums) * a[:, None] - self_weight * zc
    side = z.shape[0] if grad_stop is None else grad_stop
    if side > 0:
        weighted = y.T @ (zc * a[:, None])  # A: [C, D]
        grad[:side] += yv[:side] @ weighted - self_weight[:side] * zc[:side]
    return -grad


# ----------------------------------------------------------------------------------------------
# Launchers and torch.library glue
# ----------------------------------------------------------------------------------------------


def _grad_stop(n: int, grad_stop: int | None) -> int:
    """``grad_stop`` checked, None as R."""
    stop = n if grad_stop is None else grad_stop
    if not 0 <= stop <= n:
        raise ValueError(f"grad_stop must satisfy 0 <= grad_stop <= R = {n}, got {stop}")
    return stop


def _common_args(z, present, counts, start, stop, scale_shift, mode, threshold) -> dict:
    o_star, u_star = _least_passing_ratio(float(threshold), present.shape[1]) if mode == 0 else (1, 1)
    return {"Z": z, "stride_z": z.stride(0), "Y": present, "stride_y": present.stride(0), "NY": counts,
            "N": z.shape[0], "D": z.shape[1], "C": present.shape[1], "ANCHOR_START": start, "ANCHOR_STOP": stop,
            "SCALE_SHIFT": scale_shift, "O_STAR": o_star, "U_STAR": u_star, "MODE": mode,
            "PRECISION": dot_precision(z.dtype)}  # fmt: skip


@triton_library_op("multihot_supcon", fake=contract.fake("multihot_supcon"))
def multihot_supcon(
    features: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    base_temperature: float,
    positives: str,
    threshold: float,
    anchor_start: int = 0,
    anchor_stop: int | None = None,
    grad_stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-row loss and statistics of multi-hot SupCon (forward launcher).

    Args:
        features: ``[R, D]`` rows z of the contrast set, fp32, fp16, bf16 or fp64.
        targets: ``[R, C]`` uint8, 1 = label present, 0 = absent (any nonzero counts as present).
        temperature: :math:`\tau > 0`.
        base_temperature: :math:`\tau_{base} > 0`.
        positives: ``"jaccard"``, ``"any"``, ``"all"`` or ``"mulsupcon"``.
        threshold: the least Jaccard ratio of a positive, in (0, 1] (``"jaccard"`` only).
        anchor_start, anchor_stop: the anchor rows (``anchor_stop=None``: R). Only they get a loss;
            every row stays in their contrast sets.
        grad_stop: the backward's (see :func:`multihot_supcon_backward`); checked here.

    Returns:
        ``(loss, lse, coef, count)``, each ``[R]`` in fp32 (fp64 for fp64 features), 0 outside the
        anchors: :math:`\ell_i` (0 without positives), :math:`\mathrm{LSE}_i` (-inf when R = 1),
        :math:`\mathrm{coef}_i` and :math:`n_i`, as :data:`mlcontrast.ops.contract.FUSED_OPS` states.
        Only ``loss`` is differentiable.

    Example:
        >>> z = torch.nn.functional.normalize(torch.randn(6, 8, device="cuda"), dim=1)
        >>> y = torch.randint(0, 2, (6, 5), dtype=torch.uint8, device="cuda")
        >>> loss, lse, coef, count = multihot_supcon(z, y, 0.1, 0.1, "jaccard", 0.5)
    """
    mode = _mode(positives, threshold)
    z = features.contiguous()
    n, d = z.shape
    start, stop = _anchor_range(n, anchor_start, anchor_stop)
    _grad_stop(n, grad_stop)
    dtype = compute_dtype(z.dtype)
    zero = torch.zeros((), dtype=dtype, device=z.device)
    present, counts = _targets(targets)
    sums, count, wsum, wdot = (torch.zeros(n, dtype=dtype, device=z.device) for _ in range(4))
    lse2 = torch.zeros(n, dtype=dtype, device=z.device)
    anchors = (torch.arange(n, device=z.device) >= start) & (torch.arange(n, device=z.device) < stop)
    if stop > start:
        scale_shift = _scale_and_shift(z, None, temperature, dtype)
        common = _common_args(z, present, counts, start, stop, scale_shift, mode, threshold)
        cfg = _config(d, z.dtype, "fwd")
        launch(_multihot_supcon_fwd_kernel, (triton.cdiv(stop - start, cfg["BLOCK_M"]),))(
            SUMS=sums, COUNT=count, WSUM=wsum, WDOT=wdot, **common, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            **_chunks(d, present.shape[1], cfg, z, mode != MODES["mulsupcon"]), **cfg["options"],
        )  # fmt: skip
        lse2 = torch.where(anchors, scale_shift[1] + torch.log2(sums), zero)
        # Rows whose shifted sum underflowed: label_supcon's online-max LSE, every row valid (ids 0).
        lse_chunks = _chunks(d, 1, cfg, z, labels=False)
        launch(_label_supcon_lse_kernel, (triton.cdiv(stop - start, cfg["BLOCK_M"]),))(
            LSE2=lse2, SUMS=sums, FLOOR=SHIFTED_SUM_FLOOR, Z=z, stride_z=z.stride(0),
            Y=torch.zeros(n, dtype=torch.int32, device=z.device), N=n, D=d, ANCHOR_START=start, ANCHOR_STOP=stop,
            CONTRAST_START=0, SCALE_SHIFT=scale_shift, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=lse_chunks["BLOCK_D"],
            NUM_D_CHUNKS=lse_chunks["NUM_D_CHUNKS"], PRECISION=common["PRECISION"], **cfg["options"],
        )  # fmt: skip
    lse = lse2 * _LN2
    if mode == MODES["mulsupcon"]:
        count, b = _mulsupcon_positives(z, present, start, stop, temperature, dtype)
        coef = count.clone()  # two outputs may not share storage
    else:
        coef = wsum / count.clamp(min=1)
        b = wdot / (temperature * count.clamp(min=1))
    # where(), not a product with the mask: coef * lse is NaN (0 * -inf) for a row with nothing to contrast.
    loss = torch.where(count > 0, (coef * lse - b) * (temperature / base_temperature), zero)
    return loss, lse, coef, count


@triton_library_op("multihot_supcon_backward", fake=contract.fake("multihot_supcon_backward"))
def multihot_supcon_backward(
    grad_rows: torch.Tensor,
    features: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    count: torch.Tensor,
    temperature: float,
    base_temperature: float,
    positives: str,
    threshold: float,
    anchor_start: int = 0,
    anchor_stop: int | None = None,
    grad_stop: int | None = None,
) -> torch.Tensor:
    r"""Gradient of :math:`\sum_i g_i \ell_i` with respect to the features (backward launcher).

    Args:
        grad_rows: ``[R]`` upstream gradient :math:`g` of the per-row loss (rows outside the anchors,
            whose loss is the constant 0, contribute nothing).
        features, targets, temperature, base_temperature, positives, threshold, anchor_start, anchor_stop:
            as given to :func:`multihot_supcon`.
        lse, coef, count: ``[R]`` statistics saved by :func:`multihot_supcon`.
        grad_stop: rows below it (None: R) get the gradient of their contrast role; the anchors always get
            that of their own loss; other rows get 0 and cost no work (a detached memory).

    Returns:
        ``[R, D]`` gradient in the dtype of ``features``.
    """
    mode = _mode(positives, threshold)
    z = features.contiguous()
    n, d = z.shape
    start, stop = _anchor_range(n, anchor_start, anchor_stop)
    side = _grad_stop(n, grad_stop)
    if stop == start:
        return torch.zeros((n, d), dtype=features.dtype, device=z.device)
    dtype = compute_dtype(z.dtype)
    zero = torch.zeros((), dtype=dtype, device=z.device)
    present, counts = _targets(targets)
    rows = torch.arange(n, device=z.device)
    has_loss = (count > 0) & (rows >= start) & (rows < stop)
    a = torch.where(has_loss, grad_rows.to(dtype) / base_temperature, zero)  # g (t / t_b) / t
    w = a * coef.to(dtype)
    p = a / count.to(dtype).clamp(min=1)
    # Rows that contribute nothing get LSE = +inf and alpha = 0, which makes their terms exactly 0.
    lse2 = torch.where(w != 0, lse.to(dtype) * _LOG2E, torch.full((), float("inf"), dtype=dtype, device=z.device))
    scale_shift = _scale_and_shift(z, None, temperature, dtype)
    # -log2 of each row's shifted sum: at most `limit` (60) unless the forward redid the row.
    below_shift, limit = scale_shift[1] - lse2, -math.log2(SHIFTED_SUM_FLOOR)
    alpha = torch.where(w != 0, w * torch.exp2(below_shift.clamp(max=limit)), zero)
    two_exp = ((w != 0) & (below_shift > limit)).any().to(torch.int32).reshape(1)
    mulsupcon = mode == MODES["mulsupcon"]
    # mulsupcon's positives, through class sums; a one-element stand-in (never read) for the other modes.
    if mulsupcon:
        extra = _mulsupcon_positive_grad(z, present, a, dtype, side)
    else:
        extra = torch.zeros((1, 1), dtype=dtype, device=z.device)
    cfg = _config(d, z.dtype, "bwd")
    grad = torch.empty((n, d), dtype=features.dtype, device=z.device)
    launch(_multihot_supcon_bwd_kernel, (triton.cdiv(n, cfg["BLOCK_M"]), max(1, triton.cdiv(d, cfg["BLOCK_DZ"]))))(
        DZ=grad, stride_dz=grad.stride(0), EXTRA=extra, stride_extra=extra.stride(0),
        **_common_args(z, present, counts, start, stop, scale_shift, mode, threshold), LSE2=lse2, W=w, P=p,
        ALPHA=alpha, TWO_EXP=two_exp, GRAD_STOP=side, HAS_EXTRA=mulsupcon, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_DZ=cfg["BLOCK_DZ"], SCALE_G=z.dtype == torch.float16,
        **_chunks(d, present.shape[1], cfg, z, not mulsupcon), **cfg["options"],
    )  # fmt: skip
    return grad


contract.register_autograd(LIBRARY, "multihot_supcon")
