"""The device's dense matmul rate and copy bandwidth, the denominators of the throughput fractions, measured
in a child process: ``python -m benchmarks.harness.rates --case-json '{"device": "cuda", "dtype": "bfloat16",
"matmul_size": 8192, "copy_bytes": 1073741824}'``.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable

from benchmarks.harness.constants import GIB
from benchmarks.harness.devices import select_cuda_device, tf32_allowed, torch_dtype
from benchmarks.harness.processes import child_main, run_case_subprocess

#: The module run as the child of :func:`measure_device_rates` (this one).
RATES_MODULE = "benchmarks.harness.rates"


def _cuda_event_median_s(fn: Callable[[], Any], iters: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def median_time_s(fn: Callable[[], Any], device: str, runs: int = 5) -> tuple[float, list[float], str]:
    """The median over ``runs`` runs of each run's median time of ``fn()`` (seconds), the per-run medians,
    and the method. CUDA: one ``triton.testing.do_bench(fn, return_mode="median")`` per run (CUDA events
    when Triton is missing); CPU: one ``time.perf_counter`` measurement per run after one warm-up call."""
    per_run: list[float] = []
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        for _ in range(runs):
            if do_bench is not None:
                per_run.append(float(do_bench(fn, warmup=25, rep=100, return_mode="median")) / 1e3)
            else:
                per_run.append(_cuda_event_median_s(fn))
        method = ("triton.testing.do_bench(return_mode='median')" if do_bench is not None
                  else "CUDA events, median of 20") + f", median of {runs} runs"
    else:
        fn()
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            per_run.append(time.perf_counter() - t0)
        method = f"time.perf_counter, median of {runs} calls after one warm-up call"
    return statistics.median(per_run), per_run, method


def measure_matmul_rate(device: str, dtype: str, size: int = 8192, runs: int = 5) -> dict[str, Any]:
    """Dense ``torch.mm`` rate of a ``size``³ product in ``dtype`` (2·size³ FLOPs per product).

    For float32 on CUDA the rate depends on whether TF32 is allowed (TF32 tensor cores or IEEE fp32; read
    through ``mlcontrast._base.tf32_allowed``, since reading the legacy ``allow_tf32`` raises once torch's
    ``fp32_precision`` switch was used), which is recorded with the result; it is the setting of the process
    that measures, the same as that of the cases (``--allow-tf32``)."""
    import torch

    dt = torch_dtype(dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dt)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dt)
    out = torch.empty(size, size, device=device, dtype=dt)
    median_s, per_run, method = median_time_s(lambda: torch.mm(a, b, out=out), device, runs)
    flops = 2.0 * size**3
    cuda = device.startswith("cuda")
    return {
        "op": "torch.mm", "shape": [size, size, size], "dtype": dtype,
        "allow_tf32": tf32_allowed() if cuda and dtype == "float32" else None,
        "fp32_precision": getattr(torch.backends.cuda.matmul, "fp32_precision", None) if cuda else None,
        "flops": flops, "median_s": median_s, "run_medians_s": per_run, "tflops": flops / median_s / 1e12,
        "method": method,
    }


def measure_copy_bandwidth(device: str, nbytes: int = GIB, runs: int = 5) -> dict[str, Any]:
    """Device copy bandwidth: ``dst.copy_(src)`` of an ``nbytes`` fp32 tensor into a preallocated one (a
    clone without the allocation), counted as 2·nbytes moved (one read, one write) per copy."""
    import torch

    src = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    median_s, per_run, method = median_time_s(lambda: dst.copy_(src), device, runs)
    size = src.numel() * 4
    return {
        "op": "Tensor.copy_", "bytes": size, "moved_bytes": 2 * size, "median_s": median_s, "run_medians_s": per_run,
        "gb_s": 2 * size / median_s / 1e9, "method": method,
    }


def _rates_case(case: dict[str, Any]) -> dict[str, Any]:
    """Child side of :func:`measure_device_rates`."""
    import torch

    device = case["device"]
    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    if device.startswith("cuda"):
        select_cuda_device(device, case.get("allow_tf32", False))
    out: dict[str, Any] = {"status": "ok"}
    if case.get("matmul_size"):
        out["matmul_peak"] = measure_matmul_rate(device, case["dtype"], case["matmul_size"], case.get("runs", 5))
    if case.get("copy_bytes"):
        out["copy_bandwidth"] = measure_copy_bandwidth(device, case["copy_bytes"], case.get("runs", 5))
    return out


def measure_device_rates(device: str, dtype: str, matmul_size: int | None, copy_bytes: int | None,
                         allow_tf32: bool = False, threads: int | None = None,
                         timeout_s: float = 600.0) -> dict[str, Any]:
    """:func:`measure_matmul_rate` and/or :func:`measure_copy_bandwidth` in a child process (so that the
    parent holds no device memory while the cases run); ``{"matmul_peak": ..., "copy_bandwidth": ...}``,
    or ``{"device_rates_error": ...}``."""
    case = {"device": device, "dtype": dtype, "matmul_size": matmul_size, "copy_bytes": copy_bytes,
            "allow_tf32": allow_tf32, "threads": threads, "runs": 5}
    result = run_case_subprocess(RATES_MODULE, case, timeout_s=timeout_s)
    if result.get("status") != "ok":
        return {"device_rates_error": {k: result.get(k) for k in ("status", "message", "stderr_tail") if k in result}}
    return {k: result[k] for k in ("matmul_peak", "copy_bandwidth") if k in result}


if __name__ == "__main__":  # the device-rates child of measure_device_rates
    sys.exit(child_main(_rates_case))
