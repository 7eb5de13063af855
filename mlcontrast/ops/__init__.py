"""Fused ops: the glue to the compiled extension (``compiled.py``), per op the Triton kernels, and the
registry from (op, backend) to the callable that runs it (``registry.py``).

The Triton op files (``label_supcon.py``, ``prototype_ce.py``, ``prototype_nce.py``,
``update_prototypes.py``) are imported on first use by :mod:`mlcontrast.ops.registry`, because importing
them decorates their kernels: ``TRITON_INTERPRET=1`` must be set before that to run them on CPU tensors.
"""

from __future__ import annotations

from mlcontrast._triton_status import triton_unavailable_reason
from mlcontrast.ops import compiled  # noqa: F401  (registers fake kernels and autograd of torch.ops.mlcontrast)
from mlcontrast.ops.registry import TRITON_OP_MODULES as _TRITON_OP_MODULES  # noqa: F401  (tests import it)

__all__ = ["triton_unavailable_reason"]
