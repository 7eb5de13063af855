"""Is the column loop of the Triton label_supcon kernels software-pipelined? The sm_90 TTGIR says so.

    python -m benchmarks.ttgir_label_supcon                          # bf16 and fp32, D = 256, sm_90
    python -m benchmarks.ttgir_label_supcon --dtype float16 --dim 128 --dump /tmp/ttgir

No GPU is needed: the launchers run on CPU tensors with their launches recorded instead of run, and
each recorded launch is compiled for the target up to Triton's TTGIR stage (no ptxas). For each kernel
the script prints its loops that do a matrix product (the column sweeps, and the D-chunk loops if
any), whether each holds a nested loop (Triton pipelines only innermost loops), and what a pipelined
loop holds in its own body: asynchronous copies of the next tiles into shared memory
(``ttg.async_copy_global_to_local`` / ``ttg.async_wait``, or TMA: ``ttng.async_tma_copy_global_to_local``),
and on sm_90 asynchronous wgmma (``ttng.warp_group_dot`` and ``ttng.warp_group_dot_wait`` with
``pendings``). A loop without async copies loads its tiles synchronously: ``num_stages`` has no effect.

``launch_source`` (a recorded launch as an ``ASTSource`` and its options) also serves the compile check
of ``tests/test_triton_compile.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from pathlib import Path

import torch

_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
               torch.int64: "i64", torch.int32: "i32", torch.int8: "i8"}  # fmt: skip
EVIDENCE = ("async_copy_global_to_local", "async_tma_copy_global_to_local", "async_wait", "warp_group_dot ")


@contextlib.contextmanager
def recorded_launches(*modules):
    """Within the block, the ``launch`` of each op module records ``(kernel, args, kwargs)`` in the
    yielded list instead of running the kernel."""
    launches, saved = [], [m.launch for m in modules]
    for module in modules:
        module.launch = lambda kernel, grid: (lambda *a, **k: launches.append((kernel, a, k)))
    try:
        yield launches
    finally:
        for module, launch in zip(modules, saved):
            module.launch = launch


def launch_source(kernel, args, kwargs):
    """``(ASTSource, options)`` of a recorded launch, with the specialisations of a real one: 16-byte
    aligned pointers and integers divisible by 16 marked so."""
    from triton.compiler import ASTSource

    values = dict(zip(kernel.arg_names, args), **kwargs)
    options = {k: values.pop(k) for k in ("num_warps", "num_stages") if k in values}
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, name) in enumerate(zip(kernel.params, kernel.arg_names)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPE_NAMES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32" if isinstance(value, int) else "fp32"
            if isinstance(value, int) and value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), options


def to_ttgir(source, options: dict, arch: int = 90) -> str:
    """The TTGIR of ``source`` for ``sm_<arch>``: the stages of ``triton.compile`` up to "ttgir" only."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    opts = backend.parse_options(dict(options, **source.parse_options()))
    stages: dict = {}
    backend.add_stages(stages, opts, source.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    metadata: dict = {}
    for name in ("ttir", "ttgir"):
        module = stages[name](module, metadata)
    return str(module)


def dot_loops(ttgir: str) -> list[tuple[bool, list[str]]]:
    """The ``scf.for`` loops that do a matrix product (in their own body or a nested loop's), outermost
    first: whether each holds another loop, and the lines of its header and own body (nested loops left
    out)."""
    found, stack, depth = [], [], 0  # stack: [depth at opening, own lines, holds a loop, does a dot, index]
    for line in ttgir.splitlines():
        opens = "scf.for" in line and line.rstrip().endswith("{")
        if opens and stack:
            stack[-1][2] = True
        if stack and not opens:
            stack[-1][1].append(line)
            stack[-1][3] |= "tt.dot " in line or "warp_group_dot " in line
        if opens:
            found.append(None)
            stack.append([depth, [line], False, False, len(found) - 1])
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1][0]:
            _, body, inner, dot, index = stack.pop()
            if stack:
                stack[-1][3] |= dot
            found[index] = (inner, body) if dot else None
    return [loop for loop in found if loop is not None]


def loop_evidence(body: list[str]) -> dict:
    """What shows a loop (header and body lines) pipelined: counts of the async ops, whether the loop
    carries an async token from one iteration to the next (the copy of the next tile in flight), the
    synchronous loads of 2-D tiles (none in a pipelined column loop), and the ``pendings`` of its wgmma
    waits (> 0: a product left in flight across iterations)."""
    counts = {name.strip(): sum(name in line for line in body) for name in EVIDENCE}
    counts["carries_token"] = "!ttg.async.token" in body[0] if body else False
    counts["sync_tile_loads"] = sum(bool(re.search(r" tt\.load .*tensor<\d+x\d+x!tt\.ptr", line)) for line in body)
    counts["pendings"] = sorted({int(p) for line in body for p in re.findall(r"pendings = (\d+)", line)})
    return counts


def label_supcon_ttgir(dtype: torch.dtype, dim: int, arch: int = 90, n: int = 208) -> dict[str, str]:
    """TTGIR of every kernel that the label_supcon launchers launch (both modes, forward and backward)
    for ``[n, dim]`` features of ``dtype``, by kernel name. Needs ``TRITON_INTERPRET`` unset at import."""
    import mlcontrast.ops.label_supcon as ls

    z, y = torch.randn(n, dim).to(dtype), torch.randint(-1, 48, (n,))
    with recorded_launches(ls) as launches:
        loss, lse, n_pos = ls.label_supcon(z, y, 0.1, 0.1)
        ls.label_supcon(z, y, 0.1, 0.1, 0, None, atomic=True)
        ls.label_supcon_backward(loss, z, y, lse, n_pos, 0.1, 0.1, atomic=False)
        ls.label_supcon_backward(loss, z, y, lse, n_pos, 0.1, 0.1, atomic=True)
    return {kernel.__name__: to_ttgir(*launch_source(kernel, a, k), arch=arch) for kernel, a, k in launches}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", action="append", help="features dtype (repeatable; default bfloat16 and float32)")
    parser.add_argument("--dim", type=int, default=256, help="D, the features' width")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 or 80")
    parser.add_argument("--dump", type=Path, help="also write each kernel's TTGIR under this folder")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    for name in args.dtype or ["bfloat16", "float32"]:
        for kernel, ttgir in label_supcon_ttgir(getattr(torch, name), args.dim, args.arch).items():
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                (args.dump / f"{kernel}_{name}_d{args.dim}_sm{args.arch}.ttgir").write_text(ttgir)
            for index, (nested, body) in enumerate(dot_loops(ttgir)):
                kind = "holds a loop" if nested else "innermost"
                print(f"{name:9s} {kernel:32s} loop {index} ({kind}): {loop_evidence(body)}")


if __name__ == "__main__":
    main()
