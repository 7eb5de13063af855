"""Shared pieces of the training tests: tiny CLI arguments (test_resnet, 16 images) and one torch thread."""

from __future__ import annotations

import pytest
import torch

from mlcontrast.train.config import build_parser

TINY = ["--threads", "1", "--backbone", "test_resnet", "--feature-index", "2", "--hidden-dim", "32", "--proj-dim", "16",
        "--limit-train", "16", "--limit-test", "16", "--batch-size", "8", "--no-progress", "--lr", "1e-3"]


def tiny_args(tmp_path, *extra):
    """Parsed CLI arguments of a tiny run writing to ``tmp_path``."""
    return build_parser().parse_args([*TINY, "--output", str(tmp_path), *extra])


@pytest.fixture(autouse=True)
def one_thread():
    # OpenMP threads on a busy 2-core machine make these tiny steps many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
