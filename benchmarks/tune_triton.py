"""Launch configurations of the Triton label_supcon kernels, timed one against another on a GPU.

    python -m benchmarks.tune_triton --n 32768 --d 256 --dtype bfloat16      # the issue's target shape
    python -m benchmarks.tune_triton --n 16384 --d 128 --dtype float16 --phases bwd
    python -m benchmarks.tune_triton --quick --out /tmp/tune.json           # interpreter smoke run (CPU)
    export MLCONTRAST_TRITON_CONFIGS="$(python -m benchmarks.tune_triton --emit-env results/tuning/*.json)"

For each phase (``fwd`` / ``bwd``: the deterministic forward and backward kernels; ``fwd-atomic`` /
``bwd-atomic``: the symmetric-tile ones, whose tiles are square) every candidate configuration (block
sizes, ``num_warps``, ``num_stages``) is installed in ``mlcontrast.ops.utils.CONFIG_OVERRIDES``, run once
and checked against the default configuration's result (relative error by norm within the dtype's
tolerance: a configuration that computes something else is rejected, not timed), then timed with
``triton.testing.do_bench`` (median). Configurations that do not compile or do not fit (shared memory,
registers) are recorded with their error. Throughput counts the model FLOPs of
``benchmarks.bench_label_supcon``: 2·N²·D for a forward, 6·N²·D for a backward (with the recomputation of
S), whatever the kernel executes (the symmetric ones do about half).

The table is printed and written to ``benchmarks/results/tuning/label_supcon_<dtype>_d<D>_n<N>_<device>.json``
(beside, not among, the op benchmarks' files); the best configuration of each phase is printed as the
``CONFIG_OVERRIDES`` entry that selects it for that dtype, to be made the default in ``mlcontrast/ops/label_supcon.py``.
``--emit-env`` turns results files into the JSON of ``MLCONTRAST_TRITON_CONFIGS``, which every process
(a benchmark's cases included) reads into ``CONFIG_OVERRIDES`` at import.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import time
from pathlib import Path

from benchmarks.harness.constants import RESULTS_DIR
from benchmarks.harness.metadata import metadata
from benchmarks.harness.output import write_results

PHASES = ("fwd", "fwd-atomic", "bwd", "bwd-atomic")
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}


def candidates(d: int, quick: bool, phase: str = "fwd") -> list[dict[str, int]]:
    """Tile shapes x D chunk x warps x pipeline stages; duplicates (D chunks above D) removed. The atomic
    kernels' tiles are square (``BLOCK_M`` only)."""
    square = phase.endswith("-atomic")
    if quick:
        configs = [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16}, {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_D": 32}]
    else:
        chunks = sorted({min(c, max(16, 1 << (d - 1).bit_length())) for c in (64, 128, 256)})
        configs = [
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "num_warps": warps, "num_stages": stages}
            for (bm, bn), bd, warps, stages in itertools.product(
                [(64, 64), (128, 64), (64, 128), (128, 128)], chunks, (4, 8), (2, 3)
            )
        ]
    if square:
        configs = [{k: v for k, v in c.items() if k != "BLOCK_N"} for c in configs if c["BLOCK_M"] == c["BLOCK_N"]]
    return configs


def _inputs(n: int, d: int, dtype: str, device: str):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=getattr(torch, dtype))
    y = torch.randint(0, 80, (n,), generator=g).to(device)
    return z, y


def _phase_call(phase: str, z, y, saved):
    """A callable running the phase's kernel(s) once, and returning what they computed. ``saved``: the
    forward's (loss, lse, n_pos) that the backward phases start from (taken once, with the default
    forward configuration)."""
    import torch

    from mlcontrast.ops import label_supcon as ls

    atomic = phase.endswith("-atomic")
    if phase.startswith("fwd"):
        return lambda: ls.label_supcon(z, y, 0.1, 0.1, 0, None, atomic=atomic)[1]
    loss, lse, n_pos = saved
    upstream = torch.full_like(loss, 1.0 / max(1, z.shape[0]))
    return lambda: ls.label_supcon_backward(upstream, z, y, lse, n_pos, 0.1, 0.1, atomic=atomic)


def _time_ms(fn, device: str) -> float:
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _rel_error(actual, expected) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def budgeted(configs: list[dict], budget_s: float | None) -> list[dict]:
    """The candidates in the order they are tried: as listed, or, under a time budget that may cut the list
    short, in a fixed shuffled order, so that what runs samples every tile shape, warp count and stage count
    rather than the first tile shape only."""
    if budget_s is None:
        return configs
    shuffled = list(configs)
    random.Random(0).shuffle(shuffled)
    return shuffled


