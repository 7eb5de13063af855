"""reference.py (the spec and backend "torch") against loops.py and against hand-worked numbers."""

from __future__ import annotations

import math

import loops
import pytest
import torch
from loops import logsumexp_scalars
from utils import assert_close_by_norm, grads, make_labels, make_targets

from mlcontrast import reference

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# reference vs loops on small random inputs (values and gradients, float64)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("n,d", [(1, 3), (2, 1), (7, 3), (13, 5)])
def test_label_supcon_reference_matches_loops(n, d, normalize, reduction):
    z = torch.randn(n, d, dtype=F64, requires_grad=True)
    y = make_labels(n, 3, ignore_fraction=0.2, singleton=n > 2)
    upstream = torch.randn(n, dtype=F64) if reduction == "none" else None
    ref = reference.label_supcon_loss(z, y, 0.3, 0.5, reduction, normalize)
    loop = loops.label_supcon(z, y, 0.3, 0.5, reduction, normalize)
    assert_close_by_norm(ref, loop, F64, "loss")
    assert_close_by_norm(grads(ref, z, upstream)[0], grads(loop, z, upstream)[0], F64, "grad")


@pytest.mark.parametrize("ref_grad", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("n,m", [(1, 4), (7, 5), (6, 0)])
def test_label_supcon_reference_with_ref_rows_matches_loops(n, m, normalize, reduction, ref_grad):
    z = torch.randn(n, 3, dtype=F64, requires_grad=True)
    q = torch.randn(m, 3, dtype=F64, requires_grad=ref_grad)
    y, yq = make_labels(n, 3, ignore_fraction=0.2), make_labels(m, 3, ignore_fraction=0.3)
    upstream = torch.randn(n, dtype=F64) if reduction == "none" else None
    ref = reference.label_supcon_loss(z, y, 0.3, 0.5, reduction, normalize, q, yq)
    loop = loops.label_supcon(z, y, 0.3, 0.5, reduction, normalize, q, yq)
    assert_close_by_norm(ref, loop, F64, "loss")
    inputs = [z, q] if ref_grad else [z]
    for a, b in zip(grads(ref, inputs, upstream), grads(loop, inputs, upstream)):
        assert_close_by_norm(a, b, F64, "grad")


# The op's roles (anchors, contrast_start, grad_stop): a batch with detached ref rows, a batch against a
# memory only (its copy there detached, or not), anchors that are contrast rows past grad_stop, and ranges
# that straddle each other.
ROLES = [(0, 5, 0, 5), (0, 5, 5, 0), (0, 5, 5, None), (0, 5, 0, 0), (2, 9, 4, 6), (3, 11, 0, 11), (0, 0, 3, 2)]


@pytest.mark.parametrize("start,stop,contrast_start,grad_stop", ROLES)
def test_label_supcon_anchor_rows_with_roles_match_loops(start, stop, contrast_start, grad_stop):
    z = torch.randn(11, 4, dtype=F64, requires_grad=True)
    y = make_labels(11, 3, ignore_fraction=0.2)
    upstream = torch.randn(stop - start, dtype=F64)
    args = (0.3, 0.5, True, start, stop, contrast_start, grad_stop)
    ref = reference.label_supcon_anchor_rows(z, y, *args)
    loop = loops.label_supcon_rows(z, y, 0.3, 0.5, True, (start, stop), contrast_start, grad_stop)
    loop = torch.stack(loop) if loop else torch.zeros(0, dtype=F64)
    assert_close_by_norm(ref, loop, F64, "loss")
    if ref.numel() and (ref.requires_grad or loop.requires_grad):
        g_ref = grads((ref * upstream).sum() + 0 * z.sum(), z)[0]
        g_loop = grads((loop * upstream).sum() + 0 * z.sum(), z)[0]
        assert_close_by_norm(g_ref, g_loop, F64, "grad")


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("b,v", [(1, 2), (4, 1), (5, 3)])
def test_supcon_reference_matches_loops(b, v, with_labels, contrast_mode):
    z = torch.nn.functional.normalize(torch.randn(b, v, 6, dtype=F64), dim=-1).requires_grad_()
    labels = torch.randint(0, 2, (b,)) if with_labels else None
    ref = reference.supcon_loss(z, labels, 0.2, 0.3, contrast_mode)
    loop = loops.supcon(z, labels, 0.2, 0.3, contrast_mode)
    assert_close_by_norm(ref, loop, F64, "loss")
    assert_close_by_norm(grads(ref, z)[0], grads(loop, z)[0], F64, "grad")


@pytest.mark.parametrize("legacy_sadcl", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 5), (4, 2, 3, 5), (3, 3, 2, 4)])
def test_multilabel_supcon_reference_matches_loops(shape, legacy_sadcl):
    z = torch.randn(*shape, dtype=F64, requires_grad=True)
    b, c = shape[0], shape[-2]
    t = make_targets(b, c, p_positive=0.5)
    ref = reference.multilabel_supcon_loss(z, t, 0.2, 0.4, legacy_sadcl)
    loop = loops.multilabel_supcon(z, t, 0.2, 0.4, legacy_sadcl)
    assert_close_by_norm(ref, loop, F64, "loss")
    assert_close_by_norm(grads(ref, z)[0], grads(loop, z)[0], F64, "grad")


