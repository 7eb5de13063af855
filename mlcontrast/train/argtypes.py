"""argparse ``type=`` converters shared by the CLI and the methods' own option groups."""

from __future__ import annotations

import argparse

__all__ = ["positive", "non_negative_int", "ratio", "unit_interval", "optional", "decay"]


def _convert(kind, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive(kind):
    """``type=positive(int)`` / ``positive(float)``: a number > 0."""

    def parse(text: str):
        v = _convert(kind, text, f"a positive {kind.__name__}")
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v

    return parse


def non_negative_int(text: str) -> int:
    v = _convert(int, text, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def ratio(text: str) -> float:
    """A proportion in (0, 1] (known-label ratios)."""
    v = _convert(float, text, "a number in (0, 1]")
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {v}")
    return v


def unit_interval(text: str) -> float:
    """A number in [0, 1] (momenta, probability thresholds)."""
    v = _convert(float, text, "a number in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {v}")
    return v


def optional(kind):
    """``type=optional(positive(float))``: ``none`` / ``off`` / ``0`` mean off (``None``), anything else goes
    through ``kind`` — so an option a recipe turns on can be turned off on the command line."""

    def parse(text: str):
        if text.strip().lower() in ("none", "off", "0", "0.0"):
            return None
        return kind(text)

    return parse


def decay(text: str) -> float:
    """An EMA decay in (0, 1)."""
    v = _convert(float, text, "a number in (0, 1)")
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {v}")
    return v
