"""The Triton kernels as programs: registration, tracing into them under torch.compile, and compiling
them for GPU targets without a GPU (TTIR, TTGIR, and the opt-in cubin/ptxas check).

The subprocess checks run without TRITON_INTERPRET, on fake CUDA tensors or through triton.compile with a
GPUTarget: no GPU needed. The opt-in compile check, which reports every kernel's shared memory, registers
and spills: ``MLCONTRAST_COMPILE_CHECK=1 python -m pytest -s tests/test_triton_compile.py -k compile_for_gpu``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from utils import assert_matches, backend_table

import mlcontrast

TRITON = backend_table()["triton"]
if TRITON.reason is not None:
    pytest.skip(f"the Triton backend cannot run here: {TRITON.reason}", allow_module_level=True)

from mlcontrast.ops import label_supcon as triton_label_supcon  # noqa: E402
from mlcontrast.ops import prototype_ce as triton_prototype_ce  # noqa: E402
from mlcontrast.ops import prototype_nce as triton_prototype_nce  # noqa: E402
from mlcontrast.ops import triton_unavailable_reason  # noqa: E402
from mlcontrast.ops import update_prototypes as triton_update_prototypes  # noqa: E402
from mlcontrast.ops.utils import is_interpreted  # noqa: E402

DEVICE = TRITON.device
INTERPRETED = is_interpreted(triton_label_supcon._label_supcon_fwd_kernel)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, for benchmarks.*


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(device=DEVICE, dtype=dtype)


def test_backend_is_available():
    assert triton_unavailable_reason() is None
    assert "triton" in mlcontrast.available_backends(DEVICE)
    modules = (triton_label_supcon, triton_prototype_ce, triton_prototype_nce, triton_update_prototypes)
    kernels = [k for m in modules for name, k in vars(m).items() if name.startswith("_") and name.endswith("_kernel")]
    assert len(kernels) == 13
    assert all(is_interpreted(k) == INTERPRETED for k in kernels)


def test_torch_compile_fullgraph():
    # aot_eager: the graph capture (what fullgraph=True checks) without Inductor's C++ compile of the
    # CPU code around the ops, which would add ~15 s here.
    z, p = _rand(12, 6), _rand(3, 6)
    y = torch.tensor([0, 1, 2, 0, 1, 2, -1, 0, 1, 2, 2, 0], device=DEVICE)

    def loss_fn(a, b):
        return mlcontrast.label_supcon_loss(a, y, 0.1, normalize=True, backend="triton") + mlcontrast.prototype_ce_loss(
            a, y, b, 0.1, backend="triton"
        )

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    assert_matches(compiled, loss_fn, [z, p])


_TRACE_TRITON_OPS = textwrap.dedent(
    """
    import os, logging
    os.environ.pop("TRITON_INTERPRET", None)
    logging.disable(logging.WARNING)  # no GPU driver: the mutation analysis falls back, with a warning
    import torch
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    import mlcontrast.ops.label_supcon as ls, mlcontrast.ops.prototype_ce as pc
    import mlcontrast.ops.prototype_nce as pn, mlcontrast.ops.update_prototypes as up

    def everything(z, y, p, t):
        loss, lse, npos = ls.label_supcon(z, y, 0.1, 0.1)
        loss_atomic = ls.label_supcon(z, y, 0.1, 0.1, 0, None, atomic=True)[0]
        g1 = ls.label_supcon_backward(loss, z, y, lse, npos, 0.1, 0.1, atomic=False)
        g2 = ls.label_supcon_backward(loss, z, y, lse, npos, 0.1, 0.1, atomic=True)
        l2, lse2, norm2 = pc.prototype_ce(z, y, p, 0.1)
        g3 = pc.prototype_ce_backward(l2, z, y, p, lse2, norm2, 0.1)
        z3, p3 = z.view(4, 5, 8), p[:5]
        l3, st, lg, nm = pn.prototype_nce(z3, p3, t, 0.1)
        g4 = pn.prototype_nce_backward(l3, z3, p3, t, st, lg, nm, 0.1)
        q = p.clone()
        up.update_prototypes_(q, z, y, 0.9, True)
        return loss, loss_atomic, g1, g2, g3, g4, q

    graphs = []
    traced = aot_function(everything, fw_compiler=lambda gm, _: graphs.append(gm.code) or gm)
    with FakeTensorMode():  # fake CUDA tensors: traced, never run
        z = torch.empty(20, 8, device="cuda", dtype=torch.float16)
        y = torch.empty(20, device="cuda", dtype=torch.long)
        p = torch.empty(7, 8, device="cuda", dtype=torch.float16)
        t = torch.empty(4, 5, device="cuda", dtype=torch.long)
        traced(z, y, p, t)
    print("launches", graphs[0].count("triton_kernel_wrapper_functional("))
    print("opaque", graphs[0].count("mlcontrast_triton"))
    """
)


def test_triton_ops_trace_into_their_kernels_without_a_gpu():
    # Without the interpreter the ops are torch.library.triton_op: AOTAutograd (what torch.compile
    # uses) must see through them to the 13 kernel launches, with no data-dependent shapes or host
    # syncs in their bodies. Run on fake CUDA tensors in a fresh process (no TRITON_INTERPRET).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _TRACE_TRITON_OPS], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "launches 13" in result.stdout and "opaque 0" in result.stdout, result.stdout


_TRACE_PROTOTYPE_CE_BACKWARD = textwrap.dedent(
    """
    import os, logging, operator
    os.environ.pop("TRITON_INTERPRET", None)
    logging.disable(logging.WARNING)  # no GPU driver: the mutation analysis falls back, with a warning
    import torch
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    import mlcontrast.ops.prototype_ce as pc

    graphs = []
    traced = aot_function(
        lambda *args: pc.prototype_ce_backward(*args, 0.1), fw_compiler=lambda gm, _: graphs.append(gm) or gm
    )
    n, c, d = 20, 7, 8  # D in one chunk: the dz kernel needs no scratch
    with FakeTensorMode():  # fake CUDA tensors: traced, never run
        f = lambda *shape, dtype=torch.float32: torch.empty(*shape, device="cuda", dtype=dtype)
        traced(f(n), f(n, d), f(n, dtype=torch.long), f(c, d), f(n), f(n))
    graph = graphs[0].graph
    for node in graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            args, cloned = node.kwargs["kwargs"], node.kwargs["tensors_to_clone"]
            tensors = [args[name] for name in cloned]
            print("aliased", len(tensors) - len(set(tensors)))
    grad_z = graph.output_node().args[0][-2]
    assert grad_z.target is operator.getitem, grad_z.format_node()
    print("grad_z from", grad_z.args[1])  # the name of the kernel argument that holds it
    """
)


def test_prototype_ce_backward_traces_without_aliased_kernel_outputs():
    # A triton_op's kernel launch is functionalised under torch.compile: each argument the kernel may
    # write is cloned separately, and the result read from its clone. Two such arguments holding one
    # tensor (DZ and DZU once did, for D in one chunk) leave the returned gradient a clone never written.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _TRACE_PROTOTYPE_CE_BACKWARD], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["aliased", "0", "aliased", "0", "grad_z", "from", "DZ"], result.stdout


# ----------------------------------------------------------------------------------------------
# Compiling the kernels for sm_90 without a GPU: TTIR and TTGIR (seconds)
# ----------------------------------------------------------------------------------------------

_PROTOTYPE_CE_TTIR = textwrap.dedent(
    """
    import os, re
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import mlcontrast.ops.prototype_ce as pc

    launches = []  # recorded, not run
    pc.launch = lambda kernel, grid: (lambda *a, **k: launches.append((kernel, a, k)))
    z, p, y = torch.randn(40, 256), torch.randn(48, 256), torch.randint(-1, 48, (40,))  # D: several chunks
    loss, lse, norm = pc.prototype_ce(z, y, p, 0.1)
    pc.prototype_ce_backward(loss, z, y, p, lse, norm, 0.1)
    for kernel, args, kwargs in launches[1:]:  # the two backward kernels
        values = dict(zip(kernel.arg_names, args), **kwargs)
        options = {k: values.pop(k) for k in ("num_warps", "num_stages") if k in values}
        signature, constexprs = {}, {}
        for param, name in zip(kernel.params, kernel.arg_names):
            value = values[name]
            if param.is_constexpr:
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + {torch.float32: "fp32", torch.int64: "i64"}[value.dtype]
            else:
                signature[name] = "i32"
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        ttir = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ttir"]
        lines = [line.strip() for line in ttir.splitlines()]
        loaded = {m.group(1) for line in lines for m in [re.search(r"= tt.load (%[\\w.]+)", line)] if m}
        for index, line in enumerate(lines):
            stored = re.match(r"tt.store (%[\\w.]+)", line)
            if stored and stored.group(1) in loaded:  # a read-modify-write of global memory
                print(kernel.__name__, "rmw then", lines[index + 1].split(" ")[0])
    """
)


def test_prototype_ce_backward_waits_after_each_read_modify_write():
    # The dz and dp kernels add each D chunk past the first into global memory (DZU, the partials) once
    # per class chunk / row block. Load and store of a chunk get different layouts, so the next read of
    # an element may be by another warp than the one that stored it: a barrier must follow each store.
    # Checked in the TTIR for sm_90, which triton produces without a GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _PROTOTYPE_CE_TTIR], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    found = [line.split() for line in result.stdout.splitlines()]
    assert [kernel for kernel, *_ in found] == ["_prototype_ce_bwd_dz_kernel", "_prototype_ce_bwd_dp_kernel"], found
    assert all(next_op.endswith(".barrier") for *_, next_op in found), found


_PIPELINE_CHECK = textwrap.dedent(
    """
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from benchmarks.ttgir_label_supcon import dot_loops, label_supcon_ttgir, loop_evidence

    dtype, dim = getattr(torch, sys.argv[1]), int(sys.argv[2])
    for kernel, ttgir in label_supcon_ttgir(dtype, dim, arch=90).items():
        for nested, body in dot_loops(ttgir):
            evidence = loop_evidence(body)
            pipelined = (not nested and evidence["async_copy_global_to_local"] > 0 and evidence["carries_token"]
                         and evidence["sync_tile_loads"] == 0)
            print(kernel, "pipelined" if pipelined else "NOT pipelined", "nested" if nested else "", evidence)
    """
)


@pytest.mark.parametrize("dtype,dim", [("bfloat16", 256), ("float16", 128), ("float32", 64)])
def test_label_supcon_column_loops_are_pipelined_for_sm90(dtype, dim):
    # The sm_90 TTGIR (no GPU, no ptxas: seconds): every loop of the deterministic kernels that does a
    # matrix product is the column sweep, innermost, and fetches the next column tile with asynchronous
    # copies carried across iterations; no 2-D tile is loaded synchronously in it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _PIPELINE_CHECK, dtype, str(dim)], env=env, capture_output=True, text=True, cwd=_ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    for kernel in ("_label_supcon_fwd_kernel", "_label_supcon_lse_kernel", "_label_supcon_bwd_kernel"):
        loops = [line for line in lines if line.startswith(kernel + " ")]
        assert loops and not any("NOT pipelined" in line for line in loops), result.stdout


# ----------------------------------------------------------------------------------------------
# Compiling every kernel for a GPU target (opt-in: minutes on 2 cores)
# ----------------------------------------------------------------------------------------------

_COMPILE_CHECK = textwrap.dedent(
    """
    import os, re, shutil, subprocess, sys, tempfile
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    import triton.backends.nvidia
    PTXAS = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
    PTXAS = PTXAS if os.path.exists(PTXAS) else shutil.which("ptxas")
    from triton.backends.compiler import GPUTarget
    import mlcontrast.ops.label_supcon as ls, mlcontrast.ops.prototype_ce as pc
    import mlcontrast.ops.prototype_nce as pn, mlcontrast.ops.update_prototypes as up
    import mlcontrast.ops.multihot_supcon as mh
    from benchmarks.ttgir_label_supcon import launch_source, recorded_launches

    dtype = getattr(torch, sys.argv[1])
    z, p = torch.randn(208, 256).to(dtype), torch.randn(48, 256).to(dtype)  # D = 256: the targets' width
    y, t = torch.randint(-1, 48, (208,)), torch.randint(-1, 2, (4, 48))
    with recorded_launches(ls, pc, pn, up, mh) as launches:  # record every launch instead of running it
        loss, lse, npos = ls.label_supcon(z, y, 0.1, 0.1)
        ls.label_supcon(z, y, 0.1, 0.1, 0, None, atomic=True)
        ls.label_supcon_backward(loss, z, y, lse, npos, 0.1, 0.1, atomic=False)
        ls.label_supcon_backward(loss, z, y, lse, npos, 0.1, 0.1, atomic=True)
        ls.label_supcon_backward(loss, z, y, lse, npos, 0.1, 0.1, 0, 100, 150, 50)  # roles: the ROLES kernel
        l2, lse2, norm2 = pc.prototype_ce(z, y, p, 0.1)
        pc.prototype_ce_backward(l2, z, y, p, lse2, norm2, 0.1)
        z3 = z[:192].reshape(4, 48, 256)
        l3, st, lg, nm = pn.prototype_nce(z3, p, t, 0.1)
        pn.prototype_nce_backward(l3, z3, p, t, st, lg, nm, 0.1)
        up.update_prototypes_(p, z, y, 0.9, True)
        up.ONE_HOT_MAX_CLASSES = 0  # and the atomic class sums
        up.update_prototypes_(p, z, y, 0.9, True)
        targets = (torch.rand(208, 80) < 0.04).to(torch.uint8)  # C = 80
        for positives in ("jaccard", "mulsupcon"):  # the overlap product, and the label-free kernels
            l4, lse4, coef4, count4 = mh.multihot_supcon(z, targets, 0.1, 0.1, positives, 0.5)
            mh.multihot_supcon_backward(l4, z, targets, lse4, coef4, count4, 0.1, 0.1, positives, 0.5)

    for kernel, args, kwargs in launches:
        source, options = launch_source(kernel, args, kwargs)
        compiled = triton.compile(source, target=GPUTarget("cuda", int(sys.argv[2]), 32), options=options)
        assert compiled.metadata.shared <= 100 * 1024, (kernel.__name__, compiled.metadata.shared)
        # Registers and spills, from ptxas on the kernel's PTX.
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(compiled.asm["ptx"])
            ptx.flush()
            arch = "sm_90a" if sys.argv[2] == "90" else "sm_" + sys.argv[2]
            info = subprocess.run([PTXAS, "-arch=" + arch, "-v", ptx.name, "-o", os.devnull],
                                  capture_output=True, text=True).stderr
        spills = sum(int(n) for n in re.findall(r"([0-9]+) bytes spill stores", info))
        registers = max(int(n) for n in re.findall(r"Used ([0-9]+) registers", info))
        print(kernel.__name__, "shared", compiled.metadata.shared, "registers", registers, "spills", spills)
        # The 16-bit kernels (the fast path) and label_supcon's and multihot_supcon's fp32 ones but the
        # atomic backward (3xTF32 on symmetric tiles) must not spill on sm_90 (the H100/H200 of the
        # targets), with the pinned triton or 3.6; the others are reported.
        fp32_checked = (dtype == torch.float32 and kernel.fn.__module__.endswith(("label_supcon_kernels",
                                                                                  "multihot_supcon_kernels"))
                        and kernel.__name__ != "_label_supcon_bwd_atomic_kernel")
        if (dtype in (torch.float16, torch.bfloat16) or fp32_checked) and sys.argv[2] == "90":
            blocks = {k: v for k, v in dict(zip(kernel.arg_names, args), **kwargs).items() if "BLOCK" in k}
            assert spills == 0, (kernel.__name__, blocks, options, info)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MLCONTRAST_COMPILE_CHECK", "0") != "1",
    reason="opt-in (MLCONTRAST_COMPILE_CHECK=1): compiles every kernel to a cubin, about a minute per dtype",
)
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_kernels_compile_for_gpu_without_a_gpu(dtype, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_CHECK, dtype, str(arch)], env=env, capture_output=True, text=True, cwd=_ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    print(result.stdout)  # shared memory, registers and spills of every kernel (pytest -s shows them)
    assert result.stdout.count("shared") == 22, result.stdout


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_torch_compile_traces_into_the_kernels():
    z = torch.randn(512, 64, device="cuda")
    y = torch.randint(0, 10, (512,), device="cuda")

    def loss_fn(a):
        return mlcontrast.label_supcon_loss(a, y, 0.1, normalize=True, backend="triton")

    compiled = torch.compile(loss_fn, fullgraph=True)
    assert_matches(compiled, loss_fn, [z])



