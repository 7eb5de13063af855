"""Build of mlcontrast and its compiled extension ``mlcontrast._C``.

Environment switches:

* ``MLCONTRAST_BUILD_CUDA``: ``auto`` (default) builds the CUDA kernels of ``csrc/cuda/`` when torch is a
  CUDA build and nvcc is found; ``1`` forces them and fails loudly when that is impossible; ``0`` skips them.
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures (default ``8.0;9.0``; the tensor-core kernels need 8.0 or
  newer, older architectures get the SIMT kernels). Add ``+PTX`` to the last one to run on newer GPUs.
* ``MAX_JOBS``: parallel compile jobs (ninja).
* ``NVCC_THREADS``: threads of one nvcc call, which compiles the architectures of a .cu file in parallel
  (default 1; each thread needs about 1 GB of memory).
* ``CUDA_HOME``: the CUDA toolkit; found from ``nvcc`` on PATH when unset (wrapper scripts are followed).
* ``MLCONTRAST_DEBUG=1``: ``-O0 -g``.

``setup.py`` imports torch, so install with ``pip install --no-build-isolation``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_of_nvcc(nvcc: str) -> str | None:
    """The toolkit folder of an nvcc binary, following a wrapper script that execs the real one."""
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"#!"):
        match = re.search(rb"(/\S+/bin/nvcc)\b", head)
        return _toolkit_of_nvcc(match.group(1).decode()) if match else None
    home = os.path.dirname(os.path.dirname(nvcc))
    return home if os.path.isdir(os.path.join(home, "include")) else None


def find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_of_nvcc(nvcc)
        if home:
            return home
    for candidate in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def cuda_wanted(cuda_sources: list[str]) -> bool:
    mode = os.environ.get("MLCONTRAST_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"MLCONTRAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    import torch

    reasons = []
    if not cuda_sources:
        reasons.append("there are no CUDA sources under csrc/cuda/")
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if os.environ.get("CUDA_HOME") is None:
        reasons.append("no CUDA toolkit was found (set CUDA_HOME, or put nvcc on PATH)")
    if reasons and mode == "1":
        sys.exit("MLCONTRAST_BUILD_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
    if reasons:
        print("mlcontrast: building the CPU kernels only: " + "; ".join(reasons), file=sys.stderr)
    return not reasons


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("MLCONTRAST_DEBUG", "0") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-fopenmp"]
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]

    if cuda_wanted(cuda_sources):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # -lineinfo costs nothing at run time and lets compute-sanitizer name source lines. No
        # --use_fast_math: the fp32 kernels are held to 1e-4 against fp64.
        nvcc_flags = ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["--expt-relaxed-constexpr"]
        nvcc_threads = os.environ.get("NVCC_THREADS", "1").strip()
        if not nvcc_threads.isdigit() or int(nvcc_threads) < 1:
            sys.exit(f"NVCC_THREADS must be a positive integer, got {nvcc_threads!r}")
        if int(nvcc_threads) > 1:
            nvcc_flags += ["--threads", nvcc_threads]
        return [
            CUDAExtension(
                "mlcontrast._C",
                cpp_sources + cuda_sources,
                include_dirs=include_dirs,
                define_macros=[("MLCONTRAST_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=["-fopenmp"],
                py_limited_api=True,
            )
        ]
    return [
        CppExtension(
            "mlcontrast._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["mlcontrast", "mlcontrast.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
