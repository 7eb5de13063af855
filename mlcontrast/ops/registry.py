"""The one map from (fused op, fused backend) to the callable that runs it.

Every fused op exists in two torch libraries, with the same required arguments and outputs:
``torch.ops.mlcontrast.<op>`` (the compiled extension: backends ``"cpu"`` and ``"cuda"``) and
``torch.ops.mlcontrast_triton.<op>`` (Triton: backend ``"triton"``). An op of one library may take
defaulted trailing arguments that only its backend has (Triton's ``label_supcon`` takes ``atomic``);
:func:`op` fills them in by keyword, so that a caller passes the required arguments only and never
names a backend's options. Adding a fused backend is one entry of :data:`FUSED_BACKENDS`; adding an op,
its entry in :mod:`mlcontrast.ops.contract` (and here its backend-only arguments, if it has any, and
its Triton module in :data:`TRITON_OP_MODULES` and :func:`_load_triton`).

Example:
    >>> loss, *stats = op("prototype_ce", "cpu")(torch.randn(5, 8), torch.tensor([0, 1, -1, 1, 0]),
    ...                                        torch.randn(2, 8), 0.1)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mlcontrast.ops.contract import FUSED_OPS

__all__ = ["FUSED_BACKENDS", "OPS", "TRITON_OP_MODULES", "FusedBackend", "backward_op", "op", "rows_in_input_dtype"]

#: The fused ops, by their names in both libraries (their schemas: :mod:`mlcontrast.ops.contract`).
OPS = tuple(FUSED_OPS)

#: The modules of mlcontrast.ops that define the Triton ops (:func:`_load_triton` imports them).
TRITON_OP_MODULES = ("label_supcon", "multihot_supcon", "prototype_ce", "prototype_nce", "update_prototypes")


@dataclass(frozen=True)
class FusedBackend:
    """Where a fused backend's ops live and what it wants from its callers."""

    #: The ``torch.ops`` namespace of its ops.
    library: str
    #: Whether it wants rows normalised by the caller in the caller's dtype (16-bit rows keep the GPU's
    #: 16-bit tensor-core rate and half the memory traffic) rather than in the fp32 they were normalised in.
    rows_in_input_dtype: bool
    #: Makes ``torch.ops.<library>.<op>`` exist (imports what registers them).
    load: Callable[[], None]
    #: The backend-only trailing arguments of an op, by keyword (read on every call: they may follow
    #: the environment).
    options: Callable[[str], dict[str, Any]]


def _load_compiled() -> None:
    # Nothing to do: mlcontrast._extension loaded the extension (its schemas and kernels), and
    # mlcontrast.ops.compiled, imported with this package, registered their fake kernels and autograd.
    return None


def _load_triton() -> None:
    # Importing an op file registers torch.ops.mlcontrast_triton.<op>. Imported on first use, not with
    # mlcontrast: importing decorates the kernels, and TRITON_INTERPRET=1 must be set before that to run
    # them on CPU tensors. A static import statement, because torch.compile traces it (it does not trace
    # importlib.import_module), so the first call may be a compiled one.
    from mlcontrast.ops import (  # noqa: F401
        label_supcon,
        multihot_supcon,
        prototype_ce,
        prototype_nce,
        update_prototypes,
    )


def _no_options(name: str) -> dict[str, Any]:
    return {}


def _triton_options(name: str) -> dict[str, Any]:
    if name != "label_supcon":
        return {}
    from mlcontrast.ops import label_supcon

    # The symmetric-tile kernels (half the flops, atomics) or the deterministic ones.
    return {"atomic": label_supcon._use_atomics()}


#: The fused backends, by the names that ``backend=`` takes (``"auto"`` and ``"torch"`` are not fused).
FUSED_BACKENDS: dict[str, FusedBackend] = {
    # The CPU kernels compute in fp32 whatever they get: fp32 rows spare them a rounding.
    "cpu": FusedBackend("mlcontrast", rows_in_input_dtype=False, load=_load_compiled, options=_no_options),
    "cuda": FusedBackend("mlcontrast", rows_in_input_dtype=True, load=_load_compiled, options=_no_options),
    "triton": FusedBackend("mlcontrast_triton", rows_in_input_dtype=True, load=_load_triton, options=_triton_options),
}


def _backend(backend: str) -> FusedBackend:
    spec = FUSED_BACKENDS.get(backend)
    if spec is None:
        raise ValueError(f"backend must be one of the fused backends {tuple(FUSED_BACKENDS)}, got {backend!r}")
    return spec


def op(name: str, backend: str) -> Callable[..., Any]:
    """The callable that runs fused op ``name`` on fused ``backend``: it takes the op's required
    arguments (the same on every backend) and returns its outputs (the loss first)."""
    if name not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {name!r}")
    spec = _backend(backend)
    spec.load()
    packet = getattr(getattr(torch.ops, spec.library), name)
    options = spec.options(name)
    return functools.partial(packet, **options) if options else packet


def backward_op(name: str, backend: str) -> Callable[..., Any]:
    """The callable that runs the backward op of fused op ``name`` on fused ``backend`` (the contract's
    ``<name>_backward``), with the backend's options as :func:`op` passes them to the forward."""
    forward = FUSED_OPS.get(name)
    if forward is None or forward.backward is None:
        raise ValueError(f"op must be one of the fused ops with a backward, got {name!r}")
    spec = _backend(backend)
    spec.load()
    packet = getattr(getattr(torch.ops, spec.library), forward.backward)
    options = spec.options(name)
    return functools.partial(packet, **options) if options else packet


def rows_in_input_dtype(backend: str) -> bool:
    """Whether fused ``backend`` wants normalised rows in the caller's dtype (else in fp32)."""
    return _backend(backend).rows_in_input_dtype
