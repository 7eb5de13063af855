"""The CUDA backend as far as a machine without a GPU can check it.

The extension loads; when it was built with the CUDA sources every op has a CUDA kernel; without a
GPU the "cuda" backend is reported unavailable and asking for it raises RuntimeError saying why; the
kernel files keep the api/kernel split (no torch header in a .cu/.cuh, no cuBLAS-pulling header
anywhere); every op schema has a CUDA implementation in an api file; and, where nvcc is installed,
every kernel file compiles on its own for sm_80 (all tensor-core paths included); and the kernel
templates run on the CPU under an emulation of the CUDA execution model (csrc/cuda/emulation), plain,
with ThreadSanitizer and with AddressSanitizer. The compiled kernels run in tests/test_gpu.py, on a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import mlcontrast
from mlcontrast import _backends
from mlcontrast.ops.contract import FUSED_OPS

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
# The compiled library's ops (forward and backward) from the one table of the contract, and those of them
# whose kernels the CUDA backend has.
OPS = tuple(name for fused in FUSED_OPS.values() for name in (fused.name, fused.backward) if name)
CUDA_OPS = tuple(
    name for fused in FUSED_OPS.values() if "cuda" in fused.backends for name in (fused.name, fused.backward) if name
)


def _extension_error() -> str | None:
    try:
        from mlcontrast import _C  # noqa: F401  (loading it registers the kernels)
    except ImportError as error:
        return str(error)
    return None


def _built_with_cuda() -> bool:
    return _extension_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mlcontrast::label_supcon", "CUDA"
    )


def test_extension_loads():
    assert _extension_error() is None, _extension_error()


@pytest.mark.skipif(not _built_with_cuda(), reason="mlcontrast._C was built without its CUDA kernels")
@pytest.mark.parametrize("op", CUDA_OPS)
def test_every_op_has_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mlcontrast::{op}", "CUDA"), op
    # The CPU kernels stay registered next to them.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mlcontrast::{op}", "CPU"), op


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_backend_is_unavailable_without_a_gpu():
    assert "cuda" not in mlcontrast.available_backends("cpu")
    assert "cuda" not in mlcontrast.available_backends("cuda")
    reason = _backends.why_unavailable("cuda", torch.device("cuda"))
    assert reason is not None and "GPU" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_requesting_cuda_for_cpu_tensors_says_why():
    z = torch.randn(6, 4)
    y = torch.tensor([0, 0, 1, 1, -1, 2])
    with pytest.raises(RuntimeError, match=r'backend "cuda".*CUDA tensors'):
        mlcontrast.label_supcon_loss(z, y, backend="cuda")
    with pytest.raises(RuntimeError, match=r'backend "cuda".*CUDA tensors'):
        mlcontrast.prototype_ce_loss(z, y.clamp(min=0), torch.randn(3, 4), backend="cuda")


@pytest.mark.skipif(not _built_with_cuda(), reason="mlcontrast._C was built without its CUDA kernels")
def test_a_cuda_build_still_dispatches_cpu_tensors_to_the_cpu_kernels():
    z = torch.randn(9, 5, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, -1, 2, 2, 0, 3])
    rows = mlcontrast.label_supcon_loss(z, y, 0.5, reduction="none", backend="cpu")
    expected = mlcontrast.label_supcon_loss(z, y, 0.5, reduction="none", backend="torch")
    torch.testing.assert_close(rows, expected)


def _sources(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in CUDA_DIR.glob(pattern))


def test_kernel_files_include_no_torch_header():
    kernel_files = _sources("*.cu", "*.cuh", "params.h", "launch.h")
    assert kernel_files, "no CUDA kernel sources under csrc/cuda"
    include = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|pybind11)/')
    offenders = [p.name for p in kernel_files if include.search(p.read_text())]
    assert not offenders, f"kernel files must not include torch headers (they compile with nvcc alone): {offenders}"


def test_no_file_pulls_in_cublas_headers():
    # ATen/cuda/CUDAContext.h includes cublas_v2.h and cusparse.h, which some toolkits lack.
    files = [p for p in CUDA_DIR.rglob("*") if p.is_file()]
    offenders = [p.name for p in files if "ATen/cuda/CUDAContext.h" in p.read_text()]
    assert not offenders, offenders


def test_every_schema_has_a_cuda_implementation_in_an_api_file():
    schemas = set(re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "ops.cpp").read_text()))
    assert schemas == set(OPS)
    implemented = set()
    for api in _sources("*_api.cpp"):
        text = api.read_text()
        assert "TORCH_LIBRARY_IMPL(mlcontrast, CUDA, m)" in text, api.name
        implemented |= set(re.findall(r'm\.impl\(\s*"(\w+)"', text))
    assert implemented == set(CUDA_OPS)


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
def test_kernel_files_compile_alone_for_sm80(tmp_path):
    # The flags torch's CUDAExtension passes (no implicit half conversions), plus warnings as output
    # to inspect. sm_80 compiles every tensor-core path (fp16, bf16, TF32 wmma).
    flags = [
        "-std=c++17",
        "-O3",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-Xcompiler",
        "-Wall",
    ]

    def compile_one(source: Path) -> tuple[str, subprocess.CompletedProcess]:
        out = tmp_path / (source.stem + ".o")
        cmd = [_nvcc(), *flags, "-c", str(source), "-o", str(out)]
        return source.name, subprocess.run(cmd, capture_output=True, text=True)

    sources = _sources("*.cu")
    with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_one, sources))
    for name, result in results:
        assert result.returncode == 0, f"{name}:\n{result.stderr[-4000:]}"
        assert "warning" not in result.stderr.lower(), f"{name}:\n{result.stderr[-4000:]}"


# ----------------------------------------------------------------------------------------------
# The kernel templates run on the CPU (csrc/cuda/emulation): results, races, bounds
# ----------------------------------------------------------------------------------------------

EMULATION_DIR = CUDA_DIR / "emulation"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (cuda_fp16.h and friends), if there is one."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = _nvcc()
    if nvcc:
        real = Path(nvcc).resolve()
        text = real.read_bytes()[:4096] if real.is_file() else b""
        match = re.search(rb"(/\S+/bin/nvcc)\b", text) if text.startswith(b"#!") else None
        roots.append(str(Path(match.group(1).decode()).parent.parent) if match else str(real.parent.parent))
    roots += sorted((str(p) for p in Path("/usr/local").glob("cuda*")), reverse=True)
    for root in roots:
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


def _compile_emulator(out: Path, sanitize: str | None) -> Path:
    cmd = [
        os.environ.get("CXX", "g++"),
        "-std=c++20",
        "-O1",
        "-g",
        "-pthread",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        f"-I{_cuda_include()}",
        str(EMULATION_DIR / "emulate_kernels.cpp"),
        "-o",
        str(out),
    ]
    if sanitize:
        cmd.insert(1, f"-fsanitize={sanitize}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


needs_emulator = pytest.mark.skipif(
    _cuda_include() is None or shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="needs the CUDA headers (cuda_fp16.h) and a C++20 compiler",
)


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    """The emulator built plain, with ThreadSanitizer and with AddressSanitizer (compiled in parallel)."""
    folder = tmp_path_factory.mktemp("emulation")
    kinds = {"plain": None, "thread": "thread", "address": "address"}
    with ThreadPoolExecutor(max_workers=max(1, min(3, os.cpu_count() or 1))) as pool:
        futures = {k: pool.submit(_compile_emulator, folder / f"emulate_{k}", s) for k, s in kinds.items()}
        return {k: f.result() for k, f in futures.items()}


class _Emulation:
    """Writes the inputs of one kernel run, runs the emulator, reads the outputs."""

    def __init__(self, binary: Path, folder: Path):
        self.binary, self.folder = binary, folder

    def file(self, name: str, tensor: torch.Tensor | None = None) -> str:
        path = self.folder / name
        if tensor is not None:
            tensor.contiguous().view(torch.uint8).numpy().tofile(path)
        return str(path)

    def read(self, name: str, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        raw = torch.from_numpy(np.fromfile(self.folder / name, dtype=np.uint8))
        return raw.view(dtype).reshape(shape).clone()

    def run(self, *args) -> str:
        env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66", ASAN_OPTIONS="detect_leaks=0")
        result = subprocess.run([str(self.binary), *map(str, args)], capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"{args[:7]}\n{result.stderr[-6000:]}"
        return result.stdout


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), a
    return (a - e).norm().item() / max(e.norm().item(), 1e-30)


# (dtype, tensor cores) of every label_supcon kernel configuration, with the tolerances of the
# forward (row LSE) and the backward (G Z) against fp64. fp16/bf16 products are exact in fp32; the
# backward rounds G to the element type (and TF32 rounds both operands to 10 mantissa bits).
SUPCON_CONFIGS = [
    (torch.float32, 0, 1e-6, 1e-5),
    (torch.float32, 1, 5e-4, 3e-3),
    (torch.float16, 0, 1e-6, 1e-5),
    (torch.float16, 1, 1e-6, 2e-3),
    (torch.bfloat16, 0, 1e-6, 1e-5),
    (torch.bfloat16, 1, 1e-6, 1e-2),
    (torch.float64, 0, 1e-14, 1e-14),
]


def _check_supcon(
    emu: _Emulation, dtype, tc, fwd_tol, bwd_tol, n, d, inv_t=10.0, anchors=None, shifted=False, roles=None
):
    """One forward and one backward run against fp64; ``shifted``: with the logit bound c (the fixed-shift
    forward and the one-exp backward), else the online max and two exps. ``roles``: ``(col_begin, grad_end)``
    (params.h): the anchors' contrast rows are those from col_begin on, and only the rows in
    [col_begin, grad_end) take the other anchors' terms."""
    begin, end = anchors if anchors is not None else (0, n)
    col_begin, grad_end = roles if roles is not None else (0, n)
    extra_fwd, extra_bwd = ((col_begin,), (col_begin, grad_end)) if roles is not None else ((), ())
    z = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)
    zd = z.double()
    bound = (zd.norm(dim=1).max() ** 2 * inv_t).item()  # c = max |z|^2 / t, as the api computes it
    shift = repr(bound) if shifted else "-"
    emu.run(
        "supcon_fwd", DTYPE_NAMES[dtype], tc, n, d, inv_t, begin, end, shift, emu.file("z", z), emu.file("lse"),
        *extra_fwd,
    )  # fmt: skip
    lse = emu.read("lse", _acc(dtype), n)
    s = zd @ zd.T * inv_t
    s.fill_diagonal_(-float("inf"))
    columns = torch.arange(n) >= col_begin  # each anchor's contrast rows
    expected = torch.logsumexp(s.masked_fill(~columns[None, :], -float("inf")), 1)
    assert not lse[:begin].any() and not lse[end:].any(), "rows outside the anchors are not written"
    empty = expected[begin:end].isneginf()  # no contrast row but itself: LSE -inf (a lone row)
    assert torch.equal(lse[begin:end].isneginf(), empty), "an anchor without contrast rows has LSE -inf"
    if (~empty).any():
        assert _rel(lse[begin:end][~empty], expected[begin:end][~empty]) <= fwd_tol, (
            DTYPE_NAMES[dtype], tc, n, d, begin, end, roles
        )  # fmt: skip

    w = torch.randn(n, dtype=_acc(dtype))
    w[::3] = 0  # rows without positives: weight 0, LSE +inf
    w[:begin] = 0  # rows outside the anchors have no loss
    w[end:] = 0
    w[expected.isneginf()] = 0  # nor do anchors without contrast rows
    lse_eff = torch.where(w != 0, expected.to(_acc(dtype)), torch.full_like(w, float("inf")))
    g_scale = 0.0 if dtype in (torch.float32, torch.float64) else min(n, 2**14) / max(w.abs().max().item(), 1e-30)
    alpha = torch.where(w != 0, w * torch.exp(bound - lse_eff), torch.zeros_like(w))
    emu.run(
        "supcon_bwd", DTYPE_NAMES[dtype], tc, n, d, inv_t, begin, end, g_scale, shift,
        emu.file("z", z), emu.file("w", w), emu.file("lse_eff", lse_eff), emu.file("alpha", alpha), emu.file("dz"),
        *extra_bwd,
    )  # fmt: skip
    dz = emu.read("dz", _acc(dtype), n, d)
    wd, ld = w.double(), lse_eff.double()
    rows = torch.arange(n)
    side = (rows >= col_begin) & (rows < grad_end)  # the rows that take the other anchors' terms
    own = (wd[:, None] * torch.exp(s - ld[:, None])).nan_to_num(0.0) * columns[None, :]
    others = (wd[None, :] * torch.exp(s - ld[None, :])).nan_to_num(0.0) * side[:, None]
    g = own + others
    g.fill_diagonal_(0.0)
    expected_dz = g @ zd
    takes_none = ~side & ((rows < begin) | (rows >= end))
    assert not dz[takes_none].any(), "rows that are neither anchors nor contrast rows below grad_end get 0"
    if expected_dz.norm() == 0:
        assert not dz.any()
    else:
        error = _rel(dz, expected_dz)
        assert error <= bwd_tol, (DTYPE_NAMES[dtype], tc, n, d, begin, end, roles, error)


