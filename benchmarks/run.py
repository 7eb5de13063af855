"""Runs the benchmarks: every ``benchmarks/bench_<op>.py``, or those named with ``--ops``.

    python -m benchmarks.run                       # all ops, CPU, default sweeps
    python -m benchmarks.run --device cuda
    python -m benchmarks.run --quick               # smoke run of every op
    python -m benchmarks.run --ops label_supcon -- --n 4096 16384 --providers cpu torch
    python -m benchmarks.run --quick --out-dir /tmp/bench   # results elsewhere (tests)
    python -m benchmarks.run --device cuda --dims 128 256 512 1024 --dtypes float32 bfloat16   # D x dtype sweep

Options after ``--`` (and any option this runner does not know) go to every bench script. Each script
exposes ``main(argv) -> list[Path]`` and writes ``benchmarks/results/<name>_<device>.json`` and ``.png``
(``<name>`` = ``<op>[_d<D>][_fp16|_bf16][_quick]``; ``--out-dir`` puts them elsewhere). ``--dims`` and
``--dtypes`` sweep every op over feature dimensions and input dtypes, one results file per combination.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    """The op names of the ``bench_<op>.py`` files next to this one."""
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    ops = discover()
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="a short smoke run of every op")
    p.add_argument("--ops", nargs="+", default=None, choices=ops, metavar="OP", help=f"ops to run (of {ops})")
    p.add_argument("--max-memory-gib", type=float, default=None, help="memory cap of each case (see bench scripts)")
    p.add_argument("--out-dir", default=None, help="directory of the results files (default benchmarks/results)")
    p.add_argument("--dims", type=int, nargs="+", default=[None], metavar="D",
                   help="feature dimensions to sweep (default: each op's own)")
    p.add_argument("--dtypes", nargs="+", default=[None], choices=("float32", "float16", "bfloat16"),
                   metavar="DTYPE", help="input dtypes to sweep (default: float32)")
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]

    forwarded = ["--device", args.device, *(["--quick"] if args.quick else [])]
    if args.max_memory_gib is not None:
        forwarded += ["--max-memory-gib", str(args.max_memory_gib)]
    if args.out_dir is not None:
        forwarded += ["--out-dir", args.out_dir]
    forwarded += rest

    written: dict[str, list[Path]] = {}
    failed: list[str] = []
    started = time.perf_counter()
    sweep = [(d, dtype) for dtype in args.dtypes for d in args.dims]
    for op in args.ops or ops:
        for d, dtype in sweep:
            extra = (["--d", str(d)] if d is not None else []) + (["--dtype", dtype] if dtype is not None else [])
            label = " ".join([op, *extra[1::2]])
            print(f"\n===== {label} ({args.device}) =====", flush=True)
            try:
                module = importlib.import_module(f"benchmarks.bench_{op}")
                written.setdefault(op, []).extend(module.main(forwarded + extra) or [])
            except SystemExit as exit_:  # argparse errors of a bench script
                if exit_.code not in (0, None):
                    failed.append(label)
            except Exception:
                traceback.print_exc()
                failed.append(label)

    print(f"\n===== done in {time.perf_counter() - started:.0f} s =====")
    for op, paths in written.items():
        for path in paths:
            print(f"{op}: {path}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
