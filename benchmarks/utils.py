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
* :class:`BenchSpec` / :func:`bench_main`: the whole sweep of one op (command line, one process per case,
  correctness checks against the eager reference, speed-up and memory ratios, throughput, device rates,
  the largest-N probe, the JSON and the plot); a ``bench_<op>.py`` script only says how to build and run
  one case (:class:`CaseSetup`).
* :func:`measure_matmul_rate` / :func:`measure_copy_bandwidth`: the device's dense matmul rate and copy
  bandwidth, the denominators of the throughput fractions (``python -m benchmarks.utils --rates ...``).
"""

from __future__ import annotations

import argparse
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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
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


def retry_count(default: int) -> int:
    """How often to retry what a rebuild of ``mlcontrast._C`` in progress makes fail (``default``), or
    ``MLCONTRAST_BENCH_RETRIES``: the GPU session scripts set 0, since nothing is rebuilt behind their back
    there and every sleep would spend the call's time budget."""
    value = os.environ.get("MLCONTRAST_BENCH_RETRIES", "").strip()
    return max(0, int(value)) if value else default


def import_mlcontrast(retries: int = 9, wait_s: float = 30.0):
    """``import mlcontrast``, retried ``retry_count(retries)`` times: a rebuild of ``mlcontrast._C`` in
    progress makes imports fail briefly."""
    retries = retry_count(retries)
    for attempt in range(retries + 1):
        try:
            import mlcontrast

            return mlcontrast
        except Exception as error:  # ImportError, OSError (half-written .so), ...
            if attempt == retries:
                raise RuntimeError(f"import mlcontrast failed {retries + 1} times: {error}") from error
            for name in [m for m in sys.modules if m == "mlcontrast" or m.startswith("mlcontrast.")]:
                del sys.modules[name]
            print(f"[bench] import mlcontrast failed ({error}); retry {attempt + 1}/{retries} in {wait_s:.0f} s",
                  file=sys.stderr, flush=True)
            time.sleep(wait_s)


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
    if os.environ.get("MLCONTRAST_TRITON_CONFIGS"):  # tuned Triton launch configurations in force
        meta["triton_configs"] = json.loads(os.environ["MLCONTRAST_TRITON_CONFIGS"])
    try:
        meta["mlcontrast"] = import_mlcontrast(retries=2).__version__
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
            nvidia_driver=nvidia_driver(),
        )
    return meta


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version (``nvidia-smi``), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


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
    except BaseException:
        # Interrupted (the GPU session's phase budget sends SIGINT): the child runs in its own session, so
        # it would outlive this process and hold the GPU during the next phase.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
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


def results_path(name: str, device: str, out: str | Path | None = None, out_dir: str | Path | None = None) -> Path:
    """``out`` when given, else ``<out_dir or benchmarks/results>/<name>_<device type>.json``."""
    if out:
        return Path(out)
    return Path(out_dir or RESULTS_DIR) / f"{name}_{device.split(':')[0]}.json"


def write_results(path: Path, meta: dict[str, Any], records: list[dict[str, Any]],
                  extra: dict[str, Any] | None = None) -> Path:
    """Writes ``{"schema": 1, "metadata": ..., "records": [...], **extra}`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"schema": SCHEMA_VERSION, "metadata": meta, **(extra or {}), "records": records}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def plot_results(path: Path, records: list[dict[str, Any]], title: str, mode: str = "full",
                 xlabel: str = "N (rows)") -> Path | None:
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
        ax.set_xlabel(xlabel)
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


# ----------------------------------------------------------------------------------------------
# Device rates: the denominators of the throughput fractions
# ----------------------------------------------------------------------------------------------


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def row_feature_bytes(record: dict[str, Any]) -> int:
    """Bytes of ``[N, D]`` features in the record's dtype (``BenchSpec.feature_bytes`` of row-wise ops)."""
    return record["n"] * record["d"] * torch_dtype(record["dtype"]).itemsize


def tf32_allowed() -> bool:
    """Whether fp32 CUDA matmuls may use TF32 (``mlcontrast._base.tf32_allowed``: reading the legacy
    ``torch.backends.cuda.matmul.allow_tf32`` raises once the newer ``fp32_precision`` switch was used)."""
    from mlcontrast._base import tf32_allowed as allowed

    return allowed()


def select_cuda_device(device: str, allow_tf32: bool = False) -> None:
    """Makes ``device`` current (``"cuda"`` without an index keeps the current one: ``torch.cuda.set_device``
    rejects an index-less device) and sets ``torch.backends.cuda.matmul.allow_tf32`` when asked."""
    import torch

    index = torch.device(device).index
    if index is not None:
        torch.cuda.set_device(index)
    if allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True


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
    result = run_case_subprocess("benchmarks.utils", case, timeout_s=timeout_s)
    if result.get("status") != "ok":
        return {"device_rates_error": {k: result.get(k) for k in ("status", "message", "stderr_tail") if k in result}}
    return {k: result[k] for k in ("matmul_peak", "copy_bandwidth") if k in result}


# ----------------------------------------------------------------------------------------------
# One case, child side
# ----------------------------------------------------------------------------------------------

REFERENCE_PROVIDERS = ("torch", "torch_compile")

