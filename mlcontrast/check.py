"""``python -m mlcontrast.check``: does every fused backend compute the right thing on this machine?

Prints the environment (versions, the device, which backends are available and why the others are
not), then runs every fused op with every available fused backend in every dtype the backend supports
on the device, on small problems (odd sizes, ignored rows, an absent class), against the dense reference
of :mod:`mlcontrast.reference`: one line per case with the relative error by norm of the loss and of the
gradients (their largest), judged by the tolerance table of :mod:`mlcontrast._tolerances`. Exits with
status 1 if any case fails.

    python -m mlcontrast.check                         # the current device: CUDA if available, else CPU
    python -m mlcontrast.check --device cpu --backends cpu --json check.json

The same check, for one backend and dtype, is what the first-use check (:mod:`mlcontrast._first_use`)
runs before ``"auto"`` trusts a GPU backend (``mlcontrast/__init__.py`` hands it :func:`run_checks`: this
module imports the public functions, so the first-use check, under them, cannot import it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mlcontrast import _backends, _extension, functional
from mlcontrast._base import dtype_name, interpreting, tf32_allowed
from mlcontrast._first_use import BackendMismatchWarning
from mlcontrast._tolerances import TOLERANCES, reference_dtype, relative_error, within_tolerance

__all__ = [
    "OPS", "BackendMismatchWarning", "CheckResult", "default_dtypes", "environment", "main", "run_check", "run_checks",
]

#: The fused ops, by the names that ``mlcontrast._measured`` and the first-use check use.
OPS = ("label_supcon", "prototype_nce", "prototype_ce", "update_prototypes", "multihot_supcon", "label_supcon_queue")
FUSED = ("cpu", "triton", "cuda")

# Small on purpose (the interpreted Triton path runs them on CPUs), and odd: no size is a multiple of a
# tile, some rows are ignored, one class has a single row and one prototype's class is absent; the
# multi-hot case has rows without labels, unknown (-1) entries and _M reference rows.
_N, _D, _C, _B, _M = 37, 33, 7, 11, 13
_SEED = 1234


@dataclass
class CheckResult:
    """One case: ``op`` on ``backend`` in ``dtype``; errors are relative by norm (None: not computed)."""

    op: str
    backend: str
    dtype: str
    device: str
    passed: bool
    loss_rel_err: float | None
    grad_rel_err: float | None
    seconds: float
    error: str | None = None
    tf32: bool = False  # fp32 on CUDA with TF32 products: judged by the fp16 tolerance (10 mantissa bits)

    def line(self) -> str:
        def err(value: float | None) -> str:
            return "-" if value is None else f"{value:.1e}"

        verdict = "PASS" if self.passed else "FAIL"
        dtype = self.dtype + ("/tf32" if self.tf32 else "")
        text = f"{self.op:<18} {self.backend:<7} {dtype:<12} {verdict}  loss {err(self.loss_rel_err):>8}"
        text += f"  grad {err(self.grad_rel_err):>8}  {self.seconds * 1e3:8.1f} ms"
        return text + (f"  {self.error}" if self.error else "")


# ------------------------------------------------------------------------------------------------
# The problems: fp32 tensors made on the CPU from a private generator (the caller's random state is
# left alone), as (float inputs, integer inputs).
# ------------------------------------------------------------------------------------------------


def _labels(gen: torch.Generator, n: int, classes: int) -> torch.Tensor:
    labels = torch.randint(0, classes - 2, (n,), generator=gen)  # classes - 1 stays absent
    labels[torch.rand(n, generator=gen) < 0.2] = -1
    labels[0] = classes - 2  # the only row of its class: no positives
    return labels


def _targets(gen: torch.Generator, b: int, c: int) -> torch.Tensor:
    u = torch.rand(b, c, generator=gen)
    targets = (u < 0.35).long()
    targets[u > 0.8] = -1
    return targets


def _problem(op: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(_SEED)
    if op == "multihot_supcon":  # features and ref rows; targets and ref targets (some rows without labels)
        floats = [torch.randn(_N, _D, generator=gen), torch.randn(_M, _D, generator=gen)]
        return floats, [_targets(gen, _N, _C), _targets(gen, _M, _C)]
    if op == "label_supcon":
        return [torch.randn(_N, _D, generator=gen)], [_labels(gen, _N, _C)]
    if op == "label_supcon_queue":  # the batch, then a detached queue of _M rows (ignored rows on both sides)
        floats = [torch.randn(_B, _D, generator=gen), torch.randn(_M, _D, generator=gen)]
        return floats, [_labels(gen, _B, _C), _labels(gen, _M, _C)]
    if op == "prototype_nce":
        return [torch.randn(_B, _C, _D, generator=gen), torch.randn(_C, _D, generator=gen)], [_targets(gen, _B, _C)]
    if op == "prototype_ce":
        return [torch.randn(_N, _D, generator=gen), torch.randn(_C, _D, generator=gen)], [_labels(gen, _N, _C)]
    prototypes = F.normalize(torch.randn(_C, _D, generator=gen), dim=1)
    return [prototypes, torch.randn(_N, _D, generator=gen)], [_labels(gen, _N, _C)]


def _call(op: str, backend: str, floats: list[torch.Tensor], ints: list[torch.Tensor]) -> torch.Tensor:
    """The public function of ``op`` with ``backend`` (``"torch"`` is the reference)."""
    if op == "label_supcon":
        return functional.label_supcon_loss(floats[0], ints[0], 0.1, 0.07, normalize=True, backend=backend)
    if op == "label_supcon_queue":
        return functional.label_supcon_loss(floats[0], ints[0], 0.1, 0.07, normalize=True, ref_features=floats[1],
                                            ref_labels=ints[1], backend=backend)  # fmt: skip
    if op == "prototype_nce":
        return functional.prototype_nce_loss(floats[0], floats[1], ints[0], 0.07, backend=backend)
    if op == "prototype_ce":
        return functional.prototype_ce_loss(floats[0], ints[0], floats[1], 0.1, backend=backend)
    if op == "multihot_supcon":
        return functional.multihot_supcon_loss(floats[0], ints[0], 0.1, 0.07, normalize=True, ref_features=floats[1],
                                               ref_targets=ints[1], backend=backend)  # fmt: skip
    return functional.update_prototypes_(floats[0], floats[1], ints[0], momentum=0.9, backend=backend)


def _evaluate(op: str, backend: str, floats, ints) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output and the gradients of its float inputs (none for the in-place prototype update)."""
    if op == "update_prototypes":
        out = _call(op, backend, [floats[0].clone(), floats[1]], ints)
        return out, []
    leaves = [t.detach().clone().requires_grad_() for t in floats]
    if op == "label_supcon_queue":
        leaves[1].requires_grad_(False)  # the queue is detached: only the batch gets a gradient
    out = _call(op, backend, leaves, ints)
    return out.detach(), list(torch.autograd.grad(out, [t for t in leaves if t.requires_grad]))


