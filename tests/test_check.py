"""``python -m mlcontrast.check`` and the first-use check that guards "auto" against a wrong GPU backend.

Without a GPU the guarded condition is simulated: ``_first_use.guarded`` is made to guard the ``cpu``
backend, and a kernel is broken by patching the per-row wrapper of ``mlcontrast.functional``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import mlcontrast
from mlcontrast import _backends, _first_use, _measured, check, functional, reference

pytestmark = pytest.mark.skipif("cpu" not in mlcontrast.available_backends("cpu"), reason="extension not built")
ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def _break_label_supcon(monkeypatch, backend="cpu", value=1.1, grad=1.0):
    """Makes ``backend``'s label_supcon rows ``value`` × the true ones, with ``grad`` × their gradient."""
    original = functional._label_supcon_rows

    def broken(name, *args, **kwargs):
        rows = original(name, *args, **kwargs)
        if name != backend:
            return rows
        return value * rows.detach() + grad * (rows - rows.detach())

    monkeypatch.setattr(functional, "_label_supcon_rows", broken)


@pytest.fixture
def guard_cpu(monkeypatch):
    """The GPU condition on the CPU: the first use of backend "cpu" is checked; verdicts start empty."""
    monkeypatch.setattr(_first_use, "guarded", lambda backend, device: backend == "cpu")
    monkeypatch.delenv("MLCONTRAST_BACKEND", raising=False)
    _first_use.reset()
    calls = []
    run_checks = check.run_checks

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return run_checks(*args, **kwargs)

    monkeypatch.setattr(check, "run_checks", counting)
    yield calls
    _first_use.reset()


def _problem(n=40, d=16):
    z = torch.randn(n, d)
    y = torch.randint(0, 4, (n,))
    y[::7] = -1
    return z, y


# ------------------------------------------------------------------------------------------------
# python -m mlcontrast.check
# ------------------------------------------------------------------------------------------------


