"""The compiled extension ``mlcontrast._C``: whether it loaded, and whether it holds CUDA kernels.

A leaf module (it imports nothing else from mlcontrast), so that the backend resolution
(:mod:`mlcontrast._backends`) and the compiled ops' registration (:mod:`mlcontrast.ops.compiled`) can
both read these facts without importing each other.
"""

from __future__ import annotations

import torch

__all__ = ["EXTENSION_ERROR", "HAS_CUDA_KERNELS"]


def _load_extension() -> str | None:
    """Loads the compiled extension; None on success, otherwise why it is missing."""
    try:
        from mlcontrast import _C  # noqa: F401  (loading it registers the torch.ops.mlcontrast kernels)
    except ImportError as error:
        return (
            f"the compiled extension mlcontrast._C did not load ({error}); reinstall with "
            "`pip install --no-build-isolation .` from a source checkout"
        )
    return None


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mlcontrast::{op}", dispatch_key)


# Decided once at import, so that resolving a backend is plain Python over constants, which
# torch.compile traces without a graph break.

#: None when the extension loaded, otherwise why not and the remedy.
EXTENSION_ERROR = _load_extension()
#: Whether the extension was built with its CUDA kernels.
HAS_CUDA_KERNELS = EXTENSION_ERROR is None and _has_kernel("label_supcon", "CUDA")