@pytest.mark.parametrize("b,c,d", [(1, 1, 1), (5, 3, 4), (9, 6, 7)])
def test_prototype_nce_reference_matches_loops(b, c, d):
    z = torch.randn(b, c, d, dtype=F64, requires_grad=True)
    p = torch.randn(c, d, dtype=F64, requires_grad=True)
    t = make_targets(b, c)
    t[0, 0] = 1  # at least one positive
    ref = reference.prototype_nce_loss(z, p, t, 0.1)
    loop = loops.prototype_nce(z, p, t, 0.1)
    assert_close_by_norm(ref, loop, F64, "loss")
    for a, e, name in zip(grads(ref, (z, p)), grads(loop, (z, p)), ("features", "prototypes")):
        assert_close_by_norm(a, e, F64, f"grad {name}")


@pytest.mark.parametrize("n,c,d", [(1, 1, 1), (6, 2, 3), (15, 5, 8)])
def test_prototype_ce_reference_matches_loops(n, c, d):
    z = torch.randn(n, d, dtype=F64, requires_grad=True)
    p = torch.randn(c, d, dtype=F64, requires_grad=True)
    y = make_labels(n, c, ignore_fraction=0.25)
    ref = reference.prototype_ce_loss(z, y, p, 0.2)
    loop = loops.prototype_ce(z, y, p, 0.2)
    assert_close_by_norm(ref, loop, F64, "loss")
    for a, e, name in zip(grads(ref, (z, p)), grads(loop, (z, p)), ("features", "prototypes")):
        assert_close_by_norm(a, e, F64, f"grad {name}")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
def test_update_prototypes_reference_matches_loops(momentum, normalize):
    p = torch.randn(5, 4, dtype=F64)
    z = torch.randn(11, 4, dtype=F64)
    y = torch.tensor([0, 0, 2, -1, 2, 2, 4, -1, 0, 4, 4])  # classes 1 and 3 absent
    ref = reference.update_prototypes_(p.clone(), z, y, momentum, normalize)
    loop = loops.update_prototypes_(p.clone(), z, y, momentum, normalize)
    assert_close_by_norm(ref, loop, F64)
    assert torch.equal(ref[[1, 3]], p[[1, 3]])


# ----------------------------------------------------------------------------------------------
# Hand-worked cases
# ----------------------------------------------------------------------------------------------


