"""multihot_supcon_loss on every fused backend (tests/utils.py: backend_table) against reference.py, and the
API-level contract of DESIGN §9/§10: every mode and reduction, rows without labels, duplicate label sets,
unknown (-1) entries, an overlap exactly at the threshold, bool targets, reference rows, one-hot targets
as label_supcon, torch.compile. The reference itself is checked in tests/test_reference.py.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_close_by_norm, assert_matches, backends, cases, device_of, grads, record_op_calls

import mlcontrast
from mlcontrast import reference

MODES = ("jaccard", "any", "all", "mulsupcon")
# Odd and prime sizes: rows on both sides of the CPU kernel's tiles, C on both sides of a 64-bit mask word.
SIZES = {
    "full": [(1, 5, 3), (2, 3, 1), (7, 3, 4), (31, 64, 5), (131, 17, 80), (257, 33, 67), (521, 7, 13)],
    "small": [(5, 7, 3), (33, 40, 9)],
}


def _all_backends():
    return backends() + [pytest.param("torch", id="torch")]


def _dev(backend):
    return torch.device("cpu") if backend == "torch" else device_of(backend)


def make_multihot(n: int, c: int, p_label: float = 0.3, p_unknown: float = 0.1, gen=None) -> torch.Tensor:
    """``[n, c]`` int64 targets: 1 with probability ``p_label``, some -1, the rest 0; row 0 has no label and
    row 2 repeats row 1's label set (when there are such rows)."""
    u = torch.rand(n, c, generator=gen)
    targets = (u < p_label).long()
    targets[u > 1 - p_unknown] = -1
    if n > 0:
        targets[0] = 0
    if n > 2:
        targets[2] = targets[1].clamp(min=0)  # the same label set, spelled with 0 where row 1 has -1
    return targets


def check(backend, z, targets, upstream=None, ref=None, ref_targets=None, **kw):
    """Loss and gradients (of features, and of the ref rows when given) of the backend against reference.py."""
    tensors, names = [z], ["features"]
    if ref is not None:
        tensors, names = [z, ref], ["features", "ref_features"]

    def call(fn, *args):
        ref_args = {} if ref is None else {"ref_features": args[1], "ref_targets": ref_targets}
        return fn(args[0], targets, **ref_args, **kw)

    return assert_matches(
        lambda *x: call(lambda *a, **k: mlcontrast.multihot_supcon_loss(*a, **k, backend=backend), *x),
        lambda *x: call(reference.multihot_supcon_loss, *x),
        tensors,
        upstream,
        names=names,
    )


@pytest.mark.parametrize("positives", MODES)
@pytest.mark.parametrize("backend,n,d,c,dtype", cases(SIZES))
def test_matches_reference_across_sizes(backend, n, d, c, dtype, positives):
    dev = device_of(backend)
    z = (torch.randn(n, d) / d**0.5).to(dev, dtype)
    targets = make_multihot(n, c, p_label=min(0.5, 3 / c)).to(dev)
    upstream = torch.randn(n, dtype=torch.float64, device=dev)
    kw = dict(temperature=0.1, base_temperature=0.07, positives=positives, threshold=0.3, reduction="none")
    out, _ = check(backend, z, targets, upstream, **kw)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert out[0] == 0  # a row without labels has no positives


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("positives", MODES)
@pytest.mark.parametrize("backend", _all_backends())
def test_every_mode_and_reduction(backend, positives, reduction, normalize):
    dev = _dev(backend)
    n, d, c = 23, 9, 6
    z = torch.randn(n, d, device=dev)
    targets = make_multihot(n, c).to(dev)
    upstream = torch.randn(n, dtype=torch.float64, device=dev) if reduction == "none" else None
    kw = dict(temperature=0.5, positives=positives, threshold=0.5, reduction=reduction, normalize=normalize)
    out, _ = check(backend, z, targets, upstream, **kw)
    assert out.shape == ((n,) if reduction == "none" else ())


