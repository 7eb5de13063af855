"""Benchmark of ``label_supcon_loss``: the fused backends against the dense reference, eager and compiled.

Providers:

* ``torch``: ``mlcontrast.reference.label_supcon_loss``, eager (materialises N x N matrices);
* ``torch_compile``: ``torch.compile(mlcontrast.reference.label_supcon_loss, dynamic=False)``, compile
  time excluded (it happens during warm-up and is reported as ``warmup.first_s``);
* every fused backend of ``mlcontrast.available_backends(device)`` except ``torch`` (``cpu`` on CPU;
  ``cuda`` and ``triton`` on CUDA), called through ``mlcontrast.label_supcon_loss(..., backend=name)``.

Inputs: features ``[N, D]`` = L2-normalised ``randn`` rows (``requires_grad``), labels ``randint(0, 80)``
(COCO-like class ids), temperature 0.1, reduction ``"mean"``; the same seed gives every provider the
same inputs. Each (provider, N) case runs in its own process. Every timed iteration is one forward (with
grad enabled) followed by one backward, timed separately: ``fwd``, ``bwd`` and ``full`` = fwd + bwd.

    python -m benchmarks.bench_label_supcon --device cpu                 # default sweep
    python -m benchmarks.bench_label_supcon --quick                      # N in {256, 1024}, 1 repeat
    python -m benchmarks.bench_label_supcon --n 4096 16384 --providers cpu torch
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
from typing import Any

from benchmarks import utils
from benchmarks.utils import GIB, MIB, RepeatPolicy, fmt_bytes, fmt_time

OP = "label_supcon"
MODULE = "benchmarks.bench_label_supcon"
REFERENCE_PROVIDERS = ("torch", "torch_compile")
MODES = ("fwd", "bwd", "full")

DEFAULT_N = (1024, 4096, 16384, 65536)
QUICK_N = (256, 1024)
NUM_CLASSES = 80

# Lower bounds on the N x N-sized memory (bytes per matrix element) one fwd+bwd of the dense reference
# needs at its peak. A case is skipped as "too large" when this alone reaches the memory cap, so that
# only cases that obviously cannot fit are skipped. Measured on CPU (fp32): eager ~35 B/element, compiled
# ~5 B/element (inductor fuses the masks and recomputes); every dense formulation holds at least the fp32
# logits, 4 B/element.
NN_BYTES_LOWER_BOUND = {"torch": 16.0, "torch_compile": 4.0}

# Saved for the correctness check between providers (bytes); larger gradients are not kept.
MAX_SAVED_GRAD_BYTES = 256 * MIB


# ----------------------------------------------------------------------------------------------
# Child: one case
# ----------------------------------------------------------------------------------------------


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def make_inputs(n: int, d: int, dtype: str, device: str, num_classes: int = NUM_CLASSES, seed: int = 0):
    """The same inputs for every provider: seeded on the CPU generator, then moved to ``device``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    features = F.normalize(torch.randn(n, d, generator=g), dim=1)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    features = features.to(device=device, dtype=_dtype(dtype)).requires_grad_()
    return features, labels.to(device)