def test_label_supcon_hand_worked_three_rows():
    # z0 = z1 = (1, 0) share class 0, z2 = (0, 1) is class 1; tau = 0.5 so s01 = 2, s02 = s12 = 0.
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    y = torch.tensor([0, 0, 1])
    ell = math.log(math.exp(2) + 1) - 2  # LSE(s01, s02) - s01 for rows 0 and 1; row 2 has no positive
    rows = reference.label_supcon_loss(z, y, 0.5, reduction="none")
    assert torch.allclose(rows, torch.tensor([ell, ell, 0.0], dtype=F64), rtol=1e-12, atol=0)
    assert reference.label_supcon_loss(z, y, 0.5, reduction="sum").item() == pytest.approx(2 * ell, rel=1e-12)
    assert reference.label_supcon_loss(z, y, 0.5).item() == pytest.approx(2 * ell / 3, rel=1e-12)
    # base_temperature scales by tau / tau_base.
    assert reference.label_supcon_loss(z, y, 0.5, 1.0).item() == pytest.approx(0.5 * 2 * ell / 3, rel=1e-12)


def test_label_supcon_hand_worked_ignored_row_takes_no_part():
    # The same three rows plus a row labelled -1 that would be a positive of rows 0 and 1.
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=F64)
    y = torch.tensor([0, 0, 1, -1])
    ell = math.log(math.exp(2) + 1) - 2
    rows = reference.label_supcon_loss(z, y, 0.5, reduction="none")
    assert torch.allclose(rows, torch.tensor([ell, ell, 0.0, 0.0], dtype=F64), rtol=1e-12, atol=0)
    assert reference.label_supcon_loss(z, y, 0.5).item() == pytest.approx(2 * ell / 3, rel=1e-12)  # over |V| = 3


def test_label_supcon_hand_worked_normalize():
    # Rows of norm 3 and 0.5: with normalize=True only the directions count.
    z = torch.tensor([[3.0, 0.0], [0.0, 0.5], [0.5, 0.0]], dtype=F64)
    y = torch.tensor([0, 1, 0])
    t = 0.25
    # Row 0: A = {1, 2}, s01 = 0, s02 = 4, P = {2}. Row 2 symmetric. Row 1 has no positive.
    ell = logsumexp_scalars(0.0, 4.0) - 4.0
    got = reference.label_supcon_loss(z, y, t, reduction="none", normalize=True)
    assert torch.allclose(got, torch.tensor([ell, 0.0, ell], dtype=F64), rtol=1e-12, atol=0)


def test_supcon_hand_worked_simclr_pair():
    # B = 2 samples, V = 2 views, labels None; rows in view-major order: (v0,b0), (v0,b1), (v1,b0), (v1,b1).
    # Sample 0's views are e1 and e1, sample 1's views are e2 and e1; tau = tau_base = 1.
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    z = torch.tensor([[e1, e1], [e2, e1]], dtype=F64)  # [B, V, D]
    # Anchor (v0,b0): others s = [0 (v0,b1), 1 (v1,b0), 1 (v1,b1)], positive (v1,b0) with s = 1.
    a0 = logsumexp_scalars(0, 1, 1) - 1
    # Anchor (v0,b1) = e2: others s = [0, 0, 0], positive (v1,b1) s = 0.
    a1 = logsumexp_scalars(0, 0, 0) - 0
    # Anchor (v1,b0) = e1: others s = [1 (v0,b0), 0 (v0,b1), 1 (v1,b1)], positive (v0,b0) s = 1.
    a2 = logsumexp_scalars(1, 0, 1) - 1
    # Anchor (v1,b1) = e1: others s = [1, 0, 1], positive (v0,b1) s = 0.
    a3 = logsumexp_scalars(1, 0, 1) - 0
    expected = (a0 + a1 + a2 + a3) / 4
    assert reference.supcon_loss(z, None, 1.0, 1.0).item() == pytest.approx(expected, rel=1e-12)
    assert reference.supcon_loss(z, None, 1.0, 1.0, "one").item() == pytest.approx((a0 + a1) / 2, rel=1e-12)


