"""Markdown tables from the results files, and README's benchmark section rebuilt from them.

    python -m benchmarks.report                  # print the tables of every results file
    python -m benchmarks.report --write-readme   # replace README's section between the bench markers
    python -m benchmarks.report --results-dir /tmp/quick --include-quick   # tables of quick runs elsewhere
    python -m benchmarks.report --write-measured # mlcontrast/_measured.py: the fastest CUDA backend per shape

README's benchmark section is never typed by hand: it is this script's output for the committed
``benchmarks/results/<op>_<device>.json`` files (quick runs, ``*_quick_*``, are left out). The tables are
generic over ops: the time columns follow ``config.modes`` (fwd / bwd / fwd+bwd, or one time), and the GPU
fields (TFLOP/s and fraction of the dense matmul rate, features GB/s and fraction of the copy bandwidth, the
largest N that ran) get columns or lines where the results have them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
PROVIDER_NAMES = {
    "torch": "eager reference",
    "torch_compile": "compiled reference",
    "triton_atomic": "mlcontrast `triton` (atomic)",
}
MEMORY_METHODS = {
    "vmhwm_clear_refs": "the resident-set high-water mark above the inputs",
    "rss_sampler_1ms": "the resident set (sampled every ms) above the inputs",
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated above the inputs",
}


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1e-3:  # GPU kernels: tens of microseconds
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}×"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _median(record: dict, mode: str) -> float | None:
    return record.get("time_s", {}).get(mode, {}).get("median")


def _modes(result: dict) -> list[str]:
    return list(result.get("config", {}).get("modes") or ["fwd", "bwd", "full"])


def _size_label(result: dict) -> str:
    return result.get("config", {}).get("size_label", "N")


def table(result: dict) -> str:
    """One markdown table: every (N, provider) case with times, memory and ratios to the references."""
    records = result["records"]
    summary = {(s["n"], s["provider"]): s for s in result.get("summary", [])}
    modes = _modes(result)
    two_phase = "fwd" in modes
    time_heads = [{"fwd": "fwd", "bwd": "bwd", "full": "fwd+bwd"}.get(m, m) for m in modes] if two_phase else ["time"]
    what = "fwd+bwd" if two_phase else "time"
    ok = [r for r in records if r.get("status") == "ok"]
    has_tflops = any("throughput" in r for r in ok)
    has_matmul = any("fraction_of_matmul" in r.get("throughput", {}) for r in ok)
    has_gbs = any("bandwidth" in r for r in ok)
    has_copy = any("fraction_of_copy" in r.get("bandwidth", {}) for r in ok)
    has_beyond = any(r.get("memory", {}).get("method") == "cuda_max_memory_allocated" for r in ok)

    heads = [_size_label(result), "provider", *time_heads, "extra peak memory"]
    if has_beyond:
        heads.append("beyond inputs + grads")
    heads.append(f"{what} speed-up vs eager / compiled" if two_phase else "speed-up vs eager / compiled")
    if has_tflops:
        heads.append(f"TFLOP/s ({what})")
    if has_matmul:
        heads.append("of dense matmul")
    if has_gbs:
        heads.append(f"features GB/s ({what})")
    if has_copy:
        heads.append("of copy bandwidth")
    align = ["---:", "---", *["---:"] * (len(heads) - 2)]
    lines = ["| " + " | ".join(heads) + " |", "| " + " | ".join(align) + " |"]

    baselines = {"torch": 0, "torch_compile": 1}  # the references first, then the fused backends
    for r in sorted(records, key=lambda r: (r["n"], baselines.get(r["provider"], 2), r["provider"])):
        name = PROVIDER_NAMES.get(r["provider"], f"mlcontrast `{r['provider']}`")
        if r.get("status") != "ok":
            lines.append(f"| {r['n']} | {name} | {r.get('status')} |" + " |" * (len(heads) - 3))
            continue
        s = summary.get((r["n"], r["provider"]), {})
        speedups = ""
        if s:
            speedups = f"{_ratio(s.get('speedup_full_vs_torch'))} / {_ratio(s.get('speedup_full_vs_torch_compile'))}"
        memory = r.get("memory", {})
        cells = [str(r["n"]), name, *[_time(_median(r, m)) for m in (modes if two_phase else ["full"])],
                 _bytes(memory.get("extra_peak_bytes"))]
        if has_beyond:
            cells.append(_bytes(memory.get("beyond_inputs_and_grads_bytes")))
        cells.append(speedups)
        if has_tflops:
            cells.append(_num(r.get("throughput", {}).get("tflops", {}).get("full")))
        if has_matmul:
            cells.append(_pct(r.get("throughput", {}).get("fraction_of_matmul", {}).get("full")))
        if has_gbs:
            cells.append(_num(r.get("bandwidth", {}).get("feature_read_gb_s", {}).get("full")))
        if has_copy:
            cells.append(_pct(r.get("bandwidth", {}).get("fraction_of_copy", {}).get("full")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _params(config: dict) -> str:
    """``D=128, float32, 80 classes, temperature 0.1`` and the like, from what the config has."""
    parts = []
    if "positives" in config:  # multihot_supcon: one results file per positives mode
        threshold = f" (threshold {config['threshold']})" if config["positives"] == "jaccard" else ""
        parts.append(f"positives={config['positives']}{threshold}")
    if "d" in config:
        parts.append(f"D={config['d']}")
    parts.append(config.get("dtype", "float32"))
    if "num_classes" in config:
        parts.append(f"{config['num_classes']} classes")
    for key in ("temperature", "momentum"):
        if key in config:
            parts.append(f"{key} {config[key]}")
    return ", ".join(parts)


def _device_lines(meta: dict, result: dict) -> list[str]:
    lines = []
    mm = meta.get("matmul_peak")
    if mm:
        tf32 = " (TF32)" if mm.get("allow_tf32") else ""
        lines.append(f"Dense matmul (`torch.mm` {mm['shape'][0]}³, {mm['dtype']}{tf32}): {mm['tflops']:.4g} TFLOP/s.")
        if mm["dtype"] == "float32" and not mm.get("allow_tf32") and str(meta.get("device")).startswith("cuda"):
            lines.append("(IEEE fp32; the Triton kernels run fp32 products as 3xTF32 on the tensor cores, so their "
                         "fraction of this rate can pass 100%.)")
    cp = meta.get("copy_bandwidth")
    if cp:
        lines.append(f"Copy bandwidth (`copy_` of {_bytes(cp['bytes'])}, read + write): {cp['gb_s']:.4g} GB/s.")
    flops = result.get("config", {}).get("flops")
    if flops:
        lines.append(f"FLOPs counted: fwd {flops['fwd']}, bwd {flops['bwd']}, fwd+bwd {flops['full']}.")
    probe = result.get("max_n_probe")
    if probe:
        found = ", ".join(f"{PROVIDER_NAMES.get(p['provider'], p['provider'])} {p['largest_n_ok'] or 'none'} "
                          f"(then {p['stopped_by']})" for p in probe["results"])
        lines.append(f"Largest {_size_label(result)} that ran (doubling from {probe['start']}): {found}.")
    return lines


def section(paths: list[Path]) -> str:
    parts = []
    for path in paths:
        result = json.loads(path.read_text())
        meta, config = result["metadata"], result["config"]
        methods = {r.get("memory", {}).get("method") for r in result["records"] if r.get("status") == "ok"}
        memory = MEMORY_METHODS.get(next(iter(methods)) if len(methods) == 1 else "", "the peak above the inputs")
        where = meta.get("gpu_name") or meta.get("cpu_model", meta.get("device"))
        threads = "" if meta.get("gpu_name") else f" ({meta.get('torch_num_threads', '?')} threads)"
        command = " ".join(meta["command"].split()[1:]) if "command" in meta else ""
        processes = "every case in one process (quick run)" if config.get("quick") else "each case in its own process"
        text = (
            f"### `{config['op']}` on {where}{threads}\n\n"
            f"{_params(config)}; medians; extra peak memory is {memory}, {processes}. "
            f"Measured {meta['date'][:10]} with torch {meta['torch']}, mlcontrast {meta['mlcontrast']} (`{command}`); "
            f"raw data: [`{_rel(path)}`]({_rel(path)}).\n\n"
        )
        extra = _device_lines(meta, result)
        if result.get("partial"):
            extra.insert(0, "**Partial run** (cut short): the cases below ran, the others did not.")
        if extra:
            text += " ".join(extra) + "\n\n"
        parts.append(text + table(result))
        plot = path.with_suffix(".png")
        if plot.exists():
            parts.append(f"![{config['op']} on {meta['device']}]({_rel(plot)})")
    return "\n\n".join(parts)


def result_files(results_dir: Path = RESULTS, include_quick: bool = False) -> list[Path]:
    return sorted(p for p in Path(results_dir).glob("*.json") if include_quick or "_quick_" not in p.name)


def write_readme(text: str, start: str = START, end: str = END) -> None:
    """Replace README's text between the ``start`` and ``end`` markers."""
    readme = README.read_text()
    if start not in readme or end not in readme:
        raise SystemExit(f"README.md has no {start} ... {end} section")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n{text}\n{end}{tail}")


