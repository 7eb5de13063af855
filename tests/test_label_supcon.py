"""label_supcon_loss on every fused backend (tests/utils.py: backend_table) against reference.py.

The backend is a parameter. The ``"full"`` backends run every size; the interpreted Triton backend runs
the small cases, in both of its kernel pairs (deterministic and atomic: utils.VARIANTS). Its own
mechanisms (launch configurations, the fixed shift, the D loop, atomics) are in
tests/test_label_supcon_triton.py.
"""

from __future__ import annotations

import pytest
import torch
from utils import (
    assert_close_by_norm,
    assert_matches,
    backend_table,
    backends,
    cases,
    device_of,
    grads,
    loss_and_grads,
    make_labels,
    use_variant,
)

import mlcontrast
from mlcontrast import functional, reference
from mlcontrast.ops import registry

BACKENDS = [p.values[0] for p in backends(sizes="full")]
# The CPU kernel tiles rows by 128 and columns by 512: these sizes sit on both sides of the boundaries.
# The interpreted Triton kernels' tiles shrink to 16 (mlcontrast.ops.utils): N = 33, 70 and D = 40 cross
# them, N = 5 and D = 7 leave partial tiles.
SIZES_N = [1, 2, 7, 31, 127, 257, 1031]
SIZES_D = [1, 3, 64, 127]
SIZES = {"full": [(n, d) for n in SIZES_N for d in SIZES_D], "small": [(1, 7), (5, 1), (33, 40), (70, 7)]}


def check(backend, z, y, upstream=None, temperature=0.1, base_temperature=None, reduction="mean", normalize=False):
    """Loss and gradient of the backend against reference.py; returns the backend's."""
    args = (temperature, base_temperature, reduction, normalize)
    return assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, *args, backend=backend),
        lambda x: reference.label_supcon_loss(x, y, *args),
        [z],
        upstream,
        names=["features"],
    )


