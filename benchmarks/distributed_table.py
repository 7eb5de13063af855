"""The cost of ``process_group=``: label_supcon over several processes, each rank's anchors against all rows.

    python -m benchmarks.distributed_table                        # world 2, N in {4096, 16384}, D = 128, CPU
    python -m benchmarks.distributed_table --world 2 --n 8192 --repeats 3
    python -m benchmarks.distributed_table --write-readme         # README's table from the results file
    python -m benchmarks.distributed_table --quick --out /tmp/d.json

``world`` processes (gloo, one thread each) hold ``N / world`` rows each of L2-normalised ``[N, D]`` features
with labels ``randint(0, 80)``, and time one fwd+bwd step of ``label_supcon_loss(..., process_group=WORLD)``
(all of them in step: a step's time is the slowest rank's; the median over the repeats is reported):

* ``anchors``: this version: each rank computes its own rows' losses against all rows (O(N_rank N D));
* ``gathered set``: what version 0.1.0 did: each rank computes every row's loss of the gathered set and
  keeps its own (O(N^2 D)), the same gather, reduction and gradient path otherwise;
* ``one process``: one process with one thread over all N rows (no process group), for scale.

Both distributed variants must return the same loss (checked). Results go to
``benchmarks/results/distributed/cpu.json`` (beside, not among, the op benchmarks' files); README's section
between the ``distributed`` markers is generated from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks.harness.constants import RESULTS_DIR
from benchmarks.harness.metadata import metadata
from benchmarks.harness.output import write_results
from benchmarks.report import write_readme

START, END = "<!-- distributed:start -->", "<!-- distributed:end -->"
TEMPERATURE = 0.1
VARIANTS = ("anchors", "gathered set", "one process")


def _inputs(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=gen), dim=1), torch.randint(0, 80, (n,), generator=gen)


def _gathered_set_loss(z: torch.Tensor, y: torch.Tensor, backend: str) -> torch.Tensor:
    """Version 0.1.0's process_group path: every row's loss of the gathered set, then this rank's rows."""
    from mlcontrast import distributed, functional

    everything, sizes, start = distributed.gather_with_sizes(z, None)
    labels = distributed.all_gather_no_grad(y, sizes, None)
    rows = functional._label_supcon_rows(backend, everything, labels, TEMPERATURE, TEMPERATURE)
    count = (labels >= 0).sum().clamp(min=1).to(rows.dtype)
    local = rows[start : start + z.shape[0]]
    return functional._shard_result(local, count, "mean", None, dist.get_world_size())


def _step_times(step, warmup: int, repeats: int, distributed: bool) -> tuple[list[float], float]:
    loss = None
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        loss = step()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if distributed:  # the step is as slow as its slowest rank
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return times, float(loss)


def _rank_main(rank: int, world: int, init_file: str, cases: list[dict], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import mlcontrast

    results = []
    for case in cases:
        z_all, y_all = _inputs(case["n"], case["d"])
        rows = case["n"] // world
        z = z_all[rank * rows : (rank + 1) * rows].clone().requires_grad_()
        y = y_all[rank * rows : (rank + 1) * rows]

        def step(fn):
            def run():
                z.grad = None
                loss = fn()
                loss.backward()
                return loss.detach()

            return run

        backend, group = case["backend"], dist.group.WORLD
        new = step(lambda: mlcontrast.label_supcon_loss(z, y, TEMPERATURE, backend=backend, process_group=group))
        old = step(lambda: _gathered_set_loss(z, y, backend))
        for variant, fn in (("anchors", new), ("gathered set", old)):
            times, loss = _step_times(fn, case["warmup"], case["repeats"], distributed=True)
            results.append({**case, "variant": variant, "world": world, "times_s": times, "loss": loss})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _one_process(case: dict) -> dict:
    import mlcontrast

    torch.set_num_threads(1)
    z_all, y_all = _inputs(case["n"], case["d"])
    z = z_all.clone().requires_grad_()

    def run():
        z.grad = None
        loss = mlcontrast.label_supcon_loss(z, y_all, TEMPERATURE, backend=case["backend"])
        loss.backward()
        return loss.detach()

    times, loss = _step_times(run, case["warmup"], case["repeats"], distributed=False)
    return {**case, "variant": "one process", "world": 1, "times_s": times, "loss": loss}


def measure(world: int, sizes: list[int], d: int, backend: str, warmup: int, repeats: int) -> list[dict]:
    cases = [{"n": n, "d": d, "backend": backend, "warmup": warmup, "repeats": repeats} for n in sizes]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(_rank_main, args=(world, os.path.join(tmp, "init"), cases, out), nprocs=world, join=True)
        records = json.loads(Path(out).read_text())
    records += [_one_process(case) for case in cases]
    for r in records:
        r["median_s"] = statistics.median(r["times_s"])
    for n in sizes:
        new, old = (next(r for r in records if r["n"] == n and r["variant"] == v) for v in VARIANTS[:2])
        if abs(new["loss"] - old["loss"]) > 1e-4 * max(1.0, abs(old["loss"])):
            raise SystemExit(f"N={n}: the two distributed variants disagree: {new['loss']} vs {old['loss']}")
    return records


def table(records: list[dict], meta: dict) -> str:
    lines = [
        f"label_supcon fwd+bwd per step, backend `{records[0]['backend']}`, D = {records[0]['d']}, fp32; "
        f"{meta.get('cpu_model') or meta['device']}, one thread per process (median of {records[0]['repeats']}).",
        "",
        "| N (all ranks) | world | anchors (this version) | gathered set (0.1.0) | speed-up | one process |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in sorted({r["n"] for r in records}):
        by = {r["variant"]: r for r in records if r["n"] == n}
        new, old, one = by["anchors"], by["gathered set"], by["one process"]
        lines.append(
            f"| {n} | {new['world']} | {new['median_s'] * 1e3:.0f} ms | {old['median_s'] * 1e3:.0f} ms "
            f"| {old['median_s'] / new['median_s']:.2f}× | {one['median_s'] * 1e3:.0f} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.distributed_table", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--world", type=int, default=2, help="number of processes")
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384], help="rows over all ranks")
    parser.add_argument("--d", type=int, default=128, help="feature dimension")
    parser.add_argument("--backend", default="cpu", help="mlcontrast backend of the loss")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="N = 512, 2 repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/...)")
    parser.add_argument("--write-readme", action="store_true", help="README's section from the results file")
    args = parser.parse_args(argv)
    path = args.out or RESULTS_DIR / "distributed" / "cpu.json"
    if args.write_readme:
        payload = json.loads(path.read_text())
        write_readme(table(payload["records"], payload["metadata"]), START, END)
        print(f"README.md: distributed section from {path}")
        return 0
    sizes, repeats = ([512], 2) if args.quick else (args.n, args.repeats)
    if any(n % args.world for n in sizes):
        parser.error(f"every N must be a multiple of --world {args.world}")
    records = measure(args.world, sizes, args.d, args.backend, args.warmup, repeats)
    meta = metadata("cpu")
    write_results(path, meta, records)
    print(table(records, meta))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