# (n, d, anchors, (col_begin, grad_end)) of the emulated label_supcon kernels with roles: a batch with
# detached reference rows (grad_end at the batch's end), a batch against a memory only (col_begin past the
# anchors; grad_end 0: the memory detached, or n), anchors that are contrast rows past grad_end, and
# anchors straddling col_begin and grad_end off the tile grid.
ROLE_CASES = [
    (150, 9, (0, 40), (0, 40)),
    (150, 9, (0, 40), (40, 0)),
    (150, 9, (0, 40), (40, 150)),
    (130, 20, (0, 70), (0, 0)),
    (200, 20, (30, 150), (70, 100)),
]


@needs_emulator
@pytest.mark.parametrize("dtype,tc,fwd_tol,bwd_tol", SUPCON_CONFIGS, ids=lambda v: str(v))
def test_emulated_label_supcon_kernels(emulators, tmp_path, dtype, tc, fwd_tol, bwd_tol):
    emu = _Emulation(emulators["plain"], tmp_path)
    # n: one row, less than a tile, a partial second tile; d: 1, odd, vector widths, more than one
    # D chunk and more than one D slice of the backward (DP = 128 for fp16/bf16).
    for shifted in (False, True):
        for n, d in [(1, 3), (5, 8), (70, 33), (130, 136), (64, 1)]:
            _check_supcon(emu, dtype, tc, fwd_tol, bwd_tol, n, d, shifted=shifted)
        # Anchors (a process group's own rows): in the middle, off the tile grid, across a tile
        # boundary; at the start and end; none.
        for n, d, anchors in [(200, 20, (70, 135)), (150, 9, (0, 40)), (150, 9, (110, 150)), (40, 5, (17, 17))]:
            _check_supcon(emu, dtype, tc, fwd_tol, bwd_tol, n, d, anchors=anchors, shifted=shifted)
        # Roles (reference rows, a batch against a memory): ROLE_CASES.
        for n, d, anchors, roles in ROLE_CASES:
            _check_supcon(emu, dtype, tc, fwd_tol, bwd_tol, n, d, anchors=anchors, shifted=shifted, roles=roles)


