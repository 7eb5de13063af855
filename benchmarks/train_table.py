"""The training table: every method on an embedded dataset at several known-label ratios.

    python -m benchmarks.train_table                           # bce, msupcon, sadcl, hst, trmml x ratios 0.1, 0.5, 1.0
    python -m benchmarks.train_table --dataset mnist_mosaic    # the same on the harder MNIST mosaics
    python -m benchmarks.train_table --methods hst --ratios 0.5 --jobs 1
    python -m benchmarks.train_table --write-readme            # README's training table from the results file
    python -m benchmarks.train_table --quick --out /tmp/t.json # a smoke run (tests)

Each run is ``mlcontrast-train --dataset D --method M --known-ratio R --no-progress`` (all other options at their
defaults, so the table shows what a user gets) in its own process, ``--jobs`` at a time (each single-threaded,
the embedded datasets' default). Its last epoch's metrics and its wall time (process start to exit, including
dataset construction and evaluation) go to ``benchmarks/results/train/<D>.json``; records of earlier runs with
other (method, ratio) pairs are kept, so the table can be filled in several sittings. README's section between
the dataset's markers (``train`` for digits, ``train-<D>`` for the others) is generated from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness.metadata import metadata
from benchmarks.report import README, write_readme
from mlcontrast.train.data import EMBEDDED

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "train" / "digits.json"
START, END = "<!-- train:start -->", "<!-- train:end -->"


def results_path(dataset: str) -> Path:
    """The committed results file of ``dataset``'s table."""
    return RESULTS.with_name(f"{dataset}.json")


def markers(dataset: str) -> tuple[str, str]:
    """README's markers around ``dataset``'s table (digits keeps the first table's ``train`` markers)."""
    if dataset == "digits":
        return START, END
    return f"<!-- train-{dataset}:start -->", f"<!-- train-{dataset}:end -->"

METHOD_ORDER = ("bce", "msupcon", "sadcl", "hst", "trmml")
QUICK = ["--epochs", "1", "--limit-train", "64", "--limit-test", "32", "--batch-size", "16", "--hidden-dim", "32",
         "--proj-dim", "16", "--backbone", "test_resnet", "--feature-index", "2"]
KEYS = ("mAP", "CF1", "OF1", "pseudo_precision", "pseudo_recall", "pseudo_positives")


