"""Constants and small helpers that every module of mlcontrast may import.

This module imports nothing from mlcontrast (and not triton), so that it can sit under every other
module without creating an import cycle. Each value here is defined nowhere else.
"""

from __future__ import annotations

import os

import torch

__all__ = ["BACKENDS", "NORM_EPS", "compute_dtype", "dtype_name", "interpreting", "tf32_allowed"]

#: The backend names every public function accepts, ``"auto"`` first.
BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")

#: The eps of ``F.normalize`` / ``F.cosine_similarity``, used for every cosine on every backend.
NORM_EPS = 1e-8


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how dtypes are spelled in the measured table, the Triton
    launch-configuration keys and the benchmark results."""
    return str(dtype).removeprefix("torch.")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation and loss dtype of the fused kernels: fp64 for fp64 input (gradcheck), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter: ``TRITON_INTERPRET`` read as Triton reads it
    (``1``, ``true`` or ``on``, in any case).

    Only the environment is read (not ``triton.knobs``), so that ``torch.compile`` traces the backend
    choice that calls this without a graph break.
    """
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")


def tf32_allowed() -> bool:
    """Whether fp32 CUDA matmuls may use TF32, whichever of torch's two switches set it.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` (``"tf32"``, ``"ieee"`` or ``"none"``,
    inheriting ``torch.backends.fp32_precision``), and reading the legacy ``allow_tf32`` raises ("mix of
    the legacy and new APIs") once anything has set the new one. Setting the legacy switch updates the new
    one, so the new one, where it exists and says something, is the answer.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9: only the legacy switch exists
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"
