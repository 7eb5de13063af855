"""Shared helpers of the test suite: one tolerance table, one comparison, the backends to test."""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import pytest
import torch

import mlcontrast
from mlcontrast._tolerances import TOLERANCES, reference_dtype  # noqa: F401  (the one table lives in the package)

_TINY = 1e-30


def assert_close_by_norm(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Relative error by norm within the tolerance of ``dtype``, and nothing NaN or infinite."""
    rtol, atol = TOLERANCES[dtype]
    label = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{label}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert torch.isfinite(a).all(), f"{label}actual has {(~torch.isfinite(a)).sum().item()} NaN/inf entries: {a}"
    assert torch.isfinite(e).all(), f"{label}expected has {(~torch.isfinite(e)).sum().item()} NaN/inf entries: {e}"
    err = torch.linalg.vector_norm(a - e).item()
    ref = torch.linalg.vector_norm(e).item()
    rel = err / max(ref, _TINY)
    if err > rtol * ref + atol:
        worst = (a - e).abs().flatten().argmax().item() if a.numel() else -1
        raise AssertionError(
            f"{label}relative error by norm {rel:.3e} > rtol {rtol:.0e} (atol {atol:.0e}) for {dtype}; "
            f"||a-e|| = {err:.3e}, ||e|| = {ref:.3e}, shape {tuple(e.shape)}; worst entry {worst}: "
            f"actual {a.flatten()[worst].item() if worst >= 0 else None!r} vs "
            f"expected {e.flatten()[worst].item() if worst >= 0 else None!r}"
        )


def cpu_backends() -> list[str]:
    """The fused backends available on CPU tensors but the reference and Triton (which runs on CPU tensors
    only in its slow interpreter: the op tests give it small sizes, see :func:`backend_table`)."""
    return [b for b in mlcontrast.available_backends("cpu") if b not in ("torch", "triton")]


def grads(output: torch.Tensor, inputs, upstream: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """d output / d inputs, with ``upstream`` as the incoming gradient (required for non-scalars)."""
    if upstream is None and output.dim() > 0:
        raise ValueError("a non-scalar output needs an upstream gradient")
    return torch.autograd.grad(output, inputs, upstream)


def make_labels(n: int, num_classes: int, ignore_fraction: float = 0.0, singleton: bool = False) -> torch.Tensor:
    """``[n]`` int64 labels in ``[0, num_classes)``, a fraction set to -1, optionally one class of exactly one row."""
    labels = torch.randint(0, num_classes, (n,))
    if ignore_fraction > 0:
        labels[torch.rand(n) < ignore_fraction] = -1
    if singleton and n > 0:
        labels[0] = num_classes  # a class no other row has
    return labels


def make_targets(b: int, c: int, p_positive: float = 0.3, p_unknown: float = 0.2) -> torch.Tensor:
    """``[b, c]`` int64 targets with 1 (positive), 0 (negative) and -1 (unknown)."""
    u = torch.rand(b, c)
    targets = torch.zeros(b, c, dtype=torch.long)
    targets[u < p_positive] = 1
    targets[u > 1 - p_unknown] = -1
    return targets


def loss_and_grads(fn, tensors, upstream: torch.Tensor | None = None):
    """``fn(*leaves)`` and its gradients w.r.t. fresh leaves holding ``tensors`` (strides kept)."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    if upstream is not None:
        upstream = upstream.to(out.dtype)
    return out.detach(), grads(out, leaves, upstream)


def assert_matches(actual_fn, expected_fn, tensors, upstream: torch.Tensor | None = None, names=None):
    """Loss and gradients of ``actual_fn(*tensors)`` against ``expected_fn`` on the tensors upcast.

    The tolerance is that of the first tensor's dtype; fp32/fp64 inputs are checked against the
    expected function run in fp64, fp16/bf16 inputs against it run in fp32. Returns the actual loss
    and gradients.
    """
    dtype = tensors[0].dtype
    ref = reference_dtype(dtype)
    names = names or [f"input {i}" for i in range(len(tensors))]
    out, g = loss_and_grads(actual_fn, tensors, upstream)
    expected, g_expected = loss_and_grads(expected_fn, [t.to(ref) for t in tensors], upstream)
    assert_close_by_norm(out, expected, dtype, "loss")
    for a, e, t, name in zip(g, g_expected, tensors, names):
        assert a.dtype == t.dtype, f"grad of {name} is {a.dtype}, input is {t.dtype}"
        assert_close_by_norm(a, e, dtype, f"grad of {name}")
    return out, g


# ----------------------------------------------------------------------------------------------
# The backends under test: which ones, on which device, with which dtypes and sizes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestedBackend:
    """A fused backend as the op tests run it.

    Attributes:
        name: the ``backend=`` value.
        device: where its tensors live.
        sizes: ``"full"`` (an op file's whole size grid) or ``"small"`` (its small cases only: the
            interpreted Triton backend runs one program after another).
        dtypes: the floating dtypes of an op file's reference grid on it (the grids of other dtypes,
            fp64 and 16-bit, are their own tests on the ``"full"`` backends).
        check_dtypes: the dtypes that opcheck runs its ops in.
        reason: why it cannot run here (its cases are skipped, and say why), or None.
    """

    __test__ = False  # not a test class, whatever its name

    name: str
    device: torch.device
    sizes: str
    dtypes: tuple[torch.dtype, ...]
    check_dtypes: tuple[torch.dtype, ...]
    reason: str | None

    @property
    def slow(self) -> bool:
        return self.sizes == "small"


def _triton_reason() -> str | None:
    from mlcontrast.ops import triton_unavailable_reason

    reason = triton_unavailable_reason()
    if reason is not None or torch.cuda.is_available():
        return reason
    from mlcontrast.ops import label_supcon
    from mlcontrast.ops.utils import is_interpreted

    if not is_interpreted(label_supcon._label_supcon_fwd_kernel):
        return "mlcontrast's Triton kernels were imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it)"
    return None


@functools.cache
def backend_table() -> dict[str, TestedBackend]:
    """The one table of the fused backends the op tests run, by name.

    ``"cpu"`` runs every size; Triton runs in its interpreter on CPU tensors here (slow: small sizes, and
    fp32/fp16 only, its bf16 ``tl.dot`` being wrong), on the GPU when there is one (small sizes still:
    the large ones are the GPU tests). The ``"cuda"`` backend needs a GPU: tests/test_gpu.py.
    """
    cuda = torch.cuda.is_available()
    low = (torch.float16, torch.bfloat16) if cuda else (torch.float16,)
    cpu_reason = None if "cpu" in mlcontrast.available_backends("cpu") else "the C++ extension is not built"
    return {
        "cpu": TestedBackend("cpu", torch.device("cpu"), "full", (torch.float32,), (torch.float32, torch.float64),
                             cpu_reason),  # fmt: skip
        "triton": TestedBackend("triton", torch.device("cuda" if cuda else "cpu"), "small", (torch.float32, *low),
                                (torch.float32,), _triton_reason()),  # fmt: skip
    }


def device_of(backend: str) -> torch.device:
    """The device of ``backend``'s tensors in the op tests."""
    return backend_table()[backend].device


#: Kernel choices that a backend makes for an op and that the tests run each of:
#: ``(op, backend) -> {variant: (module of mlcontrast.ops, attribute, value) or None for the default}``.
VARIANTS: dict[tuple[str, str], dict[str, tuple[str, str, object] | None]] = {
    ("label_supcon", "triton"): {
        "deterministic": ("label_supcon", "ATOMIC", False),
        "atomic": ("label_supcon", "ATOMIC", True),  # the symmetric-tile kernels
    },
    ("update_prototypes_", "triton"): {
        "one-hot": None,  # class sums as one-hot products (the default below 1024 classes)
        "atomic-sums": ("update_prototypes", "ONE_HOT_MAX_CLASSES", 0),
    },
}


def use_variant(monkeypatch, op: str, backend: str, variant: str | None) -> None:
    """Makes ``backend`` use kernel ``variant`` of ``op`` (None: it has one way) for this test."""
    if variant is None:
        return
    setting = VARIANTS[(op, backend)][variant]
    if setting is not None:
        module, attribute, value = setting
        monkeypatch.setattr(importlib.import_module(f"mlcontrast.ops.{module}"), attribute, value)


def _param(values: tuple, backend: TestedBackend):
    ident = "-".join(str(v).removeprefix("torch.") for v in values if v is not None)
    marks = [pytest.mark.skip(reason=backend.reason)] if backend.reason else []
    return pytest.param(*values, marks=marks, id=ident)


def backends(op: str | None = None, *, sizes: str | None = None) -> list:
    """pytest parameters ``backend`` (``backend, variant`` when ``op`` is given: one per kernel variant,
    None for a backend with one way) for every backend under test, or those of ``sizes`` only.

    Example:
        >>> @pytest.mark.parametrize("backend", backends(sizes="full"))
    """
    params = []
    for b in backend_table().values():
        if sizes is not None and b.sizes != sizes:
            continue
        if op is None:
            params.append(_param((b.name,), b))
        else:
            params.extend(_param((b.name, v), b) for v in VARIANTS.get((op, b.name), {None: None}))
    return params


def cases(sizes: Mapping[str, Sequence], op: str | None = None, dtypes: Sequence[torch.dtype] | None = None) -> list:
    """pytest parameters ``backend, [variant,] *size, dtype``: each backend under test with the sizes of its
    size class (``sizes["full"]`` or ``sizes["small"]``) and the dtypes of its reference grid (those of
    them in ``dtypes`` when given), and with each kernel variant it has for ``op`` when ``op`` is given.

    Example:
        >>> @pytest.mark.parametrize("backend,n,d,dtype", cases({"full": [(257, 64)], "small": [(33, 40)]}))
    """
    params = []
    for b in backend_table().values():
        variants = VARIANTS.get((op, b.name), {None: None}) if op is not None else {}
        for size in sizes.get(b.sizes, ()):
            size = size if isinstance(size, tuple) else (size,)
            for dtype in (t for t in b.dtypes if dtypes is None or t in dtypes):
                if op is None:
                    params.append(_param((b.name, *size, dtype), b))
                else:
                    params.extend(_param((b.name, v, *size, dtype), b) for v in variants)
    return params


# ----------------------------------------------------------------------------------------------
# Sample calls of every fused op of the contract (mlcontrast.ops.contract.FUSED_OPS)
# ----------------------------------------------------------------------------------------------


def sample_inputs(op: str, dtype: torch.dtype, device, requires_grad: bool = False) -> list[tuple]:
    """Small argument tuples of the fused ``op`` (its contract's order), each a case worth checking:
    ignored rows, a singleton class, an absent class, anchor rows. Inputs that get a gradient are leaves
    that require one when ``requires_grad``; the sizes suit gradcheck in fp64 and the interpreter.
    """

    def leaf(*shape, grad=False):
        return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(grad)

    def ints(values):
        return torch.tensor(values, device=device)

    g = requires_grad
    if op == "label_supcon":
        z, y = leaf(7, 3, grad=g), ints([0, 0, 1, 1, 1, -1, 2])  # an ignored row, a singleton class 2
        # Every row, then anchor rows 2 .. 5, then anchors 1 .. 6 against the rows from 2 on with every row's
        # contrast-role gradient (grad_stop = R: the op's backward is the gradient of its forward only then).
        return [(z, y, 0.3, 0.2), (z, y, 0.3, 0.2, 2, 5), (z, y, 0.3, 0.2, 1, 6, 2, 7)]
    if op == "label_supcon_queue":
        z, y = leaf(7, 3, grad=g), ints([0, 0, 1, 1, 1, -1, 2])
        q, yq = leaf(5, 3), ints([2, -1, 0, 3, 0])  # an ignored queue row, a class only the queue has
        # Every row against the normalised queue, anchor rows 2 .. 5, the queue as given; an empty queue.
        return [(z, y, q, yq, 0.3, 0.2, True), (z, y, q, yq, 0.3, 0.2, False, 2, 5),
                (z, y, q[:0], yq[:0], 0.3, 0.2, True, 0, None, 7)]  # fmt: skip
    if op == "multihot_supcon":
        z = leaf(7, 3, grad=g)
        # Rows 0 and 1 share a label set, row 2 overlaps row 0 at Jaccard 1/3 exactly (the threshold below),
        # row 3 has no label, label 4 only row 5: every mode once, two of them on anchor rows.
        y = ints([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 0],
                  [0, 0, 0, 0, 1], [1, 0, 1, 0, 0]]).to(torch.uint8)  # fmt: skip
        # grad_stop = R: the op's backward is the gradient of its forward only then (as label_supcon's).
        return [(z, y, 0.3, 0.2, "jaccard", 1 / 3), (z, y, 0.3, 0.2, "any", 0.5, 2, 5), (z, y, 0.3, 0.2, "all", 0.5),
                (z, y, 0.3, 0.2, "mulsupcon", 0.5, 1, 6, 7)]  # fmt: skip
    if op == "prototype_ce":
        z, p = leaf(6, 3, grad=g), leaf(4, 3, grad=g)
        return [(z, ints([0, 3, -1, 1, 1, 2]), p, 0.3)]
    if op == "prototype_nce":
        z, p = leaf(4, 3, 5, grad=g), leaf(3, 5, grad=g)
        return [(z, p, ints([[1, 0, -1], [0, 1, 1], [1, -1, 0], [-1, 0, 0]]), 0.2)]
    if op == "update_prototypes_":
        p, z, y = leaf(4, 5), leaf(9, 5), ints([0, 0, 1, -1, 3, 3, 3, -1, 0])  # class 2 absent
        return [(p, z, y, 0.9, False), (p.clone(), z, y, 0.9, True)]
    raise KeyError(f"no sample inputs for {op!r}: add them here with its entry in FUSED_OPS")


