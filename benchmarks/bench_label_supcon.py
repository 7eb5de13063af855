"""Benchmark of ``label_supcon_loss``: the fused backends against the dense reference, eager and compiled.

Providers:

* ``torch``: ``mlcontrast.reference.label_supcon_loss``, eager (materialises N x N matrices);
* ``torch_compile``: ``torch.compile(mlcontrast.reference.label_supcon_loss, dynamic=False)``, compile
  time excluded (it happens during warm-up and is reported as ``warmup.first_s``);
* every fused backend of ``mlcontrast.available_backends(device)`` except ``torch`` (``cpu`` on CPU;
  ``cuda`` and ``triton`` on CUDA), called through ``mlcontrast.label_supcon_loss(..., backend=name)``;
* ``triton_atomic`` (on CUDA, beside ``triton``): the Triton backend with its symmetric-tile kernels
  (``MLCONTRAST_TRITON_ATOMIC=1``: half the flops, atomics, not bitwise reproducible).

Inputs: features ``[N, D]`` = L2-normalised ``randn`` rows (``requires_grad``), labels ``randint(0, 80)``
(COCO-like class ids), temperature 0.1, reduction ``"mean"``; the same seed gives every provider the
same inputs. Each (provider, N) case runs in its own process. Every timed iteration is one forward (with
grad enabled) followed by one backward, timed separately: ``fwd``, ``bwd`` and ``full`` = fwd + bwd.

Throughput counts model FLOPs, those of the N x N similarity products: 2·N²·D for the forward (S = Z Zᵀ),
6·N²·D for the backward (S recomputed, then dZ = dS Z + dSᵀ Z) and 8·N²·D for fwd+bwd, whatever a provider
actually executes (symmetry could halve them, the dense reference does more). On CUDA the run also
measures the dense matmul rate of the run's dtype (``metadata.matmul_peak``) and reports each case's
fraction of it.

    python -m benchmarks.bench_label_supcon --device cpu                 # default sweep
    python -m benchmarks.bench_label_supcon --quick                      # N in {256, 1024}, 1 repeat
    python -m benchmarks.bench_label_supcon --n 4096 16384 --providers cpu torch
    python -m benchmarks.bench_label_supcon --device cuda --dtype bfloat16 --max-n-probe
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.harness.case import CaseSetup, loss_case, provider_function
from benchmarks.harness.devices import torch_dtype
from benchmarks.harness.spec import BenchSpec
from benchmarks.harness.sweep import bench_main

OP = "label_supcon"
MODULE = "benchmarks.bench_label_supcon"
MODES = ("fwd", "bwd", "full")

DEFAULT_N = (1024, 4096, 16384, 65536)
QUICK_N = (256, 1024)
NUM_CLASSES = 80

# Lower bounds on the N x N-sized memory (bytes per matrix element) one fwd+bwd of the dense reference
# needs at its peak. A case is skipped as "too large" when this alone reaches the memory cap, so that
# only cases that obviously cannot fit are skipped. Measured on CPU (fp32): eager ~35 B/element, compiled
# ~5 B/element (inductor fuses the masks and recomputes); every dense formulation holds at least the fp32
# logits, 4 B/element.
NN_BYTES_LOWER_BOUND = {"torch": 16.0, "torch_compile": 4.0}

FLOP_CONVENTION = {
    "fwd": "2*N^2*D", "bwd": "6*N^2*D", "full": "8*N^2*D",
    "note": "model FLOPs of the N x N similarity products (fwd: S = Z Z^T; bwd: S recomputed, dZ = dS Z + dS^T Z), "
            "whatever a provider executes; tflops = flops / median time; fraction_of_matmul = tflops / "
            "metadata.matmul_peak.tflops (dense torch.mm of the run's dtype)",
}


def make_inputs(n: int, d: int, dtype: str, device: str, num_classes: int = NUM_CLASSES, seed: int = 0):
    """The same inputs for every provider: seeded on the CPU generator, then moved to ``device``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    features = F.normalize(torch.randn(n, d, generator=g), dim=1)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    features = features.to(device=device, dtype=torch_dtype(dtype)).requires_grad_()
    return features, labels.to(device)


def setup(case: dict[str, Any], mlcontrast) -> CaseSetup:
    """One case (in the child): inputs and the fwd / bwd phases."""
    features, labels = make_inputs(case["n"], case["d"], case["dtype"], case["device"], case["num_classes"],
                                   case["seed"])
    loss_fn = provider_function(
        case["provider"], mlcontrast, "label_supcon_loss", temperature=case["temperature"], reduction="mean"
    )
    return loss_case(lambda: loss_fn(features, labels), {"grad": features})


def flops(record: dict[str, Any]) -> dict[str, float]:
    nnd = float(record["n"]) ** 2 * record["d"]
    return {"fwd": 2 * nnd, "bwd": 6 * nnd, "full": 8 * nnd}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=int, default=128, help="feature dimension D")
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES)
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
    config_fields=lambda a: {"d": a.d, "num_classes": a.num_classes, "temperature": a.temperature,
                             "reduction": "mean"},
    params=lambda a: f"D={a.d}, {a.num_classes} classes, temperature {a.temperature:g}",
    modes=MODES,
    nn_bytes_lower_bound=NN_BYTES_LOWER_BOUND,
    flops=flops,
    flop_convention=FLOP_CONVENTION,
    variants=("triton_atomic",),
)


def main(argv: list[str] | None = None) -> list[Path]:
    return bench_main(SPEC, argv)


if __name__ == "__main__":
    main()
