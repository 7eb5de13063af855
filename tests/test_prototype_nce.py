"""prototype_nce_loss (SADCL's PSCL) on every fused backend (tests/utils.py: backend_table) against
reference.py.

The backend is a parameter: the ``"full"`` backends run every size, the interpreted Triton backend the
small cases. The Triton backward's split over the samples closes the file, in its own section.
"""

from __future__ import annotations

import math

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
    record_launches,
    triton_module,
)

import mlcontrast
from mlcontrast import reference

BACKENDS = [p.values[0] for p in backends(sizes="full")]
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


# The interpreted Triton kernels tile by 16: C = 17 and D = 40 cross the tiles.
SIZES = {
    "full": [(b, c, d) for b, c in [(1, 1), (2, 3), (7, 5), (31, 20), (127, 3), (257, 7)] for d in [1, 3, 64, 127]],
    "small": [(1, 1, 1), (5, 3, 7), (9, 17, 40), (20, 5, 9)],
}


@pytest.mark.parametrize("backend,b,c,d,dtype", cases(SIZES))
def test_matches_reference(backend, b, c, d, dtype):
    dev = device_of(backend)
    z, p = torch.randn(b, c, d).to(dev, dtype), torch.randn(c, d).to(dev, dtype)
    t = _targets_with_a_positive(b, c).to(dev)
    if c > 1:
        t[:, 1] = 0  # a class with known rows but no positive
    out, _ = check(backend, z, p, t, temperature=0.1)
    assert out.dtype == torch.float32 and out.dim() == 0


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


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("fill", [0, -1])
def test_no_positive_at_all_gives_exactly_zero(backend, fill):
    dev = device_of(backend)
    z = torch.randn(6, 3, 4, device=dev, requires_grad=True)
    p = torch.randn(3, 4, device=dev, requires_grad=True)
    targets = make_targets(6, 3, p_positive=0.0, p_unknown=0.5) if fill == 0 else torch.full((6, 3), -1)
    out = mlcontrast.prototype_nce_loss(z, p, targets.to(dev), backend=backend)
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


# ----------------------------------------------------------------------------------------------
# The Triton backward's programs: splits over the samples
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [64, 512])
def test_prototype_nce_backward_fills_a_gpu(b, monkeypatch):
    # The backward's programs at a typical shape (C = 80, D = 256) with a GPU's configuration: one per
    # (class block, D chunk) would be 40 for 132 SMs, each serial over B; the splits over B make more.
    triton_prototype_nce = triton_module("prototype_nce")
    ops_utils = triton_module("utils")
    monkeypatch.setattr(triton_prototype_nce, "interpreting", lambda: False)
    monkeypatch.setattr(ops_utils, "interpreting", lambda: False)  # split_count's
    launched = record_launches(triton_prototype_nce, monkeypatch, run=False)
    z, p = torch.zeros(b, 80, 256), torch.ones(80, 256)
    t = torch.ones(b, 80, dtype=torch.long)
    stats, logits, norm = torch.zeros(2, 80), torch.zeros(b, 80), torch.ones(b, 80)
    triton_prototype_nce.prototype_nce_backward(torch.tensor(1.0), z, p, t, stats, logits, norm, 0.1)
    ((name, grid, kwargs),) = launched
    assert name == "_prototype_nce_bwd_kernel" and math.prod(grid) >= 4 * 132, grid
    assert grid[2] * kwargs["SAMPLES_PER_SPLIT"] >= b > (grid[2] - 1) * kwargs["SAMPLES_PER_SPLIT"]


@pytest.mark.parametrize("per_split", [1, 3, 4])  # B = 11: 11, 4 or 3 splits, the last one shorter
def test_prototype_nce_backward_splits_over_samples(per_split, monkeypatch):
    triton_prototype_nce = triton_module("prototype_nce")
    monkeypatch.setattr(
        triton_prototype_nce, "split_count", lambda blocks, *_, **__: (-(-blocks // per_split), per_split)
    )
    launched = record_launches(triton_prototype_nce, monkeypatch)
    dev = device_of("triton")
    z, p = torch.randn(11, 5, 20, device=dev), torch.randn(5, 20, device=dev)
    t = make_targets(11, 5).to(dev)
    t[0, 0] = 1
    assert_matches(
        lambda a, q: mlcontrast.prototype_nce_loss(a, q, t, 0.1, backend="triton"),
        lambda a, q: reference.prototype_nce_loss(a, q, t, 0.1),
        [z, p],
        names=["features", "prototypes"],
    )
    assert launched[-1][1][2] == -(-11 // per_split)  # the backward's splits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_triton_low_precision(dtype):
    p = torch.randn(80, 256, device="cuda").to(dtype)
    z3 = torch.randn(64, 80, 256, device="cuda").to(dtype)
    t = make_targets(64, 80).cuda()
    assert_matches(
        lambda a, b: mlcontrast.prototype_nce_loss(a, b, t, 0.07, backend="triton"),
        lambda a, b: reference.prototype_nce_loss(a, b, t, 0.07),
        [z3, p],
    )
