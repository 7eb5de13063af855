"""The run configuration: the command line's options, the dataset-dependent defaults, and a method built
from a configuration.

It sits above the methods (the parser collects each method's own options) and below the engine and the CLI,
so none of them imports another in a circle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlcontrast._base import BACKENDS
from mlcontrast.train.argtypes import non_negative_int, positive, ratio
from mlcontrast.train.data import DATASETS
from mlcontrast.train.methods import METHODS

__all__ = ["DESCRIPTION", "build_parser", "resolve_args", "build_method"]

#: ``mlcontrast-train --help``'s description
DESCRIPTION = """``mlcontrast-train`` / ``python -m mlcontrast.train``: train a method on a dataset.

With no arguments it trains SADCL on the embedded digits dataset on the CPU. Under ``torchrun`` it trains
with DistributedDataParallel: ``--batch-size`` is per process, and the contrastive losses contrast every
rank's rows (``process_group``), so N processes train like one process with N times the batch.
"""

_DIGITS_DEFAULTS = {"backbone": "resnet10t", "feature_index": 2}
_FILE_DEFAULTS = {"backbone": "resnet50", "feature_index": -1}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlcontrast-train", description=DESCRIPTION,
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
                   help="weight of the mean BCE on known labels (sadcl, bce, msupcon)")
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


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of the CLI arguments with the dataset-dependent defaults filled in."""
    args = argparse.Namespace(**vars(args))
    defaults = _DIGITS_DEFAULTS if args.dataset == "digits" else _FILE_DEFAULTS
    if args.backbone is None:
        args.backbone = defaults["backbone"]
    if args.feature_index is None:
        args.feature_index = defaults["feature_index"] if args.backbone == defaults["backbone"] else -1
    if getattr(args, "threads", None) is None:
        args.threads = 1 if args.dataset == "digits" else 0
    if args.output is None:
        args.output = str(Path("runs") / f"{args.method}-{args.dataset}")
    return args


def build_method(name: str, num_classes: int, args: argparse.Namespace | None = None, **overrides):
    """The method ``name`` for ``num_classes`` classes, from CLI ``args`` (the parser's defaults when None)
    with ``overrides`` applied on top."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    if args is None:
        args = resolve_args(build_parser().parse_args(["--method", name]))
    args = argparse.Namespace(**{**vars(args), **overrides})
    return METHODS[name].from_args(num_classes, args)
