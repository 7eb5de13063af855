"""The op contract (mlcontrast/ops/contract.py): both libraries' schemas are the table's, the compiled
ops return what the table says, and the generic autograd formula serves any library, backend-only
trailing arguments included."""

from __future__ import annotations

import importlib
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close_by_norm

import mlcontrast
from mlcontrast.ops import _TRITON_OP_MODULES, contract, triton_unavailable_reason

needs_extension = pytest.mark.skipif(
    "cpu" not in mlcontrast.available_backends("cpu"), reason="extension not built"
)
NAMES = [n for fused in contract.FUSED_OPS.values() for n in (fused.name, fused.backward) if n is not None]
#: The ops (and backward ops) that the Triton library has: those whose contract lists the Triton backend.
TRITON_NAMES = [n for fused in contract.FUSED_OPS.values() if "triton" in fused.backends
                for n in (fused.name, fused.backward) if n is not None]  # fmt: skip


def _arguments(schema) -> list[tuple]:
    # (name, type, default, written in place) of each argument; torch's custom_op spells int as SymInt.
    return [
        (a.name, str(a.type).replace("SymInt", "int"), a.default_value if a.has_default_value() else "<required>",
         bool(a.alias_info is not None and a.alias_info.is_write))
        for a in schema.arguments
    ]  # fmt: skip


def contract_mismatch(actual, name: str) -> str | None:
    """Why the schema ``actual`` breaks the contract of ``name`` (None when it keeps it): the contract's
    arguments first, then only defaulted (backend-only) ones, and the same returns."""
    expected = torch._C.parse_schema(contract.schema(name))
    want, got = _arguments(expected), _arguments(actual)
    if got[: len(want)] != want:
        return f"arguments {got} do not start with the contract's {want}"
    required = [a[0] for a in got[len(want) :] if a[2] == "<required>"]
    if required:
        return f"backend-only arguments {required} have no default"
    if [str(r.type) for r in actual.returns] != [str(r.type) for r in expected.returns]:
        return f"returns {actual.returns} are not the contract's {expected.returns}"
    return None


@needs_extension
@pytest.mark.parametrize("name", NAMES)
def test_compiled_schema_is_the_contract(name):
    assert str(getattr(torch.ops.mlcontrast, name).default._schema) == f"mlcontrast::{contract.schema(name)}"


@pytest.mark.skipif(triton_unavailable_reason() is not None, reason=str(triton_unavailable_reason()))
@pytest.mark.parametrize("name", TRITON_NAMES)
def test_triton_schema_is_the_contract(name):
    _import_triton_ops()
    assert contract_mismatch(getattr(torch.ops.mlcontrast_triton, name).default._schema, name) is None


def test_the_schema_check_can_fail():
    good = torch._C.parse_schema(contract.schema("label_supcon").replace(")", ", bool atomic=False)", 1))
    assert contract_mismatch(good, "label_supcon") is None
    for bad in (
        contract.schema("prototype_ce").replace(")", ", bool atomic)", 1),  # backend-only without a default
        contract.schema("label_supcon").replace("-> (Tensor, Tensor, Tensor)", "-> (Tensor, Tensor)"),
        contract.schema("label_supcon_backward").replace("Tensor n_pos, ", ""),
    ):
        assert contract_mismatch(torch._C.parse_schema(bad), bad.split("(")[0]) is not None, bad


