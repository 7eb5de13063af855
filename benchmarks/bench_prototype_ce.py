"""Benchmark of ``prototype_ce_loss``: N rows against C prototypes, fused backends against the reference.

Providers:

* ``torch``: ``mlcontrast.reference.prototype_ce_loss``, eager (N x C logits, then ``F.cross_entropy``);
* ``torch_compile``: ``torch.compile(mlcontrast.reference.prototype_ce_loss, dynamic=False)``, compile time
  excluded (reported as ``warmup.first_s``);
* every fused backend of ``mlcontrast.available_backends(device)`` except ``torch``, called through
  ``mlcontrast.prototype_ce_loss(..., backend=name)``.

Inputs: features ``[N, D]`` and prototypes ``[C, D]`` = L2-normalised ``randn`` rows (both
``requires_grad``), labels ``randint(0, C)``, temperature 0.1; C = 80, D = 256 by default. Every iteration
is one forward and one backward, timed separately (``fwd``, ``bwd``, ``full``). With C = 80 the op is
memory-bound: ``bandwidth`` relates the time to one read of the features.

    python -m benchmarks.bench_prototype_ce --device cpu
    python -m benchmarks.bench_prototype_ce --quick
    python -m benchmarks.bench_prototype_ce --n 65536 --providers torch cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.harness.case import CaseSetup, loss_case, provider_function
from benchmarks.harness.devices import torch_dtype
from benchmarks.harness.spec import BenchSpec, row_feature_bytes
from benchmarks.harness.sweep import bench_main

OP = "prototype_ce"
MODULE = "benchmarks.bench_prototype_ce"
DEFAULT_N = (16384, 65536, 262144)
QUICK_N = (1024, 4096)
NUM_CLASSES = 80


def make_inputs(n: int, c: int, d: int, dtype: str, device: str, seed: int = 0):
    """features [N, D], labels [N] in [0, C), prototypes [C, D]; unit rows, features and prototypes requires_grad."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = torch_dtype(dtype)
    features = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    labels = torch.randint(0, c, (n,), generator=g)
    prototypes = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    features = features.to(device=device, dtype=dt).requires_grad_()
    prototypes = prototypes.to(device=device, dtype=dt).requires_grad_()
    return features, labels.to(device), prototypes


def setup(case: dict[str, Any], mlcontrast) -> CaseSetup:
    features, labels, prototypes = make_inputs(case["n"], case["num_classes"], case["d"], case["dtype"],
                                               case["device"], case["seed"])
    loss_fn = provider_function(
        case["provider"], mlcontrast, "prototype_ce_loss", temperature=case["temperature"]
    )
    return loss_case(lambda: loss_fn(features, labels, prototypes),
                           {"grad": features, "prototypes_grad": prototypes})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=int, default=256, help="feature dimension D")
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES, help="prototypes C")
    p.add_argument("--temperature", type=float, default=0.1)


SPEC = BenchSpec(
    op=OP,
    module=MODULE,
    description=__doc__.split("\n\n")[0],
    default_sizes=DEFAULT_N,
    quick_sizes=QUICK_N,
    setup=setup,
    add_arguments=add_arguments,
    case_fields=lambda a: {"d": a.d, "num_classes": a.num_classes, "temperature": a.temperature},
    params=lambda a: f"C={a.num_classes}, D={a.d}, temperature {a.temperature:g}",
    feature_bytes=row_feature_bytes,
)


def main(argv: list[str] | None = None) -> list[Path]:
    return bench_main(SPEC, argv)


if __name__ == "__main__":
    main()
