"""Smoke test of the benchmarks: ``python -m benchmarks.run --quick --device cpu`` into a temporary directory,
then ``python -m benchmarks.report`` on what it wrote.

One run of every ``benchmarks/bench_<op>.py`` (tiny sizes, every provider in one process per op, including
``torch.compile`` of the references) takes about 1.5 minutes on two CPU cores, hence ``slow``. The throughput
arithmetic behind the GPU-only fields (fractions of the measured matmul rate and copy bandwidth) is checked
on made-up records, since no device rates are measured on CPU by default.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
OPS = sorted(p.stem[len("bench_"):] for p in BENCH.glob("bench_*.py"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MLCONTRAST_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # set in this process by conftest.py; not for the benchmarks
    return env


def _snapshot(directory: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in directory.glob("*")} if directory.exists() else {}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import mlcontrast

    # Without the compiled extension the runner would wait for it (minutes of retries): say so at once.
    if "cpu" not in mlcontrast.available_backends("cpu"):
        from mlcontrast import _backends

        pytest.fail(f"the cpu backend is unavailable: {_backends.why_unavailable('cpu', 'cpu')}")
    out = tmp_path_factory.mktemp("bench_quick")
    committed = _snapshot(BENCH / "results")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--out-dir", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900,
    )
    return out, proc, committed


def test_ops_are_discovered():
    assert {"label_supcon", "prototype_nce", "prototype_ce", "update_prototypes"} <= set(OPS)


@pytest.mark.slow
def test_quick_run_exits_cleanly(quick_run):
    out, proc, committed = quick_run
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    # Everything went to --out-dir: the committed results are untouched.
    assert _snapshot(BENCH / "results") == committed


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_quick_results(quick_run, op):
    out, proc, _ = quick_run
    path = out / f"{op}_quick_cpu.json"
    assert path.exists(), f"{path} missing; stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    result = json.loads(path.read_text())
    assert result["schema"] == 1 and "partial" not in result  # the case-by-case file, replaced at the end
    config, records = result["config"], result["records"]
    assert config["op"] == op and config["device"] == "cpu" and config["quick"] is True
    assert {"torch", "torch_compile", "cpu"} <= set(config["providers"])

    cpu = [r for r in records if r["provider"] == "cpu"]
    assert sorted(r["n"] for r in cpu) == sorted(config["n"])
    for r in records:  # every provider ran: the references too
        assert r["status"] == "ok", f"{r['provider']} n={r['n']}: {r['status']} {r.get('message', '')}"
        assert r["finite"] is True
        assert all(r["time_s"][m]["median"] > 0 for m in config["modes"])
        assert r["memory"]["extra_peak_bytes"] >= 0
        if "fwd" in config["modes"]:  # a loss op
            assert math.isfinite(r["loss"])
    for r in cpu:
        errors = {k: v for k, v in r["check"].items() if k.endswith("_rel_err")}
        assert errors, r["check"]
        assert all(v < 1e-3 for v in errors.values()), errors
    # The summary has a row per cpu case, with the speed-ups against both references.
    rows = {(s["provider"], s["n"]) for s in result["summary"] if "speedup_full_vs_torch_compile" in s}
    fused_records = {(r["provider"], r["n"]) for r in records if r["provider"] not in ("torch", "torch_compile")}
    assert {("cpu", r["n"]) for r in cpu} <= rows == fused_records  # variants (e.g. cpu_tensor_tau) too
    if op == "label_supcon":
        assert config["flops"]["full"] == "8*N^2*D"
        r = cpu[0]
        assert r["throughput"]["flops"]["full"] == 8 * r["n"] ** 2 * r["d"]
    elif op == "multihot_supcon":  # the similarities and the label overlaps (C classes)
        assert config["flops"]["full"] == "4*N^2*(2*D+C)" and config["positives"] == "jaccard"
        r = cpu[0]
        assert r["throughput"]["flops"]["full"] == 4 * r["n"] ** 2 * (2 * r["d"] + r["num_classes"])
    elif "flops" in config:  # another op counted in model FLOPs (the queue and PML benchmarks)
        assert all(r["throughput"]["flops"]["full"] > 0 for r in cpu)
    else:
        assert all(r["bandwidth"]["feature_bytes"] > 0 for r in cpu)


@pytest.mark.slow
def test_report_renders_quick_results(quick_run):
    out, _, _ = quick_run
    cmd = [sys.executable, "-m", "benchmarks.report", "--results-dir", str(out)]
    skipped = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert skipped.returncode == 0, skipped.stderr
    assert "###" not in skipped.stdout  # quick files are left out by default

    proc = subprocess.run(cmd + ["--include-quick"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for op in OPS:
        assert f"### `{op}` on " in text
        section = text.split(f"### `{op}` on ", 1)[1].split("\n### ", 1)[0]
        table = [line for line in section.splitlines() if line.startswith("|")]
        assert " provider " in table[0] and set(table[1]) <= set("|-: ")
        assert any("mlcontrast `cpu`" in line for line in table[2:])
        assert any("eager reference" in line for line in table[2:])


def test_throughput_fractions():
    from benchmarks import bench_label_supcon, bench_prototype_ce
    from benchmarks.harness.analysis import add_throughput, summarize_ratios

    stats = lambda s: {"n": 1, "median": s, "min": s, "max": s, "mean": s}  # noqa: E731
    meta = {"matmul_peak": {"tflops": 100.0}, "copy_bandwidth": {"gb_s": 1000.0}}
    n, d = 4096, 128
    flops_full = 8 * n * n * d
    record = {"status": "ok", "provider": "cuda", "n": n, "d": d, "dtype": "bfloat16",
              "time_s": {"fwd": stats(flops_full / 4 / 50e12), "bwd": stats(flops_full * 3 / 4 / 50e12),
                         "full": stats(flops_full / 50e12)},
              "memory": {"extra_peak_bytes": 1}}
    add_throughput([record], bench_label_supcon.SPEC, meta)
    tp = record["throughput"]
    assert tp["flops"] == {"fwd": 2 * n * n * d, "bwd": 6 * n * n * d, "full": flops_full}
    for mode in ("fwd", "bwd", "full"):
        assert tp["tflops"][mode] == pytest.approx(50.0)
        assert tp["fraction_of_matmul"][mode] == pytest.approx(0.5)
    assert "bandwidth" not in record

    nbytes = n * 256 * 2  # bf16 features [N, 256]
    record = {"status": "ok", "provider": "cuda", "n": n, "d": 256, "dtype": "bfloat16",
              "time_s": {m: stats(nbytes / 250e9) for m in ("fwd", "bwd", "full")},
              "memory": {"extra_peak_bytes": 1}}
    add_throughput([record], bench_prototype_ce.SPEC, meta)
    assert record["bandwidth"]["feature_bytes"] == nbytes
    assert record["bandwidth"]["feature_read_gb_s"]["full"] == pytest.approx(250.0)
    assert record["bandwidth"]["fraction_of_copy"]["full"] == pytest.approx(0.25)
    assert "throughput" not in record

    add_throughput([record], bench_prototype_ce.SPEC, {})  # no device rates: no fractions
    assert "fraction_of_copy" not in record["bandwidth"]
    summary = summarize_ratios([record], ["cuda"], bench_prototype_ce.SPEC.modes)
    assert summary[0]["feature_read_gb_s_full"] == pytest.approx(250.0)


def test_train_table_quick(tmp_path):
    """The training-table script: tiny runs in their own processes, merged records, the markdown table."""
    out = tmp_path / "digits.json"
    out.write_text(json.dumps({"records": [
        {"method": "hst", "known_ratio": 0.5, "status": "ok", "wall_s": 60.0, "mAP": 91.0, "CF1": 80.0, "OF1": 85.0,
         "pseudo_precision": 70.0, "pseudo_recall": 40.0},
        {"method": "bce", "known_ratio": 0.5, "status": "ok", "wall_s": 1.0, "mAP": 0.0, "CF1": 0.0, "OF1": 0.0}]}))
    cmd = [sys.executable, "-m", "benchmarks.train_table", "--quick", "--methods", "bce", "--ratios", "0.5",
           "--jobs", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    recs = {(r["method"], r["known_ratio"]): r for r in result["records"]}
    assert set(recs) == {("bce", 0.5), ("hst", 0.5)}  # the old bce record was replaced, hst kept
    bce = recs[("bce", 0.5)]
    assert bce["status"] == "ok" and bce["epochs"] == 1 and 0 < bce["mAP"] <= 100 and bce["wall_s"] > 0
    assert "pseudo_precision" not in bce and result["metadata"]["torch"]
    from benchmarks.train_table import section

    text = section(result, out)
    assert "| bce | 50% |" in text and "| hst | 50% | 91.00 | 80.00 | 85.00 | 70.0 | 40.0 | 1.0 min |" in text
    assert text.index("| bce |") < text.index("| hst |")


def test_train_table_per_dataset_files_markers_and_text(tmp_path, capsys):
    """--dataset: its own results file and README markers, its name in the command, no mixing of datasets."""
    from benchmarks import train_table as tt

    assert tt.results_path("digits") == tt.RESULTS and tt.results_path("mnist_mosaic").name == "mnist_mosaic.json"
    assert tt.markers("digits") == (tt.START, tt.END)
    assert tt.markers("mnist_mosaic") == ("<!-- train-mnist_mosaic:start -->", "<!-- train-mnist_mosaic:end -->")
    readme = (ROOT / "README.md").read_text()
    assert all(m in readme for m in tt.markers("mnist_mosaic"))
    result = {"metadata": {"date": "2026-01-01", "cpu_model": "x", "cpu_count": 2, "torch": "2"}, "jobs": 1,
              "dataset": "mnist_mosaic", "records": [{"method": "bce", "known_ratio": 1.0, "status": "ok",
                                                      "wall_s": 60.0, "mAP": 90.0, "CF1": 80.0, "OF1": 81.0}]}
    text = tt.section(result, tmp_path / "mnist_mosaic.json")
    assert "`mlcontrast-train --dataset mnist_mosaic --method M" in text
    assert "`python -m benchmarks.train_table --dataset mnist_mosaic`" in text
    assert "| bce | 100% | 90.00 | 80.00 | 81.00 |" in text
    assert "--dataset" not in tt.section({**result, "dataset": "digits"}, tmp_path / "d.json")
    digits_file = tmp_path / "digits.json"
    digits_file.write_text(json.dumps({"records": []}))  # no "dataset": an older digits file
    with pytest.raises(SystemExit):
        tt.main(["--dataset", "mnist_mosaic", "--methods", "bce", "--ratios", "1", "--out", str(digits_file)])
    assert "holds digits results, not mnist_mosaic" in capsys.readouterr().err


def test_results_name_marks_non_default_d_and_dtype():
    import argparse

    from benchmarks.bench_label_supcon import SPEC
    from benchmarks.harness.spec import results_name

    def name(**kw):
        return results_name(SPEC, argparse.Namespace(**{"d": 128, "dtype": "float32", "quick": False, **kw}))

    assert name() == "label_supcon"
    assert name(d=1024, dtype="bfloat16") == "label_supcon_d1024_bf16"
    assert name(dtype="float16", quick=True) == "label_supcon_fp16_quick"


def test_multihot_results_file_per_positives_mode(tmp_path):
    """bench_multihot_supcon: one results file per --positives mode, the mode in its name unless it is the
    default (jaccard), after the op and before the harness's D / dtype / quick marks."""
    from benchmarks.bench_multihot_supcon import SPEC, mode_results_path
    from benchmarks.harness.spec import parse_bench_args

    def paths(*argv):
        args = parse_bench_args(SPEC, ["--out-dir", str(tmp_path), *argv])
        return [mode_results_path(args, mode).name for mode in args.positives]

    assert paths() == ["multihot_supcon_cpu.json"]
    assert paths("--positives", "jaccard", "mulsupcon", "--d", "64", "--quick") == [
        "multihot_supcon_d64_quick_cpu.json", "multihot_supcon_mulsupcon_d64_quick_cpu.json"]
    assert paths("--positives", "any", "all", "--out", str(tmp_path / "r.json")) == ["r_any.json", "r_all.json"]
    assert paths("--positives", "any", "--out", str(tmp_path / "r.json")) == ["r.json"]