# ----------------------------------------------------------------------------------------------
# The compiled ops return what the table says
# ----------------------------------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_label_supcon_statistics(dtype):
    z = torch.randn(11, 5, dtype=dtype)
    y = torch.tensor([0, 0, 1, 1, 2, -1, 0, 3, 1, -1, 2])
    start, stop = 2, 9
    loss, lse, n_pos = torch.ops.mlcontrast.label_supcon(z, y, 0.5, 0.5, start, stop)
    rows = torch.arange(11)
    anchors = (rows >= start) & (rows < stop) & (y >= 0)
    same = (y[:, None] == y[None, :]) & (y[None, :] >= 0) & (rows[:, None] != rows[None, :])
    assert torch.equal(n_pos, torch.where(anchors, same.sum(1), 0).to(dtype))
    logits = (z @ z.T / 0.5).masked_fill(~((y[None, :] >= 0) & (rows[:, None] != rows[None, :])), float("-inf"))
    expected_lse = torch.where(anchors, logits.logsumexp(1), torch.zeros((), dtype=dtype))
    assert_close_by_norm(lse, expected_lse, dtype, "lse")
    assert loss.dtype == lse.dtype == n_pos.dtype == dtype
    assert not loss[~anchors].any()


@needs_extension
@pytest.mark.parametrize(
    "features_dtype,prototypes_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.float32)],
)
def test_prototype_statistics(features_dtype, prototypes_dtype):
    expected_dtype = torch.float64 if torch.float64 in (features_dtype, prototypes_dtype) else torch.float32
    p = torch.randn(3, 4, dtype=prototypes_dtype)
    z = torch.randn(6, 4).to(features_dtype)
    z[1] = 0  # a clamped norm
    y = torch.tensor([0, 1, 2, -1, 2, 0])
    loss, lse, norm = torch.ops.mlcontrast.prototype_ce(z, y, p, 0.3)
    assert loss.dtype == lse.dtype == norm.dtype == expected_dtype
    assert_close_by_norm(norm, z.double().norm(dim=1).clamp(min=1e-8), expected_dtype, "prototype_ce norm")

    zb = torch.randn(5, 3, 4).to(features_dtype)
    t = torch.tensor([[1, 0, -1], [0, 1, -1], [1, -1, 0], [0, 0, -1], [-1, 1, 0]])
    loss, stats, logits, norm = torch.ops.mlcontrast.prototype_nce(zb, p, t, 0.3)
    assert loss.shape == () and stats.shape == (2, 3) and logits.shape == norm.shape == (5, 3)
    assert stats.dtype == logits.dtype == norm.dtype == expected_dtype
    cos = (F.normalize(zb.double(), dim=-1, eps=1e-8) * F.normalize(p.double(), dim=-1, eps=1e-8)).sum(-1)
    assert_close_by_norm(logits, cos / 0.3, expected_dtype, "prototype_nce logits")
    assert_close_by_norm(norm, zb.double().norm(dim=-1).clamp(min=1e-8), expected_dtype, "prototype_nce norm")
    s = cos / 0.3
    for row, mask in enumerate((t == 1, t >= 0)):
        lse = s.masked_fill(~mask, float("-inf")).logsumexp(0)
        assert_close_by_norm(stats[row], torch.where(mask.any(0), lse, 0.0), expected_dtype, f"stats[{row}]")


def _import_triton_ops():
    for module in _TRITON_OP_MODULES:
        importlib.import_module(f"mlcontrast.ops.{module}")


@needs_extension
@pytest.mark.skipif(triton_unavailable_reason() is not None, reason=str(triton_unavailable_reason()))
def test_both_libraries_return_the_same_outputs():
    # Every output, statistics included, so that either library's statistics can feed either backward.
    _import_triton_ops()
    z = torch.randn(11, 5)
    y = torch.tensor([0, 0, 1, 1, 2, -1, 0, 3, 1, -1, 2])
    p, zb = torch.randn(4, 5), torch.randn(5, 4, 5)
    t = torch.tensor([[1, 0, -1, 0], [0, 1, -1, 1], [1, -1, 0, 0], [0, 0, -1, 1], [-1, 1, 0, 0]])
    calls = {
        "label_supcon": [(z, y, 0.5, 0.4), (z, y, 0.5, 0.4, 2, 9)],
        "prototype_ce": [(z, y.clamp(max=3), p, 0.3)],
        "prototype_nce": [(zb, p, t, 0.3)],
    }
    for name, argument_lists in calls.items():
        for arguments in argument_lists:
            compiled = getattr(torch.ops.mlcontrast, name)(*arguments)
            triton = getattr(torch.ops.mlcontrast_triton, name)(*arguments)
            for output, a, b in zip(contract.FUSED_OPS[name].outputs, compiled, triton):
                where = f"{name}{arguments[2:]}: {output.name}"
                assert a.shape == b.shape and a.dtype == b.dtype, where
                assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"{where}: {a} vs {b}"
                finite = torch.isfinite(a)
                assert torch.equal(a[~finite], b[~finite]), f"{where}: {a} vs {b}"
                torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-5, msg=where)


