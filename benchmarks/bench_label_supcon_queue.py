"""Benchmark of ``label_supcon_loss`` against a memory queue: a batch of B anchors with M detached reference
rows (``ref_features`` / ``ref_labels``, a MoCo-style queue), the fused backends against the dense reference,
eager and compiled. The size swept is the queue length M.

Providers:

* ``torch``: ``mlcontrast.reference.label_supcon_loss(..., ref_features=queue, ref_labels=...)``, eager (it
  materialises B x (B + M) matrices);
* ``torch_compile``: the same under ``torch.compile(dynamic=False)``, compile time excluded;
* every fused backend (``cpu`` on CPU; ``triton`` and ``cuda`` on CUDA) through
  ``mlcontrast.label_supcon_loss(..., backend=name)``;
* ``<backend>_tensor_tau`` beside each: the same call with the temperature a 0-dim tensor that requires
  grad (``log_t.exp()``), to measure what a learnable temperature costs (its gradient is checked too).

Inputs: anchors ``[B, D]`` (B = 512, ``--batch``) L2-normalised ``randn`` rows with ``requires_grad``; the
queue ``[M, D]`` L2-normalised rows without grad; labels ``randint(0, 80)`` for both; temperature 0.1,
``normalize=True``, reduction ``"mean"``. Each timed iteration is one forward (with grad enabled) and one
backward. Model FLOPs: the B x (B + M) similarity products, 2·B·(B+M)·D forward, 4·B·(B+M)·D backward (S
recomputed, dZ of the anchors; the queue gets no gradient), 6·B·(B+M)·D in all. The ``cpu`` backend runs the
``label_supcon_queue`` op, which does 4·B·M·D for the queue part (the forward keeps the softmax-weighted queue
mean; the backward does not revisit the queue): the TFLOP/s column still counts the convention's 6.

    python -m benchmarks.bench_label_supcon_queue --device cpu        # B = 512, M = 4096 ... 65536
    python -m benchmarks.bench_label_supcon_queue --quick             # B = 64, M in {256, 1024}
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.harness.case import BACKEND_VARIANTS, CaseSetup, loss_case
from benchmarks.harness.devices import torch_dtype
from benchmarks.harness.spec import BenchSpec
from benchmarks.harness.sweep import bench_main

OP = "label_supcon_queue"
MODULE = "benchmarks.bench_label_supcon_queue"
DEFAULT_M = (4096, 16384, 65536)
QUICK_M = (256, 1024)
NUM_CLASSES = 80

# The learnable-temperature providers: a fused backend called with a tensor temperature (setup reads the name).
TENSOR_TAU = tuple(f"{b}_tensor_tau" for b in ("cpu", "triton", "cuda"))
for _provider in TENSOR_TAU:
    BACKEND_VARIANTS.setdefault(_provider, (_provider.removesuffix("_tensor_tau"), {}))

FLOP_CONVENTION = {
    "fwd": "2*B*(B+M)*D", "bwd": "4*B*(B+M)*D", "full": "6*B*(B+M)*D",
    "note": "model FLOPs of the B x (B + M) similarity products (fwd: S; bwd: S recomputed, dZ of the anchors; "
            "the detached queue gets no gradient); N in the tables is the queue length M",
}


def make_inputs(b: int, m: int, d: int, dtype: str, device: str, seed: int = 0):
    """Anchors (with grad), the detached queue and both label vectors, the same for every provider."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    anchors = F.normalize(torch.randn(b, d, generator=g), dim=1)
    queue = F.normalize(torch.randn(m, d, generator=g), dim=1)
    labels = torch.randint(0, NUM_CLASSES, (b,), generator=g)
    queue_labels = torch.randint(0, NUM_CLASSES, (m,), generator=g)
    as_input = {"device": device, "dtype": torch_dtype(dtype)}
    return (anchors.to(**as_input).requires_grad_(), queue.to(**as_input), labels.to(device),
            queue_labels.to(device))  # fmt: skip


def setup(case: dict[str, Any], mlcontrast) -> CaseSetup:
    """One case (in the child): inputs and the fwd / bwd phases."""
    import torch

    anchors, queue, labels, queue_labels = make_inputs(case["batch"], case["n"], case["d"], case["dtype"],
                                                       case["device"], case["seed"])  # fmt: skip
    provider = case["provider"]
    kwargs = dict(ref_features=queue, ref_labels=queue_labels, normalize=True)
    leaves = {"grad": anchors}
    if provider == "torch":
        fn = mlcontrast.reference.label_supcon_loss
    elif provider == "torch_compile":
        fn = torch.compile(mlcontrast.reference.label_supcon_loss, dynamic=False)
    else:
        backend = BACKEND_VARIANTS.get(provider, (provider, {}))[0]

        def fn(*args, **kw):
            return mlcontrast.label_supcon_loss(*args, backend=backend, **kw)

    if provider in TENSOR_TAU:
        log_t = torch.tensor(case["temperature"], device=case["device"]).log().requires_grad_()
        leaves["log_t_grad"] = log_t
        return loss_case(lambda: fn(anchors, labels, log_t.exp(), **kwargs), leaves)
    return loss_case(lambda: fn(anchors, labels, case["temperature"], **kwargs), leaves)


def flops(record: dict[str, Any]) -> dict[str, float]:
    pairs = float(record["batch"]) * (record["batch"] + record["n"]) * record["d"]
    return {"fwd": 2 * pairs, "bwd": 4 * pairs, "full": 6 * pairs}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=None, help="anchors B (default 512; --quick: 64)")
    p.add_argument("--d", type=int, default=128, help="feature dimension D")
    p.add_argument("--temperature", type=float, default=0.1)


def _fields(a: argparse.Namespace) -> dict[str, Any]:
    batch = a.batch or (64 if a.quick else 512)
    return {"batch": batch, "d": a.d, "num_classes": NUM_CLASSES, "temperature": a.temperature}


SPEC = BenchSpec(
    op=OP,
    module=MODULE,
    description=__doc__.split("\n\n")[0],
    default_sizes=DEFAULT_M,
    quick_sizes=QUICK_M,
    setup=setup,
    add_arguments=add_arguments,
    case_fields=_fields,
    config_fields=lambda a: {**_fields(a), "normalize": True, "reduction": "mean", "queue_grad": False},
    params=lambda a: f"B={_fields(a)['batch']} anchors against a queue of M rows, D={a.d}, temperature "
    f"{a.temperature:g}, normalize",
    size_help="queue rows M",
    size_label="M",
    flops=flops,
    flop_convention=FLOP_CONVENTION,
    variants=TENSOR_TAU,
)


def main(argv=None):
    return bench_main(SPEC, argv)


if __name__ == "__main__":
    main()