@pytest.mark.parametrize("backend,variant,n,d,dtype", cases(SIZES, op="label_supcon"))
def test_matches_reference_across_sizes(backend, variant, n, d, dtype, monkeypatch):
    use_variant(monkeypatch, "label_supcon", backend, variant)
    dev = device_of(backend)
    z = (torch.randn(n, d) / d**0.5).to(dev, dtype)
    y = make_labels(n, max(1, n // 8), ignore_fraction=0.1, singleton=True).to(dev)
    upstream = torch.randn(n, dtype=torch.float64, device=dev)  # per-row weights: "not the last layer"
    out, (grad,) = check(backend, z, y, upstream, temperature=0.1, base_temperature=0.07, reduction="none")
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert torch.all(out[y < 0] == 0)
    assert torch.all(grad[y < 0] == 0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "backend,n,d,dtype", cases({"full": [(31, 64), (257, 3)], "small": [(21, 9)]}, dtypes=[torch.float32])
)
def test_reductions_match_reference(backend, n, d, dtype, reduction, normalize):
    dev = device_of(backend)
    z = torch.randn(n, d).to(dev, dtype)
    y = make_labels(n, 5, ignore_fraction=0.2, singleton=True).to(dev)
    upstream = torch.randn(n, dtype=torch.float64, device=dev) if reduction == "none" else None
    out, _ = check(backend, z, y, upstream, temperature=0.5, reduction=reduction, normalize=normalize)
    assert out.shape == ((n,) if reduction == "none" else ())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [7, 257, 1031])
def test_fp64_matches_reference_to_fp64_precision(backend, n):
    z = torch.randn(n, 17, dtype=torch.float64)
    y = make_labels(n, 6, ignore_fraction=0.15, singleton=True)
    upstream = torch.randn(n, dtype=torch.float64)
    out, (g,) = check(backend, z, y, upstream, temperature=0.3, reduction="none", normalize=True)
    assert out.dtype == torch.float64 and g.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_feature_dimension(backend):
    n, d = 1031, 1024
    z = torch.randn(n, d)
    y = make_labels(n, 40, ignore_fraction=0.1)
    check(backend, z, y, temperature=0.1, normalize=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_temperature_with_normalize(backend):
    z = torch.randn(257, 64)
    y = make_labels(257, 10, ignore_fraction=0.1, singleton=True)
    out, _ = check(backend, z, y, temperature=0.01, normalize=True)
    assert out.item() > 1.0  # at tau = 0.01 random directions are far from their positives


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base_temperature", [0.07, 1.0])
def test_base_temperature_scales_the_loss(backend, base_temperature):
    z = torch.randn(129, 8)
    y = make_labels(129, 4)
    out, _ = check(backend, z, y, temperature=0.2, base_temperature=base_temperature, normalize=True)
    plain = mlcontrast.label_supcon_loss(z, y, 0.2, normalize=True, backend=backend)
    assert out.item() == pytest.approx(plain.item() * 0.2 / base_temperature, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_take_no_part(backend):
    # Rows labelled -1 change neither the other rows' losses nor get a gradient.
    z = torch.randn(140, 6)
    y = make_labels(140, 3)
    y[::3] = -1
    upstream = torch.randn(140, dtype=torch.float64)
    out, (g,) = check(backend, z, y, upstream, reduction="none", normalize=True)
    valid = y >= 0
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))
    assert torch.equal(g[~valid], torch.zeros_like(g[~valid]))
    kept, (g_kept,) = loss_and_grads(
        lambda x: mlcontrast.label_supcon_loss(x, y[valid], reduction="none", normalize=True, backend=backend),
        [z[valid]],
        upstream[valid],
    )
    assert_close_by_norm(out[valid], kept, torch.float32, "loss without the ignored rows")
    assert_close_by_norm(g[valid], g_kept, torch.float32, "grad without the ignored rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_classes_with_exactly_one_member_contribute_zero(backend):
    z = torch.randn(9, 4)
    y = torch.tensor([0, 0, 0, 1, 2, 3, 3, 4, -1])  # classes 1, 2, 4 have one member
    out, _ = check(backend, z, y, reduction="none", upstream=torch.randn(9, dtype=torch.float64))
    assert torch.equal(out[[3, 4, 7, 8]], torch.zeros(4))
    assert (out[[0, 1, 2, 5, 6]] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_and_large_class_ids(backend):
    z = torch.randn(40, 5)
    y = torch.randint(0, 4, (40,)) * 10**12 + 7
    check(backend, z, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [1, 7, 600])
def test_no_positives_at_all_gives_zero_loss_and_zero_grad(backend, n, reduction):
    z = torch.randn(n, 8, requires_grad=True)
    y = torch.arange(n)  # every class has one member
    out = mlcontrast.label_supcon_loss(z, y, reduction=reduction, normalize=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    (g,) = grads(out, z, torch.randn(n) if reduction == "none" else None)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend,n,dtype", cases({"full": [1, 5, 300], "small": [4]}, dtypes=[torch.float32]))
def test_all_rows_ignored_gives_zero_loss_and_zero_grad(backend, n, dtype, reduction):
    dev = device_of(backend)
    z = torch.randn(n, 8, device=dev, requires_grad=True)
    y = torch.full((n,), -1, device=dev)
    out = mlcontrast.label_supcon_loss(z, y, reduction=reduction, normalize=True, backend=backend)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))
    (g,) = grads(out, z, torch.randn(n, device=dev) if reduction == "none" else None)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_valid_row_gives_zero_loss_and_finite_zero_grad(backend):
    z = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([-1, -1, 4, -1, -1, -1])
    out = mlcontrast.label_supcon_loss(z, y, backend=backend)
    assert out.item() == 0.0
    (g,) = grads(out, z)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", backends())
def test_empty_batch_gives_zero(backend, reduction):
    dev = device_of(backend)
    z = torch.randn(0, 4, device=dev, requires_grad=True)
    out = mlcontrast.label_supcon_loss(z, torch.zeros(0, dtype=torch.long, device=dev), reduction=reduction,
                                       backend=backend)  # fmt: skip
    assert out.shape == ((0,) if reduction == "none" else ())
    assert out.sum().item() == 0.0
    (g,) = grads(out.sum(), z)
    assert g.shape == (0, 4)


@pytest.mark.parametrize("backend,variant", backends("label_supcon"))
def test_int64_class_ids(backend, variant, monkeypatch):
    # Class ids are int64 (hashed or dataset ids): 2^32 + 5 and 5 are equal modulo 2^32 but different
    # classes, 2^31 and 2^40 + 3 do not fit 32 bits (2^31 would read as a negative, ignored, id). The
    # rows cross the interpreted Triton tiles (N = 37 > 16) and each class has positives.
    use_variant(monkeypatch, "label_supcon", backend, variant)
    dev = device_of(backend)
    ids = torch.tensor([2**40 + 3, 2**32 + 5, 5, 2**31, -1, 2**63 - 1])
    y = ids[torch.arange(37) % len(ids)].to(dev)
    z = (torch.randn(37, 8) * 8**-0.5).to(dev)
    out, _ = check(backend, z, y, torch.randn(37, dtype=torch.float64, device=dev), reduction="none")
    assert torch.isfinite(out).all() and (out[y >= 0] != 0).all()


@pytest.mark.parametrize("backend", backends())
def test_statistics_follow_the_contract(backend):
    # The op's (loss, lse, n_pos): n_pos counts the positives, lse is the row LSE over j != i of the valid
    # rows, and an ignored row's lse is 0 (mlcontrast.ops.contract), on every backend.
    dev = device_of(backend)
    z = torch.randn(9, 4, device=dev)
    y = torch.tensor([0, 0, 0, 1, 1, 2, -1, 3, 3], device=dev)
    loss, lse, n_pos = registry.op("label_supcon", backend)(z, y, 0.5, 0.5)
    assert n_pos.tolist() == [2, 2, 2, 1, 1, 0, 0, 1, 1]
    valid = (y >= 0).nonzero().squeeze(1)
    s = z[valid] @ z[valid].T / 0.5
    s.fill_diagonal_(float("-inf"))
    torch.testing.assert_close(lse[valid], torch.logsumexp(s, 1))
    assert lse[6] == 0 and loss[6] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_matches_fp32_reference(backend, dtype, normalize):
    z = (torch.randn(257, 64) / 8).to(dtype)
    y = make_labels(257, 6, ignore_fraction=0.1, singleton=True)
    upstream = torch.randn(257, dtype=torch.float64)
    out, (g,) = check(backend, z, y, upstream, temperature=0.2, reduction="none", normalize=normalize)
    assert out.dtype == torch.float32, "the loss of fp16/bf16 features is fp32"
    assert g.dtype == dtype


@pytest.mark.parametrize(
    "backend,d,n,dtype", cases({"full": [(64, 300)], "small": [(12, 40)]}, dtypes=[torch.float32])
)
def test_non_contiguous_features_and_labels(backend, d, n, dtype):
    dev = device_of(backend)
    base = torch.randn(d, n, device=dev)  # features = base.T[::2]: transposed and strided
    y_base = make_labels(n, 5, ignore_fraction=0.1).to(dev)

    def fused(b):
        return mlcontrast.label_supcon_loss(b.t()[::2], y_base[::2], normalize=True, backend=backend)

    def ref(b):
        return reference.label_supcon_loss(b.t()[::2], y_base[::2], 0.1, None, "mean", True)

    assert not base.t()[::2].is_contiguous() and not y_base[::2].is_contiguous()
    assert_matches(fused, ref, [base], names=["features"])


@pytest.mark.parametrize("backend", BACKENDS + ["torch", "auto"])
def test_module_matches_functional(backend):
    z = torch.randn(50, 8)
    y = make_labels(50, 4, ignore_fraction=0.1)
    kw = dict(temperature=0.3, base_temperature=0.5, reduction="sum", normalize=True, backend=backend)
    module = mlcontrast.LabelSupConLoss(**kw)
    a, (ga,) = loss_and_grads(lambda x: module(x, y), [z])
    b, (gb,) = loss_and_grads(lambda x: mlcontrast.label_supcon_loss(x, y, **kw), [z])
    assert torch.equal(a, b) and torch.equal(ga, gb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_uses_the_first_available_backend(backend, monkeypatch):
    monkeypatch.delenv("MLCONTRAST_BACKEND", raising=False)
    if mlcontrast.available_backends("cpu")[0] != backend:
        pytest.skip(f"auto does not pick {backend}")
    z = torch.randn(33, 5)
    y = make_labels(33, 3)
    a, (ga,) = loss_and_grads(lambda x: mlcontrast.label_supcon_loss(x, y, backend="auto"), [z])
    b, (gb,) = loss_and_grads(lambda x: mlcontrast.label_supcon_loss(x, y, backend=backend), [z])
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_torch_backend_is_the_reference():
    z = torch.randn(20, 4)
    y = make_labels(20, 3, ignore_fraction=0.2)
    got = mlcontrast.label_supcon_loss(z, y, 0.2, 0.3, "none", True, backend="torch")
    assert torch.equal(got, reference.label_supcon_loss(z, y, 0.2, 0.3, "none", True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_norm_row_with_normalize(backend):
    z = torch.randn(6, 4, dtype=torch.float64)
    z[2] = 0
    check(backend, z, torch.tensor([0, 1, 2, 0, 1, 2]), normalize=True)


# Anchor rows: a process group's own rows get a loss, against every rank's rows. The CPU kernel's
# tiles are 128 rows and 512 columns; these ranges start and end off the tile grid, at the edges, and
# cover the empty range and a single row.
ANCHOR_CASES = [(300, (0, 300)), (700, (70, 201)), (300, (0, 45)), (300, (260, 300)), (40, (13, 13)), (31, (30, 31))]


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("n,anchors", ANCHOR_CASES)
def test_anchor_rows_match_the_rows_of_the_full_loss(backend, n, anchors):
    start, stop = anchors
    z = torch.randn(n, 16, dtype=torch.float64)
    y = make_labels(n, 6, ignore_fraction=0.2, singleton=True)
    upstream = torch.randn(stop - start, dtype=torch.float64)

    def anchors_only(x):
        return functional._anchor_losses(backend, x, y, 0.2, 0.3, True, anchors)

    def full_then_sliced(x):
        return reference.label_supcon_loss(x, y, 0.2, 0.3, "none", normalize=True)[start:stop]

    assert_matches(anchors_only, full_then_sliced, [z], upstream, names=["features"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_rows_outside_the_rows_are_refused(backend):
    z, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    error = RuntimeError if backend == "cpu" else ValueError
    for start, stop in [(-1, 3), (4, 3), (0, 7)]:
        with pytest.raises(error, match="anchor_start <= anchor_stop <= N = 6"):
            functional._label_supcon_rows(backend, z, y, 0.1, 0.1, start, stop)


# ----------------------------------------------------------------------------------------------
# Reference rows (DESIGN.md §10) and the op's roles: contrast_start, grad_stop
# ----------------------------------------------------------------------------------------------

# (N, M): prime and odd sizes across the CPU tiles (128 rows, 512 columns) and the interpreted Triton tiles
# (16); a lone anchor; no ref rows.
REF_SIZES = {"full": [(31, 97), (131, 541), (1, 13), (7, 0)], "small": [(13, 21), (5, 3)]}


def _ref_inputs(n, m, dev, dtype=torch.float32):
    z = torch.randn(n, 16).to(dev, dtype)
    q = torch.randn(m, 16).to(dev, dtype)
    y = make_labels(n, 5, ignore_fraction=0.1, singleton=True).to(dev)
    yq = make_labels(m, 5, ignore_fraction=0.3).to(dev)  # ignored ref rows too
    return z, y, q, yq


@pytest.mark.parametrize("ref_grad", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend,n,m,dtype", cases(REF_SIZES, dtypes=[torch.float32]))
def test_ref_rows_match_reference(backend, n, m, dtype, reduction, ref_grad):
    dev = device_of(backend)
    z, y, q, yq = _ref_inputs(n, m, dev)
    args = (0.2, 0.15, reduction, True)
    upstream = torch.randn(n, dtype=torch.float64, device=dev) if reduction == "none" else None
    if ref_grad:  # gradients reach the ref rows
        out, _ = assert_matches(
            lambda x, r: mlcontrast.label_supcon_loss(x, y, *args, backend=backend, ref_features=r, ref_labels=yq),
            lambda x, r: reference.label_supcon_loss(x, y, *args, r, yq),
            [z, q], upstream, names=["features", "ref_features"],
        )  # fmt: skip
    else:  # a detached queue
        out, _ = assert_matches(
            lambda x: mlcontrast.label_supcon_loss(x, y, *args, backend=backend, ref_features=q, ref_labels=yq),
            lambda x: reference.label_supcon_loss(x, y, *args, q.double(), yq),
            [z], upstream, names=["features"],
        )  # fmt: skip
    assert out.shape == ((n,) if reduction == "none" else ())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ref_rows_reductions_and_normalize_match_reference_in_fp64(backend, reduction):
    z, y, q, yq = _ref_inputs(127, 263, "cpu", torch.float64)
    upstream = torch.randn(127, dtype=torch.float64) if reduction == "none" else None
    for normalize in (False, True):
        args = (0.5, None, reduction, normalize)
        assert_matches(
            lambda x, r: mlcontrast.label_supcon_loss(x, y, *args, backend=backend, ref_features=r, ref_labels=yq),
            lambda x, r: reference.label_supcon_loss(x, y, *args, r, yq),
            [z, q], upstream, names=["features", "ref_features"],
        )  # fmt: skip


@pytest.mark.parametrize("backend", backends())
def test_detached_ref_rows_leave_the_features_gradient_unchanged(backend):
    # grad_stop only drops the ref rows' own gradient: the batch's loss and gradient are those of the same
    # call with ref rows that require grad, and a ref gradient, where asked for, is nonzero.
    dev = device_of(backend)
    z, y, q, yq = _ref_inputs(21, 40, dev)

    def run(ref):
        return mlcontrast.label_supcon_loss(z_leaf, y, 0.1, normalize=True, backend=backend, ref_features=ref,
                                            ref_labels=yq)  # fmt: skip

    z_leaf = z.clone().requires_grad_()
    detached = run(q)
    (g_detached,) = torch.autograd.grad(detached, z_leaf)
    q_leaf = q.clone().requires_grad_()
    attached = run(q_leaf)
    g_attached, g_ref = torch.autograd.grad(attached, [z_leaf, q_leaf])
    assert torch.equal(detached, attached)
    assert_close_by_norm(g_detached, g_attached, torch.float32, "features' gradient")
    assert g_ref[yq >= 0].abs().sum() > 0 and torch.equal(g_ref[yq < 0], torch.zeros_like(g_ref[yq < 0]))


@pytest.mark.parametrize("backend", backends())
def test_ignored_ref_rows_take_no_part(backend):
    # Ref rows labelled -1 change no loss and get a zero gradient: the same as leaving them out.
    dev = device_of(backend)
    z, y, q, yq = _ref_inputs(19, 30, dev)
    kept = yq >= 0
    assert (~kept).any() and kept.any()
    upstream = torch.randn(19, dtype=torch.float64, device=dev)

    def loss(ref_labels):
        return lambda x, r: mlcontrast.label_supcon_loss(x, y, reduction="none", backend=backend, ref_features=r,
                                                         ref_labels=ref_labels)  # fmt: skip

    with_ignored, (g, g_ref) = loss_and_grads(loss(yq), [z, q], upstream)
    without, (g_kept, g_ref_kept) = loss_and_grads(loss(yq[kept]), [z, q[kept]], upstream)
    assert_close_by_norm(with_ignored, without, torch.float32, "losses")
    assert_close_by_norm(g, g_kept, torch.float32, "features' gradient")
    assert_close_by_norm(g_ref[kept], g_ref_kept, torch.float32, "ref rows' gradient")
    assert torch.equal(g_ref[~kept], torch.zeros_like(g_ref[~kept]))


@pytest.mark.parametrize("backend", BACKENDS + ["torch", "auto"])
def test_module_with_ref_rows_matches_functional(backend):
    z, y, q, yq = _ref_inputs(30, 50, "cpu")
    kw = dict(temperature=0.3, base_temperature=0.5, reduction="sum", normalize=True, backend=backend)
    module = mlcontrast.LabelSupConLoss(**kw)
    a, (ga,) = loss_and_grads(lambda x: module(x, y, q, yq), [z])
    b, (gb,) = loss_and_grads(lambda x: mlcontrast.label_supcon_loss(x, y, **kw, ref_features=q, ref_labels=yq), [z])
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_ref_rows_are_cast_to_the_features_dtype():
    z, y, q, yq = _ref_inputs(9, 12, "cpu")
    loss = mlcontrast.label_supcon_loss(z, y, backend="cpu", ref_features=q.double(), ref_labels=yq)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(mlcontrast.label_supcon_loss(z, y, ref_features=q, ref_labels=yq).item())


# The op's roles, (R, (anchor_start, anchor_stop, contrast_start, grad_stop)): a batch with detached ref rows;
# a batch against a memory only (PML's ref_emb), its memory detached (grad_stop 0) or not; a batch against
# itself and a memory, every row detached as a contrast row (PML's CrossBatchMemory); anchors that straddle
# contrast_start and grad_stop off the tile grids; contrast_start past every row; no anchors.
ROLE_CASES = {
    "full": [(700, (0, 200, 0, 200)), (700, (0, 200, 200, 0)), (700, (0, 200, 200, None)), (700, (0, 200, 0, 0)),
             (700, (70, 601, 150, 333)), (300, (10, 290, 300, None)), (300, (40, 40, 5, 7)), (37, (30, 37, 0, 31))],
    "small": [(45, (0, 17, 0, 17)), (45, (0, 17, 17, 0)), (45, (5, 40, 12, 30)), (45, (0, 20, 0, 0))],
}  # fmt: skip


@pytest.mark.parametrize("backend,variant,r,roles,dtype", cases(ROLE_CASES, op="label_supcon", dtypes=[torch.float32]))
def test_op_roles_match_the_dense_definition(backend, variant, r, roles, dtype, monkeypatch):
    # The op's per-row losses, statistics and gradient against reference.label_supcon_anchor_rows, whose
    # rows past grad_stop enter the contrast sets detached (tests/test_reference.py holds it to a loop
    # definition): fp64 on the full backends, fp32 under the interpreter.
    use_variant(monkeypatch, "label_supcon", backend, variant)
    dev = device_of(backend)
    dtype = torch.float64 if backend_table()[backend].sizes == "full" else dtype
    start, stop, contrast_start, grad_stop = roles
    z = torch.randn(r, 8, dtype=torch.float64).to(dev, dtype)
    y = make_labels(r, 4, ignore_fraction=0.2, singleton=True).to(dev)
    upstream = torch.randn(stop - start, dtype=torch.float64, device=dev)
    op = registry.op("label_supcon", backend)

    def fused(x):
        return op(x, y, 0.2, 0.3, start, stop, contrast_start, grad_stop)[0][start:stop]

    def dense(x):
        return reference.label_supcon_anchor_rows(x, y, 0.2, 0.3, False, start, stop, contrast_start, grad_stop)

    out, (g,) = assert_matches(fused, dense, [z], upstream, names=["features"])
    # Rows that are neither anchors nor contrast rows below grad_stop get exactly 0.
    rows = torch.arange(r, device=dev)
    below = rows < (r if grad_stop is None else grad_stop)
    neither = ~((rows >= start) & (rows < stop)) & ~(below & (rows >= contrast_start))
    assert torch.equal(g[neither], torch.zeros_like(g[neither]))
    # The statistics: |P(i)| among the contrast rows, LSE over them (-inf without any).
    _, lse, n_pos = op(z.detach(), y, 0.2, 0.3, start, stop, contrast_start, grad_stop)
    valid, anchors = y >= 0, (rows >= start) & (rows < stop)
    contrast = valid & (rows >= contrast_start)
    same = (y[:, None] == y[None, :]) & contrast[None, :] & (rows[:, None] != rows[None, :])
    expected_pos = torch.where(valid & anchors, same.sum(1), 0)
    assert torch.equal(n_pos.long(), expected_pos)
    s = z.double() @ z.double().T / 0.2
    s = s.masked_fill(~(contrast[None, :] & (rows[:, None] != rows[None, :])), float("-inf"))
    expected_lse = torch.where(valid & anchors, torch.logsumexp(s, 1), 0.0)
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close_by_norm(lse[finite], expected_lse[finite].to(lse.dtype), dtype, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_roles_outside_the_rows_are_refused(backend):
    z, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    op = registry.op("label_supcon", backend)
    error = RuntimeError if backend == "cpu" else ValueError
    for contrast_start in (-1, 7):
        with pytest.raises(error, match="0 <= contrast_start <= N = 6"):
            op(z, y, 0.1, 0.1, 0, None, contrast_start, None)
    for grad_stop in (-1, 7):
        with pytest.raises(error, match="0 <= grad_stop <= N = 6"):
            op(z, y, 0.1, 0.1, 0, None, 0, grad_stop)


@pytest.mark.parametrize("backend", backends())
def test_learned_temperature_with_detached_ref_rows(backend):
    # A tensor temperature scales every row, detached ref rows too: its gradient is exact only with their
    # contrast role's gradient, which the op then computes (and which never reaches the detached rows).
    dev = device_of(backend)
    z, y, q, yq = _ref_inputs(17, 29, dev)
    log_t = torch.tensor(-2.0, device=dev, requires_grad=True)

    def run(fn, *extra):
        x = z.clone().requires_grad_()
        loss = fn(x, y, log_t.exp(), *extra)
        return (loss, *torch.autograd.grad(loss, [x, log_t]))

    fused = run(lambda x, y, t: mlcontrast.label_supcon_loss(x, y, t, normalize=True, backend=backend,
                                                             ref_features=q, ref_labels=yq))  # fmt: skip
    dense = run(lambda x, y, t: reference.label_supcon_loss(x, y, t, None, "mean", True, q, yq))
    for a, b, what in zip(fused, dense, ("loss", "features' gradient", "temperature's gradient")):
        assert_close_by_norm(a, b, torch.float32, what)
