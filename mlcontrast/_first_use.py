"""The first-use check: a fused GPU backend proves itself on small problems before ``"auto"`` trusts it.

No committed measurement vouches for a GPU that the kernels have never run on. So the first call of
backend ``"triton"`` or ``"cuda"`` for a (device kind, dtype) that ``mlcontrast._measured`` does not
cover runs the small check of :mod:`mlcontrast.check` for that backend and dtype, once per process. When
an op's loss or gradients disagree with the reference, a :class:`BackendMismatchWarning` says so and
``"auto"`` takes the next available backend for that op; an explicitly requested backend still runs as
asked (after the same warning).

The check runs in eager mode only: while ``torch.compile`` traces, or a CUDA graph is being captured,
nothing is run, and only the verdicts of earlier eager calls on the same device are used.

``MLCONTRAST_FIRST_USE_CHECK``: ``0`` (or ``false``, ``off``) turns it off; ``1`` (default) guards the
GPU backends on CUDA tensors; ``all`` also guards the backends on CPU tensors (``cpu``, and ``triton``
under ``TRITON_INTERPRET``), which is how the tests exercise it without a GPU.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Callable

import torch

from mlcontrast import _measured
from mlcontrast._base import dtype_name, tf32_allowed
from mlcontrast._tolerances import TOLERANCES

__all__ = ["BackendMismatchWarning", "device_kind", "reset", "set_runner", "trusted"]

ENV = "MLCONTRAST_FIRST_USE_CHECK"
REPORT_TO = "the mlcontrast issue tracker"

#: The backends a check guards on CUDA tensors by default (the CPU kernels are tested by every install).
GPU_BACKENDS = ("triton", "cuda")


class BackendMismatchWarning(RuntimeWarning):
    """A fused backend disagreed with the reference (or failed) on the small problems of the check."""


# (backend, device kind, dtype name) -> {op: what went wrong} for the ops that failed; {} when all passed.
_VERDICTS: dict[tuple[str, str, str], dict[str, str]] = {}
# (backend, device type, device index, dtype name) -> the ops that failed there: the only state read while
# torch.compile traces (plain dict lookups, no device queries). Holds failures only, so it stays empty
# (and its guard trivial) on a machine where everything passed.
_FAILED_ON_DEVICE: dict[tuple[str, str, int | None, str], frozenset[str]] = {}
# (backend, device type, device index, dtype name and TF32) -> the failed ops: what each device found.
_SEEN: dict[tuple[str, str, int | None, str], dict[str, str]] = {}
_LOCK = threading.RLock()
_STATE = threading.local()  # .running: this thread is inside a check (its explicit calls must not recurse)
# (device, backend, dtype) -> the check's results (with .op, .passed, .error, .loss_rel_err, .grad_rel_err).
_RUNNER: Callable[[torch.device, str, torch.dtype], list] | None = None


def set_runner(runner: Callable[[torch.device, str, torch.dtype], list] | None) -> None:
    """Sets what runs the check of one backend and dtype on a device (mlcontrast's ``__init__`` passes
    :func:`mlcontrast.check.run_checks`).

    Passed in rather than imported: the check calls the public functions, which resolve their backend
    here, so an import of the check from this module would close an import cycle
    (``_backends -> _first_use -> check -> functional -> _backends``).
    """
    global _RUNNER
    _RUNNER = runner


def reset() -> None:
    """Forgets every verdict, so the next guarded call checks again (for tests)."""
    with _LOCK:
        _VERDICTS.clear()
        _SEEN.clear()
        _FAILED_ON_DEVICE.clear()


def _mode() -> str:
    value = os.environ.get(ENV, "1").strip().lower()
    return "off" if value in ("0", "false", "off", "no") else "all" if value == "all" else "gpu"


def guarded(backend: str, device: torch.device) -> bool:
    """Whether calls of ``backend`` on ``device`` are checked on first use (see ``MLCONTRAST_FIRST_USE_CHECK``)."""
    mode = _mode()
    if mode == "off" or backend in ("auto", "torch"):
        return False
    if mode == "all":
        return True
    return device.type == "cuda" and backend in GPU_BACKENDS


def device_kind(device: torch.device) -> str:
    """What the kernels' correctness depends on: the GPU's name and compute capability, or ``"cpu"``."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def measured(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the committed GPU benchmarks (mlcontrast._measured) ran ``backend`` in ``dtype`` on this GPU model.

    Those runs compared every result with the reference, and only plausible ones entered the table (see
    ``benchmarks.report.plausible``); the GPU session that produces them also runs the full check.
    """
    if device.type != "cuda" or _measured.DEVICE is None or _measured.DEVICE != torch.cuda.get_device_name(device):
        return False
    name = dtype_name(dtype)
    return any(key[1] == name and any(p[2] == backend for p in points) for key, points in _measured.FASTEST.items())


def _runnable_now(device: torch.device) -> bool:
    # A check needs a real device and must not land inside a CUDA graph being captured.
    if device.type == "cuda":
        return torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()
    return device.type == "cpu"


def _describe(result) -> str:
    if result.error is not None:
        return result.error
    return f"loss rel. error {result.loss_rel_err:.2e}, gradient rel. error {result.grad_rel_err or 0.0:.2e}"


def _precision(device: torch.device, dtype: torch.dtype) -> str:
    # fp32 on CUDA takes another kernel path with TF32 on: a separate verdict.
    tf32 = dtype == torch.float32 and device.type == "cuda" and tf32_allowed()
    return dtype_name(dtype) + ("/tf32" if tf32 else "")


def _verdict(backend: str, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The failed ops of ``backend`` in ``dtype`` on this device kind, running the check the first time."""
    key = (backend, device_kind(device), _precision(device, dtype))
    with _LOCK:
        if key in _VERDICTS:
            return _VERDICTS[key]
        if _RUNNER is None:  # nothing to check with (mlcontrast's __init__ sets it): nothing is checked
            return {}
        _STATE.running = True
        try:
            results = _RUNNER(device, backend, dtype)
        finally:
            _STATE.running = False
        failed = {r.op: _describe(r) for r in results if not r.passed}
        _VERDICTS[key] = failed
        if failed:
            # Under torch.compile the TF32 switch is not consulted: a failure in either mode counts.
            where = (backend, device.type, device.index, dtype_name(dtype))
            _FAILED_ON_DEVICE[where] = _FAILED_ON_DEVICE.get(where, frozenset()) | frozenset(failed)
            _warn(backend, key[1], key[2], failed)
        return failed