@needs_emulator
@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_emulated_label_supcon_kernels_are_race_free_and_in_bounds(emulators, tmp_path, sanitizer):
    # ThreadSanitizer: every shared-memory access is ordered by the kernels' barriers;
    # AddressSanitizer: no access outside the exactly-sized input and output buffers.
    emu = _Emulation(emulators[sanitizer], tmp_path)
    for dtype, tc, fwd_tol, bwd_tol in SUPCON_CONFIGS:
        # Anchors 20 .. 45: row blocks that visit every column tile and some that visit only the anchors'.
        for shifted in (False, True):
            d = 33 if dtype != torch.float16 else 136
            _check_supcon(emu, dtype, tc, fwd_tol, bwd_tol, 70, d, anchors=(20, 45), shifted=shifted)
        # Roles: blocks that visit only the contrast rows, only the anchors, both, or nothing.
        _check_supcon(emu, dtype, tc, fwd_tol, bwd_tol, 70, 33, anchors=(0, 45), shifted=True, roles=(20, 30))


def _check_prototype_nce(emu: _Emulation, dtype, b, c, d, inv_t=1 / 0.07):
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    z = torch.randn(b * c, d, dtype=torch.float64)
    if dtype != torch.float16:
        z[0] = 0  # a zero row: the eps clamp (its gradient, ~1e8, overflows fp16)
    z = z.to(dtype)
    unit_p = torch.nn.functional.normalize(torch.randn(c, d, dtype=torch.float64), dim=1, eps=1e-8).to(_acc(dtype))
    emu.run(
        "nce_fwd", DTYPE_NAMES[dtype], b * c, c, d, inv_t,
        emu.file("z", z), emu.file("p", unit_p), emu.file("l"), emu.file("n"),
    )  # fmt: skip
    logits = emu.read("l", _acc(dtype), b * c)
    zd, pd = z.double(), unit_p.double()
    norm = zd.norm(dim=1).clamp_min(1e-8)
    classes = torch.arange(b * c) % c
    expected = (zd * pd[classes]).sum(1) / norm * inv_t
    assert _rel(logits, expected) <= tol
    assert _rel(emu.read("n", _acc(dtype), b * c), norm) <= tol  # the op's saved norms

    dlogits = torch.randn(b * c, dtype=_acc(dtype))
    emu.run(
        "nce_bwd", DTYPE_NAMES[dtype], b * c, c, d, inv_t,
        emu.file("z", z), emu.file("p", unit_p), emu.file("dl", dlogits), emu.file("gz"), emu.file("gp"),
    )  # fmt: skip
    grad_z = emu.read("gz", dtype, b * c, d)
    grad_p = emu.read("gp", _acc(dtype), c, d)
    ds = dlogits.double() * inv_t
    u = zd / norm[:, None]
    radial = torch.where(zd.norm(dim=1) > 1e-8, ds * (u * pd[classes]).sum(1), torch.zeros_like(ds))
    expected_z = (ds[:, None] * pd[classes] - u * radial[:, None]) / norm[:, None]
    expected_p = torch.zeros(c, d, dtype=torch.float64).index_add_(0, classes, ds[:, None] * u)
    out_tol = {torch.float16: 1e-3, torch.bfloat16: 5e-3}.get(dtype, tol)  # grad_z is rounded to dtype
    assert _rel(grad_z, expected_z) <= out_tol
    assert _rel(grad_p, expected_p) <= tol