def record_op_calls(monkeypatch, lookup: str = "op") -> list:
    """Records every call of the fused ops that ``mlcontrast.ops.registry.<lookup>`` (``"op"`` or
    ``"backward_op"``) hands out from now on, as ``(name, args)``; the calls still run.

    Example:
        >>> calls = record_op_calls(monkeypatch)
        >>> mlcontrast.label_supcon_loss(z, y, backend="cpu")
        >>> [name for name, _ in calls]
        ['label_supcon']
    """
    from mlcontrast.ops import registry

    calls = []
    real = getattr(registry, lookup)

    def spying(name, backend):
        run = real(name, backend)

        def call(*args, **kwargs):
            calls.append((name, args))
            return run(*args, **kwargs)

        return call

    monkeypatch.setattr(registry, lookup, spying)
    return calls


def backward_inputs(op: str, args: tuple, outputs: tuple) -> tuple:
    """The arguments of ``<op>_backward`` after the forward call ``op(*args) -> outputs``: a random
    incoming gradient, the tensor inputs, the saved statistics, the other inputs (the contract's order)."""
    from mlcontrast.ops.contract import FUSED_OPS

    fused = FUSED_OPS[op]
    values = dict(zip((a.name for a in fused.args), args))
    tensors = [values[a.name].detach() for a in fused.tensor_args]
    others = [values[a.name] for a in fused.other_args if a.name in values]
    return (torch.randn_like(outputs[0]), *tensors, *outputs[1:], *others)


# ----------------------------------------------------------------------------------------------
# Triton-only tests
# ----------------------------------------------------------------------------------------------


def triton_module(name: str):
    """The Triton op module ``mlcontrast.ops.<name>``; skips the calling test where Triton cannot run."""
    reason = backend_table()["triton"].reason
    if reason is not None:
        pytest.skip(f"the Triton backend cannot run here: {reason}")
    return importlib.import_module(f"mlcontrast.ops.{name}")


def record_launches(module, monkeypatch, run: bool = True) -> list:
    """Records ``(kernel name, grid, keyword arguments)`` of every launch of ``module``'s kernels (and runs
    them unless ``run`` is False)."""
    launched, real_launch = [], module.launch

    def recording_launch(kernel, grid):
        launcher = real_launch(kernel, grid) if run else (lambda *args, **kwargs: None)
        return lambda *args, **kwargs: (launched.append((kernel.__name__, grid, kwargs)), launcher(*args, **kwargs))

    monkeypatch.setattr(module, "launch", recording_launch)
    return launched