def tune(n: int, d: int, dtype: str, device: str, phases: list[str], quick: bool,
         budget_s: float | None = None) -> list[dict]:
    """Every candidate of every phase, checked then timed; with ``budget_s``, each phase gets an equal share
    of what is left of it, and candidates past their phase's share are recorded as ``skipped: budget``."""
    from mlcontrast.ops import label_supcon as ls
    from mlcontrast.ops.utils import CONFIG_OVERRIDES

    started = time.perf_counter()
    z, y = _inputs(n, d, dtype, device)
    saved = ls.label_supcon(z, y, 0.1, 0.1)
    flops = {phase: (2.0 if phase.startswith("fwd") else 6.0) * n * n * d for phase in PHASES}
    records = []
    for k, phase in enumerate(phases):
        phase_end = None
        if budget_s is not None:
            left = budget_s - (time.perf_counter() - started)
            phase_end = time.perf_counter() + left / (len(phases) - k)
        key = f"label_supcon.{phase}:{dtype}"  # wins over a plain key from the environment
        CONFIG_OVERRIDES.pop(key, None)
        expected = _phase_call(phase, z, y, saved)()
        for config in [None, *budgeted(candidates(d, quick, phase), budget_s)]:
            record = {"phase": phase, "config": config or "default", "status": "ok"}
            if config is not None and phase_end is not None and time.perf_counter() > phase_end:
                records.append({**record, "status": "skipped: budget"})
                continue
            if config is not None:
                CONFIG_OVERRIDES[key] = config
            try:
                fn = _phase_call(phase, z, y, saved)
                error = _rel_error(fn(), expected)
                record["rel_error"] = error
                if not error <= TOLERANCE[dtype]:
                    record["status"] = "wrong"
                else:
                    record["ms"] = _time_ms(fn, device)
                    record["tflops"] = flops[phase] / (record["ms"] * 1e-3) / 1e12
            except Exception as failure:  # does not compile, does not fit: recorded, the sweep goes on
                record["status"] = "error"
                record["message"] = f"{type(failure).__name__}: {str(failure)[:300]}"
            finally:
                CONFIG_OVERRIDES.pop(key, None)
            records.append(record)
            shown = record.get("ms")
            print(f"  {phase:>10} {json.dumps(record['config']):<90} {record['status']:>6} "
                  + (f"{shown:9.3f} ms {record['tflops']:7.1f} TFLOP/s" if shown is not None else ""), flush=True)
    return records


def best(records: list[dict]) -> dict[str, dict]:
    """The fastest correct configuration of each phase."""
    out = {}
    for r in records:
        if r["status"] == "ok" and (r["phase"] not in out or r["ms"] < out[r["phase"]]["ms"]):
            out[r["phase"]] = r
    return out


def configs_of(paths: list[Path]) -> dict[str, dict]:
    """The best configuration of every phase in tuning results files, as ``MLCONTRAST_TRITON_CONFIGS`` takes
    them (``{"label_supcon.<phase>:<dtype>": config}``: for the tuned dtype only, whose tiles may not fit
    another); a later file's phase replaces an earlier one's."""
    configs = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        for phase, config in result.get("best", {}).items():
            if isinstance(config, dict):  # "default" needs no override
                configs[f"label_supcon.{phase}:{result['shape']['dtype']}"] = config
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_triton", description=__doc__.split("\n\n")[0])
    parser.add_argument("--emit-env", nargs="+", type=Path, metavar="RESULTS",
                        help="print the best configurations of these tuning results as MLCONTRAST_TRITON_CONFIGS "
                             "JSON, and exit")
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCE))
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (interpreter)")
    parser.add_argument("--quick", action="store_true", help="N = 40, D = 24, fp32, two configurations")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time for the whole tuning, shared equally by the phases; candidates are then tried "
                             "in a fixed shuffled order and those past their phase's share are skipped")
    args = parser.parse_args(argv)
    if args.emit_env:
        print(json.dumps(configs_of(args.emit_env)))
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the op modules are imported
    if args.quick:
        args.n, args.d, args.dtype = 40, 24, "float32"
    name = f"label_supcon_{args.dtype}_d{args.d}_n{args.n}_{device.split(':')[0]}.json"
    path = args.out or RESULTS_DIR / "tuning" / name
    print(f"[tune] label_supcon N={args.n} D={args.d} {args.dtype} on {device}", flush=True)
    records = tune(args.n, args.d, args.dtype, device, args.phases, args.quick, args.budget_s)
    meta = metadata(device)
    winners = best(records)
    write_results(path, meta, records, {"shape": {"n": args.n, "d": args.d, "dtype": args.dtype},
                                        "budget_s": args.budget_s,
                                        "best": {phase: r["config"] for phase, r in winners.items()}})
    for phase, r in winners.items():
        default = next(x for x in records if x["phase"] == phase and x["config"] == "default")
        speedup = default["ms"] / r["ms"] if default.get("ms") else float("nan")
        print(f"[tune] {phase}: {r['ms']:.3f} ms, {r['tflops']:.1f} TFLOP/s, {speedup:.2f}x the default; "
              f'CONFIG_OVERRIDES["label_supcon.{phase}:{args.dtype}"] = {r["config"]}')
    print(f"[tune] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
