"""Benchmark of ``multihot_supcon_loss``: the fused backends against the dense reference, eager and compiled.

Providers:

* ``torch``: ``mlcontrast.reference.multihot_supcon_loss``, eager (materialises N x N matrices: the logits,
  the overlap and union counts, the positive weights);
* ``torch_compile``: ``torch.compile(mlcontrast.reference.multihot_supcon_loss, dynamic=False)``, compile
  time excluded (it happens during warm-up and is reported as ``warmup.first_s``);
* every fused backend of ``mlcontrast.available_backends(device)`` except ``torch`` (``cpu`` on CPU;
  ``triton`` and ``cuda`` on CUDA, where the contract gives the op kernels), called through
  ``mlcontrast.multihot_supcon_loss(..., backend=name)``.

Inputs: features ``[N, D]`` = L2-normalised ``randn`` rows (``requires_grad``); targets ``[N, C]`` int64
multi-hot, each entry an independent Bernoulli draw whose class frequencies fall as a power law
(p_c ∝ (c + 1)^-1/2) scaled to 3 labels per row on average (COCO has 2.9 per image and a few frequent
classes; ~4.5% of the rows have no label, which the loss must skip); temperature 0.1, reduction ``"mean"``,
threshold 0.5. The same seed gives every provider the same inputs. Each (provider, N) case runs in its own
process; every timed iteration is one forward (with grad enabled) followed by one backward, timed separately:
``fwd``, ``bwd`` and ``full`` = fwd + bwd.

``--positives`` takes one or more of ``jaccard`` (the default), ``any``, ``all``, ``mulsupcon``: each mode is
a sweep of its own and goes to its own results file, ``multihot_supcon[_<mode>][...]_<device>.json`` (the
mode in the name unless it is the default ``jaccard``, as ``_d<D>`` marks a non-default D), so
``benchmarks.report`` renders one table per mode.

Throughput counts model FLOPs, those of the N x N products, the same in every mode: the similarities
(2·N²·D, as ``bench_label_supcon``) plus the pairwise label overlaps counted as a product of the multi-hot
targets (2·N²·C), once in the forward and recomputed in the backward: fwd 2·N²·(D + C), bwd 2·N²·(3·D + C)
(S and the overlaps recomputed, then dZ = dS Z + dSᵀ Z), fwd+bwd 4·N²·(2·D + C), whatever a provider executes
(``mulsupcon``'s forward needs class sums, O(N·C·D), instead of the overlaps; the count does not change).

    python -m benchmarks.bench_multihot_supcon --device cpu                       # default sweep, jaccard
    python -m benchmarks.bench_multihot_supcon --positives jaccard any all mulsupcon   # every mode
    python -m benchmarks.bench_multihot_supcon --quick                            # N in {256, 1024}, 1 repeat
    python -m benchmarks.bench_multihot_supcon --n 8192 --providers cpu torch_compile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from benchmarks.harness.case import CaseSetup, loss_case, provider_function, run_case
from benchmarks.harness.devices import torch_dtype
from benchmarks.harness.output import results_path
from benchmarks.harness.processes import child_main
from benchmarks.harness.spec import BenchSpec, parse_bench_args, results_name
from benchmarks.harness.sweep import run_sweep

OP = "multihot_supcon"
MODULE = "benchmarks.bench_multihot_supcon"
MODES = ("fwd", "bwd", "full")
POSITIVES = ("jaccard", "any", "all", "mulsupcon")
DEFAULT_POSITIVES = "jaccard"

# The sweep: N = 2048 ... 32768 for everything, 65536 where only the fused backends fit (the
# references are skipped there by NN_BYTES_LOWER_BOUND below).
DEFAULT_N = (2048, 4096, 8192, 16384, 32768, 65536)
QUICK_N = (256, 1024)
NUM_CLASSES = 80
LABELS_PER_ROW = 3.0

# Lower bounds on the N x N-sized memory (bytes per matrix element) one fwd+bwd of the dense reference
# needs at its peak; a case is skipped as "too large" when this alone reaches the memory cap (see
# bench_label_supcon). Measured on CPU (fp32, N = 4096): eager ~51 B/element with jaccard (the logits, the
# overlap, union, weight matrices and their masks, autograd's saved tensors), ~24 with mulsupcon; compiled
# ~9 in both. With the default 16 GiB cap the eager reference runs up to N = 16384 and the compiled one
# up to 32768; N = 65536 is for the fused backends.
NN_BYTES_LOWER_BOUND = {"torch": 20.0, "torch_compile": 8.0}

FLOP_CONVENTION = {
    "fwd": "2*N^2*(D+C)", "bwd": "2*N^2*(3*D+C)", "full": "4*N^2*(2*D+C)",
    "note": "model FLOPs of the N x N products, the same in every positives mode: similarities (fwd: S = Z Z^T; "
            "bwd: S recomputed, dZ = dS Z + dS^T Z) plus the label overlaps Y Y^T (C = classes; once in the "
            "forward, recomputed in the backward), whatever a provider executes; tflops = flops / median time; "
            "fraction_of_matmul = tflops / metadata.matmul_peak.tflops (dense torch.mm of the run's dtype)",
}


def class_frequencies(num_classes: int, labels_per_row: float = LABELS_PER_ROW):
    """Per-class probabilities of a label, p_c ∝ (c + 1)^-1/2, summing to ``labels_per_row`` (capped at 1)."""
    import torch

    p = (torch.arange(num_classes, dtype=torch.float64) + 1).rsqrt()
    return (p * (labels_per_row / p.sum())).clamp(max=1.0)


def make_inputs(n: int, d: int, dtype: str, device: str, num_classes: int = NUM_CLASSES, seed: int = 0):
    """The same inputs for every provider: seeded on the CPU generator, then moved to ``device``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    features = F.normalize(torch.randn(n, d, generator=g), dim=1)
    p = class_frequencies(num_classes).to(torch.float32)
    targets = (torch.rand(n, num_classes, generator=g) < p).long()
    features = features.to(device=device, dtype=torch_dtype(dtype)).requires_grad_()
    return features, targets.to(device)


