"""Fake (meta) kernels and autograd formulas of the compiled ops ``torch.ops.mlcontrast.*``.

The schemas live in ``csrc/ops.cpp`` and the kernels in ``csrc/cpu`` and ``csrc/cuda``; what each op
takes, returns and saves is :mod:`mlcontrast.ops.contract`, which registers both the fake kernels (so
that ``torch.compile`` traces calls without running them) and the autograd formulas (registered on the
ops rather than wrapped in ``autograd.Function``, which keeps them composable with
``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

from mlcontrast._extension import EXTENSION_ERROR
from mlcontrast.ops import contract

LIBRARY = "mlcontrast"


def _register() -> bool:
    if EXTENSION_ERROR is not None:
        return False
    contract.register_fakes(LIBRARY)
    for fused in contract.FUSED_OPS.values():
        if fused.backward is not None:
            contract.register_autograd(LIBRARY, fused.name)
    return True


REGISTERED = _register()
