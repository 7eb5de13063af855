"""Retries around a rebuild of ``mlcontrast._C`` in progress, which makes imports fail briefly."""

from __future__ import annotations

import os
import sys
import time


def retry_count(default: int) -> int:
    """How often to retry what a rebuild of ``mlcontrast._C`` in progress makes fail (``default``), or
    ``MLCONTRAST_BENCH_RETRIES``: the GPU session scripts set 0, since nothing is rebuilt behind their back
    there and every sleep would spend the call's time budget."""
    value = os.environ.get("MLCONTRAST_BENCH_RETRIES", "").strip()
    return max(0, int(value)) if value else default


def import_mlcontrast(retries: int = 9, wait_s: float = 30.0):
    """``import mlcontrast``, retried ``retry_count(retries)`` times: a rebuild of ``mlcontrast._C`` in
    progress makes imports fail briefly."""
    retries = retry_count(retries)
    for attempt in range(retries + 1):
        try:
            import mlcontrast

            return mlcontrast
        except Exception as error:  # ImportError, OSError (half-written .so), ...
            if attempt == retries:
                raise RuntimeError(f"import mlcontrast failed {retries + 1} times: {error}") from error
            for name in [m for m in sys.modules if m == "mlcontrast" or m.startswith("mlcontrast.")]:
                del sys.modules[name]
            print(f"[bench] import mlcontrast failed ({error}); retry {attempt + 1}/{retries} in {wait_s:.0f} s",
                  file=sys.stderr, flush=True)
            time.sleep(wait_s)
