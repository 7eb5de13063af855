#!/usr/bin/env bash
# The second GPU call (issue 13), for a session with device time left after benchmarks/gpu_session.sh or
# for the next session lent a GPU: ONE device `run` of at most 560 s. Carry .device_build (the first
# call's device_build.tgz, unpacked at the repo root) to skip the build, and .whl with an expecttest wheel
# for opcheck; benchmarks/README.md gives the exact call.
#
#   bash benchmarks/gpu_session_more.sh            # on the GPU machine
#   bash benchmarks/gpu_session_more.sh --dry-run  # every phase tiny, on a CPU machine
#   bash benchmarks/gpu_session_more.sh --print    # the phases and their commands only
#
# Phases, in order, each stopped by SIGINT at its budget (benchmarks/gpu_lib.sh says how):
#   preflight        as in the first call
#   tune             benchmarks/tune_triton.py at N = 32768, D = 256, bf16, every phase, within a budget
#                    (Triton only: it runs while the CUDA extension builds, unless a build was carried;
#                    its timings share the CPU with that build, so take them as a first ranking)
#   sanitizer_probe  compute-sanitizer on a planted out-of-bounds write: does the tool instrument here?
#                    (gVisor machines refuse it; Firecracker ones work)
#   sanitizer        tests/test_gpu.py -k sanitizer (memcheck, racecheck, synccheck, initcheck), only after
#                    a probe that caught the planted error; otherwise skipped with the probe's reason
#   opcheck          torch.library.opcheck on CUDA tensors (tests/test_gpu.py, tests/test_opcheck.py),
#                    only when expecttest imports (carried as a wheel)
#   sweep            label_supcon N = 32768, D in {128, 512} x {bf16, fp32}: triton, cuda, eager, atomic
#   max_n            label_supcon bf16 D = 256 at N = 65536, then the largest N (262144 .. 1048576) of the
#                    fused providers only
source "$(dirname "$0")/gpu_lib.sh"

# Phase budgets in seconds (tests/test_benchmarks.py parses these lines; they add up to <= 540). The CUDA
# build runs beside the tuning, for at most BUDGET_TUNE + BUDGET_BUILD_WAIT.
BUDGET_PREFLIGHT=15
BUDGET_TUNE=130
BUDGET_BUILD_WAIT=30
BUDGET_SANITIZER_PROBE=15
BUDGET_SANITIZER=80
BUDGET_OPCHECK=40
BUDGET_SWEEP=115
BUDGET_MAX_N=100
check_budgets

if tiny; then
  TUNE=(--quick --device cpu --phases fwd --out "$RESULTS/tuning/label_supcon_float32_d24_n40_cpu.json")
  SWEEP=(--device cpu --dims 16 24 --dtypes float32 -- --n 128 --providers cpu torch --same-process --repeats 1)
  MAX_N=(--device cpu --d 16 --n 128 --providers cpu --max-n-start 256 --max-n-limit 512 --max-n-providers cpu
    --repeats 1 --out "$RESULTS/label_supcon_d16_maxn_cpu.json")
else
  TUNE=(--n 32768 --d 256 --dtype bfloat16 --phases fwd fwd-atomic bwd bwd-atomic
    --out "$RESULTS/tuning/label_supcon_bfloat16_d256_n32768_cuda.json")
  SWEEP=(--device cuda --dims 128 512 --dtypes bfloat16 float32 -- --n 32768
    --providers triton cuda torch triton_atomic --same-process --repeats 10 --warmup 1 --case-budget-s 1
    --case-timeout-s 60 --sweep-budget-s 27)
  # The references are left out: at these N they do not fit (and --max-n-providers keeps the probe to the
  # fused kernels even when they are named).
  MAX_N=(--device cuda --dtype bfloat16 --d 256 --n 65536 --providers triton cuda triton_atomic
    --max-n-start 262144 --max-n-limit 1048576 --max-n-timeout-s 45 --max-n-providers triton cuda triton_atomic
    --repeats 5 --case-budget-s 1 --out "$RESULTS/label_supcon_d256_bf16_maxn_cuda.json")
