"""The whole sweep of one op, parent side: :func:`bench_main` (a ``bench_<op>.py``'s command line) runs each
(provider, N) case in its own process (or all in one with ``--quick`` / ``--same-process``), then the checks,
ratios, throughput, the largest-N probe, the JSON and the plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.harness.analysis import add_checks, add_throughput, summarize_ratios
from benchmarks.harness.case import REFERENCE_PROVIDERS, backend_of, run_case
from benchmarks.harness.constants import GIB, MIB, REPO_ROOT
from benchmarks.harness.largest_n import probe_max_n
from benchmarks.harness.metadata import metadata
from benchmarks.harness.output import fmt_bytes, plot_results, results_path, write_results
from benchmarks.harness.processes import child_main, run_case_with_retry, run_cases_subprocess
from benchmarks.harness.rates import measure_device_rates
from benchmarks.harness.retry import import_mlcontrast, retry_count
from benchmarks.harness.spec import BenchSpec, default_policy, parse_bench_args, results_name
from benchmarks.harness.tables import print_summary, table_header, table_row
from benchmarks.harness.timing import RepeatPolicy


def bench_main(spec: BenchSpec, argv: Sequence[str] | None = None) -> list[Path]:
    """The command line of a ``bench_<op>.py``: a child case (``--case-json``) or the whole sweep."""
    args = parse_bench_args(spec, argv)
    if args.case_json is not None:
        child_main(lambda case: run_case(spec.setup, case), ["--case-json", args.case_json])
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


def sweep_config(spec: BenchSpec, args: argparse.Namespace, ns: list[int], requested: list[int],
                 providers: list[str], policy: RepeatPolicy) -> dict[str, Any]:
    """The ``config`` of the results file: what was asked for (sizes, op parameters, providers, policy, limits)
    and the conventions of the throughput and bandwidth figures."""
    device = args.device
    config: dict[str, Any] = {"op": spec.op, "device": device, "n": ns}
    if ns != requested:
        config["n_requested"] = requested
    config.update(spec.config_fields(args) if spec.config_fields is not None else spec.case_fields(args))
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
    if device.startswith("cuda"):
        config["allow_tf32"] = args.allow_tf32
    return config


def add_device_rates(spec: BenchSpec, args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """Measures the device rates the op's throughput needs (``--device-rates``; by default on CUDA only) into
    ``meta`` and prints them."""
    device = args.device
    cuda = device.startswith("cuda")
    rates_on = args.device_rates == "on" or (args.device_rates == "auto" and cuda)
    if not rates_on or (spec.flops is None and spec.feature_bytes is None):
        return
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


def run_sweep(spec: BenchSpec, args: argparse.Namespace, argv: list[str]) -> list[Path]:
    """Every (provider, N) case of the command line ``args`` (``argv``, recorded), then the checks, ratios,
    throughput and the largest-N probe; writes the JSON (after every case, marked partial until the end) and
    the PNG, and returns their paths."""
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
    # Nor a backend without the op's kernels (FusedOp.backends): its cases could only say so.
    fused = [b for b in fused if missing_kernels(spec.op, b) is None]
    fused += [v for v in spec.variants if backend_of(v) in fused]
    providers = args.providers or ["torch", "torch_compile", *fused]
    fused = [p for p in providers if p not in REFERENCE_PROVIDERS]
    policy = default_policy(args)
    meta = metadata(device)
    meta["bench_argv"] = argv
    if args.threads:
        meta["torch_num_threads"] = args.threads
    op_fields = spec.case_fields(args)
    config = sweep_config(spec, args, ns, requested, providers, policy)
    out = results_path(results_name(spec, args), device, args.out, args.out_dir)

    add_device_rates(spec, args, meta)

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


def missing_kernels(op: str, backend: str) -> str | None:
    """Why the contract's ``op`` has no ``backend`` kernels, or None (it has them, or is not a contract op)."""
    from mlcontrast import _backends

    return _backends._missing_kernels(op, backend)


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
