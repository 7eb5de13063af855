"""The sweep's console output: one table row per case as it finishes, and the summary of ratios at the end."""

from __future__ import annotations

from typing import Any

from benchmarks.harness.analysis import ok_record
from benchmarks.harness.output import fmt_bytes, fmt_time, format_table
from benchmarks.harness.spec import BenchSpec


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