def _nce_grid(emu: _Emulation, b: int, c: int, d: int, dtype=torch.float32) -> dict[str, tuple[int, ...]]:
    """The prototype_nce backward's split and grids as the launcher computes them (nce::split_for,
    nce::prototypes_grid, nce::partials_grid), printed by the emulator."""
    words = emu.run("nce_grid", DTYPE_NAMES[dtype], b, c, d).split()
    values, key = {}, None
    for word in words:
        if word.isdigit():
            values[key] = values.get(key, ()) + (int(word),)
        else:
            key = word
    return values


# (B, C, D) of the emulated prototype_nce runs: one of everything; fewer samples than a split needs
# (one run); odd B in several runs of 5 with a shorter last one (13 = 5 + 5 + 3, 9 = 5 + 4).
NCE_SHAPES = [(1, 1, 1), (3, 5, 33), (9, 2, 300), (13, 3, 33)]


@needs_emulator
def test_prototype_nce_backward_grid_fills_a_gpu(emulators, tmp_path):
    # Issue 13 defect 9: the grad_prototypes kernel ran C x ceil(D / 128) blocks (160 at C = 80,
    # D = 256), each serial over B. Splitting B must give an H200 (132 SMs) at least 4 blocks per SM
    # at the target shapes, within the Triton kernel's cap of 1024 programs.
    emu = _Emulation(emulators["plain"], tmp_path)
    for b in (64, 512):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            grid = _nce_grid(emu, b, 80, 256, dtype)["prototypes_grid"]
            blocks = grid[0] * grid[1] * grid[2]
            assert 4 * 132 <= blocks <= 1024, (b, dtype, grid)
    # The emulated shapes take the paths they are there for.
    splits = {shape: _nce_grid(emu, *shape)["splits"][0] for shape in NCE_SHAPES}
    assert splits == {(1, 1, 1): 1, (3, 5, 33): 1, (9, 2, 300): 2, (13, 3, 33): 3}, splits
    assert _nce_grid(emu, 13, 3, 33)["per_split"] == (5,)


