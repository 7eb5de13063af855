"""Whether the Triton backend can run here, and if not, why.

A leaf module (it imports nothing from mlcontrast but :mod:`mlcontrast._base`), read by the backend
resolution (:mod:`mlcontrast._backends`) without importing the ops.
"""

from __future__ import annotations

import sys

from mlcontrast._base import interpreting

__all__ = ["triton_unavailable_reason"]

#: The package whose modules hold the Triton kernels (the op files and their kernel files).
_OPS_PACKAGE = "mlcontrast.ops."


def _compiled_kernel_modules() -> list[str]:
    """The imported modules of mlcontrast.ops that hold compiled (GPU-only) Triton kernels."""
    from triton.runtime.interpreter import InterpretedFunction

    found = []
    for name, module in list(sys.modules.items()):
        if not name.startswith(_OPS_PACKAGE) or module is None:
            continue
        kernels = [k for k in vars(module).values() if type(k).__name__ in ("JITFunction", "InterpretedFunction")]
        if any(not isinstance(k, InterpretedFunction) for k in kernels):
            found.append(name)
    return found


def triton_unavailable_reason() -> str | None:
    """None when the Triton backend can run here, otherwise why not and the remedy.

    It can run where triton imports and either torch sees a CUDA GPU or ``TRITON_INTERPRET=1`` is set
    (the kernels then run on CPU tensors in Triton's interpreter: slow, for tests).
    """
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as error:
        return f"triton is not installed or does not import ({error}); install it with `pip install triton`"
    if interpreting():
        # Kernels are decorated when their module is imported: a module imported before the variable
        # was set holds compiled (GPU-only) kernels.
        if _compiled_kernel_modules():
            return (
                "TRITON_INTERPRET=1 was set after mlcontrast's Triton kernels were imported; set it before "
                "the first import of mlcontrast.ops (e.g. in the environment of the process)"
            )
        return None
    import torch

    if not torch.cuda.is_available():
        return (
            "the Triton kernels need a CUDA GPU and torch sees none; set TRITON_INTERPRET=1 before importing "
            "mlcontrast to run them on CPU tensors in the (slow) Triton interpreter"
        )
    return None
