""":class:`BenchSpec`: what one op's benchmark says about itself (how to build a case, its sizes, parameters and
model FLOPs), and the command line every ``bench_<op>.py`` shares.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from benchmarks.harness.case import CaseSetup
from benchmarks.harness.devices import DTYPES, torch_dtype
from benchmarks.harness.timing import RepeatPolicy


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


@dataclass
class BenchSpec:
    """One op's benchmark: everything :func:`bench_main` needs besides the shared machinery.

    ``setup(case, mlcontrast) -> CaseSetup`` runs in the child and builds one case's inputs and phases.
    ``case_fields(args)``: op parameters copied into every case, record and the config (``d``,
    ``num_classes``, ...). ``size_fields(args, n)``: the fields of a requested size (``{"n": n}`` by default;
    an op may round it, e.g. ``n = B·C``). ``flops(record)``: model FLOPs per mode (``throughput``);
    ``feature_bytes(record)``: bytes of one read of the features (``bandwidth``).
    ``nn_bytes_lower_bound``: per provider, bytes per N² element a dense reference needs at least; a case
    above the memory cap is skipped without running (CPU). ``variants``: providers of
    :data:`BACKEND_VARIANTS` run by default beside their backend.
    """

    op: str
    module: str
    description: str
    default_sizes: tuple[int, ...]
    quick_sizes: tuple[int, ...]
    setup: Callable[[dict[str, Any], Any], CaseSetup]
    case_fields: Callable[[argparse.Namespace], dict[str, Any]]
    params: Callable[[argparse.Namespace], str]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    config_fields: Callable[[argparse.Namespace], dict[str, Any]] | None = None
    size_fields: Callable[[argparse.Namespace, int], dict[str, Any]] | None = None
    modes: tuple[str, ...] = ("fwd", "bwd", "full")
    size_help: str = "rows N"
    size_label: str = "N"
    nn_bytes_lower_bound: dict[str, float] = field(default_factory=dict)
    flops: Callable[[dict[str, Any]], dict[str, float]] | None = None
    flop_convention: dict[str, str] | None = None
    feature_bytes: Callable[[dict[str, Any]], int] | None = None
    max_n_start: int = 65536
    variants: tuple[str, ...] = ()


def row_feature_bytes(record: dict[str, Any]) -> int:
    """Bytes of ``[N, D]`` features in the record's dtype (``BenchSpec.feature_bytes`` of row-wise ops)."""
    return record["n"] * record["d"] * torch_dtype(record["dtype"]).itemsize


def default_policy(args: argparse.Namespace) -> RepeatPolicy:
    if args.quick:
        return RepeatPolicy(repeats=args.repeats or 1, min_repeats=1, budget_s=0.0, warmup=1, min_warmup=1,
                            warmup_budget_s=0.0)
    return RepeatPolicy(repeats=args.repeats or 20, min_repeats=min(args.min_repeats, args.repeats or 20),
                        budget_s=args.case_budget_s, warmup=args.warmup, min_warmup=1, warmup_budget_s=2.0)


def parse_bench_args(spec: BenchSpec, argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {spec.module}", description=spec.description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:K)")
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help=f"{spec.size_help} (default {list(spec.default_sizes)}; --quick: {list(spec.quick_sizes)})")
    spec.add_arguments(p)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--providers", nargs="+", default=None,
                   help="torch, torch_compile and fused backend names (default: all available)")
    p.add_argument("--repeats", type=int, default=None,
                   help="most timed iterations per case (default 20; 1 with --quick)")
    p.add_argument("--min-repeats", type=int, default=3, help="fewest timed iterations per case")
    p.add_argument("--case-budget-s", type=float, default=15.0,
                   help="stop timing a case after this many seconds once --min-repeats are done")
    p.add_argument("--warmup", type=int, default=3, help="most warm-up iterations (stops after 2 s once one ran)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: sizes {list(spec.quick_sizes)}, one repeat, every case in one process")
    p.add_argument("--out", default=None, help="JSON path (the PNG goes next to it)")
    p.add_argument("--out-dir", default=None,
                   help="directory of the results files, named <op>[_quick]_<device>.json (default benchmarks/results)")
    p.add_argument("--max-memory-gib", type=float, default=16.0,
                   help="address-space cap of each case above its start (RLIMIT_AS, CPU); 0 = none")
    p.add_argument("--case-timeout-s", type=float, default=900.0, help="kill a case after this long")
    p.add_argument("--sweep-budget-s", type=float, default=None,
                   help="start no case (nor probe attempt) after this many seconds of the run; those left are "
                        "recorded as 'skipped: budget' and the results are written as usual (GPU sessions)")
    p.add_argument("--same-process", action="store_true",
                   help="every case in one child process, as --quick does, with the normal timing policy")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each case (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("device rates and throughput")
    g.add_argument("--device-rates", choices=("auto", "on", "off"), default="auto",
                   help="measure the dense matmul rate / copy bandwidth once per run (auto: on CUDA only)")
    g.add_argument("--matmul-size", type=int, default=None, help="square torch.mm size (default 8192 CUDA, 1024 CPU)")
    g.add_argument("--copy-mib", type=int, default=None, help="copy bandwidth tensor size (default 1024 CUDA, 128 CPU)")
    g.add_argument("--allow-tf32", action="store_true",
                   help="set torch.backends.cuda.matmul.allow_tf32 = True in every case and the matmul rate (CUDA)")
    g = p.add_argument_group("largest N that fits")
    g.add_argument("--max-n-probe", action="store_true",
                   help="after the sweep, double N from --max-n-start per provider, each in its own process, until a "
                        "case does not run (oom, timeout, ...); report the largest N that ran")
    g.add_argument("--max-n-start", type=int, default=spec.max_n_start)
    g.add_argument("--max-n-limit", type=int, default=2**26, help="stop doubling past this N")
    g.add_argument("--max-n-timeout-s", type=float, default=600.0, help="time limit of one probe case")
    g.add_argument("--max-n-providers", nargs="+", default=None, metavar="PROVIDER",
                   help="probe these providers only (default: the run's providers), e.g. the fused ones")
    p.add_argument("--case-json", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _spec_default(spec: BenchSpec, dest: str) -> Any:
    parser = argparse.ArgumentParser(add_help=False)
    spec.add_arguments(parser)
    return parser.get_default(dest)


def results_name(spec: BenchSpec, args: argparse.Namespace) -> str:
    """``<op>[_d<D>][_fp16|_bf16][_quick]``: D only where it is not the op's default."""
    name = spec.op
    d = getattr(args, "d", None)
    if d is not None and d != _spec_default(spec, "d"):
        name += f"_d{d}"
    if args.dtype != "float32":
        name += "_" + {"float16": "fp16", "bfloat16": "bf16"}[args.dtype]
    if args.quick:
        name += "_quick"
    return name