@needs_emulator
@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=str)
def test_emulated_prototype_nce_kernels(emulators, tmp_path, dtype):
    emu = _Emulation(emulators["plain"], tmp_path)
    for b, c, d in NCE_SHAPES:
        _check_prototype_nce(emu, dtype, b, c, d)


def _check_segment_sum(emu: _Emulation, dtype, rows, d, segments, weighted):
    # x in any dtype, read as it is (16-bit features get no fp32 copy); weights and sums in Acc.
    x = torch.randn(rows, d, dtype=torch.float64).to(dtype)
    weight = torch.randn(rows, dtype=_acc(dtype))
    labels = torch.randint(0, segments, (rows,))
    labels[labels == segments - 1] = 0  # an empty segment
    order = torch.sort(labels, stable=True).indices
    offsets = torch.searchsorted(labels[order], torch.arange(segments + 1))
    emu.run(
        "segment_sum", DTYPE_NAMES[dtype], rows, d, segments, int(weighted), emu.file("x", x),
        emu.file("w", weight) if weighted else "-", emu.file("o", order), emu.file("off", offsets), emu.file("s"),
    )  # fmt: skip
    out = emu.read("s", _acc(dtype), segments, d)
    values = x.double() * (weight.double()[:, None] if weighted else 1)
    expected = torch.zeros(segments, d, dtype=torch.float64).index_add_(0, labels, values)
    assert _rel(out, expected) <= (1e-12 if dtype == torch.float64 else 1e-5)
    assert not out[segments - 1].any()


