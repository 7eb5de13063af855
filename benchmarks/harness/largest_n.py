"""The largest-N probe (``--max-n-probe``): per provider, the largest N that runs."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from benchmarks.harness.output import fmt_bytes, fmt_time
from benchmarks.harness.processes import run_case_with_retry
from benchmarks.harness.spec import BenchSpec
from benchmarks.harness.timing import RepeatPolicy


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
