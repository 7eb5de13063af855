"""``mlcontrast-train`` / ``python -m mlcontrast.train``: parse the options (:mod:`mlcontrast.train.config`),
train (:func:`mlcontrast.train.engine.run`), print the final metrics."""

from __future__ import annotations

import sys

from mlcontrast.train.config import build_parser
from mlcontrast.train.engine import run

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset != "digits" and args.data_root is None:
        parser.error(f"--dataset {args.dataset} needs --data-root")
    try:
        result = run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"mlcontrast-train: error: {e}", file=sys.stderr)
        return 2
    last = result["history"][-1] if result["history"] else {}
    if last:
        print(f"final: mAP {last['mAP']:.2f} CF1 {last['CF1']:.2f} OF1 {last['OF1']:.2f}")
    return 0
