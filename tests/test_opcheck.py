"""torch.library.opcheck of every fused op of the contract (mlcontrast.ops.contract.FUSED_OPS) and its
backward op, in every library under test (tests/utils.py: backend_table, sample_inputs); then
torch.compile(fullgraph=True) of the public functions on CPU tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close_by_norm, backend_table, backward_inputs, sample_inputs

import mlcontrast
from mlcontrast.ops import registry
from mlcontrast.ops.contract import FUSED_OPS

OPS = torch.ops.mlcontrast
needs_cpu = pytest.mark.skipif(backend_table()["cpu"].reason is not None, reason="extension not built")
# test_aot_dispatch_dynamic re-traces with symbolic shapes: slow in the interpreter, left out there.
FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _param(*values, backend, ident):
    marks = [pytest.mark.skip(reason=backend.reason)] if backend.reason else []
    return pytest.param(*values, marks=marks, id=ident)


def _forward_cases():
    # Every dtype of the backend's checks; with and without inputs that require grad on the fast backends.
    for name, fused in FUSED_OPS.items():
        for b in (b for b in backend_table().values() if b.name in fused.backends):
            for dtype in b.check_dtypes:
                for grad in (False, True) if fused.grads and not b.slow else (bool(fused.grads),):
                    ident = f"{name}-{b.name}-{str(dtype).removeprefix('torch.')}{'-grad' if grad else ''}"
                    yield _param(name, b.name, dtype, grad, backend=b, ident=ident)


def _backward_cases():
    for name, fused in FUSED_OPS.items():
        for b in (b for b in backend_table().values() if b.name in fused.backends):
            for dtype in b.check_dtypes if fused.backward else ():
                ident = f"{fused.backward}-{b.name}-{str(dtype).removeprefix('torch.')}"
                yield _param(name, b.name, dtype, backend=b, ident=ident)


def _library(backend: str):
    registry.op("label_supcon", backend)  # loads the backend's library
    return getattr(torch.ops, registry.FUSED_BACKENDS[backend].library)


@pytest.mark.parametrize("backend", list(backend_table()))
def test_the_library_has_exactly_the_documented_ops(backend):
    if backend_table()[backend].reason:
        pytest.skip(backend_table()[backend].reason)
    library = _library(backend)
    for fused in FUSED_OPS.values():
        for name in filter(None, (fused.name, fused.backward)) if backend in fused.backends else ():
            assert hasattr(library, name), name


@pytest.mark.parametrize("name,backend,dtype,requires_grad", list(_forward_cases()))
def test_opcheck(name, backend, dtype, requires_grad):
    op = getattr(_library(backend), name).default
    utils = FAST_UTILS if backend_table()[backend].slow else None
    device = backend_table()[backend].device
    for args in sample_inputs(name, dtype, device, requires_grad):
        if utils is None:
            torch.library.opcheck(op, args)
        else:
            torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.parametrize("name,backend,dtype", list(_backward_cases()))
def test_opcheck_backward_op(name, backend, dtype):
    library = _library(backend)
    forward, backward = getattr(library, name), getattr(library, FUSED_OPS[name].backward).default
    utils = FAST_UTILS if backend_table()[backend].slow else None
    for args in sample_inputs(name, dtype, backend_table()[backend].device):
        inputs = backward_inputs(name, args, forward(*args))
        if utils is None:
            torch.library.opcheck(backward, inputs)
        else:
            torch.library.opcheck(backward, inputs, test_utils=utils)


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) on CPU tensors with backend "auto"
# ----------------------------------------------------------------------------------------------


def _all_losses(z, zb, zv, protos, y, targets):
    return (
        mlcontrast.label_supcon_loss(z, y, 0.1, normalize=True)
        + mlcontrast.multilabel_supcon_loss(zb, targets)
        + mlcontrast.supcon_loss(zv, y[: zv.shape[0]].clamp(min=0))
        + mlcontrast.prototype_nce_loss(zb, protos, targets)
        + mlcontrast.prototype_ce_loss(z, y.clamp(max=protos.shape[0] - 1), protos)
    )


@needs_cpu
def test_compile_fullgraph_matches_eager_with_backward(monkeypatch):
    monkeypatch.delenv("MLCONTRAST_BACKEND", raising=False)
    torch._dynamo.reset()
    c, d = 5, 16
    tensors = [
        torch.randn(40, d),  # z
        torch.randn(6, c, d),  # zb
        F.normalize(torch.randn(8, 2, d), dim=-1),  # zv
        torch.randn(c, d),  # protos
    ]
    y = torch.randint(-1, c, (40,))
    targets = torch.randint(-1, 2, (6, c))

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = fn(*leaves, y, targets)
        return out.detach(), torch.autograd.grad(out, leaves)

    compiled = torch.compile(_all_losses, fullgraph=True)
    out_c, grads_c = run(compiled)
    out_e, grads_e = run(_all_losses)
    assert_close_by_norm(out_c, out_e, torch.float32, "compiled loss")
    for a, e, name in zip(grads_c, grads_e, ("z", "zb", "zv", "protos")):
        assert_close_by_norm(a, e, torch.float32, f"compiled grad of {name}")


@needs_cpu
def test_compile_fullgraph_update_prototypes(monkeypatch):
    monkeypatch.delenv("MLCONTRAST_BACKEND", raising=False)
    torch._dynamo.reset()

    def step(protos, z, y, zb, targets):
        mlcontrast.update_prototypes_(protos, z, y, momentum=0.9)
        mlcontrast.update_prototypes_(protos, zb, targets, momentum=0.5, normalize=False)
        return protos.sum()

    protos = F.normalize(torch.randn(6, 8), dim=1)
    z, y = torch.randn(20, 8), torch.randint(-1, 5, (20,))  # class 5 absent from y
    zb, targets = torch.randn(3, 6, 8), torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, -1, 0, 0, 0]])
    eager, compiled = protos.clone(), protos.clone()
    total_e = step(eager, z, y, zb, targets)
    total_c = torch.compile(step, fullgraph=True)(compiled, z, y, zb, targets)
    assert_close_by_norm(compiled, eager, torch.float32, "prototypes updated under compile")
    assert_close_by_norm(total_c, total_e, torch.float32)
    assert torch.equal(compiled[5], protos[5]), "absent class unchanged under compile"
    assert not torch.equal(compiled[0], protos[0]), "the compiled update happened in place"


@needs_cpu
def test_compile_fullgraph_backward_ops_with_non_contiguous_inputs():
    # The kernels return contiguous tensors whatever the inputs' strides; the fake kernels must say so,
    # or inductor's size/stride assertions fail on transposed or permuted views (a saved activation
    # that is a view reaches the backward ops as it is).
    torch._dynamo.reset()
    c, d, n, b = 5, 11, 30, 6

    def grads(x, xb, xp, y, targets):
        z, zb, protos = x.t(), xb.permute(2, 0, 1), xp.t()  # [N, D], [B, C, D], [C, D] views
        rows, lse, n_pos = OPS.label_supcon(z, y, 0.5, 0.5)
        g_sup = OPS.label_supcon_backward(torch.ones_like(rows), z, y, lse, n_pos, 0.5, 0.5)
        labels = y.clamp(max=c - 1)
        rows, lse, norm = OPS.prototype_ce(z, labels, protos, 0.5)
        g_ce, gp_ce = OPS.prototype_ce_backward(torch.ones_like(rows), z, labels, protos, lse, norm, 0.5)
        loss, *saved = OPS.prototype_nce(zb, protos, targets, 0.5)
        g_nce, gp_nce = OPS.prototype_nce_backward(torch.ones_like(loss), zb, protos, targets, *saved, 0.5)
        return g_sup * 2, g_ce * 2, gp_ce * 2, g_nce * 2, gp_nce * 2

    inputs = (torch.randn(d, n), torch.randn(c, d, b), torch.randn(d, c), torch.randint(-1, c, (n,)),
              torch.randint(-1, 2, (b, c)))  # fmt: skip
    expected = grads(*inputs)
    actual = torch.compile(grads, fullgraph=True)(*inputs)
    for a, e in zip(actual, expected):
        assert_close_by_norm(a, e, torch.float32, "compiled gradient")