@contextlib.contextmanager
def _tf32(enabled: bool | None):
    """TF32 for fp32 CUDA matmuls on (True) or off (False) inside, through the switch torch has; None:
    as it is."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    if enabled is None:
        yield
        return
    old = getattr(matmul, name)
    setattr(matmul, name, ("tf32" if enabled else "ieee") if name == "fp32_precision" else enabled)
    try:
        yield
    finally:
        setattr(matmul, name, old)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _eager_grad_mode(device: torch.device):
    # The first-use check may run inside a caller's no_grad / inference_mode / autocast region.
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        if device.type in ("cuda", "cpu"):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        yield


def run_check(
    op: str, backend: str, device: torch.device | str, dtype: torch.dtype, tf32: bool | None = None
) -> CheckResult:
    """``op`` on ``backend`` in ``dtype`` against the reference (fp64 for fp32/fp64, fp32 for 16-bit).

    ``tf32`` switches TF32 for fp32 CUDA matmuls on or off for the case (None: as the process has it);
    fp32 with TF32 on CUDA is judged by the fp16 tolerance, as tests/test_gpu.py does.

    Example:
        >>> run_check("prototype_ce", "cpu", "cpu", torch.float32).passed
        True
    """
    device = torch.device(device)
    floats, ints = _problem(op)
    floats = [t.to(dtype).to(device) for t in floats]
    ints = [t.to(device) for t in ints]
    result = CheckResult(op, backend, dtype_name(dtype), str(device), False, None, None, 0.0)
    with _eager_grad_mode(device), _tf32(tf32):
        result.tf32 = dtype == torch.float32 and device.type == "cuda" and tf32_allowed()
        judge = torch.float16 if result.tf32 else dtype
        start = time.perf_counter()
        try:
            out, grads = _evaluate(op, backend, floats, ints)
            _synchronize(device)
        except Exception as error:  # a kernel that raises fails its case; the others still run
            result.seconds = time.perf_counter() - start
            result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
            return result
        result.seconds = time.perf_counter() - start
        upcast = [t.to(reference_dtype(dtype)) for t in floats]
        expected, expected_grads = _evaluate(op, "torch", upcast, ints)
    result.loss_rel_err = relative_error(out, expected)
    ok = within_tolerance(out, expected, judge)
    if grads:
        result.grad_rel_err = max(relative_error(g, e) for g, e in zip(grads, expected_grads))
        ok = ok and all(g.dtype == t.dtype and within_tolerance(g, e, judge)
                        for g, e, t in zip(grads, expected_grads, floats))  # fmt: skip
    if op == "update_prototypes":  # the contract: an absent class's prototype is unchanged bit for bit
        if not torch.equal(out[_C - 1], floats[0][_C - 1]):
            ok, result.error = False, "the prototype of an absent class changed"
    result.passed = bool(ok)
    return result


def default_dtypes(backend: str, device: torch.device | str) -> tuple[torch.dtype, ...]:
    """The dtypes checked for ``backend`` on ``device``: fp32, fp16 and bf16, except under Triton's
    interpreter, whose bf16 products are wrong (a limitation of the interpreter, not of the kernels)."""
    if backend == "triton" and torch.device(device).type == "cpu":
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_checks(
    device: torch.device | str | None = None,
    backends: list[str] | None = None,
    dtypes: list[torch.dtype] | None = None,
    ops: tuple[str, ...] = OPS,
    both_tf32: bool = False,
) -> list[CheckResult]:
    """Every op × backend × dtype case (default: the available fused backends of ``device`` and their
    :func:`default_dtypes`); raises ``RuntimeError`` for a requested backend that is unavailable. An op
    whose contract has no kernels of a backend (``FUSED_OPS[op].backends``) is not run on it.

    fp32 runs with TF32 as the process has it; ``both_tf32`` runs fp32 on CUDA twice instead, TF32 off
    and on (the kernels have a separate path for each).

    Example:
        >>> all(r.passed for r in run_checks("cpu", backends=["cpu"], dtypes=[torch.float32]))
        True
    """
    device = _default_device() if device is None else torch.device(device)
    if backends is None:
        backends = [b for b in _backends.available_backends(device) if b in FUSED]
    results = []
    for backend in backends:
        reason = _backends.why_unavailable(backend, device)
        if reason is not None:
            raise RuntimeError(f'backend "{backend}" is unavailable on {device}: {reason}')
        with_kernels = [op for op in ops if _backends.why_unavailable(backend, device, op) is None]
        for dtype in dtypes or default_dtypes(backend, device):
            both = both_tf32 and dtype == torch.float32 and device.type == "cuda"
            for tf32 in (False, True) if both else (None,):
                results += [run_check(op, backend, device, dtype, tf32) for op in with_kernels]
    return results


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str | None = None) -> dict:
    """Versions, the device, and each backend's availability on it (None) or why not (the reason)."""
    device = _default_device() if device is None else torch.device(device)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda_runtime": torch.version.cuda,
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "capability": None,
        "extension": "loaded" if _extension.EXTENSION_ERROR is None else _extension.EXTENSION_ERROR,
        "cuda_kernels_built": _extension.HAS_CUDA_KERNELS,
        "triton_interpret": interpreting(),
        "backends": {name: _backends.why_unavailable(name, device) for name in ("torch", *FUSED)},
    }
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        env.update(device_name=torch.cuda.get_device_name(device), capability=f"sm_{major}{minor}",
                   tf32=tf32_allowed())  # fmt: skip
    return env


