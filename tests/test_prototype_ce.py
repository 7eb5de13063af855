"""prototype_ce_loss on every fused backend (tests/utils.py: backend_table) against reference.py.

The backend is a parameter: the ``"full"`` backends run every size, the interpreted Triton backend the
small cases. The Triton kernels' own checks (the traced backward, its barriers) are in
tests/test_triton_compile.py; its GPU-only case closes this file.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import (
    assert_close_by_norm,
    assert_matches,
    backends,
    cases,
    device_of,
    grads,
    loss_and_grads,
    make_labels,
)

import mlcontrast
from mlcontrast import reference
from mlcontrast.ops import registry

BACKENDS = [p.values[0] for p in backends(sizes="full")]
NAMES = ["features", "prototypes"]


def check(backend, z, y, p, temperature=0.1):
    return assert_matches(
        lambda x, q: mlcontrast.prototype_ce_loss(x, y, q, temperature, backend=backend),
        lambda x, q: reference.prototype_ce_loss(x, y, q, temperature),
        [z, p],
        names=NAMES,
    )


# The CPU kernel processes rows in blocks of 256; the interpreted Triton kernels tile by 16 (N = 33, 70
# and D = 40 cross the tiles, C = 17, 20 the class tiles).
SIZES = {
    "full": [(n, c, d) for n, d in [(1, 1), (2, 3), (7, 64), (31, 127), (257, 3), (1031, 64)] for c in [1, 2, 5, 80]],
    "small": [(1, 1, 1), (5, 3, 7), (33, 17, 40), (70, 20, 9)],
}


@pytest.mark.parametrize("backend,n,c,d,dtype", cases(SIZES))
def test_matches_reference(backend, n, c, d, dtype):
    dev = device_of(backend)
    z, p = torch.randn(n, d).to(dev, dtype), torch.randn(c, d).to(dev, dtype)
    check(backend, z, make_labels(n, c, ignore_fraction=0.1).to(dev), p)


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


@pytest.mark.parametrize("backend,n,dtype", cases({"full": [1, 300], "small": [6]}, dtypes=[torch.float32]))
def test_all_rows_ignored_gives_zero_loss_and_zero_grad(backend, n, dtype):
    dev = device_of(backend)
    z = torch.randn(n, 8, device=dev, requires_grad=True)
    p = torch.randn(3, 8, device=dev, requires_grad=True)
    out = mlcontrast.prototype_ce_loss(z, torch.full((n,), -1, device=dev), p, backend=backend)
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


@pytest.mark.parametrize("backend", backends())
def test_op_rows_and_ignored_rows(backend):
    # The op's per-row losses (the contract's first output) with per-row weights: ignored rows get 0 and
    # no gradient.
    dev = device_of(backend)
    z, p = torch.randn(10, 5, device=dev), torch.randn(4, 5, device=dev)
    y = torch.tensor([0, 1, 2, 3, -1, 0, -1, 1, 2, 3], device=dev)
    rows, (grad_z, _) = assert_matches(
        lambda a, b: registry.op("prototype_ce", backend)(a, y, b, 0.2)[0],
        lambda a, b: (
            F.cross_entropy(reference._unit(a) @ reference._unit(b).T / 0.2, y.clamp(min=0), reduction="none")
            * (y >= 0)
        ),
        [z, p],
        torch.rand(10, dtype=torch.float64, device=dev),
    )
    assert torch.all(rows[y < 0] == 0) and torch.all(grad_z[y < 0] == 0)


@pytest.mark.parametrize("d", [11, 40])  # Triton: one D chunk, or three (the scratch path of the dz kernel)
@pytest.mark.parametrize("backend", backends())
def test_zero_rows_and_deterministic(backend, d):
    dev = device_of(backend)
    z, p = torch.randn(40, d, device=dev), torch.randn(6, d, device=dev)
    z[3] = 0  # a zero row: its norm is clamped to eps
    y = torch.randint(0, 6, (40,)).to(dev)
    runs = []
    for _ in range(2):
        a, b = z.clone().requires_grad_(), p.clone().requires_grad_()
        mlcontrast.prototype_ce_loss(a, y, b, backend=backend).backward()
        runs.append((a.grad, b.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    check(backend, z, y, p)


# ----------------------------------------------------------------------------------------------
# Triton on a GPU only: 16-bit inputs at the targets' sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_triton_low_precision(dtype):
    z, p = torch.randn(2053, 256, device="cuda").to(dtype), torch.randn(80, 256, device="cuda").to(dtype)
    y = torch.randint(-1, 80, (2053,), device="cuda")
    assert_matches(
        lambda a, b: mlcontrast.prototype_ce_loss(a, y, b, 0.1, backend="triton"),
        lambda a, b: reference.prototype_ce_loss(a, y, b, 0.1),
        [z, p],
    )
