"""Shared helpers of the test suite: one tolerance table, one comparison, the backends to test."""

from __future__ import annotations

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
    """The fused backends these tests run on CPU tensors: everything but the reference and Triton.

    Triton runs on CPU tensors only under the (slow) interpreter; tests/test_triton_ops.py checks it
    with small sizes."""
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
