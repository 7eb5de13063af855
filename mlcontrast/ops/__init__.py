"""Fused ops: the glue to the compiled extension (``compiled.py``) and, per op, the Triton kernels."""

from __future__ import annotations

from mlcontrast.ops import compiled  # noqa: F401  (registers fake kernels and autograd of torch.ops.mlcontrast)


def triton_unavailable_reason() -> str | None:
    """None when the Triton backend can run, otherwise why not."""
    return "the Triton kernels are not part of this version of mlcontrast yet"