def make_loss(provider: str, mlcontrast, temperature: float):
    """``loss(features, labels)`` of a provider."""
    import torch

    if provider == "torch":
        ref = mlcontrast.reference.label_supcon_loss
        return lambda x, y: ref(x, y, temperature, None, "mean", False)
    if provider == "torch_compile":
        compiled = torch.compile(mlcontrast.reference.label_supcon_loss, dynamic=False)
        return lambda x, y: compiled(x, y, temperature, None, "mean", False)
    return lambda x, y: mlcontrast.label_supcon_loss(x, y, temperature=temperature, reduction="mean",
                                                     backend=provider)


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Runs one (provider, N) case in this process and returns its record (without the case fields)."""
    import torch

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    mlcontrast = utils.import_mlcontrast()
    device = case["device"]
    provider = case["provider"]
    if provider not in REFERENCE_PROVIDERS:
        available = mlcontrast.available_backends(device)
        if provider not in available:
            from mlcontrast import _backends

            reason = _backends.why_unavailable(provider, torch.device(device))
            return {"status": "unavailable", "message": f"backend {provider!r} unavailable on {device}: {reason}"}
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))

    features, labels = make_inputs(case["n"], case["d"], case["dtype"], device, case["num_classes"], case["seed"])
    loss_fn = make_loss(provider, mlcontrast, case["temperature"])
    # The cap is set after the imports and the inputs: it bounds what the benchmark itself allocates.
    limit = None if device.startswith("cuda") else utils.limit_address_space(case.get("max_memory_gib"))

    last: dict[str, Any] = {}

    def reset() -> None:
        features.grad = None

    def forward(_: Any) -> torch.Tensor:
        return loss_fn(features, labels)

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        last["loss"] = loss.detach()

    policy = RepeatPolicy.from_dict(case["policy"])
    if provider == "torch_compile":  # the first warm-up iteration compiles the forward and the backward
        policy.first_warmup_free = True
        policy.warmup = max(policy.warmup, 2)
    probe = utils.PeakMemory(device)
    timing = utils.time_phases([("fwd", forward), ("bwd", backward)], reset=reset, device=device, policy=policy,
                               probe=probe)
    times = timing["times"]
    grad = features.grad.detach().to(torch.float64)
    record: dict[str, Any] = {
        "status": "ok",
        "time_s": {"fwd": times["fwd"], "bwd": times["bwd"], "full": times["total"]},
        "memory": probe.result,
        "warmup": timing["warmup"],
        "repeats": times["total"]["n"],
        "loss": float(last["loss"].item()),
        "grad_norm": float(torch.linalg.vector_norm(grad).item()),
        "finite": bool(torch.isfinite(last["loss"]).item() and torch.isfinite(grad).all().item()),
        "threads": torch.get_num_threads(),
        "address_space_limit_bytes": limit,
    }
    out_dir = case.get("artifacts_dir")
    if out_dir and grad.numel() * 8 <= MAX_SAVED_GRAD_BYTES:
        path = Path(out_dir) / f"{provider}_{case['n']}.pt"
        torch.save({"loss": last["loss"].double().cpu(), "grad": grad.cpu()}, path)
        record["grad_file"] = str(path)
    return record


# ----------------------------------------------------------------------------------------------
# Parent: the sweep
# ----------------------------------------------------------------------------------------------


def probe_backends(device: str, retries: int = 4, wait_s: float = 30.0) -> list[str]:
    """``mlcontrast.available_backends(device)``, retried while the compiled extension does not load (it
    may be being rebuilt); each try runs in a fresh process, since a failed load is cached."""
    code = (
        "import json, torch, mlcontrast\n"
        "from mlcontrast import _backends\n"
        f"d = torch.device({device!r})\n"
        "print(json.dumps({'available': mlcontrast.available_backends(d),"
        " 'extension': _backends._extension()[1]}))\n"
    )
    mlcontrast = utils.import_mlcontrast()
    from mlcontrast import _backends

    available, reason = mlcontrast.available_backends(device), _backends._extension()[1]
    for attempt in range(retries):
        if not reason:
            return available
        print(f"[bench] the mlcontrast extension does not load ({reason}); retry in {wait_s:.0f} s", flush=True)
        time.sleep(wait_s)
        proc = subprocess.run([sys.executable, "-c", code], cwd=utils.REPO_ROOT, capture_output=True, text=True,
                              timeout=300)
        if proc.returncode == 0:
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            available, reason = info["available"], info["extension"]
        else:
            reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    if reason:
        print(f"[bench] WARNING: going on without the compiled extension: {reason}", flush=True)
    return available


def estimate_nn_bytes(provider: str, n: int) -> int:
    return int(NN_BYTES_LOWER_BOUND.get(provider, 0.0) * n * n)


def default_policy(args: argparse.Namespace) -> RepeatPolicy:
    if args.quick:
        return RepeatPolicy(repeats=args.repeats or 1, min_repeats=1, budget_s=0.0, warmup=1, min_warmup=1,
                            warmup_budget_s=0.0)
    return RepeatPolicy(repeats=args.repeats or 20, min_repeats=min(args.min_repeats, args.repeats or 20),
                        budget_s=args.case_budget_s, warmup=args.warmup, min_warmup=1, warmup_budget_s=2.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:K)")
    p.add_argument("--n", type=int, nargs="+", default=None, help=f"rows N (default {list(DEFAULT_N)})")
    p.add_argument("--d", type=int, default=128, help="feature dimension D")
    p.add_argument("--dtype", default="float32", choices=utils.DTYPES)
    p.add_argument("--providers", nargs="+", default=None,
                   help="torch, torch_compile and fused backend names (default: all available)")
    p.add_argument("--repeats", type=int, default=None,
                   help="most timed iterations per case (default 20; 1 with --quick)")
    p.add_argument("--min-repeats", type=int, default=3, help="fewest timed iterations per case")
    p.add_argument("--case-budget-s", type=float, default=15.0,
                   help="stop timing a case after this many seconds once --min-repeats are done")
    p.add_argument("--warmup", type=int, default=3, help="most warm-up iterations (stops after 2 s once one ran)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: N in {list(QUICK_N)}, one repeat, one process per provider (not per case)")
    p.add_argument("--out", default=None, help="JSON path (the PNG goes next to it)")
    p.add_argument("--max-memory-gib", type=float, default=16.0,
                   help="address-space cap of each case above its start (RLIMIT_AS, CPU); 0 = none")
    p.add_argument("--case-timeout-s", type=float, default=900.0, help="kill a case after this long")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each case (default: torch's)")
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case-json", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


COLUMNS = (("provider", 13), ("N", 6), ("status", 18), ("fwd", 9), ("bwd", 9), ("full", 9),
           ("full min..max", 19), ("reps", 4), ("extra peak mem", 14), ("first call", 10), ("wall", 8))


def table_line(cells: list[Any]) -> str:
    return "  ".join(str(c).rjust(w) for c, (_, w) in zip(cells, COLUMNS))


def table_header() -> str:
    return table_line([h for h, _ in COLUMNS]) + "\n" + table_line(["-" * w for _, w in COLUMNS])


def table_row(r: dict[str, Any]) -> str:
    t = r.get("time_s") or {}

    def med(mode: str) -> str:
        return fmt_time(t[mode]["median"]) if mode in t else "-"

    rng = f"{fmt_time(t['full']['min'])}..{fmt_time(t['full']['max'])}" if "full" in t else "-"
    mem = (r.get("memory") or {}).get("extra_peak_bytes")
    first = (r.get("warmup") or {}).get("first_s")
    status = r["status"] if len(r["status"]) <= 18 else r["status"][:17] + "~"
    return table_line([r["provider"], r["n"], status, med("fwd"), med("bwd"), med("full"), rng, r.get("repeats", "-"),
                       fmt_bytes(mem), fmt_time(first), fmt_time(r.get("process_wall_s"))])


def _ok(records: list[dict[str, Any]], provider: str, n: int) -> dict[str, Any] | None:
    for r in records:
        if r["provider"] == provider and r["n"] == n and r.get("status") == "ok":
            return r
    return None


def add_checks(records: list[dict[str, Any]], reference: str = "torch") -> None:
    """Relative error of each provider's loss and gradient against the eager reference on the same inputs."""
    import torch

    for r in records:
        if r.get("status") != "ok" or r["provider"] == reference:
            continue
        ref = _ok(records, reference, r["n"])
        if ref is None:
            continue
        check: dict[str, Any] = {"against": reference,
                                 "loss_rel_err": abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)}
        if r.get("grad_file") and ref.get("grad_file"):
            a = torch.load(r["grad_file"])["grad"]
            e = torch.load(ref["grad_file"])["grad"]
            err = torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e).clamp(min=1e-30)
            check["grad_rel_err"] = err.item()
        r["check"] = check