def run_one(method: str, ratio: float, workdir: Path, extra: list[str], dataset: str = "digits") -> dict:
    """One training process; its final metrics, wall time and exit status."""
    out = workdir / f"{method}-{ratio:g}"
    on = [] if dataset == "digits" else ["--dataset", dataset]  # digits: the default, as a user runs it
    cmd = [sys.executable, "-m", "mlcontrast.train", *on, "--method", method, "--known-ratio", f"{ratio:g}",
           "--no-progress", "--output", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    rec = {"method": method, "known_ratio": ratio, "wall_s": round(wall, 1), "returncode": proc.returncode,
           "command": " ".join(["mlcontrast-train", *cmd[3:]])}
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    if proc.returncode != 0 or not lines:
        rec["status"] = "failed"
        rec["error"] = proc.stderr[-2000:]
        return rec
    last = json.loads(lines[-1])
    rec["status"] = "ok"
    rec["epochs"] = last["epoch"]
    rec["train_s"] = round(sum(json.loads(s)["time_s"] for s in lines), 1)
    rec.update({k: last[k] for k in KEYS if k in last})
    return rec


def _key(rec: dict) -> tuple:
    order = METHOD_ORDER.index(rec["method"]) if rec["method"] in METHOD_ORDER else len(METHOD_ORDER)
    return order, rec["method"], rec["known_ratio"]


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``new`` replaces the records of ``old`` with the same (method, ratio)."""
    fresh = {(r["method"], r["known_ratio"]) for r in new}
    return sorted([r for r in old if (r["method"], r["known_ratio"]) not in fresh] + new, key=_key)


def _cell(value, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def table(result: dict) -> str:
    heads = ["method", "known labels", "mAP", "CF1", "OF1", "pseudo-label precision", "pseudo-label recall",
             "wall time"]
    lines = ["| " + " | ".join(heads) + " |", "| --- | ---: |" + " ---: |" * (len(heads) - 2)]
    for r in sorted(result["records"], key=_key):
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['known_ratio']:.0%} | failed |" + " |" * (len(heads) - 3))
            continue
        lines.append("| " + " | ".join([
            r["method"], f"{r['known_ratio']:.0%}", _cell(r.get("mAP")), _cell(r.get("CF1")), _cell(r.get("OF1")),
            _cell(r.get("pseudo_precision"), "{:.1f}"), _cell(r.get("pseudo_recall"), "{:.1f}"),
            f"{r['wall_s'] / 60:.1f} min",
        ]) + " |")
    return "\n".join(lines)


def section(result: dict, path: Path) -> str:
    meta = result["metadata"]
    try:
        where = path.resolve().relative_to(ROOT)
    except ValueError:
        where = path
    jobs = result.get("jobs", 1)
    together = "one run at a time" if jobs == 1 else f"{jobs} runs at a time, one thread each"
    dataset = result.get("dataset", "digits")
    on = "" if dataset == "digits" else f"--dataset {dataset} "
    rerun = "" if dataset == "digits" else f" --dataset {dataset}"
    return (
        f"Measured {meta['date'][:10]} on {meta['cpu_model']} ({meta['cpu_count']} cores, {together}), torch "
        f"{meta['torch']}: `mlcontrast-train {on}--method M --known-ratio R` with every other option at its default "
        f"(15 epochs, batch 64); final-epoch test metrics; pseudo-label precision and recall over the training "
        f"labels that were hidden, in the last epoch (– where the method makes none, or nothing is hidden); "
        f"wall time of the whole process. Raw data: [`{where}`]({where}); rerun with "
        f"`python -m benchmarks.train_table{rerun}`.\n\n" + table(result)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=EMBEDDED, default="digits", help="the embedded dataset to train on")
    p.add_argument("--methods", nargs="+", default=list(METHOD_ORDER), help="methods to train")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.5, 1.0], help="known-label ratios")
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time (one thread each)")
    p.add_argument("--quick", action="store_true", help="tiny runs (1 epoch, 64 images, test_resnet): a smoke test")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (records are merged into it; default benchmarks/results/train/<dataset>.json)")
    p.add_argument("--write-readme", action="store_true", help="only rewrite README's table from the results file")
    p.add_argument("extra", nargs="*", help="after --: more mlcontrast-train options for every run")
    args = p.parse_args(argv)
    committed = results_path(args.dataset)
    if args.out is None:
        args.out = committed
    if args.write_readme:
        if args.out.resolve() != committed.resolve():
            p.error("--write-readme takes the committed results file only")
        write_readme(section(json.loads(committed.read_text()), committed), *markers(args.dataset))
        print(f"updated {README}")
        return 0
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    extra = (QUICK if args.quick else []) + args.extra
    pairs = [(m, r) for m in args.methods for r in args.ratios]
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {"dataset": args.dataset, "records": []}
    if previous.get("dataset", "digits") != args.dataset:
        p.error(f"{args.out} holds {previous.get('dataset', 'digits')} results, not {args.dataset}")
    old = previous["records"]
    with tempfile.TemporaryDirectory(prefix="train_table_") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, m, r, Path(tmp), extra, args.dataset) for m, r in pairs]
        records = []
        for (m, r), future in zip(pairs, futures):
            rec = future.result()
            records.append(rec)
            status = (f"mAP {rec['mAP']:.2f} CF1 {rec['CF1']:.2f} OF1 {rec['OF1']:.2f}" if rec["status"] == "ok"
                      else f"FAILED ({rec['returncode']}): {rec['error'][-300:]}")
            print(f"{m:6s} known {r:4.0%}: {status} ({rec['wall_s'] / 60:.1f} min)", flush=True)
            result = {"metadata": metadata("cpu"), "dataset": args.dataset, "jobs": args.jobs, "quick": args.quick,
                      "records": merge(old, records)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