@needs_emulator
@pytest.mark.parametrize("sanitizer", ["plain", "thread", "address"])
def test_emulated_segment_sum_and_prototype_kernels(emulators, tmp_path, sanitizer):
    emu = _Emulation(emulators[sanitizer], tmp_path)
    rows, d, segments = (300, 70, 7) if sanitizer == "plain" else (40, 33, 3)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        _check_segment_sum(emu, dtype, rows, d, segments, weighted=True)
        _check_segment_sum(emu, dtype, 5, 1, 3, weighted=False)
    if sanitizer != "plain":
        _check_prototype_nce(emu, torch.float16, 3, 5, 33)
        _check_prototype_nce(emu, torch.float32, 13, 3, 33)  # split prototype gradient, partials summed


# ----------------------------------------------------------------------------------------------
# multihot_supcon: the pair kernels (multihot_supcon.cuh), and "mulsupcon" on label_supcon's kernels
# as the api runs it, against reference.py
# ----------------------------------------------------------------------------------------------

# (dtype, tensor cores, tolerance of the per-row losses, of the gradient) against the fp64 reference. TF32
# rounds the similarity products to 10 mantissa bits (|s| <= 10 here).
MULTIHOT_CONFIGS = [
    (torch.float32, 0, 1e-5, 1e-5),
    (torch.float32, 1, 2e-3, 2e-3),
    (torch.float64, 0, 1e-12, 1e-12),
]
MULTIHOT_MODES = ("jaccard", "any", "all", "mulsupcon")


