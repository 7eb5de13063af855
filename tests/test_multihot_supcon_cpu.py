"""The CPU kernel of the fused op ``torch.ops.mlcontrast.multihot_supcon`` (csrc/cpu/multihot_supcon.cpp) on
its own: every output (loss, lse, coef, count) against a dense computation, the gradient against
reference.py's, fp64 gradcheck across the kernel's tiles, and the cases its tiling and bit masks make
special. The public function on every backend: tests/test_multihot_supcon.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from utils import assert_close_by_norm, assert_matches, backend_table

from mlcontrast import reference

pytestmark = pytest.mark.skipif(backend_table()["cpu"].reason is not None, reason="extension not built")

MODES = ["jaccard", "any", "all", "mulsupcon"]
OP = torch.ops.mlcontrast


def make_multihot(r: int, c: int, per_row: float = 3.0, seed: int = 0) -> torch.Tensor:
    """``[r, c]`` uint8 label sets of about ``per_row`` labels, with rows without labels and duplicate sets."""
    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(r, c, generator=gen) < per_row / c).to(torch.uint8)
    y[:: max(3, r // 5)] = 0  # rows without labels
    if r > 4:
        y[1, :2] = 1
        y[1::5] = y[1].clone()  # a label set many rows share
    return y


def dense_stats(z, y, temperature, positives, threshold, start=0, stop=None):
    """(lse, coef, count), each ``[R]`` and 0 outside the anchors, from the R x R matrices in fp64."""
    z, y = z.double(), (y != 0).double()
    r = z.shape[0]
    stop = r if stop is None else stop
    eye = torch.eye(r, dtype=torch.bool)
    lse = (z @ z.T / temperature).masked_fill(eye, float("-inf")).logsumexp(1)
    size = y.sum(1)
    overlap = y @ y.T
    if positives == "mulsupcon":
        count = ((y > 0) & (y.sum(0) >= 2)).sum(1).double()
        coef = count
    else:
        union = size[:, None] + size[None, :] - overlap
        weight = torch.where(union > 0, overlap / union.clamp(min=1), 0.0)
        if positives == "jaccard":
            positive = (overlap > 0) & (weight >= threshold)
        elif positives == "any":
            positive, weight = overlap > 0, torch.ones_like(weight)
        else:
            positive = (overlap == size[:, None]) & (overlap == size[None, :]) & (size[:, None] > 0)
            weight = torch.ones_like(weight)
        positive &= ~eye
        count = positive.sum(1).double()
        coef = (weight * positive).sum(1) / count.clamp(min=1)
    outside = torch.ones(r, dtype=torch.bool)
    outside[start:stop] = False
    return tuple(t.masked_fill(outside, 0.0) for t in (lse, coef, count))


def reference_rows(z, y, temperature, base_temperature, positives, threshold, start=0, stop=None):
    """reference.py's losses of the anchors, as the op's ``[R]`` rows (0 outside the anchors)."""
    r = z.shape[0]
    stop = r if stop is None else stop
    rows, _ = reference.multihot_supcon_anchor_rows(
        z, y, temperature, base_temperature, positives, threshold, False, start, stop
    )
    return torch.cat([rows.new_zeros(start), rows, rows.new_zeros(r - stop)])


# R = 131 and 600 cross the kernel's row (128) and column (512) tiles; C = 70 and 130 take two and three
# mask words; anchors 50 .. 300 leave column tiles outside the anchors on both sides.
GRID = [(7, 5, 0, None), (131, 70, 0, None), (600, 130, 0, None), (600, 80, 50, 300), (131, 20, 125, 131)]


@pytest.mark.parametrize("positives", MODES)
@pytest.mark.parametrize("r,c,start,stop", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_match_dense(positives, r, c, start, stop, dtype):
    z = (torch.randn(r, 16, dtype=torch.float64) / 2).to(dtype)
    y = make_multihot(r, c, seed=r + c)
    t, tb, threshold = 0.2, 0.15, 0.3
    loss, lse, coef, count = OP.multihot_supcon(z, y, t, tb, positives, threshold, start, stop)
    for out in (loss, lse, coef, count):
        assert out.dtype == dtype and out.shape == (r,)
    e_lse, e_coef, e_count = dense_stats(z, y, t, positives, threshold, start, stop)
    assert torch.equal(count.double(), e_count), "positive counts are exact"
    assert count.sum() > 0, "the case has positives"
    assert_close_by_norm(coef, e_coef, dtype, "coef")
    assert_close_by_norm(lse, e_lse, dtype, "lse")
    assert_close_by_norm(loss, reference_rows(z.double(), y, t, tb, positives, threshold, start, stop), dtype, "loss")


@pytest.mark.parametrize("positives", MODES)
@pytest.mark.parametrize("r,c,start,stop", GRID[1:])
def test_gradient_matches_reference(positives, r, c, start, stop):
    y = make_multihot(r, c, seed=r)
    z = torch.randn(r, 16) / 2
    upstream = torch.randn(r, dtype=torch.float64)
    args = (0.2, 0.15, positives, 0.3, start, stop)
    assert_matches(
        lambda x: OP.multihot_supcon(x, y, *args)[0],
        lambda x: reference_rows(x, y, *args),
        [z],
        upstream,
        names=["features"],
    )


@pytest.mark.parametrize("positives", MODES)
def test_gradcheck_across_row_tiles(positives):
    z = torch.randn(130, 2, dtype=torch.float64, requires_grad=True)  # two row tiles
    y = make_multihot(130, 6, per_row=1.5)
    assert gradcheck(lambda x: OP.multihot_supcon(x, y, 0.5, 0.4, positives, 0.5, 3, 129)[0], (z,), fast_mode=True)


@pytest.mark.parametrize("positives", MODES)
def test_one_hot_targets_give_label_supcon(positives):
    # One label per row: every mode's positives are the row's class, with weight 1.
    labels = torch.randint(0, 9, (200,))
    y = torch.nn.functional.one_hot(labels, 9).to(torch.uint8)
    z = torch.randn(200, 8, dtype=torch.float64, requires_grad=True)
    rows = OP.multihot_supcon(z, y, 0.3, 0.2, positives, 1.0, 10, 150)[0]
    expected = OP.label_supcon(z, labels, 0.3, 0.2, 10, 150)[0]
    assert_close_by_norm(rows, expected, torch.float64, "loss")
    upstream = torch.randn(200, dtype=torch.float64)
    (grad,) = torch.autograd.grad(rows, z, upstream)
    (expected_grad,) = torch.autograd.grad(expected, z, upstream)
    assert_close_by_norm(grad, expected_grad, torch.float64, "grad")


def test_jaccard_threshold_is_inclusive():
    # Rows 0 and 1 overlap in 1 of 3 labels: a positive at threshold 1/3, not just above it.
    y = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.uint8)
    z = torch.randn(2, 4)
    assert OP.multihot_supcon(z, y, 0.1, 0.1, "jaccard", 1 / 3)[3].tolist() == [1.0, 1.0]
    assert OP.multihot_supcon(z, y, 0.1, 0.1, "jaccard", 0.34)[3].tolist() == [0.0, 0.0]


def test_single_row_and_empty_anchors():
    z, y = torch.randn(1, 3, requires_grad=True), torch.ones(1, 4, dtype=torch.uint8)
    for positives in MODES:
        loss, lse, coef, count = OP.multihot_supcon(z, y, 0.1, 0.1, positives, 0.5)
        assert lse.item() == float("-inf") and loss.item() == 0 and count.item() == 0
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert torch.equal(grad, torch.zeros_like(z))
    z, y = torch.randn(6, 3, requires_grad=True), make_multihot(6, 4)
    outputs = OP.multihot_supcon(z, y, 0.1, 0.1, "any", 0.5, 3, 3)
    assert all(torch.equal(t, torch.zeros(6)) for t in outputs)
    (grad,) = torch.autograd.grad(outputs[0].sum(), z)
    assert torch.equal(grad, torch.zeros_like(z))


def test_rows_without_labels_have_no_loss_but_stay_in_the_lse():
    z, y = torch.randn(9, 4, dtype=torch.float64), make_multihot(9, 6)
    y[2:] = 0
    for positives in MODES:
        loss, lse, coef, count = OP.multihot_supcon(z, y, 0.5, 0.5, positives, 0.5)
        assert torch.all(loss[2:] == 0) and torch.all(count[2:] == 0)
        assert_close_by_norm(lse, dense_stats(z, y, 0.5, positives, 0.5)[0], torch.float64, "lse")


def test_half_and_strided_inputs():
    base = torch.randn(16, 40)
    z = base.t().to(torch.float16)  # [40, 16], transposed
    y = make_multihot(80, 12)[::2]  # every other row
    rows = OP.multihot_supcon(z, y, 0.2, 0.2, "jaccard", 0.3)
    assert all(t.dtype == torch.float32 for t in rows)
    expected = OP.multihot_supcon(z.float().contiguous(), y.contiguous(), 0.2, 0.2, "jaccard", 0.3)
    for a, e in zip(rows, expected):
        assert torch.equal(a, e)
    grad = OP.multihot_supcon_backward(torch.ones(40), z, y, *rows[1:], 0.2, 0.2, "jaccard", 0.3)
    assert grad.dtype == torch.float16 and grad.is_contiguous() and grad.shape == z.shape


@pytest.mark.parametrize("threads", [1, 3])
def test_results_do_not_depend_on_threads(threads):
    z, y = torch.randn(700, 8, dtype=torch.float64, requires_grad=True), make_multihot(700, 30)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        loss, *stats = OP.multihot_supcon(z, y, 0.2, 0.2, "jaccard", 0.3)
        (grad,) = torch.autograd.grad(loss.sum(), z)
    finally:
        torch.set_num_threads(before)
    e_loss, *e_stats = OP.multihot_supcon(z, y, 0.2, 0.2, "jaccard", 0.3)
    (e_grad,) = torch.autograd.grad(e_loss.sum(), z)
    for a, e in zip((loss, *stats, grad), (e_loss, *e_stats, e_grad)):
        assert_close_by_norm(a, e, torch.float64)


def test_bad_arguments_raise():
    z, y = torch.randn(4, 3), torch.ones(4, 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="positives must be one of"):
        OP.multihot_supcon(z, y, 0.1, 0.1, "some", 0.5)
    with pytest.raises(RuntimeError, match="threshold must lie in"):
        OP.multihot_supcon(z, y, 0.1, 0.1, "jaccard", 0.0)
    with pytest.raises(RuntimeError, match="targets must be uint8"):
        OP.multihot_supcon(z, y.long(), 0.1, 0.1, "any", 0.5)
    with pytest.raises(RuntimeError, match="targets must have R = 4 rows"):
        OP.multihot_supcon(z, y[:3], 0.1, 0.1, "any", 0.5)
    with pytest.raises(RuntimeError, match="anchor rows"):
        OP.multihot_supcon(z, y, 0.1, 0.1, "any", 0.5, 3, 5)
    with pytest.raises(RuntimeError, match="coef"):
        OP.multihot_supcon_backward(torch.ones(4), z, y, torch.zeros(4), torch.zeros(3), torch.zeros(4), 0.1, 0.1,
                                    "any", 0.5)  # fmt: skip


@pytest.mark.parametrize("positives", MODES)
def test_opcheck_on_two_mask_words_and_anchors(positives):
    z, y = torch.randn(131, 5, dtype=torch.float64, requires_grad=True), make_multihot(131, 70)
    args = (z, y, 0.3, 0.2, positives, 0.25, 20, 120)
    torch.library.opcheck(OP.multihot_supcon.default, args)
    outputs = OP.multihot_supcon(*args)
    backward_args = (torch.randn(131, dtype=torch.float64), z.detach(), y, *outputs[1:], *args[2:])
    torch.library.opcheck(OP.multihot_supcon_backward.default, backward_args)
