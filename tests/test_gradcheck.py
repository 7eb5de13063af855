"""float64 gradcheck: every fused op of the contract (mlcontrast.ops.contract.FUSED_OPS) on every backend
under test (tests/utils.py: backend_table, sample_inputs), then the public functions with backend="cpu"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from utils import backend_table, backends, device_of, sample_inputs, use_variant

import mlcontrast
from mlcontrast.ops import registry
from mlcontrast.ops.contract import FUSED_OPS

F64 = dict(dtype=torch.float64)
needs_cpu = pytest.mark.skipif(backend_table()["cpu"].reason is not None, reason="extension not built")

# Every op with a gradient, on every backend and kernel variant (Triton's label_supcon: both pairs).
OP_CASES = [
    pytest.param(name, *p.values, marks=p.marks, id=f"{name}-{p.id}")
    for name, fused in FUSED_OPS.items()
    if fused.grads
    for p in backends(name)
    if p.values[0] in fused.backends
]


@pytest.mark.parametrize("name,backend,variant", OP_CASES)
def test_op(name, backend, variant, monkeypatch):
    # The op's first output (the per-row losses, or the loss) w.r.t. every input the contract gives a
    # gradient, through the one autograd registration of the backend's library.
    use_variant(monkeypatch, name, backend, variant)
    fused, run = FUSED_OPS[name], registry.op(name, backend)
    for args in sample_inputs(name, torch.float64, device_of(backend), requires_grad=True):
        at = [i for i, a in enumerate(fused.args) if a.name in fused.grads]

        def first_output(*leaves, args=args, at=at):
            values = list(args)
            for i, leaf in zip(at, leaves):
                values[i] = leaf
            return run(*values)[0]

        assert gradcheck(first_output, [args[i] for i in at])


# ----------------------------------------------------------------------------------------------
# The public functions on the CPU backend
# ----------------------------------------------------------------------------------------------


def _leaf(*shape):
    return torch.randn(*shape, **F64).requires_grad_()


@needs_cpu
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_label_supcon(reduction, normalize):
    z = _leaf(9, 4)
    y = torch.tensor([0, 0, 1, 1, 1, 2, -1, 3, 0])  # ignored row, singleton class 3
    assert gradcheck(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.5, 0.7, reduction, normalize, backend="cpu"), (z,)
    )


@needs_cpu
def test_label_supcon_across_row_tiles():
    z = _leaf(130, 2)  # two row tiles of the kernel
    y = torch.randint(0, 5, (130,))
    y[::7] = -1
    assert gradcheck(lambda x: mlcontrast.label_supcon_loss(x, y, 1.0, backend="cpu"), (z,), fast_mode=True)


@needs_cpu
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_supcon(with_labels, contrast_mode):
    z = F.normalize(torch.randn(5, 2, 3, **F64), dim=-1).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1]) if with_labels else None
    assert gradcheck(lambda x: mlcontrast.supcon_loss(x, labels, 0.5, 0.5, contrast_mode, backend="cpu"), (z,))


@needs_cpu
@pytest.mark.parametrize("legacy_sadcl", [False, True])
def test_multilabel_supcon(legacy_sadcl):
    z = _leaf(3, 2, 3, 4)
    t = torch.tensor([[1, 0, 1], [1, 1, -1], [0, 1, 1]])
    assert gradcheck(
        lambda x: mlcontrast.multilabel_supcon_loss(x, t, 0.5, backend="cpu", legacy_sadcl=legacy_sadcl), (z,)
    )


@needs_cpu
def test_prototype_nce_features_and_prototypes():
    z, p = _leaf(4, 3, 4), _leaf(3, 4)
    t = torch.tensor([[1, 0, -1], [0, 0, -1], [1, -1, -1], [-1, 0, -1]])  # class 1 without positives
    assert gradcheck(lambda x, q: mlcontrast.prototype_nce_loss(x, q, t, 0.5, backend="cpu"), (z, p))


@needs_cpu
def test_prototype_ce_features_and_prototypes():
    z, p = _leaf(9, 4), _leaf(3, 4)
    y = torch.tensor([0, 1, 2, -1, 2, 2, 0, -1, 1])
    assert gradcheck(lambda x, q: mlcontrast.prototype_ce_loss(x, y, q, 0.5, backend="cpu"), (z, p))