def test_prototype_nce_hand_worked_with_class_without_positives():
    # B = 3, C = 4, D = 2, tau = 1. Prototypes point along e1 (classes 0, 2) or e2 (classes 1, 3); each
    # feature is +-p_c or perpendicular to it, scaled so that only the direction counts. Cosines s[b, c]:
    #   b0: [ 1,  0,  1,  0]    targets b0: [1,  0,  1, -1]
    #   b1: [ 0,  1, -1,  1]            b1: [0,  1, -1, -1]
    #   b2: [-1,  0,  0,  1]            b2: [1, -1,  0,  0]
    e1, e2 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    protos = torch.stack([e1, 2 * e2, 0.5 * e1, e2])
    z = torch.stack(
        [
            torch.stack([2 * e1, 3 * e1, e1, e1]),
            torch.stack([e2, 0.5 * e2, -e1, 4 * e2]),
            torch.stack([-e1, e1, e2, e2]),
        ]
    )
    targets = torch.tensor([[1, 0, 1, -1], [0, 1, -1, -1], [1, -1, 0, 0]])
    e = math.e
    term0 = math.log(e + 1 / e) - math.log(e + 1 + 1 / e)  # P = {b0, b2}, K = {b0, b1, b2}
    term1 = 1 - math.log(1 + e)  # P = {b1}, K = {b0, b1}
    term2 = 1 - math.log(e + 1)  # P = {b0}, K = {b0, b2}
    term3 = 0 - 1  # no positive: LSE over P is 0; K = {b2} with s = 1
    expected = -(term0 + term1 + term2 + term3) / 4  # four positives in all
    assert reference.prototype_nce_loss(z, protos, targets, 1.0).item() == pytest.approx(expected, rel=1e-12)
    assert loops.prototype_nce(z, protos, targets, 1.0).item() == pytest.approx(expected, rel=1e-12)


def test_prototype_ce_hand_worked_two_classes():
    protos = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -7.0]], dtype=F64)
    y = torch.tensor([0, 1, -1])
    t = 0.5
    row0 = math.log(math.exp(2) + 1) - 2  # cosines (1, 0) / t
    row1 = math.log(2.0)  # cosines (1/sqrt2, 1/sqrt2): a fair coin
    expected = (row0 + row1) / 2
    assert reference.prototype_ce_loss(z, y, protos, t).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_update_prototypes_hand_worked(normalize):
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]], dtype=F64)
    z = torch.tensor([[0.0, 2.0], [0.0, 4.0], [5.0, 5.0]], dtype=F64)
    y = torch.tensor([0, 0, -1])
    expected = p.clone()
    expected[0] = torch.tensor([0.5, 1.5], dtype=F64)  # 0.5 * (1, 0) + 0.5 * mean((0, 2), (0, 4))
    if normalize:
        expected[0] /= math.sqrt(2.5)
    got = reference.update_prototypes_(p.clone(), z, y, 0.5, normalize)
    assert torch.allclose(got, expected, rtol=1e-14, atol=0)
    assert torch.equal(got[1:], p[1:])