def summarize_ratios(records: list[dict[str, Any]], fused: list[str]) -> list[dict[str, Any]]:
    out = []
    for n in sorted({r["n"] for r in records}):
        eager, compiled = _ok(records, "torch", n), _ok(records, "torch_compile", n)
        for name in fused:
            f = _ok(records, name, n)
            if f is None:
                continue
            row: dict[str, Any] = {"n": n, "provider": name}
            for mode in MODES:
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
            if "check" in f:
                row["loss_rel_err_vs_torch"] = f["check"]["loss_rel_err"]
                row["grad_rel_err_vs_torch"] = f["check"].get("grad_rel_err")
            out.append(row)
    return out


def print_summary(summary: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    def e(v: float | None) -> str:
        return "-" if v is None else f"{v:.1e}"

    rows = []
    for s in summary:
        f = _ok(records, s["provider"], s["n"])
        eager, compiled = _ok(records, "torch", s["n"]), _ok(records, "torch_compile", s["n"])
        mem = lambda r: fmt_bytes(r["memory"]["extra_peak_bytes"]) if r else "-"  # noqa: E731
        frac = s.get("memory_fraction_of_torch")
        rows.append([
            s["provider"], s["n"], fmt_time(f["time_s"]["full"]["median"]),
            fmt_time(eager["time_s"]["full"]["median"]) if eager else "-",
            fmt_time(compiled["time_s"]["full"]["median"]) if compiled else "-",
            x(s.get("speedup_full_vs_torch")), x(s.get("speedup_full_vs_torch_compile")),
            mem(f), mem(eager), mem(compiled), "-" if frac is None else f"{100 * frac:.2f}%",
            e(s.get("loss_rel_err_vs_torch")), e(s.get("grad_rel_err_vs_torch")),
        ])
    print("\nSummary (full = forward + backward, medians):")
    print(utils.format_table(rows, ("fused", "N", "fused", "eager", "compiled", "vs eager", "vs compiled",
                                    "fused mem", "eager mem", "compiled mem", "mem/eager", "loss rel err",
                                    "grad rel err")))


def results_name(args: argparse.Namespace) -> str:
    name = OP
    if args.dtype != "float32":
        name += "_" + {"float16": "fp16", "bfloat16": "bf16"}[args.dtype]
    if args.quick:
        name += "_quick"
    return name


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    if args.case_json is not None:
        utils.child_main(run_case, ["--case-json", args.case_json])
        return []

    started = time.perf_counter()
    device = args.device
    ns = args.n or list(QUICK_N if args.quick else DEFAULT_N)
    fused = [b for b in probe_backends(device) if b != "torch"]
    providers = args.providers or ["torch", "torch_compile", *fused]
    fused = [p for p in providers if p not in REFERENCE_PROVIDERS]
    policy = default_policy(args)
    meta = utils.metadata(device)
    meta["bench_argv"] = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        meta["torch_num_threads"] = args.threads
    config = {
        "op": OP, "device": device, "n": ns, "d": args.d, "dtype": args.dtype, "providers": providers,
        "num_classes": args.num_classes, "temperature": args.temperature, "reduction": "mean", "seed": args.seed,
        "policy": policy.as_dict(), "max_memory_gib": args.max_memory_gib, "case_timeout_s": args.case_timeout_s,
    }
    out = utils.results_path(results_name(args), device, args.out)
    print(f"[bench] {OP} on {device} ({meta['cpu_model']}, {meta['torch_num_threads']} threads), "
          f"torch {meta['torch']}, mlcontrast {meta['mlcontrast']}, commit {meta['git_commit']}")
    print(f"[bench] N = {ns}, D = {args.d}, {args.dtype}, providers = {providers}; "
          f"{'one process per provider (quick)' if args.quick else 'one process per case'}\n")
    print(table_header(), flush=True)

    artifacts = tempfile.mkdtemp(prefix="mlcontrast_bench_")
    cap = args.max_memory_gib * GIB if args.max_memory_gib and args.max_memory_gib > 0 else None
    records: list[dict[str, Any]] = []

    def new_case(provider: str, n: int) -> dict[str, Any]:
        return {"op": OP, "provider": provider, "device": device, "n": n, "d": args.d, "dtype": args.dtype,
                "num_classes": args.num_classes, "temperature": args.temperature, "seed": args.seed,
                "policy": policy.as_dict(), "max_memory_gib": args.max_memory_gib, "threads": args.threads,
                "artifacts_dir": artifacts}

    def finish(case: dict[str, Any], result: dict[str, Any]) -> None:
        record = {k: v for k, v in case.items() if k not in ("policy", "artifacts_dir")}
        record["estimated_nn_bytes"] = estimate_nn_bytes(case["provider"], case["n"])
        record.update(result)
        records.append(record)
        print(table_row(record), flush=True)
        if record["status"] != "ok" and not record["status"].startswith("skipped"):
            print(f"    {record['status']}: {record.get('message', '')}", flush=True)

    def too_large(case: dict[str, Any]) -> dict[str, Any] | None:
        estimate = estimate_nn_bytes(case["provider"], case["n"])
        if device.startswith("cuda") or cap is None or estimate < cap:
            return None
        return {"status": "skipped: too large",
                "message": f"the dense reference needs at least {fmt_bytes(estimate)} of N x N temporaries, "
                           f"above the {args.max_memory_gib:g} GiB cap"}

    try:
        if args.quick:
            # A smoke run: one process per provider for all its N (saves the ~5 s start of a process per case).
            for provider in providers:
                cases = [new_case(provider, n) for n in ns]
                runnable = [c for c in cases if too_large(c) is None]
                results = iter(utils.run_cases_subprocess(MODULE, runnable, args.case_timeout_s) if runnable else [])
                for case in cases:
                    finish(case, too_large(case) or next(results))
        else:
            for n in ns:
                for provider in providers:
                    case = new_case(provider, n)
                    finish(case, too_large(case) or run_case_with_retry(case, args.case_timeout_s))
        add_checks(records)
    finally:
        shutil.rmtree(artifacts, ignore_errors=True)
    for r in records:
        r.pop("grad_file", None)

    summary = summarize_ratios(records, fused)
    print_summary(summary, records)
    meta["wall_s"] = time.perf_counter() - started
    path = utils.write_results(out, meta, records, {"config": config, "summary": summary})
    png = utils.plot_results(path, records, f"{OP}: D={args.d}, {args.dtype}, {device} ({meta['cpu_model']}, "
                                            f"{meta['torch_num_threads']} threads), fwd+bwd")
    print(f"\n[bench] {len(records)} cases in {meta['wall_s']:.0f} s; wrote {path}" + (f" and {png}" if png else ""))
    return [p for p in (path, png) if p]


def run_case_with_retry(case: dict[str, Any], timeout_s: float, retries: int = 3, wait_s: float = 30.0) -> dict:
    """A case, run again when its backend was unavailable (the extension being rebuilt) or it failed to import."""
    for attempt in range(retries + 1):
        result = utils.run_case_subprocess(MODULE, case, timeout_s=timeout_s)
        transient = result["status"] == "unavailable" and "did not load" in result.get("message", "")
        transient |= result["status"] == "error" and "import mlcontrast failed" in result.get("message", "")
        if not transient or attempt == retries:
            return result
        print(f"    {case['provider']} N={case['n']}: {result['message'][:200]}; retry in {wait_s:.0f} s", flush=True)
        time.sleep(wait_s)
    return result


if __name__ == "__main__":
    main()