def _warn(backend: str, kind: str, dtype: str, failed: dict[str, str]) -> None:
    ops = "\n".join(f"  {op}: {what}" for op, what in failed.items())
    warnings.warn(
        f'mlcontrast: backend "{backend}" gave WRONG results for {dtype} on {kind} in its first-use check:\n'
        f'{ops}\nbackend="auto" now uses the next available backend for these ops; an explicit '
        f'backend="{backend}" still runs them as asked. Please report this to {REPORT_TO} with the output '
        f"of `python -m mlcontrast.check`. ({ENV}=0 turns this check off.)",
        BackendMismatchWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside mlcontrast and torch (``nn.Module.__call__``), as
    seen from :func:`_warn`: the warning then points at the user's line, whichever API got there."""
    packages = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules["mlcontrast"], torch))
    frame, level = sys._getframe(2), 2  # the caller of _warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(packages):
        frame, level = frame.f_back, level + 1
    return level


def trusted(backend: str, device: torch.device, dtype: torch.dtype, op: str | None) -> bool:
    """False when the first-use check found ``op`` (any op when None) wrong on ``backend`` for this device
    kind and ``dtype``; runs that check on the first guarded, uncovered eager call."""
    if torch.compiler.is_compiling():
        if not _FAILED_ON_DEVICE:
            return True
        failed = _FAILED_ON_DEVICE.get((backend, device.type, device.index, dtype_name(dtype)))
        return failed is None or (op is not None and op not in failed)
    if getattr(_STATE, "running", False) or not guarded(backend, device) or dtype not in TOLERANCES:
        return True
    seen = (backend, device.type, device.index, _precision(device, dtype))
    failed = _SEEN.get(seen)  # after the first call: one dict lookup, no device queries
    if failed is None:
        if not _runnable_now(device):
            return True
        failed = {} if measured(backend, device, dtype) else _verdict(backend, device, dtype)
        _SEEN[seen] = failed
    return not failed or (op is not None and op not in failed)
