"""Memory of a case: :class:`PeakMemory` (the extra peak of a region: the resident-set high-water mark on CPU,
reset through ``/proc/self/clear_refs`` or an RSS sampler thread where that is impossible;
``torch.cuda.max_memory_allocated`` on CUDA), the address-space cap of a case's process and the recognition
of allocation failures.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import threading
import time
from typing import Any

from benchmarks.harness.constants import GIB, MIB

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _status_kib(key: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def hwm_bytes() -> int:
    return (_status_kib("VmHWM") or 0) * 1024


def vm_size_bytes() -> int:
    return (_status_kib("VmSize") or 0) * 1024


def malloc_trim() -> None:
    """Gives the C heap's free pages back to the system, so that the baseline RSS is not inflated."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_hwm() -> bool:
    """Resets VmHWM to the current RSS through /proc/self/clear_refs; True when that verifiably worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return hwm_bytes() <= rss_bytes() + 4 * MIB


class _RssSampler(threading.Thread):
    def __init__(self, interval_s: float = 1e-3):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def finish(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_bytes())


class PeakMemory:
    """Extra peak memory of a region, above what was in use when it started.

    CPU: the resident set. ``start()`` collects garbage, trims the C heap, reads RSS and resets the
    high-water mark (``/proc/self/clear_refs`` with ``5``); ``stop()`` reads ``VmHWM``. Where the reset is
    not possible, a thread samples RSS every millisecond instead (``method = "rss_sampler_1ms"``, which
    can miss short peaks). CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus
    ``memory_allocated`` at the start (tensors only, the caching allocator's reserve not counted).
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.result: dict[str, Any] | None = None
        self._sampler: _RssSampler | None = None

    def start(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
            return
        malloc_trim()
        self._before = rss_bytes()
        if reset_hwm():
            self._method = "vmhwm_clear_refs"
        else:
            self._method = "rss_sampler_1ms"
            self._sampler = _RssSampler()
            self._sampler.start()

    def stop(self) -> dict[str, Any]:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.result = {"method": "cuda_max_memory_allocated", "before_bytes": self._before, "peak_bytes": peak,
                           "extra_peak_bytes": peak - self._before}
            return self.result
        if self._sampler is not None:
            peak = self._sampler.finish()
            self._sampler = None
        else:
            peak = hwm_bytes()
        self.result = {"method": self._method, "before_bytes": self._before, "peak_bytes": peak,
                       "extra_peak_bytes": max(0, peak - self._before)}
        return self.result


def limit_address_space(extra_gib: float | None) -> int | None:
    """Caps this process's address space at its current size plus ``extra_gib`` (RLIMIT_AS).

    An allocation beyond the cap then fails with an exception (recorded as ``"oom"``) instead of
    waking the OOM killer. The cap is virtual memory: it counts what is mapped, not what is touched.
    Returns the limit in bytes, or None when none was set.
    """
    if not extra_gib or extra_gib <= 0:
        return None
    limit = vm_size_bytes() + int(extra_gib * GIB)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


_OOM_MESSAGES = ("can't allocate memory", "cannot allocate memory", "out of memory", "bad_alloc",
                 "not enough memory", "defaultcpuallocator")


def is_oom(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    if type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return any(m in text for m in _OOM_MESSAGES)