#: Providers that run a fused backend in another mode: provider -> (backend, environment of the case's process).
BACKEND_VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "triton_atomic": ("triton", {"MLCONTRAST_TRITON_ATOMIC": "1"}),
}


def backend_of(provider: str) -> str:
    """The mlcontrast backend a fused provider calls (itself, or the backend of a variant)."""
    return BACKEND_VARIANTS.get(provider, (provider, {}))[0]

# Outputs kept for the correctness check between providers (bytes, as fp32); larger ones are not kept.
MAX_SAVED_OUTPUT_BYTES = 256 * MIB


@dataclass
class CaseSetup:
    """What a bench script builds for one case (in the child): the phases of one iteration and what to check.

    ``phases``: ``(name, fn)`` run in order as ``state = fn(state)`` (see :func:`time_phases`); ``reset``:
    untimed, before every iteration; ``outputs()``: the tensors compared with the eager reference after
    the run (gradients, or the tensor updated in place); ``loss()``: the last loss, or None for an op
    without one; ``grad_bytes``: bytes of the gradients one iteration returns (subtracted from the peak
    for ``memory.beyond_inputs_and_grads_bytes``).
    """

    phases: list[tuple[str, Callable[[Any], Any]]]
    reset: Callable[[], None]
    outputs: Callable[[], dict[str, Any]]
    loss: Callable[[], Any] | None = None
    grad_bytes: int = 0


def loss_case(loss_fn: Callable[[], Any], leaves: dict[str, Any]) -> CaseSetup:
    """A loss op: ``fwd`` = ``loss_fn()`` with autograd enabled (it saves what backward needs), ``bwd`` =
    ``loss.backward()`` of that forward; ``reset`` clears the ``.grad`` of ``leaves``, whose gradients are
    the outputs (named by their keys: ``{"grad": features, "prototypes_grad": prototypes}``)."""
    last: dict[str, Any] = {}

    def reset() -> None:
        for t in leaves.values():
            t.grad = None

    def forward(_: Any) -> Any:
        return loss_fn()

    def backward(loss: Any) -> None:
        loss.backward()
        last["loss"] = loss.detach()

    return CaseSetup(
        phases=[("fwd", forward), ("bwd", backward)], reset=reset,
        outputs=lambda: {name: t.grad for name, t in leaves.items()}, loss=lambda: last["loss"],
        grad_bytes=sum(t.numel() * t.element_size() for t in leaves.values()),
    )


def unavailable_reason(provider: str, device: str, mlcontrast) -> str | None:
    """None when the fused backend ``provider`` runs on ``device``, otherwise why not."""
    import torch

    if provider in mlcontrast.available_backends(device):
        return None
    from mlcontrast import _backends

    return _backends.why_unavailable(provider, torch.device(device)) or "not in available_backends"


def run_case(spec: "BenchSpec", case: dict[str, Any]) -> dict[str, Any]:
    """Runs one (provider, N) case in this process and returns its record (without the case fields)."""
    import torch

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    device, provider = case["device"], case["provider"]
    os.environ.update(BACKEND_VARIANTS.get(provider, ("", {}))[1])  # this process runs this one case
    mlcontrast = import_mlcontrast()
    if provider not in REFERENCE_PROVIDERS:
        reason = unavailable_reason(backend_of(provider), device, mlcontrast)
        if reason is not None:
            return {"status": "unavailable", "message": f"backend {provider!r} unavailable on {device}: {reason}"}
    if device.startswith("cuda"):
        select_cuda_device(device, case.get("allow_tf32", False))

    setup = spec.setup(case, mlcontrast)
    # The cap is set after the imports and the inputs: it bounds what the benchmark itself allocates.
    limit = None if device.startswith("cuda") else limit_address_space(case.get("max_memory_gib"))

    policy = RepeatPolicy.from_dict(case["policy"])
    if provider == "torch_compile":  # the first warm-up iteration compiles (the forward and the backward)
        policy.first_warmup_free = True
        policy.warmup = max(policy.warmup, 2)
    probe = PeakMemory(device)
    timing = time_phases(setup.phases, reset=setup.reset, device=device, policy=policy, probe=probe)
    times = timing["times"]
    time_s = {name: times[name] for name, _ in setup.phases}
    time_s["full"] = times["total"]

    outputs = {k: v.detach() for k, v in setup.outputs().items() if v is not None}
    loss = setup.loss() if setup.loss is not None else None
    memory = dict(probe.result or {})
    if "extra_peak_bytes" in memory:
        memory["grad_bytes"] = setup.grad_bytes
        memory["beyond_inputs_and_grads_bytes"] = max(0, memory["extra_peak_bytes"] - setup.grad_bytes)
    # Norms accumulated in fp32 without an fp64 copy (the largest-N probe runs near the memory limit); a
    # norm is finite exactly when every element is (short of an overflow of the sum of squares).
    norms = {k: float(torch.linalg.vector_norm(v, dtype=torch.float32).item()) for k, v in outputs.items()}
    finite = all(math.isfinite(x) for x in norms.values())
    record: dict[str, Any] = {"status": "ok", "time_s": time_s, "memory": memory, "warmup": timing["warmup"],
                              "repeats": times["total"]["n"]}
    if loss is not None:
        record["loss"] = float(loss.item())
        finite = finite and math.isfinite(record["loss"])
    if "grad" in norms:
        record["grad_norm"] = norms["grad"]
    record["output_norms"] = norms
    record.update(finite=finite, threads=torch.get_num_threads(), address_space_limit_bytes=limit)
    if device.startswith("cuda"):
        record["allow_tf32"] = tf32_allowed()
    if provider in BACKEND_VARIANTS:
        record["backend"], record["environment"] = BACKEND_VARIANTS[provider]

    out_dir = case.get("artifacts_dir")
    if out_dir and sum(v.numel() for v in outputs.values()) * 4 <= MAX_SAVED_OUTPUT_BYTES:
        path = Path(out_dir) / f"{provider}_{case['n']}.pt"
        torch.save({"loss": None if loss is None else loss.double().cpu(),
                    "outputs": {k: v.float().cpu() for k, v in outputs.items()}}, path)
        record["output_file"] = str(path)
    return record


