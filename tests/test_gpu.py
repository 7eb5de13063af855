"""CUDA backends against reference.py (skipped without a GPU).

The first tests run every CUDA-capable backend ("cuda", "triton") on the same cases; the section
"The CUDA C++ backend in detail" then covers backend "cuda" (csrc/cuda): odd sizes, edge cases,
N = 20000, TF32, agreement with "triton", opcheck, fp64 gradcheck, bitwise determinism and
compute-sanitizer (memcheck, racecheck, synccheck, initcheck) when its binary is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from utils import assert_close_by_norm, assert_matches, loss_and_grads, make_labels, make_targets  # noqa: E402

import mlcontrast  # noqa: E402
from mlcontrast import _backends, functional, reference  # noqa: E402
from mlcontrast.ops import registry  # noqa: E402

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
@pytest.mark.parametrize("n,anchors", [(1031, (300, 517)), (4099, (0, 1025)), (257, (200, 257)), (64, (5, 5))])
def test_label_supcon_anchor_rows(backend, n, anchors, dtype):
    # A process group's rows: only the anchors get a loss, against all rows.
    start, stop = anchors
    z = torch.randn(n, 96, device=CUDA).to(dtype)
    y = make_labels(n, max(1, n // 8), ignore_fraction=0.1, singleton=True).to(CUDA)
    assert_matches(
        lambda x: functional._anchor_losses(backend, x, y, 0.1, 0.1, True, anchors),
        lambda x: reference.label_supcon_loss(x, y, 0.1, None, "none", True)[start:stop],
        [z],
        torch.randn(stop - start, dtype=torch.float64, device=CUDA),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ref_grad", [False, True])
@pytest.mark.parametrize("n,m", [(512, 4099), (131, 1031), (1, 65)])
def test_label_supcon_ref_rows(backend, n, m, ref_grad, dtype):
    # A batch against a queue (DESIGN.md §10): the ref rows' own gradient only when they require grad.
    z, q = torch.randn(n, 128, device=CUDA).to(dtype), torch.randn(m, 128, device=CUDA).to(dtype)
    y, yq = make_labels(n, 20, singleton=True).to(CUDA), make_labels(m, 20, ignore_fraction=0.2).to(CUDA)
    if ref_grad:
        assert_matches(
            lambda x, r: mlcontrast.label_supcon_loss(x, y, 0.1, normalize=True, backend=backend, ref_features=r,
                                                      ref_labels=yq),
            lambda x, r: reference.label_supcon_loss(x, y, 0.1, None, "mean", True, r, yq),
            [z, q],
        )  # fmt: skip
    else:
        assert_matches(
            lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, normalize=True, backend=backend, ref_features=q,
                                                   ref_labels=yq),
            lambda x: reference.label_supcon_loss(x, y, 0.1, None, "mean", True, q.float(), yq),
            [z],
        )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "r,roles",
    [(4608, (0, 512, 512, 0)), (4608, (0, 512, 0, 0)), (1031, (100, 900, 300, 700)), (300, (0, 64, 300, None))],
)
def test_label_supcon_roles(backend, r, roles, dtype):
    # The op's contrast_start / grad_stop (PML's CrossBatchMemory shapes, straddling ranges, no contrast rows)
    # against the dense definition, whose rows past grad_stop are contrasted detached.
    start, stop, contrast_start, grad_stop = roles
    z = F.normalize(torch.randn(r, 128, device=CUDA), dim=1).to(dtype)
    y = make_labels(r, 40, ignore_fraction=0.1).to(CUDA)
    op = registry.op("label_supcon", backend)
    assert_matches(
        lambda x: op(x, y, 0.1, 0.1, *roles)[0][start:stop],
        lambda x: reference.label_supcon_anchor_rows(x, y, 0.1, 0.1, False, *roles),
        [z],
        torch.randn(stop - start, dtype=torch.float64, device=CUDA),
    )


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


def _multihot(n: int, c: int) -> torch.Tensor:
    """``[n, c]`` uint8 label sets of about 3 labels, rows 0 and n // 2 without labels, row 2 row 1's."""
    targets = (torch.rand(n, c) < min(0.5, 3 / c)).to(torch.uint8)
    targets[0] = targets[n // 2] = 0
    if n > 2:
        targets[2] = targets[1]
    return targets.to(CUDA)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("positives", ["jaccard", "any", "all", "mulsupcon"])
@pytest.mark.parametrize("n,c,d", [(1, 5, 3), (131, 80, 17), (1031, 300, 128)])
def test_multihot_supcon(backend, n, c, d, positives, dtype):
    # C = 80: the CUDA pair kernels' staged label masks; C = 300: masks read from global memory.
    t = _multihot(n, c)
    kw = dict(temperature=0.1, base_temperature=0.07, positives=positives, threshold=1 / 3, reduction="none")
    assert_matches(
        lambda x: mlcontrast.multihot_supcon_loss(x, t, **kw, normalize=True, backend=backend),
        lambda x: reference.multihot_supcon_loss(x, t, **kw, normalize=True),
        [torch.randn(n, d, device=CUDA).to(dtype)],
        torch.randn(n, dtype=torch.float64, device=CUDA),
    )


# ----------------------------------------------------------------------------------------------
# The CUDA C++ backend (csrc/cuda) in detail
# ----------------------------------------------------------------------------------------------

CUDA_REASON = _backends.why_unavailable("cuda", CUDA)
needs_cuda_backend = pytest.mark.skipif(CUDA_REASON is not None, reason=f'backend "cuda": {CUDA_REASON}')
needs_triton = pytest.mark.skipif(
    "triton" not in mlcontrast.available_backends("cuda"), reason='backend "triton" is unavailable'
)
OPS = torch.ops.mlcontrast


def _unit_rows(n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    # Unit rows rounded to `dtype`, for calls with normalize=False (the kernels see `dtype` either way).
    return F.normalize(torch.randn(n, d, device=CUDA), dim=1).to(dtype)


class _TF32:
    """Context: torch's TF32 switch for matmuls, which the CUDA label_supcon kernels follow."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.enabled

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 3, 65, 256])
@pytest.mark.parametrize("n", [1, 7, 129, 1031])
def test_cuda_label_supcon_sizes(n, d, dtype):
    z = _unit_rows(n, d, dtype)
    y = make_labels(n, max(1, n // 8), ignore_fraction=0.1, singleton=True).to(CUDA)
    upstream = torch.randn(n, dtype=torch.float64, device=CUDA)
    out, _ = assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, 0.07, "none", backend="cuda"),
        lambda x: reference.label_supcon_loss(x, y, 0.1, 0.07, "none"),
        [z],
        upstream,
    )
    assert out.dtype == torch.float32


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n,d", [(7, 3), (200, 65), (1031, 256)])
def test_cuda_label_supcon_unnormalised_and_fp64(n, d, dtype):
    # Large logits (|s| up to ~100) and the fp64 SIMT path, at fp32 / fp64 tolerances.
    z = (0.5 * torch.randn(n, d, device=CUDA)).to(dtype)
    y = make_labels(n, max(1, n // 10), ignore_fraction=0.2, singleton=True).to(CUDA)
    for reduction in ("mean", "sum"):
        assert_matches(
            lambda x: mlcontrast.label_supcon_loss(x, y, 0.2, None, reduction, backend="cuda"),
            lambda x: reference.label_supcon_loss(x, y, 0.2, None, reduction),
            [z],
        )


_EDGE_LABELS = {
    "all_ignored": lambda n: torch.full((n,), -1),
    "no_positives": lambda n: torch.arange(n),
    "one_valid_row": lambda n: torch.tensor([-1] * (n - 1) + [4]),
    "two_valid_rows": lambda n: torch.tensor([3] + [-1] * (n - 2) + [3]),
    "one_class": lambda n: torch.zeros(n, dtype=torch.long),
    "huge_ids": lambda n: torch.randint(0, 3, (n,)) * 10**12 - (torch.rand(n) < 0.3).long() * (10**12 + 1),
}


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", sorted(_EDGE_LABELS))
def test_cuda_label_supcon_edge_cases(case, dtype):
    n, d = 70, 33
    y = _EDGE_LABELS[case](n).clamp(min=-1).to(CUDA)
    z = _unit_rows(n, d, dtype)
    for reduction in ("mean", "none"):
        upstream = torch.randn(n, dtype=torch.float64, device=CUDA) if reduction == "none" else None
        out, grads = assert_matches(
            lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, None, reduction, backend="cuda"),
            lambda x: reference.label_supcon_loss(x, y, 0.1, None, reduction),
            [z],
            upstream,
        )
        if case in ("all_ignored", "no_positives", "one_valid_row"):
            assert not out.any() and not grads[0].any()


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_label_supcon_large(dtype):
    n, d = 20000, 128
    z = _unit_rows(n, d, dtype)
    y = make_labels(n, 80, ignore_fraction=0.1, singleton=True).to(CUDA)
    assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, backend="cuda"),
        lambda x: reference.label_supcon_loss(x, y, 0.1),
        [z],
    )
    torch.cuda.empty_cache()


@needs_cuda_backend
@pytest.mark.parametrize("n,d", [(129, 65), (3001, 256)])
def test_cuda_label_supcon_tf32(n, d):
    z = _unit_rows(n, d, torch.float32)
    y = make_labels(n, 20, ignore_fraction=0.1).to(CUDA)
    with _TF32(False):
        ieee, ieee_grads = loss_and_grads(lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, backend="cuda"), [z])
    with _TF32(True):
        tf32, tf32_grads = loss_and_grads(lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, backend="cuda"), [z])
    expected, expected_grads = loss_and_grads(lambda x: reference.label_supcon_loss(x, y, 0.1), [z.double()])
    # TF32 keeps 10 mantissa bits, like fp16: hold it to the fp16 tolerance.
    assert_close_by_norm(tf32, expected, torch.float16, "TF32 loss")
    assert_close_by_norm(tf32_grads[0], expected_grads[0], torch.float16, "TF32 grad")
    assert_close_by_norm(ieee_grads[0], expected_grads[0], torch.float32, "fp32 grad")
    # The switch is honoured: the TF32 tensor-core path does not give the fp32 bits.
    assert not torch.equal(tf32_grads[0], ieee_grads[0])


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
# (64, 80, 256): the target shape, its prototype gradient split over B (6 runs of <= 11 samples).
@pytest.mark.parametrize("b,c,d", [(1, 1, 1), (7, 3, 65), (129, 20, 256), (1031, 7, 3), (64, 80, 256)])
def test_cuda_prototype_nce_sizes(b, c, d, dtype):
    z, p = torch.randn(b, c, d, device=CUDA).to(dtype), torch.randn(c, d, device=CUDA).to(dtype)
    t = make_targets(b, c).to(CUDA)
    t[0, 0] = 1
    if c > 1:
        t[:, 1] = torch.where(t[:, 1] == 1, 0, t[:, 1])  # a class without positives
    assert_matches(
        lambda x, q: mlcontrast.prototype_nce_loss(x, q, t, 0.07, backend="cuda"),
        lambda x, q: reference.prototype_nce_loss(x, q, t, 0.07),
        [z, p],
    )


@needs_cuda_backend
@pytest.mark.parametrize("case", ["no_positive", "all_unknown", "zero_rows"])
def test_cuda_prototype_nce_edge_cases(case):
    b, c, d = 9, 4, 17
    z, p = torch.randn(b, c, d, device=CUDA), torch.randn(c, d, device=CUDA)
    t = make_targets(b, c).to(CUDA)
    if case == "no_positive":
        t[t == 1] = 0
    elif case == "all_unknown":
        t.fill_(-1)
    else:
        z[0].zero_()  # rows of zero norm: the eps clamp, and no radial gradient
    assert_matches(
        lambda x, q: mlcontrast.prototype_nce_loss(x, q, t, 0.1, backend="cuda"),
        lambda x, q: reference.prototype_nce_loss(x, q, t, 0.1),
        [z, p],
    )


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("n,c,d", [(1, 1, 1), (7, 3, 3), (129, 80, 65), (1031, 5, 256)])
def test_cuda_prototype_ce_sizes(n, c, d, dtype):
    z, p = torch.randn(n, d, device=CUDA).to(dtype), torch.randn(c, d, device=CUDA).to(dtype)
    y = make_labels(n, c, ignore_fraction=0.2).to(CUDA)
    assert_matches(
        lambda x, q: mlcontrast.prototype_ce_loss(x, y, q, 0.1, backend="cuda"),
        lambda x, q: reference.prototype_ce_loss(x, y, q, 0.1),
        [z, p],
    )


@needs_cuda_backend
def test_cuda_prototype_ce_all_ignored_and_bad_label():
    z, p = torch.randn(5, 8, device=CUDA, requires_grad=True), torch.randn(3, 8, device=CUDA)
    y = torch.full((5,), -1, device=CUDA)
    loss = mlcontrast.prototype_ce_loss(z, y, p, backend="cuda")
    loss.backward()
    assert loss.item() == 0 and not z.grad.any()
    with pytest.raises(RuntimeError, match="labels must be < C"):
        OPS.prototype_ce(z.detach(), torch.tensor([0, 1, 2, 3, 0], device=CUDA), p, 0.1)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n,c,d", [(1, 1, 1), (300, 20, 64), (1031, 7, 257)])
def test_cuda_update_prototypes(n, c, d, normalize, dtype):
    protos = F.normalize(torch.randn(c, d, device=CUDA), dim=1).to(dtype)
    z = torch.randn(n, d, device=CUDA).to(dtype)
    y = make_labels(n, c, ignore_fraction=0.1).to(CUDA)
    y[y == c - 1] = -1  # an absent class
    got = protos.clone()
    mlcontrast.update_prototypes_(got, z, y, 0.9, normalize, backend="cuda")
    expected = reference.update_prototypes_(protos.clone(), z, y, 0.9, normalize)
    assert_close_by_norm(got, expected, dtype, "prototypes")
    assert torch.equal(got[c - 1], protos[c - 1])  # absent: bit-for-bit unchanged


@needs_cuda_backend
def test_cuda_update_prototypes_checks_before_writing():
    protos = torch.randn(4, 6, device=CUDA)
    before = protos.clone()
    with pytest.raises(RuntimeError, match="labels must be < C"):
        OPS.update_prototypes_(protos, torch.randn(3, 6, device=CUDA), torch.tensor([0, 4, 1], device=CUDA), 0.9, True)
    assert torch.equal(protos, before)
    mlcontrast.update_prototypes_(protos, torch.randn(3, 6, device=CUDA), torch.full((3,), -1, device=CUDA))
    assert torch.equal(protos, before)


@needs_cuda_backend
@pytest.mark.parametrize("positives", ["jaccard", "mulsupcon"])
@pytest.mark.parametrize("n,anchors", [(200, (70, 135)), (300, (0, 64)), (300, (250, 300)), (40, (17, 17))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cuda_multihot_supcon_anchor_rows(n, anchors, positives, dtype):
    start, stop = anchors
    t = _multihot(n, 13)
    assert_matches(
        lambda x: OPS.multihot_supcon(x, t, 0.1, 0.07, positives, 0.5, start, stop)[0][start:stop],
        lambda x: reference.multihot_supcon_anchor_rows(x, t, 0.1, 0.07, positives, 0.5, False, start, stop)[0],
        [_unit_rows(n, 33, dtype)],
        torch.randn(stop - start, dtype=torch.float64, device=CUDA),
    )


@needs_cuda_backend
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_triton(dtype):
    n, c, d = 2053, 40, 130
    z = _unit_rows(n, d, dtype)
    y = make_labels(n, c, ignore_fraction=0.1, singleton=True).to(CUDA)
    upstream = torch.randn(n, dtype=torch.float64, device=CUDA)
    pairs = [
        (lambda b: lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, None, "none", backend=b), [z], upstream),
    ]
    p = torch.randn(c, d, device=CUDA).to(dtype)
    y_ce = y.clamp(max=c - 1)
    pairs.append((lambda b: lambda x, q: mlcontrast.prototype_ce_loss(x, y_ce, q, 0.1, backend=b), [z, p], None))
    z3, t = torch.randn(64, c, d, device=CUDA).to(dtype), make_targets(64, c).to(CUDA)
    pairs.append((lambda b: lambda x, q: mlcontrast.prototype_nce_loss(x, q, t, 0.07, backend=b), [z3, p], None))
    t_multihot = _multihot(n, c)
    pairs.append((lambda b: lambda x: mlcontrast.multihot_supcon_loss(x, t_multihot, backend=b), [z], None))
    for make, tensors, up in pairs:
        out_cuda, g_cuda = loss_and_grads(make("cuda"), tensors, up)
        out_triton, g_triton = loss_and_grads(make("triton"), tensors, up)
        assert_close_by_norm(out_cuda, out_triton, dtype, "loss, cuda vs triton")
        for a, e in zip(g_cuda, g_triton):
            assert_close_by_norm(a, e, dtype, "grad, cuda vs triton")
    protos = F.normalize(p.float(), dim=1).to(dtype)
    by_cuda, by_triton = protos.clone(), protos.clone()
    mlcontrast.update_prototypes_(by_cuda, z, y_ce, 0.9, True, backend="cuda")
    mlcontrast.update_prototypes_(by_triton, z, y_ce, 0.9, True, backend="triton")
    assert_close_by_norm(by_cuda, by_triton, dtype, "prototypes, cuda vs triton")


@needs_cuda_backend
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_cuda_opcheck(dtype, requires_grad):
    def f(*shape):
        return torch.randn(*shape, device=CUDA, dtype=dtype).requires_grad_(requires_grad)

    y = torch.tensor([0, 0, 1, 1, 2, -1, 0, 3, 1, -1, 2], device=CUDA)
    z = f(11, 5)
    torch.library.opcheck(OPS.label_supcon.default, (z, y, 0.2, 0.3))
    p = f(4, 5)
    torch.library.opcheck(OPS.prototype_ce.default, (z, y, p, 0.1))
    zb, pb = f(5, 3, 4), f(3, 4)
    t = torch.tensor([[1, 0, -1], [0, 1, -1], [1, -1, 0], [0, 0, -1], [-1, 1, 0]], device=CUDA)
    torch.library.opcheck(OPS.prototype_nce.default, (zb, pb, t, 0.1))
    if not requires_grad:
        torch.library.opcheck(OPS.update_prototypes_.default, (f(4, 5), f(11, 5), y, 0.9, True))
        rows, lse, n_pos = OPS.label_supcon(z, y, 0.5, 0.5)
        torch.library.opcheck(
            OPS.label_supcon_backward.default, (torch.randn_like(rows), z, y, lse, n_pos, 0.5, 0.5)
        )
        rows, lse, norm = OPS.prototype_ce(z, y, p, 0.5)
        torch.library.opcheck(OPS.prototype_ce_backward.default, (torch.randn_like(rows), z, y, p, lse, norm, 0.5))
        loss, *saved = OPS.prototype_nce(zb, pb, t, 0.5)
        torch.library.opcheck(OPS.prototype_nce_backward.default, (torch.ones_like(loss), zb, pb, t, *saved, 0.5))
    tm = (y[:, None] == torch.arange(4, device=CUDA)).to(torch.uint8)  # one label, none for -1
    for positives in ("jaccard", "mulsupcon"):
        args = (0.2, 0.3, positives, 0.5)
        torch.library.opcheck(OPS.multihot_supcon.default, (z, tm, *args))
        if not requires_grad:
            rows, *saved = OPS.multihot_supcon(z, tm, *args)
            torch.library.opcheck(OPS.multihot_supcon_backward.default, (torch.randn_like(rows), z, tm, *saved, *args))


@needs_cuda_backend
def test_cuda_gradcheck_fp64():
    y = torch.tensor([0, 0, 1, 1, -1, 2, 2, 0, 5], device=CUDA)
    z = torch.randn(9, 4, dtype=torch.float64, device=CUDA, requires_grad=True)
    p = torch.randn(6, 4, dtype=torch.float64, device=CUDA, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.5, 0.3, "none", normalize=True, backend="cuda"), (z,)
    )
    torch.autograd.gradcheck(lambda x, q: mlcontrast.prototype_ce_loss(x, y, q, 0.5, backend="cuda"), (z, p))
    zb = torch.randn(5, 3, 4, dtype=torch.float64, device=CUDA, requires_grad=True)
    pb = torch.randn(3, 4, dtype=torch.float64, device=CUDA, requires_grad=True)
    t = torch.tensor([[1, 0, -1], [0, 1, -1], [1, -1, 0], [0, 0, -1], [-1, 1, 0]], device=CUDA)
    torch.autograd.gradcheck(lambda x, q: mlcontrast.prototype_nce_loss(x, q, t, 0.5, backend="cuda"), (zb, pb))
    tm = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 1, 0], [0, 1, 1], [1, 1, 1], [1, 0, 1],
                       [0, 1, 0]], device=CUDA, dtype=torch.uint8)  # fmt: skip
    for positives in ("jaccard", "any", "all", "mulsupcon"):
        torch.autograd.gradcheck(
            lambda x: mlcontrast.multihot_supcon_loss(x, tm, 0.5, 0.3, positives, 0.5, "none", True, backend="cuda"),
            (z,),
        )


@needs_cuda_backend
@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_results_are_bitwise_deterministic(dtype, tf32):
    n, c, d = 3001, 80, 130
    z = _unit_rows(n, d, dtype)
    y = make_labels(n, c, ignore_fraction=0.1, singleton=True).to(CUDA)
    p = torch.randn(c, d, device=CUDA).to(dtype)
    y_ce = y.clamp(max=c - 1)
    z3, t = torch.randn(64, c, d, device=CUDA).to(dtype), make_targets(64, c).to(CUDA)
    tm = _multihot(n, c)
    calls = [
        (lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, backend="cuda"), [z]),
        (lambda x: mlcontrast.multilabel_supcon_loss(x, t, 0.2, backend="cuda"), [z3]),
        (lambda x, q: mlcontrast.prototype_ce_loss(x, y_ce, q, 0.1, backend="cuda"), [z, p]),
        (lambda x, q: mlcontrast.prototype_nce_loss(x, q, t, 0.07, backend="cuda"), [z3, p]),
        (lambda x: mlcontrast.multihot_supcon_loss(x, tm, 0.1, backend="cuda"), [z]),
        (lambda x: mlcontrast.multihot_supcon_loss(x, tm, 0.1, positives="mulsupcon", backend="cuda"), [z]),
    ]
    with _TF32(tf32):
        for fn, tensors in calls:
            first, second = loss_and_grads(fn, tensors), loss_and_grads(fn, tensors)
            assert torch.equal(first[0], second[0])
            for a, b in zip(first[1], second[1]):
                assert torch.equal(a, b)
        runs = []
        for _ in range(2):
            protos = F.normalize(p.float(), dim=1).to(dtype)
            mlcontrast.update_prototypes_(protos, z, y_ce, 0.9, True, backend="cuda")
            runs.append(protos)
        assert torch.equal(runs[0], runs[1])


@needs_cuda_backend
def test_cuda_kernels_follow_the_current_stream_and_device_guard():
    z = _unit_rows(513, 64, torch.bfloat16)
    y = make_labels(513, 30).to(CUDA)
    expected = mlcontrast.label_supcon_loss(z, y, 0.1, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = mlcontrast.label_supcon_loss(z, y, 0.1, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, expected)


# A tiny run of every CUDA kernel path (each dtype, TF32 on and off, odd sizes, ignored rows) for
# compute-sanitizer. Without the caching allocator every tensor is its own allocation, so memcheck
# sees an access past the end of any of them.
_SANITIZER_SCRIPT = textwrap.dedent(
    """
    import torch
    import mlcontrast

    torch.manual_seed(0)
    dev = "cuda"
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for n, d in ((1, 3), (70, 33), (131, 136)):
                z = torch.nn.functional.normalize(torch.randn(n, d, device=dev), dim=1).to(dtype).requires_grad_()
                y = torch.randint(-1, 5, (n,), device=dev)
                mlcontrast.label_supcon_loss(z, y, 0.1, None, "none", backend="cuda").sum().backward()
                p = torch.randn(5, d, device=dev, dtype=dtype, requires_grad=True)
                mlcontrast.prototype_ce_loss(z, y, p, 0.1, backend="cuda").backward()
                mlcontrast.update_prototypes_(p.detach().clone(), z.detach(), y, 0.9, True, backend="cuda")
                for c, positives in ((7, "jaccard"), (300, "all"), (7, "mulsupcon")):
                    t = torch.randint(0, 2, (n, c), device=dev)
                    mlcontrast.multihot_supcon_loss(z, t, 0.1, positives=positives, backend="cuda").backward()
            zb = torch.randn(6, 5, 33, device=dev, dtype=dtype, requires_grad=True)
            pb = torch.randn(5, 33, device=dev, dtype=dtype, requires_grad=True)
            t = torch.randint(-1, 2, (6, 5), device=dev)
            mlcontrast.prototype_nce_loss(zb, pb, t, 0.1, backend="cuda").backward()
    torch.cuda.synchronize()
    print("sanitizer script done")
    """
)


def _compute_sanitizer() -> str | None:
    candidates = [shutil.which("compute-sanitizer")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "compute-sanitizer"))
    try:  # pip install nvidia-cuda-sanitizer-api (CUDA 13 wheels put it under nvidia/cu13/bin)
        import nvidia

        for root in nvidia.__path__:
            for sub in ("cu13", "cuda_sanitizer_api"):
                candidates.append(os.path.join(root, sub, "bin", "compute-sanitizer"))
            candidates.append(os.path.join(root, "cuda_sanitizer_api", "compute-sanitizer", "compute-sanitizer"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@needs_cuda_backend
@pytest.mark.skipif(
    _compute_sanitizer() is None, reason="compute-sanitizer not found (pip install nvidia-cuda-sanitizer-api)"
)
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck", "initcheck"])
def test_cuda_kernels_under_compute_sanitizer(tool):
    cmd = [_compute_sanitizer(), "--tool", tool, "--error-exitcode", "97"]
    if tool != "memcheck":
        # The shared-memory and initialisation checks only for this library's kernels (torch's own are
        # slow to instrument and not under test here).
        cmd += ["--kernel-name", "kns=mlcontrast"]
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    result = subprocess.run(
        cmd + [sys.executable, "-c", _SANITIZER_SCRIPT], capture_output=True, text=True, env=env, timeout=1800
    )
    output = result.stdout + result.stderr
    if result.returncode == 0 and "ERROR SUMMARY" not in output:
        # Some sandboxes (gVisor) run the program without letting the tool attach: nothing was checked.
        pytest.skip(f"compute-sanitizer did not instrument the run (no ERROR SUMMARY): {output[-500:]}")
    assert result.returncode == 0, output[-6000:]
    assert "sanitizer script done" in output, output[-6000:]
    assert "ERROR SUMMARY: 0 errors" in output, output[-6000:]
