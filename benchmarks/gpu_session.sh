#!/usr/bin/env bash
# The first GPU call (issue 13): ONE device `run` of at most 560 s that builds, tests, checks and
# benchmarks the kernels on a fresh H200 machine (python3 with torch 2.11, triton 3.6, nvcc 13.0,
# pytest-xdist and pytest-timeout; no network). benchmarks/README.md gives the exact call and how to
# commit what it brings back. The second call is benchmarks/gpu_session_more.sh.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine, $OUT set by the device tool
#   bash benchmarks/gpu_session.sh --dry-run  # every phase tiny, on a CPU machine (MLCONTRAST_GPU_DRY_RUN=1)
#   bash benchmarks/gpu_session.sh --print    # the phases and their commands only
#
# Phases, in order, each stopped by SIGINT at its budget (benchmarks/gpu_lib.sh says how):
#   preflight      GPU (nvidia-smi), python/torch/triton/nvcc versions, tools (compute-sanitizer, ncu)
#   triton_tests   the Triton backend's tests on the GPU, while the CUDA extension builds for sm_90 in the
#                  background (or a carried .device_build is used)
#   cuda_tests     tests/test_gpu.py, 8 processes, without compute-sanitizer and opcheck (no expecttest
#                  there unless carried: both are in the second call)
#   check          python -m mlcontrast.check --json (every fused op x backend x dtype against reference.py)
#   bench_label_supcon   N = 32768, D = 256, bf16, fwd+bwd: triton, cuda, eager and compiled reference,
#                        triton atomic (the issue's targets; the compiled reference, slowest to start, last)
#   bench_prototypes     prototype_nce, prototype_ce, update_prototypes at 262144 rows, C = 80, D = 256, bf16
#   bench_multihot       multihot_supcon (jaccard) at label_supcon's N = 32768, D = 256, bf16, C = 80: cuda,
#                        triton (issue 15's GPU target: within 1.5x of label_supcon's time)
# Everything lands in $OUT: session.log, phases.txt, logs.tgz, results.tgz, device_build.tgz.
source "$(dirname "$0")/gpu_lib.sh"

# Phase budgets in seconds (tests/test_benchmarks.py parses these lines; they add up to <= 540). The CUDA
# build runs beside the Triton tests, for at most BUDGET_TRITON_TESTS + BUDGET_BUILD_WAIT.
BUDGET_PREFLIGHT=15
BUDGET_TRITON_TESTS=130
BUDGET_BUILD_WAIT=40
BUDGET_CUDA_TESTS=90
BUDGET_CHECK=30
BUDGET_BENCH_LABEL_SUPCON=140
BUDGET_BENCH_PROTOTYPES=75
BUDGET_BENCH_MULTIHOT=20
check_budgets

if tiny; then  # tiny problems on the CPU (Triton under its interpreter)
  TRITON_TESTS=(tests/test_triton_compile.py tests/test_label_supcon_triton.py -k "test_backend_is_available or test_label_supcon_mean_of_nothing_is_zero")
  SUPCON=(--device cpu --n 128 --d 16 --dtype float32 --providers cpu torch --same-process --repeats 1)
  PROTOS=(--device cpu --dtypes float32 -- --n 640 --d 16 --num-classes 8 --providers cpu torch --same-process
    --repeats 1)
  MULTIHOT=(--device cpu --n 128 --d 16 --dtype float32 --providers cpu --same-process --repeats 1)
else
  # Every test of the Triton backend: its own files, and the op files' cases whose backend parameter is triton.
  TRITON_TESTS=(tests/test_label_supcon_triton.py tests/test_triton_compile.py tests/test_label_supcon.py
    tests/test_prototype_ce.py tests/test_prototype_nce.py tests/test_update_prototypes.py tests/test_supcon.py
    tests/test_multilabel_supcon.py tests/test_multihot_supcon.py tests/test_multihot_supcon_triton.py
    tests/test_gradcheck.py tests/test_temperature.py -k "triton and not opcheck")  # opcheck: second call
  SUPCON=(--device cuda --n 32768 --d 256 --dtype bfloat16 --providers triton cuda torch triton_atomic torch_compile
    --repeats 10 --case-budget-s 3 --warmup 3 --case-timeout-s 100)
  PROTOS=(--device cuda --dtypes bfloat16 -- --n 262144 --providers triton cuda torch --same-process --repeats 20
    --case-budget-s 1 --sweep-budget-s 22)
  MULTIHOT=(--device cuda --n 32768 --d 256 --dtype bfloat16 --providers cuda triton --same-process --repeats 5
    --warmup 1 --case-budget-s 2)
fi

phase preflight "$BUDGET_PREFLIGHT" bash -c preflight
install_wheels
use_tuned

build_start $((BUDGET_TRITON_TESTS + BUDGET_BUILD_WAIT))
pytest_cmd -n 4 --timeout 90 --maxfail 30 --durations 15 --junitxml "$LOGS/triton_tests.xml" "${TRITON_TESTS[@]}"
phase triton_tests "$BUDGET_TRITON_TESTS" "${PYTEST[@]}"
build_install
[ "$MODE" = print ] || "$PY" -c "import mlcontrast; print('backends on cuda:', mlcontrast.available_backends('cuda'))"

pytest_cmd -n 8 --timeout 120 --maxfail 30 --durations 15 --junitxml "$LOGS/cuda_tests.xml" tests/test_gpu.py \
  -k "not sanitizer and not opcheck"
phase cuda_tests "$BUDGET_CUDA_TESTS" "${PYTEST[@]}"

has_check="import importlib.util as u, sys; sys.exit(u.find_spec('mlcontrast.check') is None)"
if [ "$MODE" = print ] || "$PY" -c "$has_check" 2>/dev/null; then
  phase check "$BUDGET_CHECK" "$PY" -m mlcontrast.check --json "$LOGS/check.json"
else
  skip_phase check "mlcontrast.check does not exist in this tree"
fi

phase bench_label_supcon "$BUDGET_BENCH_LABEL_SUPCON" "$PY" -m benchmarks.bench_label_supcon "${SUPCON[@]}" \
  --sweep-budget-s $((BUDGET_BENCH_LABEL_SUPCON - 15)) --out-dir "$RESULTS"
phase bench_prototypes "$BUDGET_BENCH_PROTOTYPES" "$PY" -m benchmarks.run --ops prototype_nce prototype_ce \
  update_prototypes --out-dir "$RESULTS" "${PROTOS[@]}"
phase bench_multihot "$BUDGET_BENCH_MULTIHOT" "$PY" -m benchmarks.bench_multihot_supcon "${MULTIHOT[@]}" \
  --sweep-budget-s $((BUDGET_BENCH_MULTIHOT - 5)) --out-dir "$RESULTS"
exit "$FAILED"
