"""``mlcontrast-train`` / ``python -m mlcontrast.train``: parse the options (:mod:`mlcontrast.train.config`),
train (:func:`mlcontrast.train.engine.run`), print the final metrics."""

from __future__ import annotations

import json
import sys

from mlcontrast.train.config import build_parser, resolved_config
from mlcontrast.train.data import EMBEDDED
from mlcontrast.train.engine import run

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.print_config:  # before any data or model: the configuration only
            print(json.dumps(resolved_config(args), sort_keys=True))
            return 0
        if args.dataset not in EMBEDDED and args.data_root is None:
            parser.error(f"--dataset {args.dataset} needs --data-root")
        result = run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"mlcontrast-train: error: {e}", file=sys.stderr)
        return 2
    summary = result.get("summary") or {}
    last, best = summary.get("last"), summary.get("best")
    if last:
        print(f"final: mAP {last['mAP']:.2f} CF1 {last['CF1']:.2f} OF1 {last['OF1']:.2f} ({last['model']} model)")
    if best:
        print(f"best: epoch {best['epoch']} mAP {best['mAP']:.2f} CF1 {best['CF1']:.2f} OF1 {best['OF1']:.2f} "
              f"({best['model']} model)")
    return 0