def _multihot_targets(n: int, c: int, seed: int) -> torch.Tensor:
    """``[n, c]`` uint8 label sets of about 3 labels (at most half of c), rows 0 and n // 2 without labels and
    row 2 repeating row 1's set."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, c, generator=g) < min(0.5, 3 / c)).to(torch.uint8)
    targets[0] = 0
    targets[n // 2] = 0
    if n > 2:
        targets[2] = targets[1]
    return targets


def _check_multihot(emu: _Emulation, dtype, tc, loss_tol, grad_tol, positives, n, d, c, threshold=0.5, anchors=None,
                    shifted=True, seed=0, grad_stop=None):  # fmt: skip
    """The op's forward and backward composed from the emulated kernels as the api composes them
    (csrc/cuda/multihot_supcon_api.cpp, shared/multihot_supcon.h), against the reference's per-row losses,
    positive counts and gradient. ``shifted``: the backward's one exp per pair (else two exps); ``grad_stop``:
    the rows from it on take no contrast-role gradient (a detached memory)."""
    from mlcontrast import reference
    from mlcontrast.ops.multihot_supcon import _mulsupcon_positive_grad, _mulsupcon_positives

    begin, end = anchors if anchors is not None else (0, n)
    temperature, base_temperature = 0.1, 0.07
    inv_t, scale = 1 / temperature, temperature / base_temperature
    acc = _acc(dtype)
    torch.manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)
    zd = z.double()
    targets = _multihot_targets(n, c, seed)
    bound = (zd.norm(dim=1).max() ** 2 * inv_t).item()  # c = max |z|^2 / t, as the api computes it
    common = (DTYPE_NAMES[dtype], tc, n, d, c, inv_t, begin, end)
    emu.run(
        "multihot_fwd", *common, repr(bound), positives, threshold, emu.file("z", z), emu.file("y", targets),
        emu.file("lse"), emu.file("count"), emu.file("coef"), emu.file("b"),
    )  # fmt: skip
    lse, count, coef, b = (emu.read(name, acc, n) for name in ("lse", "count", "coef", "b"))
    if positives == "mulsupcon":
        count, b = _mulsupcon_positives(z, targets, begin, end, temperature, acc)
        coef = count.clone()
    outside = torch.cat([lse[:begin], lse[end:], count[:begin], count[end:], coef[:begin], coef[end:]])
    assert not outside.any(), "rows outside the anchors are not written"
    if end == begin:
        return
    if n == 1:
        assert lse.isneginf().all() and not count.any(), "a lone row: nothing to contrast with, no positives"
        return
    loss = torch.where(count > 0, (coef * lse - b) * scale, torch.zeros((), dtype=acc))

    zr = zd.clone().requires_grad_()
    expected, expected_k = reference.multihot_supcon_anchor_rows(
        zr, targets, temperature, base_temperature, positives, threshold, False, begin, end, grad_stop
    )
    if positives == "mulsupcon":
        assert torch.equal(count[begin:end].long(), expected_k), "label anchors"
    else:
        y = targets.double()
        not_self = torch.arange(begin, end)[:, None] != torch.arange(n)[None, :]
        weight, positive = reference._multihot_positives(y[begin:end], y, not_self, positives, threshold)
        assert torch.equal(count[begin:end].long(), positive.sum(1)), "|P(i)|"
        k = positive.sum(1).clamp(min=1)
        assert _rel(coef[begin:end], weight.sum(1) / k) <= loss_tol
    assert _rel(loss[begin:end], expected) <= loss_tol, (DTYPE_NAMES[dtype], tc, positives, n, d, c, anchors)

    upstream = torch.randn(n, dtype=torch.float64)
    (expected * upstream[begin:end]).sum().backward()
    # shared/multihot_supcon.h's backward_weights, from the emulated forward's statistics
    rows = torch.arange(n)
    has_loss = (count > 0) & (rows >= begin) & (rows < end)
    a = torch.where(has_loss, upstream.to(acc) / base_temperature, torch.zeros((), dtype=acc))
    w = a * coef
    lse_eff = torch.where(w != 0, lse, torch.full_like(lse, float("inf")))
    pair = a / count.clamp(min=1)
    alpha = torch.where(w != 0, w * torch.exp(bound - lse_eff), torch.zeros_like(w))
    g_scale = 0.0  # fp16: the api's scale of G (cuda/supcon_shift.h)
    if dtype == torch.float16:
        largest = w.abs().max() + (pair.abs().max() if positives != "mulsupcon" else 0)
        g_scale = min(n, 2**14) / max(largest.item(), 1e-30)
    emu.run(
        "multihot_bwd", *common, g_scale, repr(bound) if shifted else "-", positives, threshold, emu.file("z", z),
        emu.file("y", targets), emu.file("w", w), emu.file("lse_eff", lse_eff), emu.file("pair", pair),
        emu.file("alpha", alpha), emu.file("dz"), *(() if grad_stop is None else (grad_stop,)),
    )  # fmt: skip
    dz = emu.read("dz", acc, n, d)
    if positives == "mulsupcon":
        dz += _mulsupcon_positive_grad(z, targets, a, acc, grad_stop)  # the class sums' part (negated)
    assert _rel(dz, zr.grad) <= grad_tol, (DTYPE_NAMES[dtype], tc, positives, n, d, c, anchors, _rel(dz, zr.grad))


# (n, d, c): a lone row; fewer rows than a tile; prime n and d with one mask word (c = 13), with C = 80
# (two words, the staged path) and with C = 300 (five words: read from global memory); two column tiles.
MULTIHOT_SHAPES = [(1, 3, 4), (7, 5, 3), (67, 9, 13), (131, 17, 80), (53, 6, 300), (130, 33, 64)]


@needs_emulator
@pytest.mark.parametrize("dtype,tc,loss_tol,grad_tol", MULTIHOT_CONFIGS, ids=lambda v: str(v))
@pytest.mark.parametrize("positives", MULTIHOT_MODES)
def test_emulated_multihot_supcon_kernels(emulators, tmp_path, dtype, tc, loss_tol, grad_tol, positives):
    emu = _Emulation(emulators["plain"], tmp_path)
    for index, (n, d, c) in enumerate(MULTIHOT_SHAPES):
        _check_multihot(emu, dtype, tc, loss_tol, grad_tol, positives, n, d, c, shifted=index % 2 == 0, seed=index)
    # Anchors (a process group's own rows): across a tile boundary, at the start and the end, none; an
    # overlap exactly at the threshold (1/3: o = 1, u = 3) counts.
    anchor_cases = [(150, 20, 7, (70, 135)), (100, 9, 5, (0, 40)), (100, 9, 5, (60, 100)), (40, 5, 5, (17, 17))]
    for n, d, c, anchors in anchor_cases:
        _check_multihot(emu, dtype, tc, loss_tol, grad_tol, positives, n, d, c, 1 / 3, anchors, shifted=n != 100)
    # A batch against a detached memory (grad_stop at the batch, inside a tile and on its boundary), and
    # anchors partly past grad_stop (their own gradient only).
    for n, d, c, anchors, grad_stop in [(150, 20, 7, (0, 40), 40), (130, 9, 13, (0, 64), 64), (90, 8, 5, (10, 50), 30)]:
        _check_multihot(emu, dtype, tc, loss_tol, grad_tol, positives, n, d, c, 1 / 3, anchors, shifted=n != 130,
                        grad_stop=grad_stop)  # fmt: skip


@needs_emulator
@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_emulated_multihot_supcon_kernels_are_race_free_and_in_bounds(emulators, tmp_path, sanitizer):
    # The column tile's label sets are staged between the barriers of the similarity product; fp16 on
    # tensor cores has the fullest shared memory (label_supcon's tolerances).
    emu = _Emulation(emulators[sanitizer], tmp_path)
    configs = [*MULTIHOT_CONFIGS, (torch.float16, 1, 2e-3, 2e-3)]
    for dtype, tc, loss_tol, grad_tol in configs:
        for c in (13, 300):
            _check_multihot(emu, dtype, tc, loss_tol, grad_tol, "jaccard", 70, 33, c, 1 / 3, (20, 45), shifted=c == 13)