# ----------------------------------------------------------------------------------------------
# A sweep, parent side
# ----------------------------------------------------------------------------------------------


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


@dataclass
class BenchSpec:
    """One op's benchmark: everything :func:`bench_main` needs besides the shared machinery.

    ``setup(case, mlcontrast) -> CaseSetup`` runs in the child and builds one case's inputs and phases.
    ``case_fields(args)``: op parameters copied into every case, record and the config (``d``,
    ``num_classes``, ...). ``size_fields(args, n)``: the fields of a requested size (``{"n": n}`` by default;
    an op may round it, e.g. ``n = B·C``). ``flops(record)``: model FLOPs per mode (``throughput``);
    ``feature_bytes(record)``: bytes of one read of the features (``bandwidth``).
    ``nn_bytes_lower_bound``: per provider, bytes per N² element a dense reference needs at least; a case
    above the memory cap is skipped without running (CPU). ``variants``: providers of
    :data:`BACKEND_VARIANTS` run by default beside their backend.
    """

    op: str
    module: str
    description: str
    default_sizes: tuple[int, ...]
    quick_sizes: tuple[int, ...]
    setup: Callable[[dict[str, Any], Any], CaseSetup]
    case_fields: Callable[[argparse.Namespace], dict[str, Any]]
    params: Callable[[argparse.Namespace], str]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    config_fields: Callable[[argparse.Namespace], dict[str, Any]] | None = None
    size_fields: Callable[[argparse.Namespace, int], dict[str, Any]] | None = None
    modes: tuple[str, ...] = ("fwd", "bwd", "full")
    size_help: str = "rows N"
    size_label: str = "N"
    nn_bytes_lower_bound: dict[str, float] = field(default_factory=dict)
    flops: Callable[[dict[str, Any]], dict[str, float]] | None = None
    flop_convention: dict[str, str] | None = None
    feature_bytes: Callable[[dict[str, Any]], int] | None = None
    max_n_start: int = 65536
    variants: tuple[str, ...] = ()



def provider_function(provider: str, mlcontrast, name: str, **kwargs: Any):
    """The function a provider times, with ``kwargs`` bound: ``mlcontrast.reference.<name>`` run eagerly
    ("torch") or under ``torch.compile(dynamic=False)`` ("torch_compile"), or the public
    ``mlcontrast.<name>`` with ``backend=provider`` (a fused backend)."""
    import functools

    import torch

    if provider == "torch":
        return functools.partial(getattr(mlcontrast.reference, name), **kwargs)
    if provider == "torch_compile":
        return functools.partial(torch.compile(getattr(mlcontrast.reference, name), dynamic=False), **kwargs)
    return functools.partial(getattr(mlcontrast, name), backend=backend_of(provider), **kwargs)


def probe_backends(device: str, retries: int = 4, wait_s: float = 30.0) -> list[str]:
    """``mlcontrast.available_backends(device)``, retried while the compiled extension does not load (it
    may be being rebuilt); each try runs in a fresh process, since a failed load is cached."""
    code = (
        "import json, torch, mlcontrast\n"
        "from mlcontrast import _backends\n"
        f"d = torch.device({device!r})\n"
        "print(json.dumps({'available': mlcontrast.available_backends(d),"
        " 'extension': getattr(_backends, 'EXTENSION_ERROR', None)}))\n"
    )
    mlcontrast = import_mlcontrast()
    from mlcontrast import _backends

    available, reason = mlcontrast.available_backends(device), getattr(_backends, "EXTENSION_ERROR", None)
    for _ in range(retry_count(retries)):
        if not reason:
            return available
        print(f"[bench] the mlcontrast extension does not load ({reason}); retry in {wait_s:.0f} s", flush=True)
        time.sleep(wait_s)
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300)
        if proc.returncode == 0:
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            available, reason = info["available"], info["extension"]
        else:
            reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    if reason:
        print(f"[bench] WARNING: going on without the compiled extension: {reason}", flush=True)
    return available


def default_policy(args: argparse.Namespace) -> RepeatPolicy:
    if args.quick:
        return RepeatPolicy(repeats=args.repeats or 1, min_repeats=1, budget_s=0.0, warmup=1, min_warmup=1,
                            warmup_budget_s=0.0)
    return RepeatPolicy(repeats=args.repeats or 20, min_repeats=min(args.min_repeats, args.repeats or 20),
                        budget_s=args.case_budget_s, warmup=args.warmup, min_warmup=1, warmup_budget_s=2.0)


