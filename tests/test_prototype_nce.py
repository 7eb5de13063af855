"""prototype_nce_loss (SADCL's PSCL): every fused CPU backend against reference.py."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close_by_norm, assert_matches, cpu_backends, grads, loss_and_grads, make_targets

import mlcontrast
from mlcontrast import reference

BACKENDS = cpu_backends()
NAMES = ["features", "prototypes"]


def check(backend, z, p, targets, temperature=0.07):
    return assert_matches(
        lambda x, q: mlcontrast.prototype_nce_loss(x, q, targets, temperature, backend=backend),
        lambda x, q: reference.prototype_nce_loss(x, q, targets, temperature),
        [z, p],
        names=NAMES,
    )


def _targets_with_a_positive(b, c, **kw):
    t = make_targets(b, c, **kw)
    t[0, 0] = 1
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 3, 64, 127])
@pytest.mark.parametrize("b,c", [(1, 1), (2, 3), (7, 5), (31, 20), (127, 3), (257, 7)])
def test_matches_reference(backend, b, c, d):
    z, p = torch.randn(b, c, d), torch.randn(c, d)
    check(backend, z, p, _targets_with_a_positive(b, c), temperature=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_feature_dimension(backend):
    z, p = torch.randn(64, 20, 1024), torch.randn(20, 1024)
    check(backend, z, p, _targets_with_a_positive(64, 20))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0])
def test_temperatures(backend, temperature):
    z, p = torch.randn(33, 6, 16), torch.randn(6, 16)
    check(backend, z, p, _targets_with_a_positive(33, 6), temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_matches_reference(backend):
    z, p = torch.randn(9, 4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    out, (gz, gp) = check(backend, z, p, _targets_with_a_positive(9, 4), temperature=0.2)
    assert out.dtype == gz.dtype == gp.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_targets_and_columns_without_positives(backend):
    z, p = torch.randn(10, 5, 8), torch.randn(5, 8)
    targets = make_targets(10, 5, p_positive=0.3, p_unknown=0.3)
    targets[:, 0] = 1  # column 0 all positive
    targets[:, 1] = torch.tensor([0, -1] * 5)  # column 1: no positive, known negatives
    targets[:, 2] = -1  # column 2: nothing known
    targets[:, 3] = torch.tensor([-1] * 9 + [1])  # column 3: one positive, nothing else known
    _, (gz, gp) = check(backend, z, p, targets)
    unknown = targets == -1
    assert torch.equal(gz[unknown], torch.zeros_like(gz[unknown])), "unknown entries get no gradient"
    assert torch.equal(gp[2], torch.zeros_like(gp[2])), "a class with nothing known gets no gradient"
    assert gp[1].abs().sum() > 0, "a class without positives still pushes its known rows away"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [0, -1])
def test_no_positive_at_all_gives_exactly_zero(backend, fill):
    z = torch.randn(6, 3, 4, requires_grad=True)
    p = torch.randn(3, 4, requires_grad=True)
    targets = make_targets(6, 3, p_positive=0.0, p_unknown=0.5) if fill == 0 else torch.full((6, 3), -1)
    out = mlcontrast.prototype_nce_loss(z, p, targets, backend=backend)
    assert out.dtype == torch.float32 and out.item() == 0.0
    gz, gp = grads(out, (z, p))
    assert torch.equal(gz, torch.zeros_like(gz)) and torch.equal(gp, torch.zeros_like(gp))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_matches_fp32(backend, dtype):
    z, p = torch.randn(32, 6, 64).to(dtype), torch.randn(6, 64).to(dtype)
    out, (gz, gp) = check(backend, z, p, _targets_with_a_positive(32, 6))
    assert out.dtype == torch.float32 and gz.dtype == gp.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_features_with_fp32_prototypes(backend):
    z, p = torch.randn(16, 4, 32).to(torch.float16), torch.randn(4, 32)
    out, (gz, gp) = check(backend, z, p, _targets_with_a_positive(16, 4))
    assert gz.dtype == torch.float16 and gp.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    z_base = torch.randn(5, 12, 16)  # features = z_base.transpose(0, 1)[:, :, ::2]: [B=12, C=5, D=8]
    p_base = torch.randn(8, 5)  # prototypes = p_base.T
    targets = _targets_with_a_positive(5, 12).T  # [12, 5], strided
    assert_matches(
        lambda x, q: mlcontrast.prototype_nce_loss(x.transpose(0, 1)[:, :, ::2], q.T, targets, backend=backend),
        lambda x, q: reference.prototype_nce_loss(x.transpose(0, 1)[:, :, ::2], q.T, targets, 0.07),
        [z_base, p_base],
        names=NAMES,
    )


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_module_matches_functional(backend):
    z, p = torch.randn(8, 3, 6), torch.randn(3, 6)
    targets = _targets_with_a_positive(8, 3)
    module = mlcontrast.PrototypeNCELoss(temperature=0.2, backend=backend)
    a, ga = loss_and_grads(lambda x, q: module(x, q, targets), [z, p])
    b, gb = loss_and_grads(lambda x, q: mlcontrast.prototype_nce_loss(x, q, targets, 0.2, backend=backend), [z, p])
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_norm_rows_and_prototypes(backend):
    # cos uses max(||x||, 1e-8): a zero row has cosine 0 with everything, and a finite gradient.
    z, p = torch.randn(3, 3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    z[1, 2] = 0
    p[0] = 0
    check(backend, z, p, torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "features_dtype,prototypes_dtype",
    [
        pytest.param(torch.float64, torch.float32, id="fp64-features-fp32-prototypes"),
        pytest.param(torch.float32, torch.float64, id="fp32-features-fp64-prototypes"),
    ],
)
def test_fp64_mixed_with_fp32_matches_reference_or_is_a_type_error(backend, features_dtype, prototypes_dtype):
    z, p = torch.randn(4, 3, 5, dtype=features_dtype), torch.randn(3, 5, dtype=prototypes_dtype)
    t = torch.tensor([[1, 0, 1], [0, 1, -1], [1, 1, 0], [0, 0, 1]])
    try:
        got = mlcontrast.prototype_nce_loss(z, p, t, backend=backend)
    except TypeError as error:  # rejecting the mix up front is within the contract
        assert "features" in str(error) or "prototypes" in str(error)
        return
    expected = reference.prototype_nce_loss(z.double(), p.double(), t)
    assert_close_by_norm(got, expected, torch.float32)