FUSED_ON_CUDA = ("cuda", "triton")
MEASURED = ROOT / "mlcontrast" / "_measured.py"
#: The largest relative error (loss, outputs) against the eager reference run in the same dtype that a
#: record may show and still count as a result: wide (TF32, a 16-bit reference), it only keeps a broken
#: kernel from being chosen for being fast.
PLAUSIBLE_REL_ERR = {"float64": 1e-8, "float32": 1e-2, "float16": 5e-2, "bfloat16": 1e-1}


def plausible(record: dict) -> bool:
    """Finite, and within :data:`PLAUSIBLE_REL_ERR` of the reference wherever a check exists."""
    bound = PLAUSIBLE_REL_ERR.get(record.get("dtype"), 1e-1)
    errors = [v for k, v in (record.get("check") or {}).items() if k.endswith("_rel_err")]
    return record.get("finite", True) is not False and all(math.isfinite(e) and e <= bound for e in errors)


def fastest_backends(paths: list[Path]) -> tuple[str | None, dict[tuple[str, str], list[tuple[int, int, str]]]]:
    """From CUDA results files: the GPU's name and, per (op, dtype), each measured (rows, D) with the fused
    backend of the smallest fwd+bwd (or single-call) median time among the :func:`plausible` records."""
    device, best = None, {}
    for path in paths:
        result = json.loads(path.read_text())
        if not str(result["metadata"]["device"]).startswith("cuda") or result.get("partial"):
            continue  # a partial run's cases were never checked against the reference
        device = device or result["metadata"].get("gpu_name")
        mode = "full" if "full" in result["config"]["modes"] else result["config"]["modes"][0]
        for r in result["records"]:
            median = ((r.get("time_s") or {}).get(mode) or {}).get("median")
            if r["provider"] not in FUSED_ON_CUDA or r["status"] != "ok" or median is None or not plausible(r):
                continue
            key, shape = (r["op"], r["dtype"]), (r["n"], r["d"])
            current = best.setdefault(key, {}).get(shape)
            if current is None or median < current[0]:
                best[key][shape] = (median, r["provider"])
    table = {key: sorted((n, d, backend) for (n, d), (_, backend) in shapes.items()) for key, shapes in best.items()}
    return device, dict(sorted(table.items()))


