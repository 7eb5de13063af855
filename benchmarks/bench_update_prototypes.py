"""Benchmark of ``update_prototypes_``: the in-place EMA of C prototypes from N labelled rows.

Providers:

* ``torch``: ``mlcontrast.reference.update_prototypes_``, eager (a Python loop over the present classes);
* ``torch_compile``: ``torch.compile(mlcontrast.reference.update_prototypes_, dynamic=False)``, compile time
  excluded (reported as ``warmup.first_s``); the loop over ``torch.unique(...).tolist()`` and the boolean
  indexing break the graph, so this is mostly eager;
* every fused backend of ``mlcontrast.available_backends(device)`` except ``torch``, called through
  ``mlcontrast.update_prototypes_(..., backend=name)``.

Inputs: prototypes ``[C, D]`` and features ``[N, D]`` = L2-normalised ``randn`` rows, labels ``randint(0, C)``
(2-D features with class ids: the EMA only, no gradient), momentum 0.99, ``normalize=True``; C = 80, D = 256
by default. One timed call (mode ``full``) = one in-place update; the prototypes are restored (untimed)
before every call, so every call does the same work and the result is compared across providers. The op is
memory-bound: ``bandwidth`` relates the time to one read of the features.

    python -m benchmarks.bench_update_prototypes --device cpu
    python -m benchmarks.bench_update_prototypes --quick
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.harness.case import CaseSetup, provider_function
from benchmarks.harness.devices import torch_dtype
from benchmarks.harness.spec import BenchSpec, row_feature_bytes
from benchmarks.harness.sweep import bench_main

OP = "update_prototypes"
MODULE = "benchmarks.bench_update_prototypes"
DEFAULT_N = (16384, 65536, 262144)
QUICK_N = (1024, 4096)
NUM_CLASSES = 80


def make_inputs(n: int, c: int, d: int, dtype: str, device: str, seed: int = 0):
    """prototypes [C, D], features [N, D] (unit rows, no grad), labels [N] in [0, C)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = torch_dtype(dtype)
    prototypes = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    features = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    labels = torch.randint(0, c, (n,), generator=g)
    return prototypes.to(device=device, dtype=dt), features.to(device=device, dtype=dt), labels.to(device)


def setup(case: dict[str, Any], mlcontrast) -> CaseSetup:
    prototypes, features, labels = make_inputs(case["n"], case["num_classes"], case["d"], case["dtype"],
                                               case["device"], case["seed"])
    initial = prototypes.clone()
    update = provider_function(
        case["provider"], mlcontrast, "update_prototypes_", momentum=case["momentum"], normalize=True
    )

    def reset() -> None:
        prototypes.copy_(initial)

    def call(_: Any) -> None:
        update(prototypes, features, labels)

    return CaseSetup(phases=[("full", call)], reset=reset, outputs=lambda: {"prototypes": prototypes})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=int, default=256, help="feature dimension D")
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES, help="prototypes C")
    p.add_argument("--momentum", type=float, default=0.99)


SPEC = BenchSpec(
    op=OP,
    module=MODULE,
    description=__doc__.split("\n\n")[0],
    default_sizes=DEFAULT_N,
    quick_sizes=QUICK_N,
    setup=setup,
    add_arguments=add_arguments,
    case_fields=lambda a: {"d": a.d, "num_classes": a.num_classes, "momentum": a.momentum},
    config_fields=lambda a: {"d": a.d, "num_classes": a.num_classes, "momentum": a.momentum, "normalize": True},
    params=lambda a: f"C={a.num_classes}, D={a.d}, momentum {a.momentum:g}",
    modes=("full",),
    feature_bytes=row_feature_bytes,
)


def main(argv: list[str] | None = None) -> list[Path]:
    return bench_main(SPEC, argv)


if __name__ == "__main__":
    main()
