"""``mlcontrast-train`` / ``python -m mlcontrast.train``: train a method on a dataset.

With no arguments it trains SADCL on the embedded digits dataset on the CPU. Under ``torchrun`` it trains
with DistributedDataParallel: ``--batch-size`` is per process, and the contrastive losses contrast every
rank's rows (``process_group``), so N processes train like one process with N times the batch.
"""

from __future__ import annotations

import argparse
import sys

from mlcontrast._base import BACKENDS
from mlcontrast.train.argtypes import non_negative_int, positive, ratio
from mlcontrast.train.data import DATASETS
from mlcontrast.train.methods import METHODS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlcontrast-train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("method and data")
    g.add_argument("--method", choices=sorted(METHODS), default="sadcl")
    g.add_argument("--dataset", choices=list(DATASETS), default="digits")
    g.add_argument("--data-root", default=None, help="folder of the dataset's files (not needed for digits)")
    g.add_argument("--known-ratio", type=ratio, default=1.0,
                   help="proportion of known training labels (partial labels, seeded NumPy stream)")
    g.add_argument("--partial-seed", type=int, default=0, help="seed of the partial-label mask (HST uses 0)")
    g.add_argument("--img-size", type=positive(int), default=224, help="input size of file datasets")
    g.add_argument("--limit-train", type=positive(int), default=None, help="use only the first N training images")
    g.add_argument("--limit-test", type=positive(int), default=None, help="use only the first N test images")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=None, help="timm model name (default: resnet10t on digits, else resnet50)")
    g.add_argument("--feature-index", type=int, default=None,
                   help="features_only stage of the backbone (default: 2 for resnet10t on digits, else -1)")
    g.add_argument("--weights", default=None, help="local backbone weights file (default: random init)")
    g.add_argument("--hidden-dim", type=positive(int), default=128)
    g.add_argument("--proj-dim", type=positive(int), default=64)
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="mlcontrast loss backend")
    g.add_argument("--cls-weight", type=float, default=1000.0,
                   help="weight of the mean BCE on known labels (sadcl, bce)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive(int), default=15)
    g.add_argument("--batch-size", type=positive(int), default=64)
    g.add_argument("--lr", type=positive(float), default=1e-3, help="max lr of OneCycle (AdamW)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--output", default=None, help="output folder (default: runs/<method>-<dataset>)")
    g.add_argument("--resume", default=None, help="checkpoint file, or an output folder holding checkpoint.pt")
    g.add_argument("--num-workers", type=non_negative_int, default=0)
    g.add_argument("--threads", type=non_negative_int, default=None,
                   help="torch intra-op CPU threads; 0: torch's default; default: 1 on digits (its small model "
                        "gains little from more, and OpenMP threads on a busy machine are many times slower), "
                        "else torch's default")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    for method in METHODS.values():  # each method's own options, prefixed with its name
        method.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset != "digits" and args.data_root is None:
        parser.error(f"--dataset {args.dataset} needs --data-root")
    from mlcontrast.train.engine import run

    try:
        result = run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"mlcontrast-train: error: {e}", file=sys.stderr)
        return 2
    last = result["history"][-1] if result["history"] else {}
    if last:
        print(f"final: mAP {last['mAP']:.2f} CF1 {last['CF1']:.2f} OF1 {last['OF1']:.2f}")
    return 0