def write_measured(paths: list[Path], target: Path = MEASURED) -> Path:
    """Rewrites ``mlcontrast/_measured.py`` (its docstring kept) from the CUDA results among ``paths``."""
    device, table = fastest_backends(paths)
    text = target.read_text()
    docstring = text[: text.index('"""', 3) + 3]
    lines = [docstring, "", "# The GPU the figures were measured on (None: no GPU results yet).",
             f"DEVICE = {device!r}", "", "# (op, dtype) -> ((rows, feature dim, fastest backend), ...)",
             "FASTEST: dict[tuple[str, str], tuple[tuple[int, int, str], ...]] = {" + ("" if table else "}")]
    for key, points in table.items():
        lines.append(f"    {key!r}: (")
        lines += [f"        {point!r}," for point in points]
        lines.append("    ),")
    if table:
        lines.append("}")
    tmp = target.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-readme", action="store_true", help="rewrite README's benchmark section")
    parser.add_argument("--write-measured", action="store_true",
                        help="rewrite mlcontrast/_measured.py (the fastest CUDA backend per shape) from the results")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the results files are")
    parser.add_argument("--include-quick", action="store_true", help="also the quick runs' files (*_quick_*)")
    args = parser.parse_args(argv)
    paths = result_files(args.results_dir, args.include_quick)
    if (args.write_readme or args.write_measured) and (args.include_quick or args.results_dir.resolve() != RESULTS):
        parser.error("--write-readme and --write-measured take the committed results only "
                     "(no --results-dir, no --include-quick)")
    if args.write_measured:
        print(f"updated {write_measured(paths)}")
    text = section(paths)
    if args.write_readme:
        write_readme(text)
        print(f"updated {README}")
    elif not args.write_measured:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