# ----------------------------------------------------------------------------------------------
# The generic registration serves another library, with a backend-only trailing argument
# ----------------------------------------------------------------------------------------------

TEST_LIBRARY = "mlcontrast_contract_test"


def _define_test_library():
    # A library with the contract's label_supcon plus a trailing backend-only `scale` of the loss, which
    # its backward op applies too: the gradient is right only if the autograd formula forwarded it.
    if hasattr(torch.ops, TEST_LIBRARY) and hasattr(getattr(torch.ops, TEST_LIBRARY), "label_supcon"):
        return

    @torch.library.custom_op(f"{TEST_LIBRARY}::label_supcon", mutates_args=())
    def forward(
        features: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        base_temperature: float,
        anchor_start: int = 0,
        anchor_stop: Optional[int] = None,
        contrast_start: int = 0,
        grad_stop: Optional[int] = None,
        scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, lse, n_pos = torch.ops.mlcontrast.label_supcon(
            features, labels, temperature, base_temperature, anchor_start, anchor_stop, contrast_start, grad_stop
        )
        return loss * scale, lse.clone(), n_pos.clone()

    @torch.library.custom_op(f"{TEST_LIBRARY}::label_supcon_backward", mutates_args=())
    def backward(
        grad_rows: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        lse: torch.Tensor,
        n_pos: torch.Tensor,
        temperature: float,
        base_temperature: float,
        anchor_start: int = 0,
        anchor_stop: Optional[int] = None,
        contrast_start: int = 0,
        grad_stop: Optional[int] = None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        grad = torch.ops.mlcontrast.label_supcon_backward(
            grad_rows, features, labels, lse, n_pos, temperature, base_temperature, anchor_start, anchor_stop,
            contrast_start, grad_stop,
        )  # fmt: skip
        return grad * scale

    forward.register_fake(contract.fake("label_supcon"))
    backward.register_fake(contract.fake("label_supcon_backward"))
    contract.register_autograd(TEST_LIBRARY, "label_supcon")


@needs_extension
def test_generic_autograd_forwards_backend_only_arguments():
    _define_test_library()
    ops = getattr(torch.ops, TEST_LIBRARY)
    for name in ("label_supcon", "label_supcon_backward"):
        assert contract_mismatch(getattr(ops, name).default._schema, name) is None
    z = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, -1, 2, 2, 0, 1])
    (expected,) = torch.autograd.grad(torch.ops.mlcontrast.label_supcon(z, y, 0.5, 0.4, 1, 7)[0].sum(), z)
    (got,) = torch.autograd.grad(ops.label_supcon(z, y, 0.5, 0.4, 1, 7, scale=3.0)[0].sum(), z)
    torch.testing.assert_close(got, 3 * expected)
    loss, lse, n_pos = ops.label_supcon(z, y, 0.5, 0.4)
    assert loss.requires_grad and not lse.requires_grad and not n_pos.requires_grad
    torch.library.opcheck(ops.label_supcon.default, (z, y, 0.5, 0.4, 2, None, 1, None, 2.0))
    assert torch.autograd.gradcheck(lambda x: ops.label_supcon(x, y, 0.5, 0.4, 0, None, 0, None, 2.0)[0], (z,))
