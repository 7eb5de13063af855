"""torch.library.opcheck of every op of torch.ops.mlcontrast, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close_by_norm

import mlcontrast

pytestmark = pytest.mark.skipif("cpu" not in mlcontrast.available_backends("cpu"), reason="extension not built")
OPS = torch.ops.mlcontrast
DTYPES = [torch.float32, torch.float64]


def _float(*shape, dtype, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def test_the_library_has_exactly_the_documented_ops():
    for name in (
        "label_supcon",
        "label_supcon_backward",
        "prototype_nce",
        "prototype_nce_backward",
        "prototype_ce",
        "prototype_ce_backward",
        "update_prototypes_",
    ):
        assert hasattr(OPS, name), name


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_label_supcon(dtype, requires_grad):
    z = _float(11, 5, dtype=dtype, requires_grad=requires_grad)
    y = torch.tensor([0, 0, 1, 1, 2, -1, 0, 3, 1, -1, 2])
    torch.library.opcheck(OPS.label_supcon.default, (z, y, 0.2, 0.3))
    torch.library.opcheck(OPS.label_supcon.default, (z, y, 0.2, 0.3, 3, 9))  # anchor rows 3 .. 9


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_prototype_nce(dtype, requires_grad):
    z = _float(5, 3, 4, dtype=dtype, requires_grad=requires_grad)
    p = _float(3, 4, dtype=dtype, requires_grad=requires_grad)
    t = torch.tensor([[1, 0, -1], [0, 1, -1], [1, -1, 0], [0, 0, -1], [-1, 1, 0]])
    torch.library.opcheck(OPS.prototype_nce.default, (z, p, t, 0.1))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_prototype_ce(dtype, requires_grad):
    z = _float(10, 4, dtype=dtype, requires_grad=requires_grad)
    p = _float(3, 4, dtype=dtype, requires_grad=requires_grad)
    y = torch.tensor([0, 1, 2, -1, 2, 2, 0, -1, 1, 0])
    torch.library.opcheck(OPS.prototype_ce.default, (z, y, p, 0.1))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_update_prototypes_(dtype, normalize):
    p = _float(4, 5, dtype=dtype)
    z = _float(9, 5, dtype=dtype)
    y = torch.tensor([0, 0, 1, -1, 3, 3, 3, -1, 0])
    torch.library.opcheck(OPS.update_prototypes_.default, (p, z, y, 0.9, normalize))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_backward_ops(dtype):
    z = _float(8, 3, dtype=dtype)
    y = torch.tensor([0, 0, 1, 1, -1, 2, 2, 2])
    rows, lse, n_pos = OPS.label_supcon(z, y, 0.5, 0.5)
    torch.library.opcheck(OPS.label_supcon_backward.default, (torch.randn_like(rows), z, y, lse, n_pos, 0.5, 0.5))
    rows, lse, n_pos = OPS.label_supcon(z, y, 0.5, 0.5, 2, 5)
    torch.library.opcheck(
        OPS.label_supcon_backward.default, (torch.randn_like(rows), z, y, lse, n_pos, 0.5, 0.5, 2, 5)
    )

    p = _float(3, 3, dtype=dtype)
    rows, lse, norm = OPS.prototype_ce(z, y, p, 0.5)
    torch.library.opcheck(OPS.prototype_ce_backward.default, (torch.randn_like(rows), z, y, p, lse, norm, 0.5))

    zb = _float(4, 3, 3, dtype=dtype)
    t = torch.tensor([[1, 0, -1], [0, 1, 1], [1, -1, 0], [0, 0, 1]])
    loss, *saved = OPS.prototype_nce(zb, p, t, 0.5)  # saved: stats, logits, norm
    torch.library.opcheck(OPS.prototype_nce_backward.default, (torch.ones_like(loss), zb, p, t, *saved, 0.5))


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
