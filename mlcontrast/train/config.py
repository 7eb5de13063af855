"""The run configuration: the command line's options, the dataset-dependent defaults, and a method built
from a configuration.

It sits above the methods (the parser collects each method's own options) and below the engine and the CLI,
so none of them imports another in a circle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlcontrast._base import BACKENDS
from mlcontrast.train.argtypes import decay, non_negative_int, optional, positive, ratio
from mlcontrast.train.data import DATASETS, EMBEDDED
from mlcontrast.train.data.transforms import AUGMENTS
from mlcontrast.train.methods import METHODS
from mlcontrast.train.optim import STOP_RULES
from mlcontrast.train.recipes import RECIPES, recipe_values, released_files

__all__ = ["DESCRIPTION", "build_parser", "apply_recipe", "resolve_args", "build_method", "resolved_config",
           "method_options"]

#: ``mlcontrast-train --help``'s description
DESCRIPTION = """``mlcontrast-train`` / ``python -m mlcontrast.train``: train a method on a dataset.

With no arguments it trains SADCL on the embedded digits dataset on the CPU. Under ``torchrun`` it trains
with DistributedDataParallel: ``--batch-size`` is per process, and the contrastive losses contrast every
rank's rows (``process_group``), so N processes train like one process with N times the batch.

``--recipe paper`` sets every option of the released training scripts for the method and dataset
(:mod:`mlcontrast.train.recipes`); an option given on the command line wins over the recipe.
``--print-config`` prints the resolved configuration as JSON and exits.
"""


class _Parser(argparse.ArgumentParser):
    """Records which options the command line gave (``explicit``): those win over ``--recipe``."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        if not getattr(self, "_probing", False):
            ns.explicit = sorted(self._given(args))
        return ns, rest

    def _given(self, args) -> set[str]:
        # parse again with every default suppressed: only the options present on the line come back
        saved = [(a, a.default) for a in self._actions]
        self._probing = True
        try:
            for a, _ in saved:
                a.default = argparse.SUPPRESS
            probe, _ = super().parse_known_args(args, None)
        finally:
            for a, d in saved:
                a.default = d
            self._probing = False
        return set(vars(probe)) - {"explicit"}

