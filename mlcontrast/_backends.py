"""Which backends exist for a device, and which one a call uses.

``"auto"`` takes, on CUDA tensors, the available backend that the committed GPU benchmarks found
fastest at the nearest measured shape (:mod:`mlcontrast._measured`), and otherwise the first backend
of :func:`available_backends`; ``MLCONTRAST_BACKEND`` replaces ``"auto"`` by a fixed choice. An
explicitly requested backend that is unavailable raises ``RuntimeError`` saying why and how to get it.

A fused GPU backend that no measurement covers is checked on its first use (:mod:`mlcontrast._first_use`):
``"auto"`` passes over one that failed the check, an explicit choice runs as asked.
"""

from __future__ import annotations

import math
import os

import torch

from mlcontrast import _first_use, _measured
from mlcontrast._base import BACKENDS, dtype_name, interpreting
from mlcontrast._extension import EXTENSION_ERROR, HAS_CUDA_KERNELS  # EXTENSION_ERROR: also read from here
from mlcontrast._triton_status import triton_unavailable_reason
from mlcontrast._validation import check_backend

__all__ = [
    "BACKENDS", "EXTENSION_ERROR", "HAS_CUDA_KERNELS", "available_backends", "dtype_name", "measured_fastest",
    "resolve", "why_unavailable",
]


def why_unavailable(backend: str, device: torch.device, op: str | None = None) -> str | None:
    """None when ``backend`` can run on ``device`` (and has kernels for fused ``op``, when given), otherwise
    the reason and the remedy."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if op is not None:
        missing = _missing_kernels(op, backend)
        if missing is not None:
            return missing
    if backend == "cpu":
        if device.type != "cpu":
            return f'backend "cpu" runs on CPU tensors only, these are on {device}'
        return EXTENSION_ERROR
    if backend == "cuda":
        if device.type != "cuda":
            return f'backend "cuda" runs on CUDA tensors only, these are on {device}'
        if not torch.cuda.is_available():
            return "no CUDA GPU is available to torch"
        if EXTENSION_ERROR is not None:
            return EXTENSION_ERROR
        if not HAS_CUDA_KERNELS:
            return (
                "mlcontrast was built without its CUDA kernels; reinstall on a machine with nvcc and a CUDA "
                "build of torch, with MLCONTRAST_BUILD_CUDA=1 to make a failure loud"
            )
        return None
    if backend == "triton":
        if device.type == "cpu" and not interpreting():
            return 'backend "triton" runs on CUDA tensors (on CPU tensors only under TRITON_INTERPRET=1)'
        if device.type not in ("cpu", "cuda"):
            return f'backend "triton" does not run on {device}'
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is available to torch"
        return triton_unavailable_reason()
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _missing_kernels(op: str, backend: str) -> str | None:
    from mlcontrast.ops.contract import FUSED_OPS

    fused = FUSED_OPS.get(op)
    if fused is None or backend not in BACKENDS or backend in fused.backends:
        return None
    return f'op "{op}" has no "{backend}" kernels yet; its fused backends are {", ".join(fused.backends)}'


def _auto_order(device: torch.device) -> tuple[str, ...]:
    # On CUDA, before any measurement: Triton first. Its tile products compile to the architecture's best
    # instructions (wgmma on Hopper) with software pipelining, where the CUDA C++ kernels use wmma with
    # synchronous tile loads and hold more scratch; the measured table replaces this guess per shape.
    return ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "triton", "torch")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backend names usable for tensors on ``device``, in the order ``"auto"`` tries them.

    Example:
        >>> import mlcontrast
        >>> mlcontrast.available_backends("cpu")[-1]
        'torch'
    """
    device = torch.device(device)
    return [name for name in _auto_order(device) if why_unavailable(name, device) is None]


#: Sizes are placed on a log2 grid of this many steps per octave before shapes are compared.
_STEPS_PER_OCTAVE = 4
_MAX_OCTAVES = 48


def _log2_step(size: int | torch.SymInt) -> float:
    """log2(size), to within half a grid step, found with integer comparisons only: under
    ``torch.compile`` a symbolic size then costs a few guards on its range, where float maths on it
    would fail to trace."""
    lo, hi = 0, _MAX_OCTAVES * _STEPS_PER_OCTAVE  # 2^(lo / steps) <= size < 2^(hi / steps), size >= 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size >= math.ceil(2 ** (mid / _STEPS_PER_OCTAVE)):
            lo = mid
        else:
            hi = mid
    return (lo + 0.5) / _STEPS_PER_OCTAVE


def measured_fastest(
    op: str, dtype: torch.dtype, rows: int, dim: int, available: list[str], table: dict | None = None
) -> str | None:
    """The backend of ``available`` that ran fastest at the measured shape nearest to ``(rows, dim)``.

    Shapes are compared on a log scale (twice the rows counts as much as twice the dimension), with
    the call's sizes rounded to a quarter octave; None when nothing was measured for ``(op, dtype)``
    among ``available``.

    Example:
        >>> table = {("label_supcon", "bfloat16"): ((4096, 256, "cuda"), (65536, 256, "triton"))}
        >>> measured_fastest("label_supcon", torch.bfloat16, 50000, 256, ["cuda", "triton", "torch"], table)
        'triton'
    """
    table = _measured.FASTEST if table is None else table
    points = [p for p in table.get((op, dtype_name(dtype)), ()) if p[2] in available]
    if not points:
        return None
    x, y = _log2_step(rows), _log2_step(dim)

    def distance(point: tuple[int, int, str]) -> float:
        return (math.log2(max(point[0], 1)) - x) ** 2 + (math.log2(max(point[1], 1)) - y) ** 2

    return min(points, key=distance)[2]


def resolve(backend: str, device: torch.device, op: str | None = None, features: torch.Tensor | None = None,
            rows: int | None = None) -> str:
    """The backend that runs a call with ``backend=`` on tensors on ``device``.

    ``op`` (the fused op's name), ``features`` and ``rows`` (the rows the op sees, features.shape[0]
    when None) let ``"auto"`` on CUDA follow the measured table.
    """
    check_backend(backend)
    if backend == "auto":
        forced = os.environ.get("MLCONTRAST_BACKEND", "").strip()
        if forced and forced != "auto":
            if forced not in BACKENDS:
                raise ValueError(f"MLCONTRAST_BACKEND must be one of {BACKENDS}, got {forced!r}")
            backend = forced
        else:
            return _auto(device, op, features, rows)
    reason = why_unavailable(backend, device, op)
    if reason is not None:
        raise RuntimeError(f'mlcontrast backend "{backend}" is unavailable: {reason}')
    if features is not None:
        _first_use.trusted(backend, device, features.dtype, op)  # asked for: runs either way, after a warning
    return backend


def _auto(device: torch.device, op: str | None, features: torch.Tensor | None, rows: int | None) -> str:
    choice = None
    if device.type == "cuda" and op is not None and features is not None and _measured.FASTEST:
        available = available_backends(device)
        rows = features.shape[0] if rows is None else rows
        choice = measured_fastest(op, features.dtype, rows, features.shape[-1], available)
    order = _auto_order(device) if choice is None else (choice, *(n for n in _auto_order(device) if n != choice))
    # The first available (and, where checked on first use, correct) backend in that order, without
    # probing the ones after it; "torch", the reference, always qualifies.
    for name in order:
        if (name == choice or why_unavailable(name, device, op) is None) and (
            features is None or _first_use.trusted(name, device, features.dtype, op)
        ):
            return name
    return "torch"
