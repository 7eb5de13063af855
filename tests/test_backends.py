""""auto" on CUDA tensors: the measured table of the fastest backend per shape, and its generator."""

from __future__ import annotations

import json
import runpy
import shutil

import pytest
import torch

from mlcontrast import _backends, _measured

TABLE = {
    ("label_supcon", "bfloat16"): ((4096, 256, "cuda"), (65536, 256, "triton"), (4096, 1024, "triton")),
    ("prototype_ce", "float32"): ((16384, 256, "triton"),),
}


@pytest.mark.parametrize(
    "rows,dim,expected",
    [(4096, 256, "cuda"), (5000, 200, "cuda"), (50000, 256, "triton"), (4096, 900, "triton"), (1, 1, "cuda")],
)
def test_measured_fastest_takes_the_nearest_measured_shape(rows, dim, expected):
    available = ["cuda", "triton", "torch"]
    assert _backends.measured_fastest("label_supcon", torch.bfloat16, rows, dim, available, TABLE) == expected


def test_measured_fastest_only_among_available_backends_and_measured_dtypes():
    assert _backends.measured_fastest("label_supcon", torch.bfloat16, 4096, 256, ["triton", "torch"], TABLE) == "triton"
    assert _backends.measured_fastest("label_supcon", torch.float16, 4096, 256, ["cuda", "triton"], TABLE) is None
    assert _backends.measured_fastest("prototype_ce", torch.float32, 10, 10, ["cuda", "torch"], TABLE) is None
    assert _backends.measured_fastest("label_supcon", torch.bfloat16, 4096, 256, ["cuda"], {}) is None


def _fake_cuda(monkeypatch, table):
    monkeypatch.setattr(_measured, "FASTEST", table)
    monkeypatch.setattr(_backends, "available_backends", lambda device: ["cuda", "triton", "torch"])
    monkeypatch.delenv("MLCONTRAST_BACKEND", raising=False)


def test_auto_on_cuda_follows_the_table(monkeypatch):
    _fake_cuda(monkeypatch, TABLE)
    cuda = torch.device("cuda")
    z = torch.empty(60000, 256, dtype=torch.bfloat16, device="meta")
    assert _backends.resolve("auto", cuda, "label_supcon", z) == "triton"
    assert _backends.resolve("auto", cuda, "label_supcon", z, rows=4000) == "cuda"
    monkeypatch.setenv("MLCONTRAST_BACKEND", "torch")  # the override wins over the table
    assert _backends.resolve("auto", cuda, "label_supcon", z) == "torch"


@pytest.mark.parametrize("fullgraph", [False, True])
def test_auto_on_cuda_traces_with_dynamic_shapes(monkeypatch, fullgraph):
    # Symbolic sizes under torch.compile: the table is read through comparisons (guards), no float maths.
    _fake_cuda(monkeypatch, TABLE)
    cuda = torch.device("cuda")

    def choice(z):
        return z.sum() + (1.0 if _backends.resolve("auto", cuda, "label_supcon", z) == "triton" else 2.0)

    compiled = torch.compile(choice, dynamic=True, fullgraph=fullgraph, backend="eager")
    assert compiled(torch.zeros(60000, 256, dtype=torch.bfloat16)).item() == 1.0
    assert compiled(torch.zeros(4000, 256, dtype=torch.bfloat16)).item() == 2.0  # another range: traced again


def test_auto_without_a_measurement_takes_the_first_available(monkeypatch):
    _fake_cuda(monkeypatch, TABLE)
    monkeypatch.setattr(_backends, "why_unavailable", lambda name, device, op=None: None if name != "cuda" else "no GPU")
    z = torch.empty(100, 64, dtype=torch.float16, device="meta")  # fp16: not in the table
    assert _backends.resolve("auto", torch.device("cuda"), "label_supcon", z) == "triton"


def test_auto_on_cpu_ignores_the_table(monkeypatch):
    monkeypatch.setattr(_measured, "FASTEST", {("label_supcon", "float32"): ((10, 4, "torch"),)})
    monkeypatch.delenv("MLCONTRAST_BACKEND", raising=False)
    assert _backends.resolve("auto", torch.device("cpu"), "label_supcon", torch.zeros(10, 4)) == "cpu"


def _results(device: str, gpu: str | None, op: str, dtype: str, modes: list[str], records: list[tuple]) -> dict:
    return {
        "metadata": {"device": device, "gpu_name": gpu},
        "config": {"op": op, "modes": modes},
        "records": [
            {"op": op, "provider": p, "n": n, "d": d, "dtype": dtype, "status": status,
             "time_s": {modes[-1]: {"median": t}} if t is not None else {}}
            for p, n, d, status, t in records
        ],
    }  # fmt: skip


