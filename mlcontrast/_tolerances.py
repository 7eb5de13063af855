"""The one table of tolerances: how far a fused backend may be from the reference, per dtype.

The test suite (``tests/utils.py``) and ``python -m mlcontrast.check`` both read it, so that a kernel
that passes one passes the other.
"""

from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "reference_dtype", "relative_error", "within_tolerance"]

# (rtol, atol) per dtype of the computation under test. The check is by norm over the whole tensor:
#     ||actual - expected|| <= rtol * ||expected|| + atol.
# fp32 and fp64 are compared with a reference computed in fp64; fp16 and bf16 inputs are compared with
# the reference run on the same values upcast to fp32. The kernels accumulate in fp32, so the
# low-precision error comes mostly from rounding the returned gradients to fp16 (2^-11) or bf16 (2^-8).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (5e-3, 1e-4),
    torch.bfloat16: (2e-2, 1e-3),
}

_TINY = 1e-30


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference runs in to check a computation in ``dtype`` (see TOLERANCES)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over the whole tensors, in fp64 (inf if either is not finite)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return float("inf")
    return torch.linalg.vector_norm(a - e).item() / max(torch.linalg.vector_norm(e).item(), _TINY)


def within_tolerance(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Same shape, finite, and ||actual - expected|| <= rtol ||expected|| + atol for ``dtype``."""
    rtol, atol = TOLERANCES[dtype]
    if actual.shape != expected.shape:
        return False
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return False
    return torch.linalg.vector_norm(a - e).item() <= rtol * torch.linalg.vector_norm(e).item() + atol
