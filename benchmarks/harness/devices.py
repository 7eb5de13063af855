"""Torch settings of a benchmark process: dtype names, the CUDA device and TF32."""

from __future__ import annotations

DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str):
    """The torch dtype of a :data:`DTYPES` name."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def tf32_allowed() -> bool:
    """Whether fp32 CUDA matmuls may use TF32 (``mlcontrast._base.tf32_allowed``: reading the legacy
    ``torch.backends.cuda.matmul.allow_tf32`` raises once the newer ``fp32_precision`` switch was used)."""
    from mlcontrast._base import tf32_allowed as allowed

    return allowed()


def select_cuda_device(device: str, allow_tf32: bool = False) -> None:
    """Makes ``device`` current (``"cuda"`` without an index keeps the current one: ``torch.cuda.set_device``
    rejects an index-less device) and sets ``torch.backends.cuda.matmul.allow_tf32`` when asked."""
    import torch

    index = torch.device(device).index
    if index is not None:
        torch.cuda.set_device(index)
    if allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
