"""multilabel_supcon_loss (SADCL's SSCL) on every fused backend (tests/utils.py: backend_table; the
interpreted Triton backend in small sizes) against reference.py."""

from __future__ import annotations

import pytest
import torch
from utils import (
    assert_close_by_norm,
    assert_matches,
    backends,
    cases,
    device_of,
    grads,
    loss_and_grads,
    make_targets,
)

import mlcontrast
from mlcontrast import reference

BACKENDS = [p.values[0] for p in backends(sizes="full")]


def check(backend, z, targets, temperature=0.2, base_temperature=None, legacy_sadcl=False):
    return assert_matches(
        lambda x: mlcontrast.multilabel_supcon_loss(
            x, targets, temperature, base_temperature, backend=backend, legacy_sadcl=legacy_sadcl
        ),
        lambda x: reference.multilabel_supcon_loss(x, targets, temperature, base_temperature, legacy_sadcl),
        [z],
        names=["features"],
    )


SHAPES = {
    "full": [((1, 1, 3),), ((2, 3, 1),), ((7, 5, 16),), ((4, 2, 3, 8),), ((5, 3, 7, 31),), ((32, 2, 20, 64),),
             ((3, 1, 2, 4),)],  # fmt: skip
    "small": [((5, 2, 4, 8),)],
}


@pytest.mark.parametrize("legacy_sadcl", [False, True])
@pytest.mark.parametrize("backend,shape,dtype", cases(SHAPES, dtypes=[torch.float32]))
def test_matches_reference(backend, shape, dtype, legacy_sadcl):
    dev = device_of(backend)
    z = torch.randn(*shape).to(dev)
    targets = make_targets(shape[0], shape[-2], p_positive=0.4).to(dev)
    check(backend, z, targets, legacy_sadcl=legacy_sadcl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows_cross_tiles(backend):
    # V * B * C = 2 * 40 * 20 = 1600 rows, about 640 of them positive.
    z = torch.randn(40, 2, 20, 32)
    check(backend, z, make_targets(40, 20, p_positive=0.4), temperature=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("legacy_sadcl", [False, True])
def test_fp64_matches_reference(backend, legacy_sadcl):
    z = torch.randn(6, 2, 4, 5, dtype=torch.float64)
    out, (g,) = check(backend, z, make_targets(6, 4, p_positive=0.5), 0.3, 0.5, legacy_sadcl)
    assert out.dtype == torch.float64 and g.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_legacy_anchor_mask_changes_the_loss(backend):
    # Row (v=1, b=0, c=0) is gated by targets[(1*2 + 0) // 2, 0] = targets[1, 0] = 0 in legacy mode.
    z = torch.randn(2, 2, 2, 8)
    targets = torch.tensor([[1, 1], [0, 1]])
    intended, _ = check(backend, z, targets, legacy_sadcl=False)
    legacy, _ = check(backend, z, targets, legacy_sadcl=True)
    assert legacy.item() < intended.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_legacy_equals_intended_with_one_view_and_full_rows(backend):
    # With V = 1 the gate is targets[b, c] itself: the quirk disappears.
    z = torch.randn(6, 5, 8)
    targets = make_targets(6, 5, p_positive=0.5)
    intended = mlcontrast.multilabel_supcon_loss(z, targets, backend=backend)
    legacy = mlcontrast.multilabel_supcon_loss(z, targets, backend=backend, legacy_sadcl=True)
    assert torch.equal(intended, legacy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_dim_features_equal_a_single_view(backend):
    z = torch.randn(5, 4, 6)
    targets = make_targets(5, 4, p_positive=0.5)
    a = mlcontrast.multilabel_supcon_loss(z, targets, backend=backend)
    b = mlcontrast.multilabel_supcon_loss(z.unsqueeze(1), targets, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_and_unknown_targets_take_no_part(backend):
    # Changing the features where the target is 0 or -1 changes neither the loss nor the gradient.
    z = torch.randn(6, 2, 5, 8)
    targets = make_targets(6, 5, p_positive=0.4, p_unknown=0.3)
    out, (g,) = check(backend, z, targets)
    inactive = (targets != 1)[:, None, :, None].expand_as(z)
    z2 = torch.where(inactive, torch.randn_like(z), z)
    out2, (g2,) = loss_and_grads(lambda x: mlcontrast.multilabel_supcon_loss(x, targets, backend=backend), [z2])
    assert_close_by_norm(out2, out, torch.float32)
    assert_close_by_norm(g2, g, torch.float32)
    assert torch.equal(g[inactive], torch.zeros_like(g[inactive]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("legacy_sadcl", [False, True])
@pytest.mark.parametrize("fill", [0, -1])
def test_no_positive_target_gives_zero_loss_and_zero_grad(backend, fill, legacy_sadcl):
    z = torch.randn(4, 2, 3, 5, requires_grad=True)
    out = mlcontrast.multilabel_supcon_loss(
        z, torch.full((4, 3), fill), backend=backend, legacy_sadcl=legacy_sadcl
    )
    assert out.item() == 0.0
    (g,) = grads(out, z)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_temperature(backend):
    z = torch.randn(16, 2, 10, 32)
    check(backend, z, make_targets(16, 10, p_positive=0.3), temperature=0.01, base_temperature=0.07)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_matches_fp32(backend, dtype):
    z = torch.randn(8, 2, 6, 32).to(dtype)
    out, (g,) = check(backend, z, make_targets(8, 6, p_positive=0.4))
    assert out.dtype == torch.float32 and g.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_features_and_targets(backend):
    base = torch.randn(2, 6, 4, 8)  # features = base.transpose(0, 1): [B=6, V=2, C=4, D=8]
    t_base = make_targets(4, 6, p_positive=0.5)  # targets = t_base.T
    check_fn = lambda x: mlcontrast.multilabel_supcon_loss(x.transpose(0, 1), t_base.T, backend=backend)  # noqa: E731
    ref_fn = lambda x: reference.multilabel_supcon_loss(x.transpose(0, 1), t_base.T, 0.2)  # noqa: E731
    assert_matches(check_fn, ref_fn, [base])


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets_are_accepted(backend):
    z = torch.randn(5, 3, 4)
    targets = make_targets(5, 3, p_positive=0.5, p_unknown=0.0)
    expected = mlcontrast.multilabel_supcon_loss(z, targets, backend=backend)
    assert torch.equal(mlcontrast.multilabel_supcon_loss(z, targets.int(), backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("legacy_sadcl", [False, True])
def test_module_matches_functional(backend, legacy_sadcl):
    z = torch.randn(4, 2, 3, 6)
    targets = make_targets(4, 3, p_positive=0.5)
    module = mlcontrast.MultiLabelSupConLoss(0.3, 0.5, backend=backend, legacy_sadcl=legacy_sadcl)
    a, (ga,) = loss_and_grads(lambda x: module(x, targets), [z])
    b, (gb,) = loss_and_grads(
        lambda x: mlcontrast.multilabel_supcon_loss(x, targets, 0.3, 0.5, backend=backend, legacy_sadcl=legacy_sadcl),
        [z],
    )
    assert torch.equal(a, b) and torch.equal(ga, gb)
