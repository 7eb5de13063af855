"""Benchmark of ``prototype_nce_loss`` (SADCL's PSCL): the fused backends against the dense reference.

Providers:

* ``torch``: ``mlcontrast.reference.prototype_nce_loss``, eager;
* ``torch_compile``: ``torch.compile(mlcontrast.reference.prototype_nce_loss, dynamic=False)``, compile time
  excluded (reported as ``warmup.first_s``);
* every fused backend of ``mlcontrast.available_backends(device)`` except ``torch``, called through
  ``mlcontrast.prototype_nce_loss(..., backend=name)``.

Inputs: label-level features ``[B, C, D]`` = L2-normalised ``randn`` rows and prototypes ``[C, D]`` =
L2-normalised ``randn`` rows (both ``requires_grad``), targets ``[B, C]`` uniform in {-1, 0, 1}, temperature
0.07; C = 80 classes, D = 256 by default. The sweep is over the number of rows B·C: a requested size n gives
B = round(n / C), and the records' ``n`` is the actual B·C (8160, 65520, 262080 for the defaults 8192,
65536, 262144). Every iteration is one forward and one backward, timed separately (``fwd``, ``bwd``,
``full``). The op is memory-bound: ``bandwidth`` relates the time to one read of the features.

    python -m benchmarks.bench_prototype_nce --device cpu
    python -m benchmarks.bench_prototype_nce --quick
    python -m benchmarks.bench_prototype_nce --n 65536 --providers torch cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.harness.case import CaseSetup, loss_case, provider_function
from benchmarks.harness.devices import torch_dtype
from benchmarks.harness.spec import BenchSpec
from benchmarks.harness.sweep import bench_main

OP = "prototype_nce"
MODULE = "benchmarks.bench_prototype_nce"
DEFAULT_N = (8192, 65536, 262144)  # B·C
QUICK_N = (640, 2560)  # B = 8, 32 at C = 80
NUM_CLASSES = 80


def make_inputs(b: int, c: int, d: int, dtype: str, device: str, seed: int = 0):
    """features [B, C, D] and prototypes [C, D] (unit rows, requires_grad), targets [B, C] in {-1, 0, 1}."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = torch_dtype(dtype)
    features = F.normalize(torch.randn(b, c, d, generator=g), dim=-1)
    prototypes = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    targets = torch.randint(-1, 2, (b, c), generator=g)
    features = features.to(device=device, dtype=dt).requires_grad_()
    prototypes = prototypes.to(device=device, dtype=dt).requires_grad_()
    return features, prototypes, targets.to(device)


def setup(case: dict[str, Any], mlcontrast) -> CaseSetup:
    features, prototypes, targets = make_inputs(case["b"], case["num_classes"], case["d"], case["dtype"],
                                                case["device"], case["seed"])
    loss_fn = provider_function(
        case["provider"], mlcontrast, "prototype_nce_loss", temperature=case["temperature"]
    )
    return loss_case(lambda: loss_fn(features, prototypes, targets),
                           {"grad": features, "prototypes_grad": prototypes})


def size_fields(args: argparse.Namespace, n: int) -> dict[str, Any]:
    b = max(1, round(n / args.num_classes))
    return {"n": b * args.num_classes, "b": b}


def feature_bytes(record: dict[str, Any]) -> int:
    return record["b"] * record["num_classes"] * record["d"] * torch_dtype(record["dtype"]).itemsize


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=int, default=256, help="feature dimension D")
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES, help="classes C (B = round(n / C))")
    p.add_argument("--temperature", type=float, default=0.07)


SPEC = BenchSpec(
    op=OP,
    module=MODULE,
    description=__doc__.split("\n\n")[0],
    default_sizes=DEFAULT_N,
    quick_sizes=QUICK_N,
    setup=setup,
    add_arguments=add_arguments,
    case_fields=lambda a: {"d": a.d, "num_classes": a.num_classes, "temperature": a.temperature},
    size_fields=size_fields,
    params=lambda a: f"C={a.num_classes}, D={a.d}, temperature {a.temperature:g}",
    size_help="rows B·C (B = round(n / C))",
    size_label="B·C",
    feature_bytes=feature_bytes,
)


def main(argv: list[str] | None = None) -> list[Path]:
    return bench_main(SPEC, argv)


if __name__ == "__main__":
    main()
