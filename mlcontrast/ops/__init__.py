"""Fused ops: the glue to the compiled extension (``compiled.py``) and, per op, the Triton kernels.

The Triton op files (``label_supcon.py``, ``prototype_ce.py``, ``prototype_nce.py``,
``update_prototypes.py``) are imported on first use by :mod:`mlcontrast.functional`, because importing
them decorates their kernels: ``TRITON_INTERPRET=1`` must be set before that to run them on CPU tensors.
"""

from __future__ import annotations

import sys

from mlcontrast._base import interpreting
from mlcontrast.ops import compiled  # noqa: F401  (registers fake kernels and autograd of torch.ops.mlcontrast)

_TRITON_OP_MODULES = ("label_supcon", "prototype_ce", "prototype_nce", "update_prototypes")


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
        from triton.runtime.interpreter import InterpretedFunction

        for name in _TRITON_OP_MODULES:
            module = sys.modules.get(f"mlcontrast.ops.{name}")
            if module is None:
                continue
            kernels = [k for k in vars(module).values() if type(k).__name__ in ("JITFunction", "InterpretedFunction")]
            if kernels and not all(isinstance(k, InterpretedFunction) for k in kernels):
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