def test_backend_without_the_ops_kernels_is_unavailable():
    """A fused backend the contract gives no kernels for an op (FusedOp.backends) is no default provider of
    the op's sweep, and a case that asks for it is recorded as unavailable, not as an error."""
    from types import SimpleNamespace

    from benchmarks.harness.case import unavailable_reason
    from benchmarks.harness.sweep import missing_kernels
    from mlcontrast.ops.contract import FUSED_OPS

    missing = [(op, b) for op, f in FUSED_OPS.items() for b in ("cpu", "cuda", "triton") if b not in f.backends]
    if not missing:
        pytest.skip("every contract op has every fused backend's kernels")
    op, backend = missing[0]
    everything = SimpleNamespace(available_backends=lambda device: ["cpu", "cuda", "triton", "torch"])
    assert f'no "{backend}" kernels' in unavailable_reason(backend, "cuda", everything, op)
    assert missing_kernels(op, backend) is not None
    present = FUSED_OPS[op].backends[0]
    assert unavailable_reason(present, "cuda", everything, op) is None and missing_kernels(op, present) is None
    assert missing_kernels("not_a_contract_op", backend) is None


def test_backend_variant_runs_in_its_mode(tmp_path):
    """``triton_atomic`` (the Triton backend's atomic kernels) is a provider of its own (interpreted here)."""
    env = {**_env(), "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "benchmarks.bench_label_supcon", "--device", "cpu", "--n", "40", "--d", "16",
           "--providers", "torch", "triton_atomic", "--repeats", "1", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = tmp_path.glob("label_supcon*.json")
    records = {r["provider"]: r for r in json.loads(path.read_text())["records"]}
    variant = records["triton_atomic"]
    assert variant["status"] == "ok" and variant["backend"] == "triton"
    assert variant["environment"] == {"MLCONTRAST_TRITON_ATOMIC": "1"}
    assert variant["grad_norm"] == pytest.approx(records["torch"]["grad_norm"], rel=1e-4)


def test_distributed_table_quick(tmp_path):
    """The process_group benchmark: 2 gloo processes, both distributed variants agree, the markdown table."""
    out = tmp_path / "distributed.json"
    cmd = [sys.executable, "-m", "benchmarks.distributed_table", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    variants = {r["variant"]: r for r in result["records"]}
    assert set(variants) == {"anchors", "gathered set", "one process"}
    assert all(r["n"] == 512 and len(r["times_s"]) == 2 and r["median_s"] > 0 for r in variants.values())
    assert variants["anchors"]["world"] == 2 and variants["one process"]["world"] == 1
    # Every variant computes the same loss over the same 512 rows.
    assert variants["anchors"]["loss"] == pytest.approx(variants["one process"]["loss"], rel=1e-5)
    from benchmarks.distributed_table import table

    assert "| 512 | 2 |" in table(result["records"], result["metadata"])


def test_tune_triton_quick(tmp_path):
    """The Triton tuner under the interpreter: every candidate checked against the default, then timed."""
    out = tmp_path / "tune.json"
    cmd = [sys.executable, "-m", "benchmarks.tune_triton", "--quick", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {r["phase"] for r in result["records"]} == {"fwd", "fwd-atomic", "bwd", "bwd-atomic"}
    assert all(r["status"] == "ok" and r["rel_error"] <= 1e-4 and r["ms"] > 0 for r in result["records"])
    assert set(result["best"]) == {"fwd", "fwd-atomic", "bwd", "bwd-atomic"} and result["shape"]["n"] == 40
    emit = [sys.executable, "-m", "benchmarks.tune_triton", "--emit-env", str(out)]
    proc = subprocess.run(emit, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    configs = json.loads(proc.stdout)
    tuned = {phase for phase, config in result["best"].items() if config != "default"}
    assert set(configs) == {f"label_supcon.{phase}:float32" for phase in tuned}  # for the tuned dtype only
    # What the environment variable gives every process that imports the ops.
    check = "import json; from mlcontrast.ops.utils import CONFIG_OVERRIDES; print(json.dumps(CONFIG_OVERRIDES))"
    env = {**_env(), "MLCONTRAST_TRITON_CONFIGS": proc.stdout.strip()}
    read = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True)
    assert json.loads(read.stdout) == configs, read.stderr[-2000:]


# ---- the GPU session scripts (benchmarks/gpu_session.sh, gpu_session_more.sh) and their harness options ----

GPU_SCRIPTS = ("gpu_session.sh", "gpu_session_more.sh")


def _phase_budgets(script: str) -> dict[str, int]:
    import re

    text = (BENCH / script).read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^BUDGET_([A-Z_]+)=(\d+)\s*$", text, re.M)}


def _run_script(script: str, mode: str, out: Path) -> subprocess.CompletedProcess:
    env = {**_env(), "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(out.parent)}
    return subprocess.run(["bash", str(BENCH / script), mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_script_phase_budgets_fit_one_call(script, tmp_path):
    """The phases of one device call add up to at most 540 s (the call's timeout_s is 560 s), and the script
    runs every phase it declares a budget for, in print mode (nothing run)."""
    budgets = _phase_budgets(script)
    assert len(budgets) >= 6 and sum(budgets.values()) <= 540, budgets
    assert "CALL_BUDGET_S=540" in (BENCH / "gpu_lib.sh").read_text()
    proc = _run_script(script, "--print", tmp_path / "out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"phase budgets: {sum(budgets.values())} s of the call's 540 s" in proc.stdout
    table = (tmp_path / "out" / "phases.txt").read_text()
    phases = [line.split()[0] for line in table.splitlines()]
    assert "preflight" in phases and "build" in phases
    # Each budget names a phase (BUILD_WAIT is the build's time beyond the phase it runs beside).
    for name in budgets:
        if name != "BUILD_WAIT":
            assert name.lower() in phases or name.lower().startswith("bench_"), (name, phases)
    assert "--device cuda" in proc.stdout and "TORCH_CUDA_ARCH_LIST=9.0" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", GPU_SCRIPTS)
def test_gpu_script_dry_run(script, tmp_path):
    """Every phase of the script on this CPU machine with tiny problems (~30 s each): the phase plumbing,
    the packing into $OUT, and that nothing is written into the checkout."""
    import tarfile

    committed = _snapshot(BENCH / "results")
    out = tmp_path / "out"
    proc = _run_script(script, "--dry-run", out)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert _snapshot(BENCH / "results") == committed and not (BENCH / "results" / "tuning").exists()
    assert set(p.name for p in out.iterdir()) >= {"session.log", "phases.txt", "logs.tgz", "results.tgz"}
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
    outcomes = dict(line.split(None, 1) for line in (out / "phases.txt").read_text().splitlines())
    assert all(" ok" in o or "skipped:" in o for o in outcomes.values()), outcomes
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    assert any(n.startswith("benchmarks/results/label_supcon_") and n.endswith("_cpu.json") for n in names), names
    with tarfile.open(out / "logs.tgz") as tar:
        logs = tar.getnames()
    assert "logs/preflight.log" in logs and "logs/phases.txt" in logs
    if script == "gpu_session.sh":
        assert {"logs/triton_tests.xml", "logs/cuda_tests.xml"} <= set(logs)
        assert any("prototype_nce_" in n for n in names) and any("update_prototypes_" in n for n in names)
    else:
        assert any("_maxn_cpu.json" in n for n in names)
        assert "skipped:" in outcomes["sanitizer"] or " ok" in outcomes["sanitizer"]


def test_references_skipped_when_they_cannot_fit_on_the_gpu():
    """On CUDA the dense references are skipped unlaunched when their N x N lower bound reaches the GPU's
    memory (the sweep used to launch them whatever N); on CPU the --max-memory-gib cap applies."""
    import argparse

    from benchmarks.bench_label_supcon import NN_BYTES_LOWER_BOUND
    from benchmarks.harness.sweep import memory_cap, skip_if_too_large

    gpu = {"gpu_memory_bytes": 141 * 10**9}
    cap, what = memory_cap(argparse.Namespace(device="cuda", max_memory_gib=16.0), gpu)
    assert cap == 141 * 10**9 and "GPU" in what

    def skipped(provider, n):
        return skip_if_too_large(int(NN_BYTES_LOWER_BOUND[provider] * n * n), cap, what) is not None

    assert not skipped("torch", 32768) and not skipped("torch_compile", 131072)
    assert skipped("torch", 131072) and skipped("torch_compile", 262144)
    assert skip_if_too_large(10**12, cap, what)["status"] == "skipped: too large"
    cap, _ = memory_cap(argparse.Namespace(device="cpu", max_memory_gib=16.0), {})
    assert cap == 16 * 2**30
    assert memory_cap(argparse.Namespace(device="cpu", max_memory_gib=0), {})[0] is None


def test_sweep_budget_and_probe_providers(tmp_path):
    """--sweep-budget-s: cases past the budget are recorded as skipped and the results written as usual;
    --max-n-providers: the largest-N probe runs those providers only."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_label_supcon", "--device", "cpu", "--n", "64", "--d", "8",
           "--providers", "torch", "cpu", "--same-process", "--repeats", "1", "--max-n-probe", "--max-n-start",
           "128", "--max-n-limit", "128", "--max-n-providers", "cpu", "--out", str(out)]
    env = {**_env(), "MLCONTRAST_BENCH_RETRIES": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {r["provider"]: r["status"] for r in result["records"]} == {"torch": "ok", "cpu": "ok"}
    probe = result["max_n_probe"]["results"]
    assert [p["provider"] for p in probe] == ["cpu"] and probe[0]["largest_n_ok"] == 128

    proc = subprocess.run(cmd[:-2] + ["--sweep-budget-s", "0", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert "partial" not in result and result["config"]["sweep_budget_s"] == 0
    assert {r["status"] for r in result["records"]} == {"skipped: budget"}
    assert result["max_n_probe"]["results"][0]["stopped_by"] == "skipped: budget"


def test_no_retry_sleeps_when_told(monkeypatch):
    """MLCONTRAST_BENCH_RETRIES=0 (the GPU scripts): no waiting for a rebuild that cannot happen there."""
    from benchmarks.harness import processes
    from benchmarks.harness.retry import retry_count

    monkeypatch.setenv("MLCONTRAST_BENCH_RETRIES", "0")
    assert retry_count(9) == 0
    sleeps = []
    monkeypatch.setattr(processes.time, "sleep", sleeps.append)
    monkeypatch.setattr(processes, "run_case_subprocess",
                        lambda *a, **k: {"status": "unavailable", "message": "mlcontrast._C did not load"})
    result = processes.run_case_with_retry("m", {"provider": "cpu", "n": 1}, timeout_s=1.0)
    assert result["status"] == "unavailable" and sleeps == []
    monkeypatch.delenv("MLCONTRAST_BENCH_RETRIES")
    assert retry_count(9) == 9


def test_interrupted_parent_kills_its_case_process(monkeypatch):
    """A SIGINT to the parent (a GPU session phase at its budget) kills the case's process group, which
    runs in its own session and would otherwise hold the GPU during the next phase."""
    import signal as signal_module

    from benchmarks.harness.processes import run_case_subprocess
    from benchmarks.harness.rates import RATES_MODULE

    started = []
    real_communicate = subprocess.Popen.communicate

    def interrupted(self, *args, **kwargs):
        if not started:
            started.append(self)
            raise KeyboardInterrupt
        return real_communicate(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "communicate", interrupted)
    case = {"device": "cpu", "dtype": "float32", "matmul_size": 4096, "copy_bytes": None, "runs": 50}
    with pytest.raises(KeyboardInterrupt):
        run_case_subprocess(RATES_MODULE, case, timeout_s=600)
    (proc,) = started
    assert proc.wait(timeout=30) == -signal_module.SIGKILL
