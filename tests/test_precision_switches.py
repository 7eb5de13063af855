"""torch's TF32 switches, as the fused CUDA backends read them.

torch >= 2.9 has two switches for TF32 in CUDA matmuls: the legacy ``torch.backends.cuda.matmul.allow_tf32``
and ``fp32_precision`` (on ``torch.backends.cuda.matmul``, inheriting ``torch.backends``). Once the new
one says "tf32", reading the legacy one raises, so a backend that read it would fail every fp32 call.
Both the Triton launchers (Python) and the CUDA api (C++, compiled here against torch's headers) must
read whichever switch was set, without raising.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch

from mlcontrast._base import tf32_allowed

ROOT = Path(__file__).resolve().parent.parent
NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")
needs_new_api = pytest.mark.skipif(not NEW_API, reason="this torch has only the legacy TF32 switch")


@contextlib.contextmanager
def _switches(legacy: bool | None = None, matmul: str | None = None, everything: str | None = None):
    """Sets the switches as a user would, and puts back what was there through the new API (which
    also leaves the legacy switch readable again)."""
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.fp32_precision) if NEW_API else None
    saved_legacy = None if NEW_API else torch.backends.cuda.matmul.allow_tf32
    try:
        if everything is not None:
            torch.backends.fp32_precision = everything
        if matmul is not None:
            torch.backends.cuda.matmul.fp32_precision = matmul
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32 = legacy
        yield
    finally:
        if NEW_API:
            torch.backends.fp32_precision = saved[1]
            torch.backends.cuda.matmul.fp32_precision = saved[0]
        else:
            torch.backends.cuda.matmul.allow_tf32 = saved_legacy


CASES = [
    ({"legacy": True}, True),
    ({"legacy": False}, False),
    pytest.param({"matmul": "tf32"}, True, marks=needs_new_api),
    pytest.param({"matmul": "ieee"}, False, marks=needs_new_api),
    pytest.param({"everything": "tf32", "matmul": "none"}, True, marks=needs_new_api),
    pytest.param({"everything": "tf32", "matmul": "ieee"}, False, marks=needs_new_api),
]


@pytest.mark.parametrize("switches,expected", CASES)
def test_tf32_allowed_reads_either_switch(switches, expected):
    with _switches(**switches):
        assert tf32_allowed() is expected


@needs_new_api
def test_the_legacy_switch_raises_after_the_new_one():
    # The situation the backends must survive: if torch stops raising, this test says so.
    with _switches(matmul="tf32"), pytest.raises(RuntimeError, match="mix of the legacy and new"):
        torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("switches,expected", CASES)
def test_triton_dot_precision_reads_either_switch(switches, expected):
    pytest.importorskip("triton")
    from mlcontrast.ops.utils import dot_precision

    with _switches(**switches):
        assert dot_precision(torch.float32) == ("tf32" if expected else "tf32x3")
        assert dot_precision(torch.bfloat16) == "ieee"


_CPP = """
#include <torch/extension.h>
#include "cuda/tf32.h"
bool tf32_allowed() { return mlcontrast::tf32_allowed(); }
"""


@pytest.fixture(scope="module")
def cpp_tf32(tmp_path_factory):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import load_inline

    build = tmp_path_factory.mktemp("tf32_build")
    module = load_inline(
        name="mlcontrast_tf32_probe",
        cpp_sources=_CPP,
        functions=["tf32_allowed"],
        extra_include_paths=[str(ROOT / "csrc")],
        build_directory=str(build),
        verbose=False,
    )
    return module.tf32_allowed


@pytest.mark.slow
@pytest.mark.parametrize("switches,expected", CASES)
def test_cuda_api_reads_either_switch(cpp_tf32, switches, expected):
    # csrc/cuda/tf32.h is what the CUDA label_supcon api uses to fill params.allow_tf32; it touches only
    # at::globalContext(), so it runs on a CPU machine.
    with _switches(**switches):
        assert cpp_tf32() is expected