_DIGITS_DEFAULTS = {"backbone": "resnet10t", "feature_index": 2}
_FILE_DEFAULTS = {"backbone": "resnet50", "feature_index": -1}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mlcontrast-train", description=DESCRIPTION,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=RECIPES, default="digits",
                   help="digits: the defaults below; paper: the released scripts' settings for the method and "
                        "dataset (mlcontrast/train/recipes.py), each overridable by its own option")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as one JSON object and exit (loads no data)")
    g = p.add_argument_group("method and data")
    g.add_argument("--method", choices=sorted(METHODS), default="sadcl")
    g.add_argument("--dataset", choices=list(DATASETS), default="digits")
    g.add_argument("--data-root", default=None,
                   help="folder of the dataset's files (not needed for the embedded digits and mnist_mosaic)")
    g.add_argument("--known-ratio", type=ratio, default=1.0,
                   help="proportion of known training labels (partial labels, seeded NumPy stream)")
    g.add_argument("--partial-seed", type=int, default=0, help="seed of the partial-label mask (HST uses 0)")
    g.add_argument("--img-size", type=positive(int), default=224, help="input size of file datasets")
    g.add_argument("--augment", choices=AUGMENTS, default="flip",
                   help="training pipeline of file datasets: flip (resize + flip), multiscale_crop (SADCL), "
                        "choice_crop (HST), autoaugment_crop (the author's DualCoOp, for TRM-ML)")
    g.add_argument("--limit-train", type=positive(int), default=None, help="use only the first N training images")
    g.add_argument("--limit-test", type=positive(int), default=None, help="use only the first N test images")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=None,
                   help="timm model name (default: resnet10t on the embedded datasets, else resnet50)")
    g.add_argument("--feature-index", type=int, default=None,
                   help="features_only stage of the backbone (default: 2 for resnet10t on the embedded datasets, "
                        "else -1)")
    g.add_argument("--weights", default=None, help="local backbone weights file (default: random init)")
    g.add_argument("--feature-pool", type=positive(int), default=1,
                   help="average-pool kernel (and stride) after the backbone map (HST: 2)")
    g.add_argument("--train-layers", default="all",
                   help="backbone stages that train: all, none, or comma-separated stage names such as layer4 "
                        "(the heads always train)")
    g.add_argument("--bn-mode", choices=["train", "frozen"], default="train",
                   help="backbone BatchNorm: train (eval mode only in frozen stages) or frozen (every BatchNorm in "
                        "eval mode with frozen affine parameters, as SADCL's FrozenBatchNorm2d)")
    g.add_argument("--hidden-dim", type=positive(int), default=128)
    g.add_argument("--proj-dim", type=positive(int), default=64)
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="mlcontrast loss backend")
    g.add_argument("--cls-weight", type=float, default=1000.0,
                   help="weight of the mean BCE on known labels (sadcl, bce, msupcon)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive(int), default=15)
    g.add_argument("--batch-size", type=positive(int), default=64)
    g.add_argument("--lr", type=positive(float), default=1e-3, help="learning rate (OneCycle: its maximum)")
    g.add_argument("--weight-decay", type=float, default=1e-4,
                   help="decoupled for adamw, an L2 term in the gradient for adam and sgd")
    g.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default="adamw",
                   help="adamw; adam (L2 weight decay, as HST); sgd (momentum 0.9)")
    g.add_argument("--scheduler", choices=["onecycle", "step", "cosine"], default="onecycle",
                   help="onecycle and cosine step every iteration, step every epoch")
    g.add_argument("--pct-start", type=ratio, default=0.2, help="OneCycle's warm-up share")
    g.add_argument("--step-size", type=positive(int), default=10, help="StepLR's period in epochs")
    g.add_argument("--step-gamma", type=positive(float), default=0.1, help="StepLR's factor")
    g.add_argument("--warmup-epochs", type=non_negative_int, default=0,
                   help="train the first N epochs at the constant --warmup-lr; the schedule runs underneath and "
                        "takes over at its position then (DualCoOp: 1); 0: off")
    g.add_argument("--warmup-lr", type=positive(float), default=1e-5, help="learning rate of the warm-up epochs")
    g.add_argument("--model-ema", type=optional(decay), default=None, metavar="DECAY",
                   help="keep an EMA of the model's state (e.g. 0.9998), evaluate it beside the raw model and "
                        "report the better (SADCL); none: off")
    g.add_argument("--model-ema-start", type=non_negative_int, default=0, metavar="EPOCH",
                   help="the EMA restarts from the model at the start of this epoch (0-based) and is updated and "
                        "evaluated only from then on (DualCoOp on VOC: 2)")
    g.add_argument("--early-stop", type=optional(positive(int)), default=None, metavar="PATIENCE",
                   help="stop once the best epoch lies more than this many epochs back (SADCL: 8); none: off")
    g.add_argument("--early-stop-rule", choices=STOP_RULES, default="best",
                   help="best: the best epoch (better of raw and EMA mAP) is more than PATIENCE epochs back; sadcl: "
                        "the released rule, which also needs the raw model's best epoch that far back and the last "
                        "EMA mAP below the EMA's best")
    g.add_argument("--stop-on-nan", action=argparse.BooleanOptionalAction, default=False,
                   help="end the run after an epoch whose training loss is NaN (SADCL exits on a NaN loss)")
    g.add_argument("--amp", choices=["bf16", "fp16", "none"], default="none",
                   help="mixed precision (fp16 with a GradScaler; bf16 also on the CPU)")
    g.add_argument("--accumulate", type=positive(int), default=1,
                   help="micro-batches per optimizer step (gradient accumulation)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--output", default=None, help="output folder (default: runs/<method>-<dataset>)")
    g.add_argument("--resume", default=None, help="checkpoint file, or an output folder holding checkpoint.pt")
    g.add_argument("--num-workers", type=non_negative_int, default=0)
    g.add_argument("--threads", type=non_negative_int, default=None,
                   help="torch intra-op CPU threads; 0: torch's default; default: 1 on the embedded datasets (their "
                        "small model gains little from more, and OpenMP threads on a busy machine are many times "
                        "slower), else torch's default")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    for method in METHODS.values():  # each method's own options, prefixed with its name
        method.add_arguments(p)
    return p


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--recipe``'s values set, except on the options the command line gave (``explicit``)."""
    values = recipe_values(getattr(args, "recipe", "digits"), args.method, args.dataset)
    given = set(getattr(args, "explicit", ()))
    for key, value in values.items():
        if key not in given:
            setattr(args, key, value)
    return args


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of the CLI arguments with the recipe's values and the dataset-dependent defaults filled in."""
    args = apply_recipe(argparse.Namespace(**vars(args)))
    if getattr(args, "amp", None) == "none":
        args.amp = None
    defaults = _DIGITS_DEFAULTS if args.dataset in EMBEDDED else _FILE_DEFAULTS
    if args.backbone is None:
        args.backbone = defaults["backbone"]
    if args.feature_index is None:
        args.feature_index = defaults["feature_index"] if args.backbone == defaults["backbone"] else -1
    if getattr(args, "threads", None) is None:
        args.threads = 1 if args.dataset in EMBEDDED else 0
    if args.output is None:
        args.output = str(Path("runs") / f"{args.method}-{args.dataset}")
    return args


