"""Markdown tables from the results files, and README's benchmark section rebuilt from them.

    python -m benchmarks.report                  # print the tables of every results file
    python -m benchmarks.report --write-readme   # replace README's section between the bench markers

README's benchmark section is never typed by hand: it is this script's output for the committed
``benchmarks/results/<op>_<device>.json`` files (quick runs are left out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
PROVIDER_NAMES = {"torch": "eager reference", "torch_compile": "compiled reference"}


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}×"


def _median(record: dict, mode: str) -> float | None:
    return record.get("time_s", {}).get(mode, {}).get("median")


def table(result: dict) -> str:
    """One markdown table: every (N, provider) case with times, memory and ratios to the references."""
    records = result["records"]
    summary = {(s["n"], s["provider"]): s for s in result.get("summary", [])}
    lines = [
        "| N | provider | fwd | bwd | fwd+bwd | extra peak memory | fwd+bwd speed-up vs eager / compiled |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    baselines = {"torch": 0, "torch_compile": 1}  # the references first, then the fused backends
    for r in sorted(records, key=lambda r: (r["n"], baselines.get(r["provider"], 2), r["provider"])):
        name = PROVIDER_NAMES.get(r["provider"], f"mlcontrast `{r['provider']}`")
        if r.get("status") != "ok":
            lines.append(f"| {r['n']} | {name} | {r.get('status')} | | | | |")
            continue
        s = summary.get((r["n"], r["provider"]), {})
        speedups = ""
        if s:
            speedups = f"{_ratio(s.get('speedup_full_vs_torch'))} / {_ratio(s.get('speedup_full_vs_torch_compile'))}"
        extra = r.get("memory", {}).get("extra_peak_bytes")
        lines.append(
            f"| {r['n']} | {name} | {_time(_median(r, 'fwd'))} | {_time(_median(r, 'bwd'))} | "
            f"{_time(_median(r, 'full'))} | {_bytes(extra)} | {speedups} |"
        )
    return "\n".join(lines)


def section(paths: list[Path]) -> str:
    parts = []
    for path in paths:
        result = json.loads(path.read_text())
        meta, config = result["metadata"], result["config"]
        parts.append(
            f"### `{config['op']}` on {meta.get('cpu_model', meta.get('device'))} "
            f"({meta.get('torch_num_threads', '?')} threads)\n\n"
            f"D={config['d']}, {config['dtype']}, {config['num_classes']} classes, temperature "
            f"{config['temperature']}; medians; extra peak memory is the resident-set high-water mark above "
            f"the inputs, each case in its own process. Measured {meta['date'][:10]} with torch {meta['torch']}, "
            f"mlcontrast {meta['mlcontrast']} (`{' '.join(meta['command'].split()[1:]) if 'command' in meta else ''}`); "
            f"raw data: [`{path.relative_to(ROOT)}`]({path.relative_to(ROOT)}).\n\n"
            + table(result)
        )
        plot = path.with_suffix(".png")
        if plot.exists():
            parts.append(f"![{config['op']} on {meta['device']}]({plot.relative_to(ROOT)})")
    return "\n\n".join(parts)


def result_files() -> list[Path]:
    return sorted(p for p in RESULTS.glob("*.json") if "_quick_" not in p.name)


def write_readme(text: str) -> None:
    readme = README.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} section")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-readme", action="store_true", help="rewrite README's benchmark section")
    args = parser.parse_args(argv)
    text = section(result_files())
    if args.write_readme:
        write_readme(text)
        print(f"updated {README}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