def test_command_passes_on_this_machine(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreted Triton path is slow
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mlcontrast.check", "--device", "cpu", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "backend cpu     available" in proc.stdout
    assert 'backend cuda    unavailable: backend "cuda" runs on CUDA tensors only' in proc.stdout
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["environment"]["torch"] == torch.__version__
    cases = {(r["op"], r["backend"], r["dtype"]) for r in report["results"]}
    assert cases == {(op, "cpu", dtype) for op in check.OPS for dtype in ("float32", "float16", "bfloat16")}
    assert all(r["passed"] and r["loss_rel_err"] is not None for r in report["results"])
    assert proc.stdout.count(" PASS ") == len(cases)


def test_broken_kernel_fails_the_check_and_the_exit_status(monkeypatch, tmp_path, capsys):
    _break_label_supcon(monkeypatch)
    results = check.run_checks("cpu", backends=["cpu"], dtypes=[torch.float32])
    verdicts = {r.op: r.passed for r in results}
    assert verdicts == {"label_supcon": False, "prototype_nce": True, "prototype_ce": True, "update_prototypes": True,
                        "multihot_supcon": True, "label_supcon_queue": True}  # fmt: skip
    assert abs(next(r for r in results if r.op == "label_supcon").loss_rel_err - 0.1) < 1e-6
    argv = ["--device", "cpu", "--backends", "cpu", "--dtypes", "float32", "--json", str(tmp_path / "c.json")]
    assert check.main(argv) == 1
    out = capsys.readouterr().out
    assert re.search(r"^label_supcon +cpu +float32 +FAIL", out, re.M) and "5 of 6 cases passed: FAILED" in out
    assert json.loads((tmp_path / "c.json").read_text())["passed"] is False


def test_wrong_gradient_alone_fails(monkeypatch):
    _break_label_supcon(monkeypatch, value=1.0, grad=0.5)
    (result,) = check.run_checks("cpu", backends=["cpu"], dtypes=[torch.float32], ops=("label_supcon",))
    assert not result.passed and result.loss_rel_err < 1e-6 and abs(result.grad_rel_err - 0.5) < 1e-3


def test_an_update_that_touches_absent_classes_fails(monkeypatch):
    # Values within tolerance, but the contract says an absent class's prototype is kept bit for bit.
    original = torch.ops.mlcontrast.update_prototypes_

    def nudging(prototypes, *args):
        original(prototypes, *args)
        prototypes.mul_(1 + 1e-6)

    monkeypatch.setattr(torch.ops.mlcontrast, "update_prototypes_", nudging)
    (result,) = check.run_checks("cpu", ["cpu"], [torch.float32], ops=("update_prototypes",))
    assert not result.passed and result.loss_rel_err < 1e-5
    assert result.error == "the prototype of an absent class changed"


def test_a_kernel_that_raises_fails_its_case_only(monkeypatch):
    def raising(*args, **kwargs):
        raise RuntimeError("illegal memory access\nsecond line")

    monkeypatch.setattr(functional, "_label_supcon_rows", raising)
    results = check.run_checks("cpu", backends=["cpu"], dtypes=[torch.bfloat16])
    assert [r.passed for r in results] == [False, True, True, True, True, True]
    assert results[0].error == "RuntimeError: illegal memory access"
    assert "FAIL" in results[0].line() and "illegal memory access" in results[0].line()


def test_an_op_without_kernels_of_a_backend_is_not_run_on_it(monkeypatch):
    import dataclasses

    from mlcontrast.ops.contract import FUSED_OPS

    # As for an op whose kernels of a backend do not exist yet (FusedOp.backends leaves that backend out).
    without_cpu = dataclasses.replace(FUSED_OPS["multihot_supcon"], backends=("triton",))
    monkeypatch.setitem(FUSED_OPS, "multihot_supcon", without_cpu)
    results = check.run_checks("cpu", backends=["cpu"], dtypes=[torch.float32])
    assert [r.op for r in results] == [op for op in check.OPS if op != "multihot_supcon"]


def test_unavailable_backend_is_an_error(capsys):
    assert check.main(["--device", "cpu", "--backends", "cuda"]) == 1
    assert 'backend "cuda" is unavailable on cpu' in capsys.readouterr().out


def test_check_leaves_the_callers_random_state_and_grad_mode_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        results = check.run_checks("cpu", backends=["cpu"], dtypes=[torch.float32])
    assert all(r.passed for r in results)
    assert torch.equal(torch.rand(3), expected)


def test_tf32_switch_is_restored():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with check._tf32(True):
        assert matmul.fp32_precision == "tf32"
    with check._tf32(False):
        assert matmul.fp32_precision == "ieee"
    assert matmul.fp32_precision == before
    (result,) = check.run_checks("cpu", ["cpu"], [torch.float32], ops=("prototype_ce",), both_tf32=True)
    assert result.passed and not result.tf32  # CPU tensors: no TF32, one case


def test_default_dtypes_leave_out_bf16_only_in_the_triton_interpreter():
    assert check.default_dtypes("triton", "cpu") == (torch.float32, torch.float16)
    assert torch.bfloat16 in check.default_dtypes("triton", "cuda")
    assert torch.bfloat16 in check.default_dtypes("cpu", "cpu")


# ------------------------------------------------------------------------------------------------
# The first-use check
# ------------------------------------------------------------------------------------------------


def test_auto_warns_and_falls_back_for_the_failed_op_only(monkeypatch, guard_cpu):
    _break_label_supcon(monkeypatch)
    z, y = _problem()
    expected_next = next(b for b in mlcontrast.available_backends(CPU) if b != "cpu")
    with pytest.warns(check.BackendMismatchWarning, match=r'(?s)backend "cpu" gave WRONG results.*label_supcon'):
        loss = mlcontrast.label_supcon_loss(z, y, normalize=True)
    torch.testing.assert_close(loss, reference.label_supcon_loss(z, y, 0.1, None, "mean", True))
    assert _backends.resolve("auto", CPU, "label_supcon", z) == expected_next
    assert _backends.resolve("auto", CPU, "prototype_ce", z) == "cpu"  # its other ops passed
    assert len(guard_cpu) == 1


def test_explicit_backend_runs_as_asked_after_the_warning(monkeypatch, guard_cpu):
    _break_label_supcon(monkeypatch)
    z, y = _problem()
    with pytest.warns(check.BackendMismatchWarning, match='an explicit backend="cpu" still runs'):
        loss = mlcontrast.label_supcon_loss(z, y, normalize=True, backend="cpu")
    torch.testing.assert_close(loss, 1.1 * reference.label_supcon_loss(z, y, 0.1, None, "mean", True))


def test_runs_once_per_backend_device_kind_and_dtype(guard_cpu):
    z, y = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a passing check is silent
        for _ in range(3):
            mlcontrast.label_supcon_loss(z, y)
            mlcontrast.prototype_ce_loss(z, y.clamp(min=0), torch.randn(4, 16), backend="cpu")
        assert len(guard_cpu) == 1
        mlcontrast.label_supcon_loss(z.half(), y)
        assert len(guard_cpu) == 2
        assert guard_cpu[1][1]["dtypes"] == [torch.float16] and guard_cpu[1][1]["backends"] == ["cpu"]


def test_nothing_runs_while_torch_compile_traces(monkeypatch, guard_cpu):
    _break_label_supcon(monkeypatch)
    z, y = _problem()

    def loss(x):
        return mlcontrast.label_supcon_loss(x, y, normalize=True)

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="eager", fullgraph=True)
    broken = compiled(z)
    assert not guard_cpu, "the check ran while tracing"
    expected = reference.label_supcon_loss(z, y, 0.1, None, "mean", True)
    torch.testing.assert_close(broken, 1.1 * expected)  # unchecked: "auto" took the (broken) first backend
    # An eager call runs the check; what it found is then used when tracing (a recompile), still without running.
    with pytest.warns(check.BackendMismatchWarning):
        mlcontrast.label_supcon_loss(z, y, normalize=True)
    assert len(guard_cpu) == 1
    torch._dynamo.reset()
    fixed = torch.compile(loss, backend="eager", fullgraph=True)(z)
    torch.testing.assert_close(fixed, expected)
    assert len(guard_cpu) == 1


