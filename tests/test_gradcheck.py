"""float64 gradcheck of the compiled CPU ops, through the public functions with backend="cpu"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import mlcontrast

pytestmark = pytest.mark.skipif("cpu" not in mlcontrast.available_backends("cpu"), reason="extension not built")
F64 = dict(dtype=torch.float64)


def _leaf(*shape):
    return torch.randn(*shape, **F64).requires_grad_()


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_label_supcon(reduction, normalize):
    z = _leaf(9, 4)
    y = torch.tensor([0, 0, 1, 1, 1, 2, -1, 3, 0])  # ignored row, singleton class 3
    assert gradcheck(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.5, 0.7, reduction, normalize, backend="cpu"), (z,)
    )


def test_label_supcon_across_row_tiles():
    z = _leaf(130, 2)  # two row tiles of the kernel
    y = torch.randint(0, 5, (130,))
    y[::7] = -1
    assert gradcheck(lambda x: mlcontrast.label_supcon_loss(x, y, 1.0, backend="cpu"), (z,), fast_mode=True)


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_supcon(with_labels, contrast_mode):
    z = F.normalize(torch.randn(5, 2, 3, **F64), dim=-1).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1]) if with_labels else None
    assert gradcheck(lambda x: mlcontrast.supcon_loss(x, labels, 0.5, 0.5, contrast_mode, backend="cpu"), (z,))


@pytest.mark.parametrize("legacy_sadcl", [False, True])
def test_multilabel_supcon(legacy_sadcl):
    z = _leaf(3, 2, 3, 4)
    t = torch.tensor([[1, 0, 1], [1, 1, -1], [0, 1, 1]])
    assert gradcheck(
        lambda x: mlcontrast.multilabel_supcon_loss(x, t, 0.5, backend="cpu", legacy_sadcl=legacy_sadcl), (z,)
    )


def test_prototype_nce_features_and_prototypes():
    z, p = _leaf(4, 3, 4), _leaf(3, 4)
    t = torch.tensor([[1, 0, -1], [0, 0, -1], [1, -1, -1], [-1, 0, -1]])  # class 1 without positives
    assert gradcheck(lambda x, q: mlcontrast.prototype_nce_loss(x, q, t, 0.5, backend="cpu"), (z, p))


def test_prototype_ce_features_and_prototypes():
    z, p = _leaf(9, 4), _leaf(3, 4)
    y = torch.tensor([0, 1, 2, -1, 2, 2, 0, -1, 1])
    assert gradcheck(lambda x, q: mlcontrast.prototype_ce_loss(x, y, q, 0.5, backend="cpu"), (z, p))


def test_label_supcon_raw_op_rows():
    z = _leaf(7, 3)
    y = torch.tensor([0, 1, 0, 1, -1, 2, 2])
    assert gradcheck(lambda x: torch.ops.mlcontrast.label_supcon(x, y, 0.5, 0.5)[0], (z,))


def test_prototype_ce_raw_op_rows():
    z, p = _leaf(6, 3), _leaf(4, 3)
    y = torch.tensor([0, 3, -1, 1, 1, 2])
    assert gradcheck(lambda x, q: torch.ops.mlcontrast.prototype_ce(x, y, q, 0.4)[0], (z, p))