fi

# compute-sanitizer, found as tests/test_gpu.py finds it (PATH, then the CUDA toolkit's bin).
sanitizer_path() {
  local c
  for c in "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

# Writes $WORK/sanitizer_works when memcheck catches an out-of-bounds write planted in a trivial kernel; a
# sandbox that refuses the tool ("Device not supported", error 999) or runs the program uninstrumented
# leaves it out, and the last line of the log says why (a finding, not a failure: the status is 0).
sanitizer_probe() {
  local tool
  tool=$(sanitizer_path) || { echo "compute-sanitizer not found"; return 0; }
  command -v nvcc > /dev/null || { echo "nvcc not found (needed for the probe)"; return 0; }
  cat > "$WORK/oob.cu" <<'EOF'
#include <cstdio>
__global__ void write_past_the_end(int* a) { a[threadIdx.x] = threadIdx.x; }  // 64 threads, 32 ints
int main() {
  int* a = nullptr;
  if (cudaMalloc(&a, 32 * sizeof(int)) != cudaSuccess) { printf("cudaMalloc failed\n"); return 2; }
  write_past_the_end<<<1, 64>>>(a);
  printf("probe ran: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  return 0;
}
EOF
  nvcc -arch=sm_90 -o "$WORK/oob" "$WORK/oob.cu" || { echo "nvcc failed on the probe"; return 0; }
  "$tool" --tool memcheck --error-exitcode 97 "$WORK/oob" 2>&1 | tee "$WORK/oob.log"
  if grep -q "Invalid __global__ write" "$WORK/oob.log"; then
    echo "compute-sanitizer instruments kernels here"
    touch "$WORK/sanitizer_works"
    return 0
  fi
  echo "compute-sanitizer did not catch the planted out-of-bounds write: it does not instrument here"
}
export WORK
export -f sanitizer_path sanitizer_probe

phase preflight "$BUDGET_PREFLIGHT" bash -c preflight
install_wheels

build_start $((BUDGET_TUNE + BUDGET_BUILD_WAIT))
phase tune "$BUDGET_TUNE" "$PY" -m benchmarks.tune_triton "${TUNE[@]}" --budget-s $((BUDGET_TUNE - 20))
build_install
use_tuned  # committed tunings only: this call's own ones were timed beside a build

phase sanitizer_probe "$BUDGET_SANITIZER_PROBE" bash -c sanitizer_probe
if [ -f "$WORK/sanitizer_works" ]; then
  pytest_cmd -n 4 --timeout 75 --junitxml "$LOGS/sanitizer.xml" tests/test_gpu.py -k sanitizer
  phase sanitizer "$BUDGET_SANITIZER" "${PYTEST[@]}"
else
  skip_phase sanitizer "$(tail -1 "$LOGS/sanitizer_probe.log" 2>/dev/null || echo 'the probe did not run')"
fi

if [ "$MODE" = print ] || "$PY" -c "import expecttest" 2>/dev/null; then
  pytest_cmd -n 4 --timeout 60 --junitxml "$LOGS/opcheck.xml" tests/test_gpu.py tests/test_opcheck.py -k opcheck
  phase opcheck "$BUDGET_OPCHECK" "${PYTEST[@]}"
else
  skip_phase opcheck "expecttest does not import: carry its wheel in .whl (benchmarks/README.md)"
fi

phase sweep "$BUDGET_SWEEP" "$PY" -m benchmarks.run --ops label_supcon --out-dir "$RESULTS" "${SWEEP[@]}"
phase max_n "$BUDGET_MAX_N" "$PY" -m benchmarks.bench_label_supcon --max-n-probe \
  --sweep-budget-s $((BUDGET_MAX_N - 10)) "${MAX_N[@]}"
exit "$FAILED"