def test_the_check_does_not_recurse(guard_cpu):
    # run_checks calls the explicit backend, whose first use would start a check of its own.
    z, y = _problem()
    mlcontrast.label_supcon_loss(z, y, backend="cpu")
    assert len(guard_cpu) == 1


@pytest.mark.parametrize(
    "value,backend,device,expected",
    [
        (None, "triton", "cuda", True), (None, "cuda", "cuda", True), (None, "cpu", "cpu", False),
        (None, "triton", "cpu", False), (None, "torch", "cuda", False), ("0", "triton", "cuda", False),
        ("off", "cuda", "cuda", False), ("all", "cpu", "cpu", True), ("all", "triton", "cpu", True),
        ("all", "torch", "cpu", False),
    ],
)  # fmt: skip
def test_which_calls_are_guarded(monkeypatch, value, backend, device, expected):
    if value is None:
        monkeypatch.delenv(_first_use.ENV, raising=False)
    else:
        monkeypatch.setenv(_first_use.ENV, value)
    assert _first_use.guarded(backend, torch.device(device)) is expected


def test_env_all_checks_the_cpu_backend_for_real(monkeypatch):
    monkeypatch.setenv(_first_use.ENV, "all")
    monkeypatch.delenv("MLCONTRAST_BACKEND", raising=False)
    _break_label_supcon(monkeypatch)
    _first_use.reset()
    z, y = _problem()
    try:
        with pytest.warns(check.BackendMismatchWarning):
            assert _backends.resolve("auto", CPU, "label_supcon", z.double()) != "cpu"
    finally:
        _first_use.reset()


def test_a_measured_gpu_is_not_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(_measured, "DEVICE", "NVIDIA H200")
    monkeypatch.setattr(_measured, "FASTEST", {("label_supcon", "bfloat16"): ((4096, 256, "triton"),)})
    cuda = torch.device("cuda", 0)
    assert _first_use.measured("triton", cuda, torch.bfloat16)
    assert not _first_use.measured("cuda", cuda, torch.bfloat16)  # never measured (never fastest)
    assert not _first_use.measured("triton", cuda, torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert not _first_use.measured("triton", cuda, torch.bfloat16)


def test_without_a_usable_gpu_nothing_is_checked(monkeypatch, guard_cpu):
    # "auto" on a CUDA device that torch cannot use (the fake-CUDA tests of test_backends) checks nothing.
    monkeypatch.setattr(_first_use, "guarded", lambda backend, device: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _first_use.trusted("triton", torch.device("cuda", 0), torch.float32, "label_supcon")
    assert not guard_cpu