def test_multilabel_supcon_legacy_gate_changes_the_loss_and_matches_loops():
    # B = 2, V = 2, C = 2, targets [[1, 1], [0, 1]]: row (v=1, b=0, c=0) is gated by targets[1, 0] = 0.
    z = torch.randn(2, 2, 2, 5, dtype=F64)
    t = torch.tensor([[1, 1], [0, 1]])
    intended = reference.multilabel_supcon_loss(z, t, 0.2)
    legacy = reference.multilabel_supcon_loss(z, t, 0.2, legacy_sadcl=True)
    rows = reference.label_supcon_loss(
        z.transpose(0, 1).reshape(8, 5), torch.tensor([0, 1, -1, 1, 0, 1, -1, 1]), 0.2, reduction="none", normalize=True
    )
    assert legacy.item() == pytest.approx((rows.sum() - rows[4]).item() / 6, rel=1e-12)
    assert intended.item() == pytest.approx(rows.sum().item() / 6, rel=1e-12)
    assert rows[4] > 0 and legacy < intended
    assert legacy.item() == pytest.approx(loops.multilabel_supcon(z, t, 0.2, legacy_sadcl=True).item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Edge cases: finite (and zero where nothing contributes) gradients
# ----------------------------------------------------------------------------------------------


def _finite_grad(loss, inputs):
    out = grads(loss, inputs)
    for g in out:
        assert torch.isfinite(g).all(), g
    return out


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(
    "labels",
    [
        pytest.param([0, 1, 2, 3], id="no-positives"),
        pytest.param([-1, -1, -1, -1], id="all-ignored"),
        pytest.param([-1, 5, -1, -1], id="single-valid-row"),
    ],
)
def test_label_supcon_reference_edge_cases_have_zero_loss_and_finite_zero_grad(labels, normalize):
    z = torch.randn(4, 3, dtype=F64, requires_grad=True)
    y = torch.tensor(labels)
    for reduction in ("mean", "sum"):
        loss = reference.label_supcon_loss(z, y, 0.1, reduction=reduction, normalize=normalize)
        assert loss.item() == 0.0
        (g,) = _finite_grad(loss, z)
        assert torch.equal(g, torch.zeros_like(g))


def test_prototype_nce_reference_without_positives_is_zero_with_finite_grads():
    z = torch.randn(3, 2, 4, dtype=F64, requires_grad=True)
    p = torch.randn(2, 4, dtype=F64, requires_grad=True)
    for targets in (torch.zeros(3, 2, dtype=torch.long), torch.full((3, 2), -1)):
        loss = reference.prototype_nce_loss(z, p, targets, 0.1)
        assert loss.item() == 0.0
        for g in _finite_grad(loss, (z, p)):
            assert torch.equal(g, torch.zeros_like(g))


def test_prototype_ce_reference_all_ignored_is_zero_with_finite_grads():
    z = torch.randn(5, 4, dtype=F64, requires_grad=True)
    p = torch.randn(3, 4, dtype=F64, requires_grad=True)
    loss = reference.prototype_ce_loss(z, torch.full((5,), -1), p, 0.1)
    assert loss.item() == 0.0
    for g in _finite_grad(loss, (z, p)):
        assert torch.equal(g, torch.zeros_like(g))


def test_multilabel_supcon_reference_without_positives_is_zero_with_finite_grads():
    z = torch.randn(3, 2, 4, 5, dtype=F64, requires_grad=True)
    loss = reference.multilabel_supcon_loss(z, torch.zeros(3, 4, dtype=torch.long), 0.2)
    assert loss.item() == 0.0
    (g,) = _finite_grad(loss, z)
    assert torch.equal(g, torch.zeros_like(g))


# ----------------------------------------------------------------------------------------------
# multihot_supcon_loss: against loops.py, and by hand
# ----------------------------------------------------------------------------------------------

MULTIHOT_MODES = ("jaccard", "any", "all", "mulsupcon")


def _multihot(n, c, gen):
    u = torch.rand(n, c, generator=gen)
    targets = (u < 0.4).long()
    targets[u > 0.85] = -1
    if n > 3:
        targets[0] = 0  # no labels
        targets[2] = targets[1]  # a duplicate label set
    return targets


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("positives", MULTIHOT_MODES)
@pytest.mark.parametrize("n,d,c", [(1, 3, 2), (2, 1, 1), (7, 3, 4), (13, 5, 6)])
def test_multihot_supcon_reference_matches_loops(n, d, c, positives, reduction, with_ref):
    gen = torch.Generator().manual_seed(n * 100 + c)
    z = torch.randn(n, d, dtype=F64, generator=gen, requires_grad=True)
    targets = _multihot(n, c, gen)
    ref = torch.randn(5, d, dtype=F64, generator=gen, requires_grad=True) if with_ref else None
    ref_targets = _multihot(5, c, gen) if with_ref else None
    upstream = torch.randn(n, dtype=F64, generator=gen) if reduction == "none" else None
    for normalize, threshold in ((False, 0.5), (True, 1 / 3)):
        args = (0.3, 0.5, positives, threshold, reduction, normalize, ref, ref_targets)
        expected = loops.multihot_supcon(z, targets, *args)
        actual = reference.multihot_supcon_loss(z, targets, *args)
        assert_close_by_norm(actual, expected, F64, "loss")
        inputs = (z,) if ref is None else (z, ref)
        for a, e in zip(grads(actual, inputs, upstream), grads(expected, inputs, upstream)):
            assert_close_by_norm(a, e, F64, "grad")


def _three_rows():
    # z0 = (1, 0), z1 = (0, 1), z2 = (1, 1) with tau = 1: s01 = 0, s02 = 1, s12 = 1.
    # y0 = {0, 1}, y1 = {0}, y2 = {1, 2}: o01 = 1, u01 = 2 (w = 1/2); o02 = 1, u02 = 3 (w = 1/3); o12 = 0.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    y = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1]])
    lse01 = math.log(1 + math.e)  # LSE of rows 0 and 1: log(e^0 + e^1)
    lse2 = 1 + math.log(2)  # LSE of row 2: log(e^1 + e^1)
    return z, y, lse01, lse2


def _rows(*values):
    return torch.tensor(values, dtype=F64)


def test_multihot_supcon_hand_worked_jaccard():
    z, y, lse, lse2 = _three_rows()
    # threshold 1/2: P(0) = {1} (w 1/2), P(1) = {0} (w 1/2), P(2) = {} (w20 = 1/3 < 1/2).
    # l0 = 1/2 (LSE_0 - s01) = lse/2, l1 = 1/2 (LSE_1 - s10) = lse/2; K = 2.
    rows = reference.multihot_supcon_loss(z, y, 1.0, threshold=0.5, reduction="none")
    assert torch.allclose(rows, _rows(lse / 2, lse / 2, 0.0), rtol=1e-12, atol=0)
    assert reference.multihot_supcon_loss(z, y, 1.0, threshold=0.5).item() == pytest.approx(lse / 2, rel=1e-12)
    # threshold 1/3 (met exactly by w02): P(0) = {1, 2}: l0 = (1/2)(1/2 (lse - 0) + 1/3 (lse - 1));
    # P(2) = {0} (w 1/3): l2 = 1/3 (LSE_2 - s20) = (1/3) log 2; K = 3.
    l0 = 0.5 * (0.5 * lse + (lse - 1) / 3)
    rows = reference.multihot_supcon_loss(z, y, 1.0, threshold=1 / 3, reduction="none")
    assert torch.allclose(rows, _rows(l0, lse / 2, math.log(2) / 3), rtol=1e-12, atol=0)
    mean = reference.multihot_supcon_loss(z, y, 1.0, threshold=1 / 3)
    assert mean.item() == pytest.approx((l0 + lse / 2 + math.log(2) / 3) / 3, rel=1e-12)
    # base_temperature scales by tau / tau_base.
    halved = reference.multihot_supcon_loss(z, y, 1.0, 2.0, threshold=0.5, reduction="sum")
    assert halved.item() == pytest.approx(lse / 2, rel=1e-12)


def test_multihot_supcon_hand_worked_any_all():
    z, y, lse, lse2 = _three_rows()
    # any: P(0) = {1, 2}, P(1) = {0}, P(2) = {0}, all w = 1.
    # l0 = ((lse - 0) + (lse - 1)) / 2, l1 = lse - 0, l2 = LSE_2 - s20 = log 2; K = 3.
    rows = reference.multihot_supcon_loss(z, y, 1.0, positives="any", reduction="none")
    assert torch.allclose(rows, _rows(lse - 0.5, lse, math.log(2)), rtol=1e-12, atol=0)
    mean = reference.multihot_supcon_loss(z, y, 1.0, positives="any")
    assert mean.item() == pytest.approx((2 * lse - 0.5 + math.log(2)) / 3, rel=1e-12)
    # all: no two rows have the same label set: 0, and "mean" is 0 with K = 0.
    assert reference.multihot_supcon_loss(z, y, 1.0, positives="all").item() == 0.0
    # y1 = y0 = {0, 1} makes rows 0 and 1 each other's only positive.
    y_same = torch.tensor([[1, 1, 0], [1, 1, -1], [0, 1, 1]])
    rows = reference.multihot_supcon_loss(z, y_same, 1.0, positives="all", reduction="none")
    assert torch.allclose(rows, _rows(lse, lse, 0.0), rtol=1e-12, atol=0)


def test_multihot_supcon_hand_worked_mulsupcon():
    z, y, lse, lse2 = _three_rows()
    # n_0 = 2 (rows 0, 1), n_1 = 2 (rows 0, 2), n_2 = 1 (row 2 only: no label anchor).
    # Row 0: c = 0: P = {1}: lse - 0; c = 1: P = {2}: lse - 1. Row 1: c = 0: P = {0}: lse.
    # Row 2: c = 1: P = {0}: LSE_2 - s20 = log 2. K = 2 + 1 + 1 = 4.
    rows = reference.multihot_supcon_loss(z, y, 1.0, positives="mulsupcon", reduction="none")
    assert torch.allclose(rows, _rows(2 * lse - 1, lse, math.log(2)), rtol=1e-12, atol=0)
    mean = reference.multihot_supcon_loss(z, y, 1.0, positives="mulsupcon")
    assert mean.item() == pytest.approx((3 * lse - 1 + math.log(2)) / 4, rel=1e-12)


def test_multihot_supcon_hand_worked_unlabelled_row_and_ref_row():
    z, y, lse, lse2 = _three_rows()
    # A fourth row z3 = (-1, 0) with no label (only -1 and 0 entries): in every A(i), never a positive.
    # s03 = -1, s13 = 0. Jaccard 1/2: l0 = 1/2 (log(1 + e + 1/e) - 0), l1 = 1/2 (log(1 + e + 1) - 0).
    z4 = torch.cat([z, torch.tensor([[-1.0, 0.0]], dtype=F64)])
    y4 = torch.cat([y, torch.tensor([[-1, 0, -1]])])
    rows = reference.multihot_supcon_loss(z4, y4, 1.0, threshold=0.5, reduction="none")
    l0, l1 = 0.5 * math.log(1 + math.e + math.exp(-1)), 0.5 * math.log(2 + math.e)
    assert torch.allclose(rows, _rows(l0, l1, 0.0, 0.0), rtol=1e-12, atol=0)
    # The same fourth row as a ref row: the three anchors' losses are the same; "mean" still over K = 2.
    rows_ref = reference.multihot_supcon_loss(z, y, 1.0, threshold=0.5, reduction="none", ref_features=z4[3:],
                                              ref_targets=y4[3:])  # fmt: skip
    assert torch.allclose(rows_ref, rows[:3], rtol=1e-12, atol=0)
    mean = reference.multihot_supcon_loss(z, y, 1.0, threshold=0.5, ref_features=z4[3:], ref_targets=y4[3:])
    assert mean.item() == pytest.approx((l0 + l1) / 2, rel=1e-12)


@pytest.mark.parametrize("positives", MULTIHOT_MODES)
def test_multihot_supcon_reference_edge_cases_have_zero_loss_and_finite_zero_grad(positives):
    for targets in (torch.zeros(4, 3, dtype=torch.long), torch.eye(4, 3).long(), torch.full((4, 3), -1)):
        z = torch.randn(4, 3, dtype=F64, requires_grad=True)
        loss = reference.multihot_supcon_loss(z, targets, 0.1, positives=positives, normalize=True)
        assert loss.item() == 0.0
        (g,) = _finite_grad(loss, z)
        assert torch.equal(g, torch.zeros_like(g))
    z = torch.randn(1, 3, dtype=F64, requires_grad=True)  # one row: nothing to contrast with
    loss = reference.multihot_supcon_loss(z, torch.ones(1, 3, dtype=torch.long), 0.1, positives=positives)
    assert loss.item() == 0.0 and torch.isfinite(_finite_grad(loss, z)[0]).all()