def test_write_measured_from_cuda_results(tmp_path):
    from benchmarks.report import MEASURED, fastest_backends, write_measured

    files = {
        "label_supcon_bf16_cuda.json": _results("cuda", "NVIDIA H100 80GB HBM3", "label_supcon", "bfloat16",
                                                ["fwd", "bwd", "full"], [
            ("torch", 4096, 256, "ok", 0.001),  # a reference provider never enters the table
            ("cuda", 4096, 256, "ok", 0.004), ("triton", 4096, 256, "ok", 0.005),
            ("cuda", 32768, 256, "ok", 0.030), ("triton", 32768, 256, "ok", 0.020),
            ("cuda", 65536, 256, "oom", None), ("triton", 65536, 256, "ok", 0.08)]),
        "update_prototypes_cuda.json": _results("cuda", "NVIDIA H100 80GB HBM3", "update_prototypes", "float32",
                                                ["full"], [("triton", 16384, 256, "ok", 1e-4),
                                                           ("cuda", 16384, 256, "ok", 2e-4)]),
        "label_supcon_cpu.json": _results("cpu", None, "label_supcon", "float32", ["full"],
                                          [("cpu", 1024, 128, "ok", 0.01)]),
    }  # fmt: skip
    paths = []
    for name, payload in files.items():
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(payload))
    device, table = fastest_backends(paths)
    assert device == "NVIDIA H100 80GB HBM3"
    assert table == {
        ("label_supcon", "bfloat16"): [(4096, 256, "cuda"), (32768, 256, "triton"), (65536, 256, "triton")],
        ("update_prototypes", "float32"): [(16384, 256, "triton")],
    }
    target = tmp_path / "_measured.py"
    shutil.copy(MEASURED, target)
    written = runpy.run_path(str(write_measured(paths, target)))
    assert written["DEVICE"] == "NVIDIA H100 80GB HBM3"
    assert written["FASTEST"][("label_supcon", "bfloat16")] == ((4096, 256, "cuda"), (32768, 256, "triton"),
                                                                 (65536, 256, "triton"))  # fmt: skip
    assert written["__doc__"] == _measured.__doc__
    # No CUDA results: the committed, empty table.
    assert runpy.run_path(str(write_measured(paths[2:], target)))["FASTEST"] == {}
    assert target.read_text() == MEASURED.read_text()


def test_measured_table_skips_implausible_results(tmp_path):
    # A fast kernel with a wrong (or non-finite, or unchecked) result is never what "auto" picks.
    from benchmarks.report import fastest_backends

    payload = _results("cuda", "GPU", "label_supcon", "bfloat16", ["full"],
                       [("cuda", 4096, 256, "ok", 0.001), ("triton", 4096, 256, "ok", 0.002),
                        ("cuda", 8192, 256, "ok", 0.003), ("triton", 8192, 256, "ok", 0.004)])  # fmt: skip
    payload["records"][0]["check"] = {"against": "torch", "loss_rel_err": 1e-3, "grad_rel_err": 0.5}
    payload["records"][2]["finite"] = False
    payload["records"][3]["check"] = {"against": "torch", "loss_rel_err": 1e-3, "grad_rel_err": 1e-2}
    path = tmp_path / "label_supcon_bf16_cuda.json"
    path.write_text(json.dumps(payload))
    assert fastest_backends([path])[1] == {("label_supcon", "bfloat16"): [(4096, 256, "triton"), (8192, 256, "triton")]}
    # A run cut short (its file written case by case, never checked) does not count.
    path.write_text(json.dumps({**payload, "partial": True}))
    assert fastest_backends([path])[1] == {}


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_one_reading_of_triton_interpret(monkeypatch, value, expected):
    # Triton accepts 1/true/on in any case; every place of mlcontrast that asks must agree with it.
    pytest.importorskip("triton")
    from mlcontrast import _base
    from mlcontrast.ops import utils

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _base.interpreting() is expected
    assert utils.interpreting() is expected
    reason = _backends.why_unavailable("triton", torch.device("cpu"))
    if torch.cuda.is_available():
        return
    if expected:
        assert reason is None or "TRITON_INTERPRET=1 was set after" in reason, reason
    else:
        assert reason is not None and "TRITON_INTERPRET" in reason


def test_an_op_without_kernels_on_a_backend_is_skipped_by_auto_and_refused_when_asked(monkeypatch):
    # A fused op new to the package may have kernels on some fused backends only (contract.FusedOp.backends).
    import dataclasses

    from mlcontrast.ops import contract

    narrowed = dataclasses.replace(contract.FUSED_OPS["label_supcon"], backends=("triton",))
    monkeypatch.setitem(contract.FUSED_OPS, "label_supcon", narrowed)
    monkeypatch.delenv("MLCONTRAST_BACKEND", raising=False)
    cpu = torch.device("cpu")
    reason = _backends.why_unavailable("cpu", cpu, "label_supcon")
    assert reason is not None and 'no "cpu" kernels' in reason
    assert _backends.why_unavailable("cpu", cpu, "prototype_ce") is None
    assert _backends.resolve("auto", cpu, "label_supcon", torch.randn(4, 3)) != "cpu"
    with pytest.raises(RuntimeError, match='no "cpu" kernels'):
        _backends.resolve("cpu", cpu, "label_supcon", torch.randn(4, 3))
