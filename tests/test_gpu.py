"""CUDA backends against reference.py (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from utils import assert_matches, make_labels, make_targets  # noqa: E402

import mlcontrast  # noqa: E402
from mlcontrast import reference  # noqa: E402

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
BACKENDS = [b for b in mlcontrast.available_backends("cuda") if b != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n,d", [(1, 3), (7, 64), (257, 127), (1031, 128)])
def test_label_supcon(backend, n, d, reduction, dtype):
    z = torch.randn(n, d, device=CUDA).to(dtype)
    y = make_labels(n, max(1, n // 8), ignore_fraction=0.1, singleton=True).to(CUDA)
    upstream = torch.randn(n, dtype=torch.float64, device=CUDA) if reduction == "none" else None
    out, _ = assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, None, reduction, True, backend=backend),
        lambda x: reference.label_supcon_loss(x, y, 0.1, None, reduction, True),
        [z],
        upstream,
    )
    assert out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,c,d", [(1, 1, 3), (31, 20, 64), (257, 7, 127)])
def test_prototype_nce(backend, b, c, d, dtype):
    z, p = torch.randn(b, c, d, device=CUDA).to(dtype), torch.randn(c, d, device=CUDA).to(dtype)
    t = make_targets(b, c).to(CUDA)
    t[0, 0] = 1
    assert_matches(
        lambda x, q: mlcontrast.prototype_nce_loss(x, q, t, 0.07, backend=backend),
        lambda x, q: reference.prototype_nce_loss(x, q, t, 0.07),
        [z, p],
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,d", [(1, 1, 3), (257, 5, 64), (1031, 80, 127)])
def test_prototype_ce(backend, n, c, d, dtype):
    z, p = torch.randn(n, d, device=CUDA).to(dtype), torch.randn(c, d, device=CUDA).to(dtype)
    y = make_labels(n, c, ignore_fraction=0.1).to(CUDA)
    assert_matches(
        lambda x, q: mlcontrast.prototype_ce_loss(x, y, q, 0.1, backend=backend),
        lambda x, q: reference.prototype_ce_loss(x, y, q, 0.1),
        [z, p],
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_prototypes(backend, dtype):
    protos = torch.nn.functional.normalize(torch.randn(20, 64, device=CUDA), dim=1).to(dtype)
    z = torch.randn(300, 64, device=CUDA).to(dtype)
    y = make_labels(300, 20, ignore_fraction=0.1).to(CUDA)
    y[y == 3] = -1
    got = protos.clone()
    mlcontrast.update_prototypes_(got, z, y, 0.9, True, backend=backend)
    expected = reference.update_prototypes_(protos.clone(), z, y, 0.9, True)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(got[3], protos[3])
