"""The registry from (op, fused backend) to the callable that runs it, and what functional hands it.

functional.py names no fused backend: it asks :mod:`mlcontrast.ops.registry` for the op, and the
registry's properties (not a test of the backend's name) decide the dtype of the rows it passes.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from utils import make_labels, make_targets

import mlcontrast
from mlcontrast import _first_use, reference
from mlcontrast._layout import legacy_sadcl_gate, multilabel_rows
from mlcontrast.ops import registry, triton_unavailable_reason

ROOT = Path(__file__).resolve().parent.parent
HAS_CPU = "cpu" in mlcontrast.available_backends("cpu")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="extension not built")
# Under pytest without a GPU, conftest.py sets TRITON_INTERPRET=1: the Triton ops run on CPU tensors.
needs_triton_on_cpu = pytest.mark.skipif(
    torch.cuda.is_available() or triton_unavailable_reason() is not None, reason="Triton on CPU tensors unavailable"
)


# ---------------------------------------------------------------- the registry


def test_every_fused_backend_is_a_backend_name():
    assert set(registry.FUSED_BACKENDS) == set(mlcontrast._backends.BACKENDS) - {"auto", "torch"}


@pytest.mark.parametrize("name,backend", [("label_supcon", "torch"), ("label_supcon", "auto"), ("nope", "cpu")])
def test_unknown_op_or_backend_is_refused(name, backend):
    with pytest.raises(ValueError, match="op must be|fused backends"):
        registry.op(name, backend)


@needs_cpu
@pytest.mark.parametrize("name", registry.OPS)
def test_compiled_backends_give_the_compiled_library_op(name):
    assert registry.op(name, "cpu") is getattr(torch.ops.mlcontrast, name)
    assert registry.op(name, "cuda") is getattr(torch.ops.mlcontrast, name)  # looked up, not run: no GPU needed


@needs_triton_on_cpu
@pytest.mark.parametrize("atomic", ["0", "1"])
def test_triton_ops_get_their_backend_only_arguments_by_keyword(monkeypatch, atomic):
    from mlcontrast.ops import label_supcon

    monkeypatch.setattr(label_supcon, "ATOMIC", None)
    monkeypatch.setenv("MLCONTRAST_TRITON_ATOMIC", atomic)
    call = registry.op("label_supcon", "triton")
    assert call.func is torch.ops.mlcontrast_triton.label_supcon and call.keywords == {"atomic": atomic == "1"}
    for name in ("prototype_nce", "prototype_ce", "update_prototypes_"):
        assert registry.op(name, "triton") is getattr(torch.ops.mlcontrast_triton, name)


def test_the_triton_loader_imports_every_triton_op_module():
    # One static import statement (torch.compile traces it) must name the modules the tuple lists.
    tree = ast.parse(textwrap.dedent(inspect.getsource(registry._load_triton)))
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    assert imported == set(registry.TRITON_OP_MODULES)


def _spy_on_rows(monkeypatch) -> list[tuple[str, str, torch.dtype]]:
    """Records (op, backend, dtype of the first argument) of every fused call functional makes."""
    seen, real = [], registry.op

    def spying(name, backend):
        call = real(name, backend)

        def recorded(first, *args, **kwargs):
            seen.append((name, backend, first.dtype))
            return call(first, *args, **kwargs)

        return recorded

    monkeypatch.setattr(registry, "op", spying)
    return seen


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_normalised_rows_reach_the_kernels_in_the_dtype_the_registry_asks_for(monkeypatch, backend):
    # fp32 rows for the CPU kernels (they compute in fp32 anyway); the caller's 16-bit rows for the GPU
    # backends (tensor-core rate, half the traffic).
    if backend not in mlcontrast.available_backends("cpu"):
        pytest.skip(f"backend {backend} unavailable on CPU tensors")
    seen = _spy_on_rows(monkeypatch)
    z = torch.randn(21, 9).to(torch.float16)
    mlcontrast.label_supcon_loss(z, make_labels(21, 4), 0.2, normalize=True, backend=backend)
    mlcontrast.multilabel_supcon_loss(torch.randn(5, 3, 8).to(torch.float16), make_targets(5, 3), backend=backend)
    expected = torch.float16 if registry.rows_in_input_dtype(backend) else torch.float32
    assert seen == [("label_supcon", backend, expected)] * 2
    assert registry.rows_in_input_dtype(backend) is (backend != "cpu")


@needs_cpu
def test_every_public_function_reaches_its_fused_op_through_the_registry(monkeypatch):
    seen = _spy_on_rows(monkeypatch)
    z, y, p = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, -1, 0]), torch.randn(3, 4)
    t = torch.tensor([[1, 0, -1], [0, 1, 1]])
    mlcontrast.label_supcon_loss(z, y, backend="cpu")
    mlcontrast.supcon_loss(z.view(4, 2, 4), y[:4].clamp(min=0), backend="cpu")
    mlcontrast.multilabel_supcon_loss(z[:6].view(2, 3, 4), t, backend="cpu")
    mlcontrast.prototype_nce_loss(z[:6].view(2, 3, 4), p, t, backend="cpu")
    mlcontrast.prototype_ce_loss(z, y, p, backend="cpu")
    mlcontrast.update_prototypes_(p.clone(), z, y, backend="cpu")
    mlcontrast.update_prototypes_(p.clone(), z[:6].view(2, 3, 4), t, backend="cpu")
    assert [name for name, _, _ in seen] == ["label_supcon"] * 3 + ["prototype_nce", "prototype_ce"] + [
        "update_prototypes_"
    ] * 2


def test_functional_names_no_fused_backend():
    # Dispatch goes through the registry: no string tests of "cpu", "triton" or "cuda" left in functional.
    source = (ROOT / "mlcontrast" / "functional.py").read_text()
    code = [line.split("#")[0] for line in source.splitlines()]
    assert not [line for line in code if any(f'== "{b}"' in line or f'in ("{b}"' in line
                                             for b in ("cpu", "triton", "cuda"))]  # fmt: skip
    assert "torch.ops." not in source and len(source.splitlines()) < 600


# ---------------------------------------------------------------- the multi-label row layout, written once


def _old_view_major(targets: torch.Tensor, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The formulation of reference.multilabel_supcon_loss: (v, b, c) order.
    b, c = targets.shape
    positive = (targets == 1).repeat(v, 1).reshape(-1)
    classes = torch.arange(c).repeat(v * b)
    sample = (torch.arange(v * b) // v).repeat_interleave(c)
    return torch.where(positive, classes, -1), targets[sample, classes] == 1


@pytest.mark.parametrize("b,v,c", [(5, 2, 3), (4, 1, 6), (3, 3, 1), (0, 2, 3)])
def test_multilabel_rows_in_view_major_order_are_the_reference_layout(b, v, c):
    features, targets = torch.randn(b, v, c, 4), make_targets(b, c)
    rows, labels = multilabel_rows(features, targets, sample_major=False)
    expected_labels, expected_gate = _old_view_major(targets, v)
    assert torch.equal(rows, features.transpose(0, 1).reshape(v * b * c, 4))
    assert torch.equal(labels, expected_labels)
    assert torch.equal(legacy_sadcl_gate(targets, v, sample_major=False).reshape(-1), expected_gate)


@pytest.mark.parametrize("b,v,c", [(5, 2, 3), (4, 1, 6), (3, 3, 1)])
def test_multilabel_rows_in_sample_major_order_are_a_permutation_of_them(b, v, c):
    features, targets = torch.randn(b, v, c, 4), make_targets(b, c)
    rows, labels = multilabel_rows(features, targets, sample_major=True)
    view_rows, view_labels = multilabel_rows(features, targets, sample_major=False)
    # (b, v, c) -> (v, b, c): the same rows with the same labels, and the same gate, reordered.
    order = torch.arange(v * b * c).view(b, v, c).transpose(0, 1).reshape(-1)
    assert torch.equal(rows[order], view_rows) and torch.equal(labels[order], view_labels)
    gate = legacy_sadcl_gate(targets, v, sample_major=True).reshape(-1)
    assert torch.equal(gate[order], legacy_sadcl_gate(targets, v, sample_major=False).reshape(-1))


@needs_cpu
@pytest.mark.parametrize("legacy_sadcl", [False, True])
def test_multilabel_loss_on_the_shared_layout_matches_the_reference(legacy_sadcl):
    z, t = torch.randn(6, 2, 4, 8, dtype=torch.float64), make_targets(6, 4)
    got = mlcontrast.multilabel_supcon_loss(z, t, 0.3, legacy_sadcl=legacy_sadcl, backend="cpu")
    torch.testing.assert_close(got, reference.multilabel_supcon_loss(z, t, 0.3, legacy_sadcl=legacy_sadcl))


# ---------------------------------------------------------------- import wiring


def test_the_first_use_check_runs_mlcontrast_check():
    # Wired by mlcontrast/__init__.py (neither module imports the other: no import cycle).
    assert _first_use._RUNNER is mlcontrast._run_first_use_check


def test_triton_interpret_set_after_any_kernel_module_was_imported_is_reported():
    # A kernel file (not only an op file) imported before TRITON_INTERPRET=1 holds GPU-only kernels.
    pytest.importorskip("triton")
    script = (
        "import os, torch\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "import mlcontrast.ops.label_supcon_kernels\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from mlcontrast import _backends\n"
        "print(_backends.why_unavailable('triton', torch.device('cpu')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TRITON_INTERPRET=1 was set after" in out.stdout, out.stdout
