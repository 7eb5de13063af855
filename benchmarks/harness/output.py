"""The results file (JSON), its plot (PNG) and the console's number formats."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from benchmarks.harness.constants import GIB, MIB, RESULTS_DIR

SCHEMA_VERSION = 1


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default``: tensors and numpy scalars as numbers, anything else as text."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


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
    tmp.write_text(json.dumps(payload, indent=2, default=json_default) + "\n")
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
