"""What a sweep derives from its records: correctness checks against the eager reference, throughput and
bandwidth (against the measured device rates), and the speed-up and memory ratios of the fused providers.
"""

from __future__ import annotations

from typing import Any, Sequence

from benchmarks.harness.spec import BenchSpec


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