_LABEL_SUPCON_STORES = textwrap.dedent(
    """
    import os, re, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from benchmarks.ttgir_label_supcon import label_supcon_ttgir

    for kernel, ttgir in label_supcon_ttgir(getattr(torch, sys.argv[1]), int(sys.argv[2]), arch=90).items():
        lines = [line.strip() for line in ttgir.splitlines()]
        loaded = {m.group(1) for line in lines for m in [re.search(r"= tt.load (%[\\w.]+)", line)] if m}
        stored = [m.group(1) for line in lines for m in [re.match(r"tt.store (%[\\w.]+)", line)] if m]
        print(kernel, "stores", len(stored), "read-modify-writes", sum(pointer in loaded for pointer in stored))
    """
)


@pytest.mark.parametrize("dtype,dim", [("bfloat16", 256), ("float32", 256)])
def test_label_supcon_kernels_never_read_back_what_they_store(dtype, dim):
    # A read-modify-write of a gradient chunk through global memory reads rows that other warps stored
    # (load and store get different layouts) and is safe only behind a barrier. The deterministic backward
    # keeps its dZ slab in registers and stores each element once; fp32 at D = 256 takes the run-time D
    # loop, where the old kernel added chunks past the first into DZ. Checked in the TTGIR for sm_90.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _LABEL_SUPCON_STORES, dtype, str(dim)], env=env, capture_output=True, text=True,
        cwd=_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    found = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert "_label_supcon_bwd_kernel" in found, result.stdout
    assert int(found["_label_supcon_bwd_kernel"][2]) > 0, found  # it does store the gradient
    assert all(int(words[-1]) == 0 for words in found.values()), found