@pytest.mark.parametrize("backend", backends(sizes="full"))
@pytest.mark.parametrize("positives", MODES)
def test_fp64_matches_reference_to_fp64_precision(backend, positives):
    z = torch.randn(67, 11, dtype=torch.float64)
    targets = make_multihot(67, 7)
    out, _ = check(backend, z, targets, positives=positives, threshold=0.25, normalize=True)
    assert out.dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# The cases of §9, one at a time, on every backend
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _all_backends())
def test_overlap_exactly_at_the_threshold_counts(backend):
    # Rows 0 and 1 share 1 of 3 labels (Jaccard exactly 1/3), rows 0 and 2 share 1 of 2 (exactly 1/2).
    dev = _dev(backend)
    targets = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 0]], device=dev)
    z = torch.randn(3, 4, device=dev)
    for threshold, has_pos in ((1 / 3, [1, 1, 1]), (0.5, [1, 0, 1]), (0.5 + 1e-6, [0, 0, 0]), (1.0, [0, 0, 0])):
        kw = dict(temperature=1.0, normalize=True, threshold=threshold, reduction="none")  # losses well above 0
        out = mlcontrast.multihot_supcon_loss(z, targets, **kw, backend=backend)
        assert [int(v != 0) for v in out.tolist()] == has_pos, f"threshold {threshold}"
        expected = reference.multihot_supcon_loss(z.double(), targets, **kw)
        assert_close_by_norm(out, expected, torch.float32, f"threshold {threshold}")


@pytest.mark.parametrize("positives", MODES)
@pytest.mark.parametrize("backend", _all_backends())
def test_unknown_entries_are_absent_and_bool_targets_are_the_same(backend, positives):
    dev = _dev(backend)
    targets = make_multihot(19, 5, p_unknown=0.3).to(dev)
    z = torch.randn(19, 6, device=dev)
    kw = dict(positives=positives, reduction="none", backend=backend)
    out = mlcontrast.multihot_supcon_loss(z, targets, **kw)
    zeros = mlcontrast.multihot_supcon_loss(z, targets.clamp(min=0), **kw)  # -1 -> 0
    as_bool = mlcontrast.multihot_supcon_loss(z, targets == 1, **kw)
    as_uint8 = mlcontrast.multihot_supcon_loss(z, (targets == 1).to(torch.uint8), **kw)
    assert torch.equal(out, zeros) and torch.equal(out, as_bool) and torch.equal(out, as_uint8)


@pytest.mark.parametrize("positives", MODES)
@pytest.mark.parametrize("backend", _all_backends())
def test_rows_without_labels_are_in_the_contrast_set_but_have_no_loss(backend, positives):
    dev = _dev(backend)
    targets = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0], [-1, 0]], device=dev)  # rows 3 and 4: no labels
    z = torch.randn(5, 3, device=dev, requires_grad=True)
    kw = dict(positives=positives, temperature=1.0, normalize=True, reduction="none", backend=backend)
    out = mlcontrast.multihot_supcon_loss(z, targets, **kw)
    assert out[2] == 0 and out[3] == 0 and out[4] == 0
    without = mlcontrast.multihot_supcon_loss(z[:3], targets[:3], **kw)
    assert (out[:2] > without[:2]).all(), "the unlabelled rows add to the anchors' LSE"
    (g,) = grads(out.sum(), z)
    assert (g[3:].abs().sum(1) > 0).all(), "the unlabelled rows get a gradient as negatives"


@pytest.mark.parametrize("backend", _all_backends())
def test_duplicate_label_sets_are_positives_in_every_mode(backend):
    dev = _dev(backend)
    targets = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 1, 0]], device=dev)
    z = torch.randn(3, 5, device=dev)
    for positives in MODES:
        out = mlcontrast.multihot_supcon_loss(z, targets, temperature=1.0, normalize=True, positives=positives,
                                              threshold=1.0, reduction="none", backend=backend)  # fmt: skip
        assert out[0] != 0 and out[1] != 0 and out[2] == 0, positives


@pytest.mark.parametrize("positives", MODES)
@pytest.mark.parametrize("backend", _all_backends())
def test_no_positive_anywhere_gives_zero_with_finite_zero_gradient(backend, positives):
    dev = _dev(backend)
    for n, targets in ((0, torch.zeros(0, 3)), (1, torch.ones(1, 3)), (4, torch.eye(4, 3))):
        z = torch.randn(n, 5, device=dev, requires_grad=True)
        loss = mlcontrast.multihot_supcon_loss(z, targets.long().to(dev), positives=positives, backend=backend)
        assert loss.item() == 0 and loss.dtype == torch.float32
        (g,) = grads(loss, z)
        assert torch.equal(g, torch.zeros_like(z))


# ----------------------------------------------------------------------------------------------
# Reference rows (§10)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positives", MODES)
@pytest.mark.parametrize("backend", _all_backends())
def test_ref_rows_match_reference_and_get_gradients(backend, positives):
    dev = _dev(backend)
    z, targets = torch.randn(13, 6, device=dev), make_multihot(13, 5).to(dev)
    ref, ref_targets = torch.randn(11, 6, device=dev), make_multihot(11, 5).to(dev)
    out, (_, g_ref) = check(backend, z, targets, ref=ref, ref_targets=ref_targets, positives=positives,
                            normalize=True, temperature=0.3)  # fmt: skip
    assert g_ref.abs().sum() > 0


