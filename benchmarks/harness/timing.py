"""Wall-clock timing with warm-up: ``time.perf_counter`` on CPU, CUDA events or ``triton.testing.do_bench``
on CUDA, summarised by :func:`summarize`; :class:`RepeatPolicy` says how many iterations.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Sequence

from benchmarks.harness.memory import PeakMemory


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_s: Sequence[float]) -> dict[str, Any]:
    """median, min, max, mean (and p20, p80 when there are at least 5 samples) of times in seconds."""
    values = sorted(float(t) for t in times_s)
    if not values:
        return {"n": 0}
    out: dict[str, Any] = {
        "n": len(values),
        "median": statistics.median(values),
        "min": values[0],
        "max": values[-1],
        "mean": statistics.fmean(values),
    }
    if len(values) >= 5:
        out["p20"] = _quantile(values, 0.2)
        out["p80"] = _quantile(values, 0.8)
    return out


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class RepeatPolicy:
    """How many times to run: ``warmup`` and ``repeats`` are maxima, cut short by time budgets.

    Warm-up runs at least ``min_warmup`` iterations and stops after ``warmup`` iterations or once it has
    spent ``warmup_budget_s``; with ``first_warmup_free`` (compiled callables) the first iteration, which
    compiles, does not count, so at least one compiled iteration runs before timing. Timing runs at least
    ``min_repeats`` iterations and stops after ``repeats`` or once it has spent ``budget_s``.
    """

    def __init__(self, repeats: int = 20, min_repeats: int = 3, budget_s: float = 20.0, warmup: int = 3,
                 min_warmup: int = 1, warmup_budget_s: float = 2.0, first_warmup_free: bool = False):
        self.repeats = max(1, repeats)
        self.min_repeats = max(1, min(min_repeats, self.repeats))
        self.budget_s = budget_s
        self.warmup = max(0, warmup)
        self.min_warmup = min(min_warmup, self.warmup)
        self.warmup_budget_s = warmup_budget_s
        self.first_warmup_free = first_warmup_free

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RepeatPolicy":
        return cls(**d)


def time_phases(
    phases: Sequence[tuple[str, Callable[[Any], Any]]],
    reset: Callable[[], None] | None = None,
    device: str = "cpu",
    policy: RepeatPolicy | None = None,
    probe: PeakMemory | None = None,
) -> dict[str, Any]:
    """Times an iteration made of consecutive phases, each phase separately and the whole.

    Every iteration calls ``reset()`` (untimed), then ``state = phase(state)`` for each phase in order,
    starting from ``state = None``. Returns ``{"warmup": {...}, "times": {phase: stats, ..., "total": stats}}``
    in seconds. On CPU the clock is ``time.perf_counter``; on CUDA, events recorded on the current stream
    around every phase (one synchronisation per iteration). With ``probe``, the first timed iteration is
    also the memory measurement: the probe starts after ``reset()`` and stops after the last phase, both
    outside the timed region.
    """
    policy = policy or RepeatPolicy()
    cuda = device.startswith("cuda")

    def one_iteration(measure: PeakMemory | None = None) -> list[float]:
        if reset is not None:
            reset()
        if measure is not None:
            measure.start()
        state = None
        if cuda:
            import torch

            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
            events[0].record()
            for i, (_, fn) in enumerate(phases):
                state = fn(state)
                events[i + 1].record()
            torch.cuda.synchronize()
            durations = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(len(phases))]
        else:
            marks = [time.perf_counter()]
            for _, fn in phases:
                state = fn(state)
                marks.append(time.perf_counter())
            durations = [b - a for a, b in zip(marks, marks[1:])]
        del state
        if measure is not None:
            measure.stop()
        return durations

    warm_times: list[float] = []
    synchronize(device)
    while len(warm_times) < policy.warmup:
        t0 = time.perf_counter()
        one_iteration()
        synchronize(device)
        warm_times.append(time.perf_counter() - t0)
        counted = warm_times[1:] if policy.first_warmup_free else warm_times
        if len(warm_times) >= policy.min_warmup and counted and sum(counted) >= policy.warmup_budget_s:
            break

    samples: list[list[float]] = []
    spent = 0.0
    while len(samples) < policy.repeats:
        durations = one_iteration(probe if (probe is not None and not samples) else None)
        samples.append(durations)
        spent += sum(durations)
        if len(samples) >= policy.min_repeats and spent >= policy.budget_s:
            break

    times = {name: summarize([s[i] for s in samples]) for i, (name, _) in enumerate(phases)}
    times["total"] = summarize([sum(s) for s in samples])
    return {
        "warmup": {"iterations": len(warm_times), "first_s": warm_times[0] if warm_times else None,
                   "times_s": warm_times},
        "times": times,
        "samples_s": samples,
    }


def time_callable(fn: Callable[[], Any], device: str = "cpu", policy: RepeatPolicy | None = None) -> dict[str, Any]:
    """Stats (seconds) of ``fn()``; on CUDA through ``triton.testing.do_bench`` when Triton is installed."""
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            ms = do_bench(fn, warmup=25, rep=100, return_mode="all")
            return summarize([t / 1e3 for t in ms])
    result = time_phases([("call", lambda _: fn())], device=device, policy=policy)
    return result["times"]["call"]
