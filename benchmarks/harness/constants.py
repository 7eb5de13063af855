"""Paths and byte units shared by the benchmark harness (a leaf: it imports nothing of the harness)."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCHMARKS_DIR.parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
GIB = 1024**3
MIB = 1024**2