@pytest.mark.parametrize("backend", _all_backends())
def test_detached_ref_rows_get_no_gradient_and_change_the_loss(backend):
    dev = _dev(backend)
    z = torch.randn(5, 4, device=dev, requires_grad=True)
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]], device=dev)
    ref = torch.randn(6, 4, device=dev)  # a queue: no gradient
    ref_targets = torch.tensor([[1, 0, 0]] * 3 + [[0, 1, 0]] * 3, device=dev)
    kw = dict(positives="any", temperature=1.0, normalize=True, backend=backend)
    with_ref = mlcontrast.multihot_supcon_loss(z, targets, reduction="none", ref_features=ref, ref_targets=ref_targets,
                                               **kw)  # fmt: skip
    alone = mlcontrast.multihot_supcon_loss(z, targets, reduction="none", **kw)
    # Rows 0 and 1 gain positives (and negatives) from the queue; rows 2 (class 2 only) and 4 (no label) have none.
    assert with_ref[2] == 0 and with_ref[4] == 0
    assert (with_ref[:2] - alone[:2]).abs().min() > 1e-3
    (g,) = grads(with_ref.sum(), z)
    assert g.shape == z.shape and ref.grad is None and not ref.requires_grad
    mean = mlcontrast.multihot_supcon_loss(z, targets, ref_features=ref, ref_targets=ref_targets, **kw)
    k = int((with_ref != 0).sum())  # the anchors with positives: ref rows never count
    torch.testing.assert_close(mean, with_ref.sum() / k)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("positives", ["jaccard", "any", "all", "mulsupcon"])
@pytest.mark.parametrize("r, anchors, grad_stop", [(23, (0, 7), 7), (23, (0, 7), 12), (23, (3, 9), 5), (23, (0, 23), 0),
                                                   (67, (0, 31), 31)])  # fmt: skip
def test_op_grad_stop_against_the_reference(backend, positives, r, anchors, grad_stop):
    """The op's grad_stop: rows from it on take no contrast-role gradient (the anchors past it keep their own
    loss's), against reference.multihot_supcon_anchor_rows with those rows detached; rows without labels and
    anchors without positives included."""
    from mlcontrast.ops import registry

    dev = device_of(backend)
    g = torch.Generator().manual_seed(r + grad_stop)
    z = torch.nn.functional.normalize(torch.randn(r, 6, generator=g, dtype=torch.float64), dim=1)
    targets = (torch.rand(r, 5, generator=g) < 0.35).to(torch.uint8)
    targets[1] = 0  # a row without labels: in every contrast set, no loss of its own
    weights = torch.randn(r, generator=g, dtype=torch.float64)
    leaf = z.clone().to(dev).requires_grad_()
    op = registry.op("multihot_supcon", backend)
    loss = op(leaf, targets.to(dev), 0.3, 0.2, positives, 1 / 3, *anchors, grad_stop)[0]
    (got,) = torch.autograd.grad((loss * weights.to(dev)).sum(), leaf)
    ref_leaf = z.clone().requires_grad_()
    expected, _ = reference.multihot_supcon_anchor_rows(ref_leaf, targets, 0.3, 0.2, positives, 1 / 3, False, *anchors,
                                                        grad_stop)  # fmt: skip
    (want,) = torch.autograd.grad((expected * weights[anchors[0] : anchors[1]]).sum(), ref_leaf)
    assert_close_by_norm(loss[anchors[0] : anchors[1]].detach().cpu(), expected.detach(), torch.float64, "loss")
    assert_close_by_norm(got.cpu(), want, torch.float64, "features' gradient")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("positives", ["jaccard", "mulsupcon"])
