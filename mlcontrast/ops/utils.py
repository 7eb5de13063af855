"""Helpers shared by the Triton op files of :mod:`mlcontrast.ops`.

Every op file holds its ``@triton.jit`` kernels, their launchers and the ``torch.library`` glue. The
glue goes through :func:`triton_library_op`: on a GPU the op is a ``torch.library.triton_op``, which
``torch.compile`` traces into (the kernels become nodes of the graph); under ``TRITON_INTERPRET=1``
the kernels are interpreted functions that ``torch.library.wrap_triton`` cannot trace, so the same
body is registered as an opaque ``torch.library.custom_op`` with a fake kernel instead. Both keep
``torch.compile(fullgraph=True)`` free of graph breaks.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import torch
import triton
import triton.language as tl

from mlcontrast._base import NORM_EPS, compute_dtype, dtype_name, interpreting, tf32_allowed

__all__ = [
    "NORM_EPS",
    "KERNEL_NORM_EPS",
    "LIBRARY",
    "interpreting",
    "is_interpreted",
    "compute_dtype",
    "dot_precision",
    "launch",
    "pow2_block",
    "scalar",
    "split_count",
    "triton_library_op",
    "CONFIG_ENV",
    "CONFIG_OVERRIDES",
    "with_overrides",
    "dtype_name",
]

#: NORM_EPS inside the kernels (a global that a Triton kernel reads must be a constexpr).
KERNEL_NORM_EPS = tl.constexpr(NORM_EPS)
LIBRARY = "mlcontrast_triton"

#: The environment variable holding launch configurations as JSON, ``{"label_supcon.fwd": {"BLOCK_M": 128}}``,
#: read into :data:`CONFIG_OVERRIDES` at import (a benchmark's processes then run a tuned configuration).
CONFIG_ENV = "MLCONTRAST_TRITON_CONFIGS"


def _configs_from_environment() -> dict[str, dict[str, int]]:
    text = os.environ.get(CONFIG_ENV, "").strip()
    if not text:
        return {}
    try:
        configs = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{CONFIG_ENV} must be JSON, e.g. '{{\"label_supcon.fwd\": {{\"BLOCK_M\": 128}}}}': {error}")
    if not isinstance(configs, dict) or not all(
        isinstance(key, str) and isinstance(value, dict) and all(isinstance(v, int) for v in value.values())
        for key, value in configs.items()
    ):
        raise ValueError(f"{CONFIG_ENV} must map kernel keys to {{name: int}} objects, got {text!r}")
    return configs


#: Launch configurations that replace an op's defaults, by key ("label_supcon.fwd", "label_supcon.bwd-atomic"),
#: optionally for one features dtype ("label_supcon.fwd:bfloat16", which wins over the plain key): block
#: sizes by their kernel parameter names, and "num_warps" / "num_stages". ``benchmarks.tune_triton`` sets
#: them to time candidates; set one by hand, or through :data:`CONFIG_ENV`, to try a configuration.
#: Read when a launcher runs (under torch.compile, when it is traced).
CONFIG_OVERRIDES: dict[str, dict[str, int]] = _configs_from_environment()


def with_overrides(key: str, config: dict, dtype: torch.dtype | None = None) -> dict:
    """``config`` (block sizes, and launch ``options``) with the entries of ``CONFIG_OVERRIDES`` put in:
    those of ``"<key>:<dtype>"`` when ``dtype`` is given and that key is set, else those of ``key``.

    Example:
        >>> CONFIG_OVERRIDES["demo.fwd"] = {"BLOCK_M": 128, "num_warps": 8}
        >>> with_overrides("demo.fwd", {"BLOCK_M": 64, "options": {"num_warps": 4, "num_stages": 2}})
        {'BLOCK_M': 128, 'options': {'num_warps': 8, 'num_stages': 2}}
        >>> CONFIG_OVERRIDES["demo.fwd:float16"] = {"BLOCK_M": 32}
        >>> with_overrides("demo.fwd", {"BLOCK_M": 64, "options": {}}, torch.float16)
        {'BLOCK_M': 32, 'options': {}}
        >>> del CONFIG_OVERRIDES["demo.fwd"], CONFIG_OVERRIDES["demo.fwd:float16"]
    """
    specific = CONFIG_OVERRIDES.get(f"{key}:{dtype_name(dtype)}") if dtype is not None else None
    override = specific or CONFIG_OVERRIDES.get(key)
    if not override:
        return config
    result = {**config, "options": dict(config.get("options", {}))}
    for name, value in override.items():
        if name in ("num_warps", "num_stages"):
            result["options"][name] = value
        else:
            result[name] = value
    return result


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was decorated as an interpreted function (the env var was set at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def dot_precision(operand_dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for operands of ``operand_dtype``.

    fp32 operands honour torch's TF32 switch for CUDA matmuls (:func:`mlcontrast._base.tf32_allowed`:
    ``fp32_precision`` or the legacy ``allow_tf32``): ``"tf32"`` when allowed (a 10-bit
    mantissa, like torch's TF32 matmuls), else ``"tf32x3"``: three TF32 products that recover fp32
    accuracy (relative error about 1e-6, not bitwise IEEE) on the tensor cores, where ``"ieee"`` would
    run on the FMA units at a fraction of the speed. The other dtypes have a single precision.
    """
    if operand_dtype == torch.float32:
        return "tf32" if tf32_allowed() else "tf32x3"
    return "ieee"