def setup(case: dict[str, Any], mlcontrast) -> CaseSetup:
    """One case (in the child): inputs and the fwd / bwd phases."""
    features, targets = make_inputs(case["n"], case["d"], case["dtype"], case["device"], case["num_classes"],
                                    case["seed"])
    loss_fn = provider_function(
        case["provider"], mlcontrast, "multihot_supcon_loss", temperature=case["temperature"],
        positives=case["positives"], threshold=case["threshold"], reduction="mean",
    )
    return loss_case(lambda: loss_fn(features, targets), {"grad": features})


def flops(record: dict[str, Any]) -> dict[str, float]:
    nn = float(record["n"]) ** 2
    d, c = record["d"], record["num_classes"]
    return {"fwd": 2 * nn * (d + c), "bwd": 2 * nn * (3 * d + c), "full": 4 * nn * (2 * d + c)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=int, default=128, help="feature dimension D")
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES, help="classes C (about 3 labels per row)")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--threshold", type=float, default=0.5, help="Jaccard threshold (positives=jaccard)")
    p.add_argument("--positives", nargs="+", choices=POSITIVES, default=[DEFAULT_POSITIVES],
                   help="positive modes, each a sweep of its own into its own results file")


def _fields(a: argparse.Namespace) -> dict[str, Any]:
    # ``a.positives`` is one mode here: main() runs one sweep per mode with a namespace of its own.
    return {"d": a.d, "num_classes": a.num_classes, "temperature": a.temperature, "positives": a.positives,
            "threshold": a.threshold}


SPEC = BenchSpec(
    op=OP,
    module=MODULE,
    description=__doc__.split("\n\n")[0],
    default_sizes=DEFAULT_N,
    quick_sizes=QUICK_N,
    setup=setup,
    add_arguments=add_arguments,
    case_fields=_fields,
    config_fields=lambda a: {**_fields(a), "labels_per_row": LABELS_PER_ROW, "reduction": "mean"},
    params=lambda a: (f"positives={a.positives}" + (f" (threshold {a.threshold:g})" if a.positives == "jaccard"
                                                    else "")
                      + f", D={a.d}, {a.num_classes} classes, temperature {a.temperature:g}"),
    modes=MODES,
    nn_bytes_lower_bound=NN_BYTES_LOWER_BOUND,
    flops=flops,
    flop_convention=FLOP_CONVENTION,
)


def mode_results_path(args: argparse.Namespace, mode: str) -> Path:
    """Where one mode's sweep writes: the harness's name with ``_<mode>`` after the op (nothing for jaccard);
    with ``--out`` and several modes, the mode goes before the suffix of that path."""
    tag = "" if mode == DEFAULT_POSITIVES else f"_{mode}"
    if args.out:
        out = Path(args.out)
        return out.with_name(f"{out.stem}{tag}{out.suffix}") if len(args.positives) > 1 and tag else out
    name = OP + tag + results_name(SPEC, args)[len(OP):]
    return results_path(name, args.device, None, args.out_dir)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """A child case (``--case-json``), or one sweep per ``--positives`` mode."""
    args = parse_bench_args(SPEC, argv)
    if args.case_json is not None:
        child_main(lambda case: run_case(SPEC.setup, case), ["--case-json", args.case_json])
        return []
    recorded = list(sys.argv[1:] if argv is None else argv)
    written: list[Path] = []
    for mode in dict.fromkeys(args.positives):
        one = argparse.Namespace(**{**vars(args), "positives": mode, "out": str(mode_results_path(args, mode))})
        written += run_sweep(SPEC, one, recorded)
    return written


if __name__ == "__main__":
    main()