def test_a_detached_queue_costs_no_gradient_work(backend, positives, monkeypatch):
    """The op's backward gets grad_stop = B (the queue takes no contrast-role gradient and no work; the op's
    own tests check that semantics against the reference), and the batch's gradient is the reference's."""
    dev = device_of(backend)
    calls = record_op_calls(monkeypatch)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(9, 6, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    targets = (torch.rand(9, 4, generator=g) < 0.4).long().to(dev)
    queue = torch.randn(40, 6, generator=g, dtype=torch.float64).to(dev)
    queue_targets = (torch.rand(40, 4, generator=g) < 0.4).long().to(dev)
    kw = dict(positives=positives, normalize=True, ref_features=queue, ref_targets=queue_targets)
    loss = mlcontrast.multihot_supcon_loss(z, targets, backend=backend, **kw)
    assert [args[-1] for _, args in calls] == [9]  # grad_stop
    expected = reference.multihot_supcon_loss(z, targets, **kw)
    assert_close_by_norm(loss.detach(), expected.detach(), torch.float64, "loss")
    assert_close_by_norm(grads(loss, z)[0], grads(expected, z)[0], torch.float64, "features' gradient")


@pytest.mark.parametrize("backend", _all_backends())
def test_ref_rows_in_another_dtype_are_cast_to_the_features_dtype(backend):
    dev = _dev(backend)
    z, targets = torch.randn(7, 4, device=dev), make_multihot(7, 3).to(dev)
    ref, ref_targets = torch.randn(5, 4, device=dev, dtype=torch.float64, requires_grad=True), make_multihot(5, 3)
    out = mlcontrast.multihot_supcon_loss(z, targets, ref_features=ref, ref_targets=ref_targets.to(dev),
                                          backend=backend)  # fmt: skip
    assert out.dtype == torch.float32
    (g,) = grads(out, ref)
    assert g.dtype == torch.float64


def test_module_matches_functional_with_ref_rows():
    z, targets = torch.randn(9, 5), make_multihot(9, 4)
    ref, ref_targets = torch.randn(4, 5), make_multihot(4, 4)
    kw = dict(temperature=0.2, base_temperature=0.1, positives="mulsupcon", threshold=0.7, reduction="sum",
              normalize=True)  # fmt: skip
    module = mlcontrast.MultiHotSupConLoss(**kw, backend="torch")
    expected = mlcontrast.multihot_supcon_loss(z, targets, **kw, ref_features=ref, ref_targets=ref_targets,
                                               backend="torch")  # fmt: skip
    assert torch.equal(module(z, targets, ref, ref_targets), expected)
    assert torch.equal(module(z, targets), mlcontrast.multihot_supcon_loss(z, targets, **kw, backend="torch"))
    assert "mulsupcon" in repr(module)


# ----------------------------------------------------------------------------------------------
# One-hot targets are label_supcon
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positives", MODES)
@pytest.mark.parametrize("backend", _all_backends())
def test_one_hot_targets_are_label_supcon(backend, positives):
    # Every row has exactly one label (label_supcon's ignored rows would leave A(i); rows without labels don't).
    dev = _dev(backend)
    n, c = 29, 6
    labels = torch.randint(0, c - 1, (n,), device=dev)
    labels[3] = c - 1  # a class of one row: no positives
    targets = torch.nn.functional.one_hot(labels, c)
    z = torch.randn(n, 8, device=dev)
    kw = dict(temperature=0.2, base_temperature=0.3, normalize=True)
    rows = mlcontrast.multihot_supcon_loss(z, targets, positives=positives, reduction="none", backend=backend,
                                           threshold=1.0, **kw)  # fmt: skip
    expected = mlcontrast.label_supcon_loss(z.double(), labels, reduction="none", backend="torch", **kw)
    assert_close_by_norm(rows, expected, torch.float32, positives)
    # "mean" divides by the anchors with positives (label_supcon: by every valid row).
    mean = mlcontrast.multihot_supcon_loss(z, targets, positives=positives, backend=backend, **kw)
    k = int((labels.bincount(minlength=c)[labels] > 1).sum())
    assert_close_by_norm(mean, expected.sum() / k, torch.float32, f"{positives} mean")


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positives", ["jaccard", "mulsupcon"])
@pytest.mark.parametrize("backend", [*backends(sizes="full"), pytest.param("torch", id="torch")])
def test_compile_fullgraph_matches_eager_with_backward(backend, positives):
    torch._dynamo.reset()
    z, targets = torch.randn(37, 8), make_multihot(37, 5)
    ref, ref_targets = torch.randn(6, 8), make_multihot(6, 5)

    def loss(x, r):
        return mlcontrast.multihot_supcon_loss(x, targets, 0.2, positives=positives, normalize=True,
                                               ref_features=r, ref_targets=ref_targets, backend=backend)  # fmt: skip

    def run(fn):
        leaves = [z.clone().requires_grad_(), ref.clone().requires_grad_()]
        out = fn(*leaves)
        return out.detach(), torch.autograd.grad(out, leaves)

    out_c, grads_c = run(torch.compile(loss, fullgraph=True))
    out_e, grads_e = run(loss)
    assert_close_by_norm(out_c, out_e, torch.float32, "compiled loss")
    for a, e, name in zip(grads_c, grads_e, ("features", "ref_features")):
        assert_close_by_norm(a, e, torch.float32, f"compiled grad of {name}")
