"""Benchmark of ``mlcontrast.pml.SupConLoss`` inside pytorch-metric-learning's ``CrossBatchMemory``: the drop-in
(fused kernels) against PML's own ``SupConLoss`` in the same wrapper, eager and compiled. The size swept is
the memory length M.

Providers:

* ``torch``: ``CrossBatchMemory(pytorch_metric_learning.losses.SupConLoss(0.1), D, M)``, PML's dense loss
  (B x M similarity, masks and log-probabilities);
* ``torch_compile``: that wrapper under ``torch.compile`` (PML's index building breaks the graph; dynamo
  compiles what it can), compile time excluded;
* every fused backend (``cpu`` on CPU; ``triton`` and ``cuda`` on CUDA):
  ``CrossBatchMemory(mlcontrast.pml.SupConLoss(0.1, backend=name), D, M)``.

Inputs: a batch of B = 256 (``--batch``) ``randn`` embeddings with ``requires_grad`` and labels
``randint(0, 100)``; the memory filled with other such rows before timing, and restored (untimed) before
every iteration so that every provider times the same step: the batch enqueued, then the loss of the batch
against the whole memory (minus each row's own slot), forward and backward. Both losses pay for PML's own
index tuples (all B x M pairs, built by ``CrossBatchMemory``). Model FLOPs: the B x M similarity products,
2·B·M·D forward, 4·B·M·D backward, 6·B·M·D in all.

    python -m benchmarks.bench_pml_supcon --device cpu        # B = 256, M in {4096, 16384}
    python -m benchmarks.bench_pml_supcon --quick             # B = 32, M in {256, 1024}
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.harness.case import CaseSetup, loss_case
from benchmarks.harness.spec import BenchSpec
from benchmarks.harness.sweep import bench_main

OP = "pml_supcon"
MODULE = "benchmarks.bench_pml_supcon"
DEFAULT_M = (4096, 16384)
QUICK_M = (256, 1024)
NUM_CLASSES = 100

FLOP_CONVENTION = {
    "fwd": "2*B*M*D", "bwd": "4*B*M*D", "full": "6*B*M*D",
    "note": "model FLOPs of the B x M similarity products (the memory gets no gradient); N in the tables is M",
}


def _memory_loss(provider: str, d: int, m: int):
    import torch
    from pytorch_metric_learning import losses

    from mlcontrast import pml

    if provider in ("torch", "torch_compile"):
        wrapper = losses.CrossBatchMemory(losses.SupConLoss(temperature=0.1), embedding_size=d, memory_size=m)
        return wrapper, (torch.compile(wrapper) if provider == "torch_compile" else wrapper)
    wrapper = losses.CrossBatchMemory(pml.SupConLoss(temperature=0.1, backend=provider), embedding_size=d,
                                      memory_size=m)  # fmt: skip
    return wrapper, wrapper


def setup(case: dict[str, Any], mlcontrast) -> CaseSetup:
    """One case (in the child): a filled memory, the batch, and the fwd / bwd phases of one step."""
    import torch

    b, m, d, device = case["batch"], case["n"], case["d"], case["device"]
    g = torch.Generator(device="cpu").manual_seed(case["seed"])
    wrapper, call = _memory_loss(case["provider"], d, m)
    wrapper.to(device)
    with torch.no_grad():  # fill the memory, a batch at a time as training would
        for _ in range(-(-m // b)):
            wrapper(torch.randn(b, d, generator=g).to(device), torch.randint(0, NUM_CLASSES, (b,), generator=g)
                    .to(device))  # fmt: skip
    memory, labels_memory, position = (wrapper.embedding_memory.clone(), wrapper.label_memory.clone(),
                                       wrapper.queue_idx)  # fmt: skip
    embeddings = torch.randn(b, d, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, NUM_CLASSES, (b,), generator=g).to(device)
    step = loss_case(lambda: call(embeddings, labels), {"grad": embeddings})
    clear_grads = step.reset

    def reset() -> None:  # the same memory before every iteration: every provider times the same step
        clear_grads()
        wrapper.embedding_memory.copy_(memory)
        wrapper.label_memory.copy_(labels_memory)
        wrapper.queue_idx, wrapper.has_been_filled = position, True

    step.reset = reset
    return step


def flops(record: dict[str, Any]) -> dict[str, float]:
    pairs = float(record["batch"]) * record["n"] * record["d"]
    return {"fwd": 2 * pairs, "bwd": 4 * pairs, "full": 6 * pairs}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=None, help="batch B (default 256; --quick: 32)")
    p.add_argument("--d", type=int, default=128, help="embedding size D")


def _fields(a: argparse.Namespace) -> dict[str, Any]:
    return {"batch": a.batch or (32 if a.quick else 256), "d": a.d, "num_classes": NUM_CLASSES}


SPEC = BenchSpec(
    op=OP,
    module=MODULE,
    description=__doc__.split("\n\n")[0],
    default_sizes=DEFAULT_M,
    quick_sizes=QUICK_M,
    setup=setup,
    add_arguments=add_arguments,
    case_fields=_fields,
    config_fields=lambda a: {**_fields(a), "temperature": 0.1, "wrapper": "CrossBatchMemory"},
    params=lambda a: f"CrossBatchMemory, B={_fields(a)['batch']}, D={a.d}, {NUM_CLASSES} classes, temperature 0.1",
    size_help="memory rows M",
    size_label="M",
    flops=flops,
    flop_convention=FLOP_CONVENTION,
)


def main(argv=None):
    return bench_main(SPEC, argv)


if __name__ == "__main__":
    main()