def _print_environment(env: dict) -> None:
    print(f"python {env['python']}, torch {env['torch']}, triton {env['triton'] or 'not installed'}, "
          f"CUDA runtime {env['cuda_runtime'] or 'none (CPU build of torch)'}")  # fmt: skip
    capability = f" ({env['capability']})" if env["capability"] else ""
    tf32 = f"; TF32 {env['tf32']}" if "tf32" in env else ""
    interpret = "on" if env["triton_interpret"] else "off"
    print(f"device {env['device']}: {env['device_name']}{capability}; TRITON_INTERPRET {interpret}{tf32}")
    print(f"compiled extension: {env['extension']}; CUDA kernels built: {env['cuda_kernels_built']}")
    for name, reason in env["backends"].items():
        print(f"  backend {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")


def _parse_dtypes(text: str | None) -> list[torch.dtype] | None:
    if not text:
        return None
    names = {dtype_name(d): d for d in TOLERANCES} | {"fp32": torch.float32, "fp16": torch.float16,
                                                      "bf16": torch.bfloat16, "fp64": torch.float64}  # fmt: skip
    try:
        return [names[n.strip()] for n in text.split(",")]
    except KeyError as error:
        raise SystemExit(f"unknown dtype {error}; choose from {', '.join(names)}") from None


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0: every case passed, 1: a failure)."""
    parser = argparse.ArgumentParser(prog="python -m mlcontrast.check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    parser.add_argument("--backends", default=None, help="comma-separated fused backends (default: every available)")
    parser.add_argument("--dtypes", default=None, help="comma-separated, e.g. float32,bfloat16 (default: per backend)")
    parser.add_argument("--json", type=Path, default=None, help="also write the environment and results here")
    args = parser.parse_args(argv)
    device = _default_device() if args.device is None else torch.device(args.device)
    env = environment(device)
    _print_environment(env)
    backends = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    try:
        results = run_checks(device, backends, _parse_dtypes(args.dtypes), both_tf32=True)
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}")
        return 1
    if not results:
        print(f"no fused backend is available on {device}: nothing to check (see the reasons above)")
    for result in results:
        print(result.line(), flush=True)
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} cases passed" + (": FAILED" if failed else ""))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "passed": not failed, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
