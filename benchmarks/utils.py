"""Helpers shared by the ``bench_<op>.py`` scripts.

* :func:`metadata`: the machine, versions, git commit, date and command line of a run.
* :func:`time_phases` / :func:`time_callable`: wall-clock timing with warm-up (``time.perf_counter`` on CPU,
  CUDA events or ``triton.testing.do_bench`` on CUDA), summarised by :func:`summarize`.
* :class:`PeakMemory`: the extra peak memory of a region: the resident-set high-water mark on CPU (reset
  through ``/proc/self/clear_refs``, or an RSS sampler thread where that is impossible), and
  ``torch.cuda.max_memory_allocated`` on CUDA.
* :func:`run_case_subprocess` / :func:`child_main`: each case runs in a fresh process, under an address-space
  cap, and the parent survives whatever happens to the child (exception, allocation failure, OOM killer,
  timeout).
* :func:`write_results` / :func:`plot_results` / :func:`format_table`: the JSON file, the PNG and the tables.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_MARKER = "@@MLCONTRAST_BENCH_RESULT@@"
SCHEMA_VERSION = 1
GIB = 1024**3
MIB = 1024**2

DTYPES = ("float32", "float16", "bfloat16")


# ----------------------------------------------------------------------------------------------
# Imports that may fail while the extension is being rebuilt
# ----------------------------------------------------------------------------------------------


def import_mlcontrast(retries: int = 10, wait_s: float = 30.0):
    """``import mlcontrast``, retried: a rebuild of ``mlcontrast._C`` in progress makes imports fail briefly."""
    last: BaseException | None = None
    for attempt in range(retries):
        try:
            import mlcontrast

            return mlcontrast
        except Exception as error:  # ImportError, OSError (half-written .so), ...
            last = error
            for name in [m for m in sys.modules if m == "mlcontrast" or m.startswith("mlcontrast.")]:
                del sys.modules[name]
            print(f"[bench] import mlcontrast failed ({error}); retry {attempt + 1}/{retries} in {wait_s:.0f} s",
                  file=sys.stderr, flush=True)
            time.sleep(wait_s)
    raise RuntimeError(f"import mlcontrast failed {retries} times: {last}")


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """``git rev-parse HEAD`` of the checkout, or None (no git, not a repository, ...)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def total_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def metadata(device: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Where and with what a benchmark ran."""
    import torch

    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv and argv[0].endswith(".py") else None
    if script is not None and script.parent == Path(__file__).resolve().parent:
        argv[0:1] = ["-m", f"benchmarks.{script.stem}"]  # run as python -m benchmarks.<module>
    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), *argv]),
        "cwd": os.getcwd(),
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_num_threads": torch.get_num_threads(),
        "memory_total_bytes": total_memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version_of("numpy"),
        "mlcontrast": None,
        "git_commit": git_commit(),
    }
    try:
        meta["mlcontrast"] = import_mlcontrast(retries=3).__version__
    except Exception as error:  # keep the metadata even when the package does not import
        meta["mlcontrast"] = f"unavailable: {error}"
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        meta.update(
            gpu_name=props.name,
            gpu_memory_bytes=props.total_memory,
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            hip=getattr(torch.version, "hip", None),
            triton=_version_of("triton"),
        )
    return meta


def _version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


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
    probe: "PeakMemory | None" = None,
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


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# One case per process
# ----------------------------------------------------------------------------------------------


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


def child_main(run_case: Callable[[dict[str, Any]], dict[str, Any]], argv: Sequence[str] | None = None) -> int:
    """Entry point of a child process: ``--case-json '{...}'`` (one case, or a list run one after the other)
    → one line per case, :data:`RESULT_MARKER` followed by its JSON record."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--case-json", required=True)
    args = parser.parse_args(argv)
    cases = json.loads(args.case_json)
    for case in cases if isinstance(cases, list) else [cases]:
        try:
            result = run_case(case)
            result.setdefault("status", "ok")
        except Exception as error:  # everything becomes a record
            result = {
                "status": "oom" if is_oom(error) else "error",
                "message": f"{type(error).__name__}: {str(error)[:2000]}",
                "traceback": traceback.format_exc()[-4000:],
            }
        sys.stdout.write("\n" + RESULT_MARKER + json.dumps(result, default=_json_default) + "\n")
        sys.stdout.flush()
    return 0


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def run_case_subprocess(module: str, case: dict[str, Any], timeout_s: float = 900.0,
                        env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs ``python -m <module> --case-json '<case>'`` from the repository root and returns its record.

    The child's own record when it printed one; otherwise ``{"status": "oom"}`` when it was killed by
    SIGKILL (the OOM killer's signal), ``{"status": "timeout"}`` past ``timeout_s`` (its whole process
    group is killed), ``{"status": "error"}`` for anything else, with the tail of its stderr.
    """
    return run_cases_subprocess(module, [case], timeout_s, env)[0]


def run_cases_subprocess(module: str, cases: list[dict[str, Any]], timeout_s: float = 900.0,
                         env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Like :func:`run_case_subprocess` for several cases run one after the other in one child process
    (``timeout_s`` then bounds the whole child). Cases the child did not finish get the failure record."""
    payload = cases[0] if len(cases) == 1 else cases
    cmd = [sys.executable, "-m", module, "--case-json", json.dumps(payload)]
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        child_env.update(env)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started

    records: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            try:
                records.append(json.loads(line[len(RESULT_MARKER):]))
            except json.JSONDecodeError as error:
                records.append({"status": "error", "message": f"unreadable result line: {error}"})
    if len(records) < len(cases):
        if timed_out:
            failure = {"status": "timeout", "message": f"killed after {timeout_s:.0f} s"}
        elif proc.returncode == -signal.SIGKILL:
            failure = {"status": "oom", "message": "killed by SIGKILL (most likely the kernel's OOM killer)"}
        elif proc.returncode is not None and proc.returncode < 0:
            failure = {"status": "error", "message": f"killed by signal {-proc.returncode}"}
        else:
            failure = {"status": "error", "message": f"exit status {proc.returncode} without a result"}
        failure["stderr_tail"] = (stderr or "")[-3000:]
        records += [dict(failure) for _ in range(len(cases) - len(records))]
    for record in records:
        record["process_wall_s"] = wall / len(cases)
        record["returncode"] = proc.returncode
    return records[: len(cases)]


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def results_path(name: str, device: str, out: str | Path | None = None) -> Path:
    if out:
        return Path(out)
    return RESULTS_DIR / f"{name}_{device.split(':')[0]}.json"


def write_results(path: Path, meta: dict[str, Any], records: list[dict[str, Any]],
                  extra: dict[str, Any] | None = None) -> Path:
    """Writes ``{"schema": 1, "metadata": ..., "records": [...], **extra}`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"schema": SCHEMA_VERSION, "metadata": meta, **(extra or {}), "records": records}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def plot_results(path: Path, records: list[dict[str, Any]], title: str, mode: str = "full") -> Path | None:
    """Log-log plots: time of ``mode`` vs N and extra peak memory vs N, one line per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    providers = list(dict.fromkeys(r["provider"] for r in records))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = "osD^v<>p*h"
    for k, provider in enumerate(providers):
        ok = sorted((r for r in records if r["provider"] == provider and r.get("status") == "ok"),
                    key=lambda r: r["n"])
        pts_t = [(r["n"], r["time_s"][mode]["median"]) for r in ok if r.get("time_s", {}).get(mode)]
        pts_m = [(r["n"], r["memory"]["extra_peak_bytes"] / MIB) for r in ok
                 if r.get("memory") and r["memory"].get("extra_peak_bytes", 0) > 0]
        style = dict(marker=markers[k % len(markers)], label=provider)
        if pts_t:
            ax_t.plot(*zip(*pts_t), **style)
            lo = [r["time_s"][mode]["min"] for r in ok if r.get("time_s", {}).get(mode)]
            hi = [r["time_s"][mode]["max"] for r in ok if r.get("time_s", {}).get(mode)]
            ax_t.fill_between([p[0] for p in pts_t], lo, hi, alpha=0.15)
        if pts_m:
            ax_m.plot(*zip(*pts_m), **style)
        for r in records:  # mark cases that did not run
            if r["provider"] == provider and r.get("status") != "ok":
                ax_t.annotate(r["status"].split(":")[0], (r["n"], ax_t.get_ylim()[1] if pts_t else 1.0),
                              fontsize=7, rotation=90, va="top", alpha=0.6)
    for ax, ylabel in ((ax_t, f"time, {mode} (s), median; band = min..max"), (ax_m, "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (rows)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def format_table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    rows = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"
