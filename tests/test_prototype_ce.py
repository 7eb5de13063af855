"""prototype_ce_loss: every fused CPU backend against reference.py."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close_by_norm, assert_matches, cpu_backends, grads, loss_and_grads, make_labels

import mlcontrast
from mlcontrast import reference

BACKENDS = cpu_backends()
NAMES = ["features", "prototypes"]


def check(backend, z, y, p, temperature=0.1):
    return assert_matches(
        lambda x, q: mlcontrast.prototype_ce_loss(x, y, q, temperature, backend=backend),
        lambda x, q: reference.prototype_ce_loss(x, y, q, temperature),
        [z, p],
        names=NAMES,
    )


# The CPU kernel processes rows in blocks of 256.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [1, 2, 5, 80])
@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (7, 64), (31, 127), (257, 3), (1031, 64)])
def test_matches_reference(backend, n, d, c):
    z, p = torch.randn(n, d), torch.randn(c, d)
    check(backend, z, make_labels(n, c, ignore_fraction=0.1), p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_feature_dimension(backend):
    z, p = torch.randn(300, 1024), torch.randn(20, 1024)
    check(backend, z, make_labels(300, 20), p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
def test_temperatures(backend, temperature):
    z, p = torch.randn(100, 16), torch.randn(7, 16)
    check(backend, z, make_labels(100, 7, ignore_fraction=0.2), p, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_matches_reference(backend):
    z, p = torch.randn(513, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    out, (gz, gp) = check(backend, z, make_labels(513, 6, ignore_fraction=0.1), p, 0.3)
    assert out.dtype == gz.dtype == gp.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_get_no_gradient(backend):
    z, p = torch.randn(260, 8), torch.randn(4, 8)
    y = make_labels(260, 4)
    y[1::2] = -1
    _, (gz, _) = check(backend, z, y, p)
    assert torch.equal(gz[1::2], torch.zeros_like(gz[1::2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 300])
def test_all_rows_ignored_gives_zero_loss_and_zero_grad(backend, n):
    z = torch.randn(n, 8, requires_grad=True)
    p = torch.randn(3, 8, requires_grad=True)
    out = mlcontrast.prototype_ce_loss(z, torch.full((n,), -1), p, backend=backend)
    assert out.dtype == torch.float32 and out.item() == 0.0
    gz, gp = grads(out, (z, p))
    assert torch.equal(gz, torch.zeros_like(gz)) and torch.equal(gp, torch.zeros_like(gp))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_matches_fp32(backend, dtype):
    z, p = torch.randn(300, 64).to(dtype), torch.randn(10, 64).to(dtype)
    out, (gz, gp) = check(backend, z, make_labels(300, 10, ignore_fraction=0.1), p)
    assert out.dtype == torch.float32 and gz.dtype == gp.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    z_base = torch.randn(32, 600)  # features = z_base.T[::2]: [300, 32]
    p_base = torch.randn(5, 64)  # prototypes = p_base[:, ::2]: [5, 32]
    y = make_labels(600, 5, ignore_fraction=0.1)[::2]
    assert_matches(
        lambda x, q: mlcontrast.prototype_ce_loss(x.T[::2], y, q[:, ::2], backend=backend),
        lambda x, q: reference.prototype_ce_loss(x.T[::2], y, q[:, ::2], 0.1),
        [z_base, p_base],
        names=NAMES,
    )


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_module_matches_functional(backend):
    z, p = torch.randn(20, 6), torch.randn(4, 6)
    y = make_labels(20, 4, ignore_fraction=0.1)
    module = mlcontrast.PrototypeCELoss(temperature=0.3, backend=backend)
    a, ga = loss_and_grads(lambda x, q: module(x, y, q), [z, p])
    b, gb = loss_and_grads(lambda x, q: mlcontrast.prototype_ce_loss(x, y, q, 0.3, backend=backend), [z, p])
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_norm_rows_and_prototypes(backend):
    # cos uses max(||x||, 1e-8): a zero row has cosine 0 with everything, and a finite gradient.
    z, p = torch.randn(6, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    z[2] = 0
    p[1] = 0
    check(backend, z, torch.tensor([0, 1, 2, 0, 1, 2]), p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "features_dtype,prototypes_dtype",
    [
        pytest.param(torch.float64, torch.float32, id="fp64-features-fp32-prototypes"),
        pytest.param(torch.float32, torch.float64, id="fp32-features-fp64-prototypes"),
    ],
)
def test_fp64_mixed_with_fp32_matches_reference_or_is_a_type_error(backend, features_dtype, prototypes_dtype):
    z, p = torch.randn(6, 4, dtype=features_dtype), torch.randn(3, 4, dtype=prototypes_dtype)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    try:
        got = mlcontrast.prototype_ce_loss(z, y, p, backend=backend)
    except TypeError as error:  # rejecting the mix up front is within the contract
        assert "features" in str(error) or "prototypes" in str(error)
        return
    expected = reference.prototype_ce_loss(z.double(), y, p.double())
    assert_close_by_norm(got, expected, torch.float32)