def parse_bench_args(spec: BenchSpec, argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {spec.module}", description=spec.description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:K)")
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help=f"{spec.size_help} (default {list(spec.default_sizes)}; --quick: {list(spec.quick_sizes)})")
    spec.add_arguments(p)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--providers", nargs="+", default=None,
                   help="torch, torch_compile and fused backend names (default: all available)")
    p.add_argument("--repeats", type=int, default=None,
                   help="most timed iterations per case (default 20; 1 with --quick)")
    p.add_argument("--min-repeats", type=int, default=3, help="fewest timed iterations per case")
    p.add_argument("--case-budget-s", type=float, default=15.0,
                   help="stop timing a case after this many seconds once --min-repeats are done")
    p.add_argument("--warmup", type=int, default=3, help="most warm-up iterations (stops after 2 s once one ran)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: sizes {list(spec.quick_sizes)}, one repeat, every case in one process")
    p.add_argument("--out", default=None, help="JSON path (the PNG goes next to it)")
    p.add_argument("--out-dir", default=None,
                   help="directory of the results files, named <op>[_quick]_<device>.json (default benchmarks/results)")
    p.add_argument("--max-memory-gib", type=float, default=16.0,
                   help="address-space cap of each case above its start (RLIMIT_AS, CPU); 0 = none")
    p.add_argument("--case-timeout-s", type=float, default=900.0, help="kill a case after this long")
    p.add_argument("--sweep-budget-s", type=float, default=None,
                   help="start no case (nor probe attempt) after this many seconds of the run; those left are "
                        "recorded as 'skipped: budget' and the results are written as usual (GPU sessions)")
    p.add_argument("--same-process", action="store_true",
                   help="every case in one child process, as --quick does, with the normal timing policy")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each case (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("device rates and throughput")
    g.add_argument("--device-rates", choices=("auto", "on", "off"), default="auto",
                   help="measure the dense matmul rate / copy bandwidth once per run (auto: on CUDA only)")
    g.add_argument("--matmul-size", type=int, default=None, help="square torch.mm size (default 8192 CUDA, 1024 CPU)")
    g.add_argument("--copy-mib", type=int, default=None, help="copy bandwidth tensor size (default 1024 CUDA, 128 CPU)")
    g.add_argument("--allow-tf32", action="store_true",
                   help="set torch.backends.cuda.matmul.allow_tf32 = True in every case and the matmul rate (CUDA)")
    g = p.add_argument_group("largest N that fits")
    g.add_argument("--max-n-probe", action="store_true",
                   help="after the sweep, double N from --max-n-start per provider, each in its own process, until a "
                        "case does not run (oom, timeout, ...); report the largest N that ran")
    g.add_argument("--max-n-start", type=int, default=spec.max_n_start)
    g.add_argument("--max-n-limit", type=int, default=2**26, help="stop doubling past this N")
    g.add_argument("--max-n-timeout-s", type=float, default=600.0, help="time limit of one probe case")
    g.add_argument("--max-n-providers", nargs="+", default=None, metavar="PROVIDER",
                   help="probe these providers only (default: the run's providers), e.g. the fused ones")
    p.add_argument("--case-json", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _spec_default(spec: BenchSpec, dest: str) -> Any:
    parser = argparse.ArgumentParser(add_help=False)
    spec.add_arguments(parser)
    return parser.get_default(dest)


def results_name(spec: BenchSpec, args: argparse.Namespace) -> str:
    """``<op>[_d<D>][_fp16|_bf16][_quick]``: D only where it is not the op's default."""
    name = spec.op
    d = getattr(args, "d", None)
    if d is not None and d != _spec_default(spec, "d"):
        name += f"_d{d}"
    if args.dtype != "float32":
        name += "_" + {"float16": "fp16", "bfloat16": "bf16"}[args.dtype]
    if args.quick:
        name += "_quick"
    return name


def ok_record(records: list[dict[str, Any]], provider: str, n: int) -> dict[str, Any] | None:
    for r in records:
        if r["provider"] == provider and r["n"] == n and r.get("status") == "ok":
            return r
    return None


def add_checks(records: list[dict[str, Any]], reference: str = "torch") -> None:
    """Relative errors of each provider's loss and outputs (gradients, updated tensors) against the eager
    reference on the same inputs: ``loss_rel_err = |l − l_ref| / |l_ref|``, ``<output>_rel_err =
    ‖o − o_ref‖ / ‖o_ref‖`` (``grad_rel_err`` for the features' gradient)."""
    import torch

    for r in records:
        if r.get("status") != "ok" or r["provider"] == reference:
            continue
        ref = ok_record(records, reference, r["n"])
        if ref is None:
            continue
        check: dict[str, Any] = {"against": reference}
        if r.get("loss") is not None and ref.get("loss") is not None:
            check["loss_rel_err"] = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
        if r.get("output_file") and ref.get("output_file"):
            mine = torch.load(r["output_file"])["outputs"]
            theirs = torch.load(ref["output_file"])["outputs"]
            for name in mine:
                if name in theirs:
                    a, e = mine[name].double(), theirs[name].double()
                    err = torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e).clamp(min=1e-30)
                    check[f"{name}_rel_err"] = err.item()
        r["check"] = check


def add_throughput(records: list[dict[str, Any]], spec: BenchSpec, meta: dict[str, Any]) -> None:
    """``throughput`` (model FLOPs, TFLOP/s, fraction of the measured matmul rate) and ``bandwidth``
    (features read once per phase: GB/s, fraction of the measured copy bandwidth) of every ``ok`` record,
    from the median times."""
    matmul = (meta.get("matmul_peak") or {}).get("tflops")
    copy = (meta.get("copy_bandwidth") or {}).get("gb_s")
    for r in records:
        if r.get("status") != "ok":
            continue
        medians = {m: max(r["time_s"][m]["median"], 1e-12) for m in spec.modes if m in r.get("time_s", {})}
        if spec.flops is not None:
            flops = spec.flops(r)
            tflops = {m: flops[m] / medians[m] / 1e12 for m in flops if m in medians}
            r["throughput"] = {"flops": flops, "tflops": tflops}
            if matmul:
                r["throughput"]["fraction_of_matmul"] = {m: v / matmul for m, v in tflops.items()}
        if spec.feature_bytes is not None:
            nbytes = spec.feature_bytes(r)
            gbs = {m: nbytes / medians[m] / 1e9 for m in medians}
            r["bandwidth"] = {"feature_bytes": nbytes, "feature_read_gb_s": gbs}
            if copy:
                r["bandwidth"]["fraction_of_copy"] = {m: v / copy for m, v in gbs.items()}


def summarize_ratios(records: list[dict[str, Any]], fused: list[str], modes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (fused provider, N) that ran: speed-ups and memory fractions against the eager and the
    compiled reference, the check's errors, and the throughput fractions when present."""
    out = []
    for n in sorted({r["n"] for r in records}):
        eager, compiled = ok_record(records, "torch", n), ok_record(records, "torch_compile", n)
        for name in fused:
            f = ok_record(records, name, n)
            if f is None:
                continue
            row: dict[str, Any] = {"n": n, "provider": name}
            for mode in modes:
                if eager:
                    row[f"speedup_{mode}_vs_torch"] = eager["time_s"][mode]["median"] / f["time_s"][mode]["median"]
                if compiled:
                    row[f"speedup_{mode}_vs_torch_compile"] = (compiled["time_s"][mode]["median"]
                                                               / f["time_s"][mode]["median"])
            fm = f["memory"]["extra_peak_bytes"]
            if eager and eager["memory"]["extra_peak_bytes"] > 0:
                row["memory_fraction_of_torch"] = fm / eager["memory"]["extra_peak_bytes"]
            if compiled and compiled["memory"]["extra_peak_bytes"] > 0:
                row["memory_fraction_of_torch_compile"] = fm / compiled["memory"]["extra_peak_bytes"]
            for key, value in (f.get("check") or {}).items():
                if key.endswith("_rel_err"):
                    row[f"{key}_vs_torch"] = value
            for mode, v in (f.get("throughput") or {}).get("tflops", {}).items():
                row[f"tflops_{mode}"] = v
            for mode, v in (f.get("throughput") or {}).get("fraction_of_matmul", {}).items():
                row[f"fraction_of_matmul_{mode}"] = v
            for mode, v in (f.get("bandwidth") or {}).get("feature_read_gb_s", {}).items():
                row[f"feature_read_gb_s_{mode}"] = v
            for mode, v in (f.get("bandwidth") or {}).get("fraction_of_copy", {}).items():
                row[f"fraction_of_copy_{mode}"] = v
            out.append(row)
    return out


def _columns(spec: BenchSpec) -> list[tuple[str, int]]:
    times = [(m if m != "full" or len(spec.modes) > 1 else "time", 9) for m in spec.modes]
    return [("provider", 13), (spec.size_label, 7), ("status", 18), *times, ("full min..max", 19), ("reps", 4),
            ("extra peak mem", 14), ("first call", 10), ("wall", 8)]


def _table_line(spec: BenchSpec, cells: list[Any]) -> str:
    return "  ".join(str(c).rjust(w) for c, (_, w) in zip(cells, _columns(spec)))


def table_header(spec: BenchSpec) -> str:
    cols = _columns(spec)
    return _table_line(spec, [h for h, _ in cols]) + "\n" + _table_line(spec, ["-" * w for _, w in cols])


def table_row(spec: BenchSpec, r: dict[str, Any]) -> str:
    t = r.get("time_s") or {}
    meds = [fmt_time(t[m]["median"]) if m in t else "-" for m in spec.modes]
    rng = f"{fmt_time(t['full']['min'])}..{fmt_time(t['full']['max'])}" if "full" in t else "-"
    mem = (r.get("memory") or {}).get("extra_peak_bytes")
    first = (r.get("warmup") or {}).get("first_s")
    status = r["status"] if len(r["status"]) <= 18 else r["status"][:17] + "~"
    return _table_line(spec, [r["provider"], r["n"], status, *meds, rng, r.get("repeats", "-"), fmt_bytes(mem),
                              fmt_time(first), fmt_time(r.get("process_wall_s"))])


def print_summary(spec: BenchSpec, summary: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    def e(v: float | None) -> str:
        return "-" if v is None else f"{v:.1e}"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def mem(r: dict[str, Any] | None) -> str:
        return fmt_bytes(r["memory"]["extra_peak_bytes"]) if r else "-"

    def med(r: dict[str, Any] | None) -> str:
        return fmt_time(r["time_s"]["full"]["median"]) if r else "-"

    errors = sorted({k for s in summary for k in s if k.endswith("_rel_err_vs_torch")},
                    key=lambda k: (k != "loss_rel_err_vs_torch", k != "grad_rel_err_vs_torch", k))
    has_tflops = any("tflops_full" in s for s in summary)
    has_gbs = any("feature_read_gb_s_full" in s for s in summary)
    rows = []
    for s in summary:
        f = ok_record(records, s["provider"], s["n"])
        eager, compiled = ok_record(records, "torch", s["n"]), ok_record(records, "torch_compile", s["n"])
        row = [s["provider"], s["n"], med(f), med(eager), med(compiled), x(s.get("speedup_full_vs_torch")),
               x(s.get("speedup_full_vs_torch_compile")), mem(f), mem(eager), mem(compiled),
               pct(s.get("memory_fraction_of_torch")), *[e(s.get(k)) for k in errors]]
        if has_tflops:
            row += [f"{s['tflops_full']:.3g}" if "tflops_full" in s else "-", pct(s.get("fraction_of_matmul_full"))]
        if has_gbs:
            row += [f"{s['feature_read_gb_s_full']:.3g}" if "feature_read_gb_s_full" in s else "-",
                    pct(s.get("fraction_of_copy_full"))]
        rows.append(row)
    header = ["fused", spec.size_label, "fused", "eager", "compiled", "vs eager", "vs compiled", "fused mem",
              "eager mem", "compiled mem", "mem/eager", *[k[: -len("_vs_torch")].replace("_", " ") for k in errors]]
    if has_tflops:
        header += ["TFLOP/s", "of matmul"]
    if has_gbs:
        header += ["feat GB/s", "of copy"]
    what = "full = forward + backward" if "fwd" in spec.modes else "full = one call"
    print(f"\nSummary ({what}, medians):")
    print(format_table(rows, header))


def run_case_with_retry(module: str, case: dict[str, Any], timeout_s: float, retries: int = 3,
                        wait_s: float = 30.0) -> dict[str, Any]:
    """A case, run again (``retry_count(retries)`` times) when its backend was unavailable (the extension
    being rebuilt) or it failed to import."""
    retries = retry_count(retries)
    for attempt in range(retries + 1):
        result = run_case_subprocess(module, case, timeout_s=timeout_s)
        transient = result["status"] == "unavailable" and "did not load" in result.get("message", "")
        transient |= result["status"] == "error" and "import mlcontrast failed" in result.get("message", "")
        if not transient or attempt == retries:
            return result
        print(f"    {case['provider']} N={case['n']}: {result['message'][:200]}; retry in {wait_s:.0f} s", flush=True)
        time.sleep(wait_s)
    return result


def bench_main(spec: BenchSpec, argv: Sequence[str] | None = None) -> list[Path]:
    """The command line of a ``bench_<op>.py``: a child case (``--case-json``) or the whole sweep."""
    args = parse_bench_args(spec, argv)
    if args.case_json is not None:
        child_main(lambda case: run_case(spec, case), ["--case-json", args.case_json])
        return []
    return run_sweep(spec, args, list(sys.argv[1:] if argv is None else argv))


def memory_cap(args: argparse.Namespace, meta: dict[str, Any]) -> tuple[int | None, str]:
    """The memory a dense reference case may need before it is skipped unlaunched, and what that is: on CUDA
    the GPU's memory (no address-space cap applies there), else ``--max-memory-gib``."""
    if args.device.startswith("cuda"):
        total = meta.get("gpu_memory_bytes")
        return (int(total), f"the GPU's {fmt_bytes(total)}") if total else (None, "")
    if args.max_memory_gib and args.max_memory_gib > 0:
        return int(args.max_memory_gib * GIB), f"the {args.max_memory_gib:g} GiB cap"
    return None, ""


def skip_if_too_large(need: int, cap: int | None, cap_what: str) -> dict[str, Any] | None:
    """The record of a case skipped without launching (its N x N lower bound ``need`` reaches ``cap``), or None."""
    if cap is None or need < cap:
        return None
    return {"status": "skipped: too large",
            "message": f"the dense reference needs at least {fmt_bytes(need)} of N x N temporaries, "
                       f"above {cap_what}"}


def run_sweep(spec: BenchSpec, args: argparse.Namespace, argv: list[str]) -> list[Path]:
    started = time.perf_counter()
    deadline = None if args.sweep_budget_s is None else started + args.sweep_budget_s
    device = args.device
    cuda = device.startswith("cuda")
    requested = args.n or list(spec.quick_sizes if args.quick else spec.default_sizes)

    def sized(n: int) -> dict[str, Any]:
        return spec.size_fields(args, n) if spec.size_fields is not None else {"n": n}

    ns = list(dict.fromkeys(sized(n)["n"] for n in requested))
    # Triton on CPU tensors is its interpreter (a test tool, orders of magnitude slower): not a provider
    # unless asked for by name.
    fused = [b for b in probe_backends(device) if b != "torch" and not (b == "triton" and not cuda)]
    fused += [v for v in spec.variants if backend_of(v) in fused]
    providers = args.providers or ["torch", "torch_compile", *fused]
    fused = [p for p in providers if p not in REFERENCE_PROVIDERS]
    policy = default_policy(args)
    meta = metadata(device)
    meta["bench_argv"] = argv
    if args.threads:
        meta["torch_num_threads"] = args.threads
    op_fields = spec.case_fields(args)
    config: dict[str, Any] = {"op": spec.op, "device": device, "n": ns}
    if ns != requested:
        config["n_requested"] = requested
    config.update(spec.config_fields(args) if spec.config_fields is not None else op_fields)
    config.update(dtype=args.dtype, providers=providers, seed=args.seed, policy=policy.as_dict(),
                  max_memory_gib=args.max_memory_gib, case_timeout_s=args.case_timeout_s, modes=list(spec.modes),
                  size_label=spec.size_label, quick=args.quick)
    if args.sweep_budget_s is not None:
        config["sweep_budget_s"] = args.sweep_budget_s
    if spec.flop_convention is not None:
        config["flops"] = spec.flop_convention
    if spec.feature_bytes is not None:
        config["bandwidth"] = ("feature_read_gb_s = bytes of the features (one read) / median time of the phase; "
                               "fraction_of_copy = that / metadata.copy_bandwidth.gb_s (2 x bytes / time of a "
                               "device copy)")
    if cuda:
        config["allow_tf32"] = args.allow_tf32
    out = results_path(results_name(spec, args), device, args.out, args.out_dir)

    rates_on = args.device_rates == "on" or (args.device_rates == "auto" and cuda)
    if rates_on and (spec.flops is not None or spec.feature_bytes is not None):
        matmul_size = (args.matmul_size or (8192 if cuda else 1024)) if spec.flops is not None else None
        copy_bytes = (args.copy_mib or (1024 if cuda else 128)) * MIB if spec.feature_bytes is not None else None
        print(f"[bench] measuring the device rates ({'matmul ' + str(matmul_size) + '^3' if matmul_size else ''}"
              f"{' ' if matmul_size and copy_bytes else ''}{'copy ' + fmt_bytes(copy_bytes) if copy_bytes else ''})",
              flush=True)
        meta.update(measure_device_rates(device, args.dtype, matmul_size, copy_bytes, args.allow_tf32, args.threads))
        if "matmul_peak" in meta:
            mp = meta["matmul_peak"]
            print(f"[bench] dense matmul {args.dtype}{' (TF32)' if mp.get('allow_tf32') else ''}: "
                  f"{mp['tflops']:.4g} TFLOP/s", flush=True)
        if "copy_bandwidth" in meta:
            print(f"[bench] copy bandwidth: {meta['copy_bandwidth']['gb_s']:.4g} GB/s (read + write)", flush=True)
        if "device_rates_error" in meta:
            print(f"[bench] WARNING: device rates not measured: {meta['device_rates_error']}", flush=True)

    where = meta.get("gpu_name") or meta["cpu_model"]
    print(f"[bench] {spec.op} on {device} ({where}, {meta['torch_num_threads']} threads), torch {meta['torch']}, "
          f"mlcontrast {meta['mlcontrast']}, commit {meta['git_commit']}")
    print(f"[bench] {spec.size_label} = {ns}, {spec.params(args)}, {args.dtype}, providers = {providers}; "
          f"{'every case in one process' if args.quick or args.same_process else 'one process per case'}\n")
    print(table_header(spec), flush=True)

    artifacts = tempfile.mkdtemp(prefix="mlcontrast_bench_")
    cap, cap_what = memory_cap(args, meta)
    records: list[dict[str, Any]] = []

    def estimate(provider: str, n: int) -> int:
        return int(spec.nn_bytes_lower_bound.get(provider, 0.0) * n * n)

    def new_case(provider: str, n: int, case_policy: RepeatPolicy = policy) -> dict[str, Any]:
        case = {"op": spec.op, "provider": provider, "device": device, **sized(n), **op_fields, "dtype": args.dtype,
                "seed": args.seed, "policy": case_policy.as_dict(), "max_memory_gib": args.max_memory_gib,
                "threads": args.threads, "artifacts_dir": artifacts}
        if cuda:
            case["allow_tf32"] = args.allow_tf32
        return case

    def make_record(case: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        record = {k: v for k, v in case.items() if k not in ("policy", "artifacts_dir")}
        if spec.nn_bytes_lower_bound:
            record["estimated_nn_bytes"] = estimate(case["provider"], case["n"])
        record.update(result)
        return record

    def finish(case: dict[str, Any], result: dict[str, Any]) -> None:
        record = make_record(case, result)
        records.append(record)
        print(table_row(spec, record), flush=True)
        if record["status"] != "ok" and not record["status"].startswith("skipped"):
            print(f"    {record['status']}: {record.get('message', '')}", flush=True)
        # The file so far, marked partial (no checks, no summary): a run cut short still leaves its cases.
        so_far = [{k: v for k, v in r.items() if k != "output_file"} for r in records]
        write_results(out, meta, so_far, {"config": config, "partial": True})

    def too_large(case: dict[str, Any]) -> dict[str, Any] | None:
        return skip_if_too_large(estimate(case["provider"], case["n"]), cap, cap_what)

    def over_budget(case: dict[str, Any]) -> dict[str, Any] | None:
        if deadline is None or time.perf_counter() < deadline:
            return None
        return {"status": "skipped: budget",
                "message": f"not started: the run's --sweep-budget-s {args.sweep_budget_s:g} s was spent"}

    def case_timeout(limit: float) -> float:
        return limit if deadline is None else max(1.0, min(limit, deadline - time.perf_counter()))

    probe_result = None
    try:
        if args.quick or args.same_process:
            # Every case in one process (saves the ~5 s start of a process per case).
            cases = [new_case(provider, n) for provider in providers for n in ns]
            runnable = [c for c in cases if too_large(c) is None]
            start = bool(runnable) and over_budget(runnable[0]) is None
            results = iter(run_cases_subprocess(spec.module, runnable, case_timeout(args.case_timeout_s))
                           if start else [])
            for case in cases:  # not started: over_budget gives the record
                finish(case, too_large(case) or next(results, None) or over_budget(case))
        else:
            for n in ns:
                for provider in providers:
                    case = new_case(provider, n)
                    finish(case, too_large(case) or over_budget(case)
                           or run_case_with_retry(spec.module, case, case_timeout(args.case_timeout_s)))
        add_checks(records)
        if args.max_n_probe:
            probe_result = probe_max_n(spec, args, args.max_n_providers or providers, new_case, make_record,
                                       lambda case: too_large(case) or over_budget(case), case_timeout)
    finally:
        shutil.rmtree(artifacts, ignore_errors=True)
    for r in records:
        r.pop("output_file", None)

    add_throughput(records, spec, meta)
    summary = summarize_ratios(records, fused, spec.modes)
    print_summary(spec, summary, records)
    meta["wall_s"] = time.perf_counter() - started
    extra: dict[str, Any] = {"config": config, "summary": summary}
    if probe_result is not None:
        extra["max_n_probe"] = probe_result
    path = write_results(out, meta, records, extra)
    what = "fwd+bwd" if "fwd" in spec.modes else "one call"
    png = plot_results(path, records, f"{spec.op}: {spec.params(args)}, {args.dtype}, {device} ({where}, "
                                      f"{meta['torch_num_threads']} threads), {what}",
                       xlabel=f"{spec.size_label} (rows)")
    print(f"\n[bench] {len(records)} cases in {meta['wall_s']:.0f} s; wrote {path}" + (f" and {png}" if png else ""))
    return [p for p in (path, png) if p]


def probe_max_n(spec: BenchSpec, args: argparse.Namespace, providers: list[str], new_case: Callable[..., dict],
                make_record: Callable[..., dict], skip: Callable[[dict], dict | None],
                case_timeout: Callable[[float], float] = lambda limit: limit) -> dict[str, Any]:
    """The largest N that runs, per provider: N doubles from ``--max-n-start`` (each N in its own process,
    one warm-up iteration for compiled providers and on CUDA, where the first call's kernel compilation and
    library start-up would otherwise count in the time and the peak; one timed iteration) until a case is not
    ``ok`` (oom, timeout, error, skipped: too large or budget, whose records ``skip(case)`` gives without
    launching) or N passes ``--max-n-limit``. ``case_timeout(limit)``: the time one attempt may take."""
    warmup = 1 if args.device.startswith("cuda") else 0
    policy = RepeatPolicy(repeats=1, min_repeats=1, budget_s=0.0, warmup=warmup, min_warmup=warmup,
                          warmup_budget_s=0.0)
    print(f"\n[bench] largest {spec.size_label} that fits: doubling from {args.max_n_start} "
          f"(limit {args.max_n_limit}, {args.max_n_timeout_s:g} s per case)", flush=True)
    results = []
    for provider in providers:
        attempts: list[dict[str, Any]] = []
        largest, stopped_by = None, "limit"
        n = args.max_n_start
        while n <= args.max_n_limit:
            case = new_case(provider, n, policy)
            case.pop("artifacts_dir", None)  # no outputs saved: nothing to compare
            result = skip(case) or run_case_with_retry(spec.module, case, case_timeout(args.max_n_timeout_s))
            record = make_record(case, result)
            attempt = {"n": record["n"], "status": record["status"], "process_wall_s": record.get("process_wall_s"),
                       "full_s": (record.get("time_s") or {}).get("full", {}).get("median"),
                       "extra_peak_bytes": (record.get("memory") or {}).get("extra_peak_bytes")}
            if record["status"] != "ok":
                attempt["message"] = str(record.get("message", ""))[:500]
            attempts.append(attempt)
            print(f"    {provider:>13} {spec.size_label}={record['n']}: {record['status']}"
                  f" ({fmt_time(attempt['full_s'])}, peak {fmt_bytes(attempt['extra_peak_bytes'])})", flush=True)
            if record["status"] != "ok":
                stopped_by = record["status"]
                break
            largest = record["n"]
            n *= 2
        results.append({"provider": provider, "largest_n_ok": largest, "stopped_by": stopped_by,
                        "attempts": attempts})
        print(f"  {provider}: largest {spec.size_label} that ran = {largest} (stopped by {stopped_by})", flush=True)
    return {"start": args.max_n_start, "limit": args.max_n_limit, "timeout_s": args.max_n_timeout_s,
            "results": results}


if __name__ == "__main__":  # the device-rates child of measure_device_rates
    sys.exit(child_main(_rates_case))