def pow2_block(size: int, low: int, high: int) -> int:
    """The next power of two of ``size``, clamped to [low, high] (``tl.dot`` needs tiles >= 16 on GPUs)."""
    return max(low, min(high, triton.next_power_of_2(max(int(size), 1))))


def scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor holding a hyper-parameter for a kernel to ``tl.load``.

    Triton passes Python floats as fp32, which would round e.g. 1/0.1 in the fp64 kernels used by
    gradcheck; a tensor in the compute dtype keeps full precision and never triggers a recompile.
    """
    return torch.full((1,), value, dtype=dtype, device=device)


def launch(kernel, grid: tuple[int, ...]):
    """``kernel[grid]`` through ``wrap_triton`` so that a ``triton_op`` body stays traceable.

    An interpreted kernel (``TRITON_INTERPRET=1``, where the ops are plain ``custom_op``s) is launched
    directly: torch before 2.14 refuses to wrap one.
    """
    if is_interpreted(kernel):
        return kernel[grid]
    return torch.library.wrap_triton(kernel)[grid]


def triton_library_op(name: str, *, mutates_args: Iterable[str] = (), fake: Callable | None = None):
    """Registers ``fn`` as ``mlcontrast_triton::<name>``: a ``triton_op`` on GPUs, a ``custom_op`` when interpreted.

    Args:
        name: op name inside the ``mlcontrast_triton`` library.
        mutates_args: names of the arguments written in place.
        fake: fake (meta) implementation, used only for the ``custom_op`` registration; a
            ``triton_op`` derives its fake behaviour by tracing its own body.
    """

    def decorate(fn: Callable):
        qualname = f"{LIBRARY}::{name}"
        if interpreting():
            op = torch.library.custom_op(qualname, mutates_args=tuple(mutates_args))(fn)
            if fake is not None:
                op.register_fake(fake)
        else:
            op = torch.library.triton_op(qualname, mutates_args=tuple(mutates_args))(fn)
        return op

    return decorate


def split_count(blocks: int, bytes_per_split: int, budget_bytes: int = 64 << 20, most: int = 64) -> tuple[int, int]:
    """How a deterministic reduction over ``blocks`` row blocks splits: ``(splits, blocks_per_split)``.

    Each split is an independent partial accumulator summed in a fixed order afterwards. More splits mean
    more parallel programs; each costs ``bytes_per_split`` of scratch, capped by ``budget_bytes``. Under
    the interpreter parallelism buys nothing, so one or two splits are used. No split is left empty.
    """
    if interpreting():
        wanted = 1 if blocks < 4 else 2
    else:
        by_memory = max(1, budget_bytes // max(1, bytes_per_split))
        wanted = int(max(1, min(blocks, most, by_memory)))
    per_split = max(1, -(-blocks // wanted))
    return max(1, -(-blocks // per_split)), per_split