def method_options(name: str) -> list[str]:
    """The option names (``dest``) that method ``name`` adds to the parser."""
    p = argparse.ArgumentParser(add_help=False)
    METHODS[name].add_arguments(p)
    return [a.dest for a in p._actions]


#: options that only mean something with one scheduler
_SCHEDULER_OPTIONS = {"pct_start": "onecycle", "step_size": "step", "step_gamma": "step"}
#: options that only mean something when another one is on (``None`` in the configuration otherwise)
_DEPENDENT_OPTIONS = {"warmup_lr": "warmup_epochs", "model_ema_start": "model_ema", "early_stop_rule": "early_stop"}
_CONFIG_KEYS = ("method", "dataset", "recipe", "optimizer", "lr", "weight_decay", "scheduler", "pct_start",
                "step_size", "step_gamma", "warmup_epochs", "warmup_lr", "epochs", "batch_size", "accumulate",
                "image_size", "augment", "backbone", "feature_index", "feature_pool", "weights", "train_layers",
                "bn_mode", "model_ema", "model_ema_start", "early_stop", "early_stop_rule", "stop_on_nan", "amp",
                "hidden_dim", "proj_dim", "cls_weight", "known_ratio", "partial_seed", "seed", "backend", "device")


def resolved_config(args: argparse.Namespace) -> dict:
    """The resolved configuration (``--print-config``): the keys above (``None`` where unused, e.g.
    ``step_size`` under OneCycle) plus the method's own options; JSON-serialisable. Under ``--recipe paper``,
    ``released_files`` maps each option that takes a file the release loads (``weights``, ``sadcl_init``,
    ``sadcl_prototypes``, ``hst_class_embeddings``, ...) to where the release gets that file."""
    args = resolve_args(args)
    cfg = {}
    for key in _CONFIG_KEYS:
        value = getattr(args, "img_size" if key == "image_size" else key, None)
        if key in _SCHEDULER_OPTIONS and args.scheduler != _SCHEDULER_OPTIONS[key]:
            value = None
        if key in _DEPENDENT_OPTIONS and not getattr(args, _DEPENDENT_OPTIONS[key], None):
            value = None
        cfg[key] = value
    for key in method_options(args.method):
        cfg[key] = getattr(args, key, None)
    files = released_files(args.recipe, args.method, args.dataset)
    if files:
        cfg["released_files"] = files
    return cfg


def build_method(name: str, num_classes: int, args: argparse.Namespace | None = None, **overrides):
    """The method ``name`` for ``num_classes`` classes, from CLI ``args`` (the parser's defaults when None)
    with ``overrides`` applied on top."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    if args is None:
        args = resolve_args(build_parser().parse_args(["--method", name]))
    args = argparse.Namespace(**{**vars(args), **overrides})
    return METHODS[name].from_args(num_classes, args)
