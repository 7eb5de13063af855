"""supcon_loss: a drop-in for SupContrast's SupConLoss, on every fused backend (tests/utils.py:
backend_table; the interpreted Triton backend in small sizes)."""

from __future__ import annotations

import loops
import pytest
import torch
import torch.nn.functional as F
from utils import assert_close_by_norm, assert_matches, backends, cases, device_of, grads, loss_and_grads

import mlcontrast
from mlcontrast import reference

BACKENDS = [p.values[0] for p in backends(sizes="full")]


def supcontrast_supcon(features, labels=None, temperature=0.07, base_temperature=0.07, contrast_mode="all"):
    """SupConLoss.forward of HobbitLong/SupContrast (losses.py), written from its description.

    View-major rows torch.cat(torch.unbind(features, 1)); logits shifted by their (detached) row max;
    the anchor itself is masked out of the denominator (logits_mask); anchors without positives
    contribute 0; the mean runs over all anchors.
    """
    if features.dim() > 3:
        features = features.view(features.shape[0], features.shape[1], -1)
    batch_size = features.shape[0]
    if labels is None:
        mask = torch.eye(batch_size, dtype=features.dtype)
    else:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).to(features.dtype)
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor_feature, anchor_count = features[:, 0], 1
    else:
        anchor_feature, anchor_count = contrast_feature, contrast_count
    anchor_dot_contrast = torch.matmul(anchor_feature, contrast_feature.T) / temperature
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(
        torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0
    )
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, torch.ones_like(mask_pos_pairs), mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


def _unit(*shape, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("b,v,d", [(1, 2, 3), (2, 1, 1), (7, 2, 16), (31, 3, 64), (129, 2, 127), (300, 2, 32)])
def test_matches_supcontrast(backend, b, v, d, with_labels, contrast_mode):
    z = _unit(b, v, d)
    labels = torch.randint(0, 5, (b,)) if with_labels else None
    kw = dict(temperature=0.1, base_temperature=0.07, contrast_mode=contrast_mode)
    assert_matches(
        lambda x: mlcontrast.supcon_loss(x, labels, backend=backend, **kw),
        lambda x: supcontrast_supcon(x, labels, **kw),
        [z],
        names=["features"],
    )


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize(
    "backend,b,v,d,dtype", cases({"full": [(67, 3, 20)], "small": [(6, 2, 10)]}, dtypes=[torch.float32])
)
def test_matches_reference(backend, b, v, d, dtype, with_labels, contrast_mode):
    dev = device_of(backend)
    z = _unit(b, v, d).to(dev)
    labels = torch.randint(0, 9, (b,)).to(dev) if with_labels else None
    assert_matches(
        lambda x: mlcontrast.supcon_loss(x, labels, 0.2, 0.3, contrast_mode, backend=backend),
        lambda x: reference.supcon_loss(x, labels, 0.2, 0.3, contrast_mode),
        [z],
        names=["features"],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_hyper_parameters_match_supcontrast(backend):
    z = _unit(16, 2, 8)
    labels = torch.randint(0, 3, (16,))
    assert_matches(
        lambda x: mlcontrast.supcon_loss(x, labels, backend=backend),
        lambda x: supcontrast_supcon(x, labels),
        [z],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_and_arbitrary_labels_are_classes(backend):
    # SupContrast compares labels for equality only: -1 and -5 are ordinary classes, not "ignored".
    z = _unit(12, 2, 6)
    labels = torch.tensor([-1, -1, -5, 3, 3, -5, 10**9, -1, 0, 0, 7, -5])
    assert_matches(
        lambda x: mlcontrast.supcon_loss(x, labels, backend=backend),
        lambda x: supcontrast_supcon(x, labels),
        [z],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_features_beyond_three_dims_are_flattened(backend):
    z = torch.randn(6, 2, 4, 3) / 3
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    assert_matches(
        lambda x: mlcontrast.supcon_loss(x, labels, backend=backend),
        lambda x: supcontrast_supcon(x, labels),
        [z],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_matches_supcontrast(backend):
    z = _unit(40, 2, 9, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,))
    out, (g,) = assert_matches(
        lambda x: mlcontrast.supcon_loss(x, labels, 0.5, 0.5, backend=backend),
        lambda x: supcontrast_supcon(x, labels, 0.5, 0.5),
        [z],
    )
    assert out.dtype == torch.float64 and g.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_matches_fp32(backend, dtype):
    z = _unit(64, 2, 32, dtype=dtype)
    labels = torch.randint(0, 6, (64,))
    out, _ = assert_matches(
        lambda x: mlcontrast.supcon_loss(x, labels, backend=backend),
        lambda x: supcontrast_supcon(x, labels),
        [z],
    )
    assert out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_features(backend):
    base = _unit(2, 32, 8)  # features = base.transpose(0, 1): [B=32, V=2, D=8], not contiguous
    labels = torch.randint(0, 4, (32,))
    assert not base.transpose(0, 1).is_contiguous()
    assert_matches(
        lambda x: mlcontrast.supcon_loss(x.transpose(0, 1), labels, backend=backend),
        lambda x: supcontrast_supcon(x.transpose(0, 1), labels),
        [base],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_view_without_labels_has_no_positives(backend):
    z = _unit(5, 1, 4).requires_grad_()
    out = mlcontrast.supcon_loss(z, None, backend=backend)
    assert out.item() == 0.0
    (g,) = grads(out, z)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_module_matches_functional(backend, contrast_mode):
    z = _unit(10, 2, 5)
    labels = torch.randint(0, 3, (10,))
    module = mlcontrast.SupConLoss(temperature=0.2, contrast_mode=contrast_mode, base_temperature=0.1, backend=backend)
    a, (ga,) = loss_and_grads(lambda x: module(x, labels), [z])
    b, (gb,) = loss_and_grads(
        lambda x: mlcontrast.supcon_loss(x, labels, 0.2, 0.1, contrast_mode, backend=backend), [z]
    )
    assert torch.equal(a, b) and torch.equal(ga, gb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_all_distinct_equals_simclr(backend):
    z = _unit(9, 2, 4)
    simclr = mlcontrast.supcon_loss(z, None, backend=backend)
    distinct = mlcontrast.supcon_loss(z, torch.arange(9) * 3, backend=backend)
    assert_close_by_norm(simclr, distinct, torch.float32)


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_supcontrast_reimplementation_agrees_with_loops(with_labels, contrast_mode):
    z = _unit(6, 2, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2, 0, 5]) if with_labels else None
    assert_matches(
        lambda x: supcontrast_supcon(x, labels, 0.3, 0.2, contrast_mode),
        lambda x: loops.supcon(x, labels, 0.3, 0.2, contrast_mode),
        [z],
    )
