#!/usr/bin/env bash
# A GPU session in a few calls: build on the GPU machine, run the GPU tests, run the GPU benchmarks.
#
#   bash benchmarks/gpu_session.sh build          # build the extension for this GPU (in place); ~2 min on 16 cores
#   bash benchmarks/gpu_session.sh test           # build if needed, then the GPU tests and compute-sanitizer
#   bash benchmarks/gpu_session.sh bench-supcon   # label_supcon: bf16 D=256 (the targets' shape) + largest-N probe
#   bash benchmarks/gpu_session.sh bench-protos [DTYPE...]  # prototype_nce, prototype_ce, update_prototypes
#                                                           # (default: float32 bfloat16)
#   bash benchmarks/gpu_session.sh bench-sweep [DTYPE...]   # label_supcon at D = 128 and 512 (default: both dtypes)
#   bash benchmarks/gpu_session.sh tune           # Triton label_supcon forward configurations, bf16 D=256 N=32768
#   bash benchmarks/gpu_session.sh tune-bwd       # the same for the backward kernels
#
# Written for the device tool's machines (python3 with torch and triton already installed, nothing to
# download, each call a fresh machine unless it is still warm, at most 10 minutes a call). Every phase
# writes its log, and the benchmark phases their results, under $OUT (or ./gpu_out without it):
# `log-<phase>.txt`, `results-<phase>.tgz` (benchmarks/results/*_cuda.*) and, after a build,
# `_C.abi3.so.gz`, the built extension. To skip the build in later calls, unpack that file to
# `.device_build/_C.abi3.so` here, with `torch_version` beside it (`.device_build/` is git-ignored), and
# name `.device_build` in the call's carry: the script uses it when it was built against the same torch.
# Back here, unpack the results tarballs at the repo root, commit benchmarks/results/*_cuda.*, and run
# `python -m benchmarks.report --write-readme --write-measured` (README's tables and the table that
# "auto" follows on CUDA).
#
# Every phase stops starting work after GPU_SESSION_BUDGET_S seconds (default 540: a call's limit is 600 s)
# and packs what it has on any exit; the benchmark scripts write their results file case by case (marked
# "partial" until the sweep ends), so a phase cut short still brings back the cases that ran.
#
# Order, most important first (30 minutes of device time a session, ~10 per call): test, bench-supcon
# (the issues' targets), bench-protos, then tune, tune-bwd, bench-sweep float32, bench-sweep bfloat16.
# Unpack each call's tarball here before the next: the benchmarks then run the tuned configurations (see
# use_tuned; keyed by the tuned dtype), which go into mlcontrast/ops/label_supcon.py's defaults afterwards.
#
# Python packages that the GPU image lacks and the tests need (expecttest, for opcheck) travel as
# wheels: here, `pip download --no-deps --only-binary=:all: -d .whl expecttest` (`.whl/` is git-ignored)
# and name `.whl` in carry; the script installs them to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:-test}"
shift || true
BUDGET_S="${GPU_SESSION_BUDGET_S:-540}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
log="$OUT/log-$phase.txt"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }

# Runs a command with what is left of the phase's time budget (SECONDS counts from the script's start).
bounded() {
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -le 15 ]; then
    echo "NOT RUN (the phase's ${BUDGET_S} s budget is spent): $*"
    return 124
  fi
  timeout --kill-after=10 "$left" "$@"
  local rc=$?
  [ "$rc" -eq 124 ] && echo "STOPPED after the phase's ${BUDGET_S} s budget: $*"
  return "$rc"
}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

machine() {
  step "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton missing")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
else:
    print("no CUDA GPU")
EOF
}

# The extension for this GPU's architecture, in place; a carried build of the same torch is reused.
build() {
  local torch_version arch
  torch_version=$("$PY" -c "import torch; print(torch.__version__)")
  # This GPU's architecture (9.0 where there is none: a dry run of the script on a CPU machine).
  arch=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')" 2>/dev/null \
    || echo 9.0)
  if [ -f .device_build/_C.abi3.so ] && [ "$(cat .device_build/torch_version 2>/dev/null)" = "$torch_version" ]; then
    step "using the carried build of .device_build (torch $torch_version)"
    cp .device_build/_C.abi3.so mlcontrast/_C.abi3.so
  else
    step "building for sm_${arch/./} against torch $torch_version"
    local start=$SECONDS
    MLCONTRAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace \
      || { echo "BUILD FAILED"; exit 1; }
    echo "built in $((SECONDS - start)) s"
    gzip -c mlcontrast/_C.abi3.so > "$OUT/_C.abi3.so.gz"
    echo "$torch_version" > "$OUT/torch_version"
  fi
  "$PY" -c "import mlcontrast, torch; print('backends on cuda:', mlcontrast.available_backends('cuda'))"
}

# Tuned Triton configurations, when an earlier `tune` / `tune-bwd` call left its results here (carried
# back as untracked files): every benchmark process then runs them (and records them in its metadata).
use_tuned() {
  local files
  files=$(ls benchmarks/results/tuning/*_tune*_cuda.json 2>/dev/null) || return 0
  [ -n "$files" ] || return 0
  MLCONTRAST_TRITON_CONFIGS="$("$PY" -m benchmarks.tune_triton --emit-env $files)" && export MLCONTRAST_TRITON_CONFIGS
  echo "tuned Triton configurations: $MLCONTRAST_TRITON_CONFIGS"
}

pack() {
  local files
  files=$(ls benchmarks/results/*_cuda.* benchmarks/results/tuning/*_cuda.json 2>/dev/null) || true
  [ -n "$files" ] || { echo "nothing to pack"; return 0; }
  tar czf "$OUT/results-$phase.tgz" $files && echo "packed $OUT/results-$phase.tgz"
}

case "$phase" in
  bench-*|tune*) trap pack EXIT ;;  # whatever ran comes back, also from a phase cut short
esac

case "$phase" in
  build)
    machine; build ;;
  test)
    machine; build
    step "GPU tests (tests/test_gpu.py: every op on CUDA, opcheck, determinism, compute-sanitizer)"
    bounded "$PY" -m pytest -q --maxfail=25 -p no:cacheprovider tests/test_gpu.py -rs --durations=15
    step "Triton on the GPU (tests/test_triton_ops.py, bf16 and large sizes included)"
    bounded "$PY" -m pytest -q --maxfail=25 -p no:cacheprovider tests/test_triton_ops.py -rs --durations=10 ;;
  bench-supcon)
    machine; build; use_tuned
    step "label_supcon, bf16, D = 256, the issue's shape (N = 32768) and around it; largest N up to 2^20"
    bounded "$PY" -m benchmarks.bench_label_supcon --device cuda --dtype bfloat16 --d 256 --n 4096 16384 32768 65536 \
      --max-n-probe --max-n-start 131072 --max-n-limit 1048576 --max-n-timeout-s 120 ;;
  bench-protos)
    machine; build; use_tuned
    for dtype in ${@:-float32 bfloat16}; do
      for op in prototype_nce prototype_ce update_prototypes; do
        step "$op, $dtype"
        bounded "$PY" -m benchmarks.bench_$op --device cuda --dtype "$dtype"
      done
    done ;;
  bench-sweep)
    machine; build; use_tuned
    for dtype in ${@:-float32 bfloat16}; do
      for d in 128 512; do
        step "label_supcon, $dtype, D = $d"
        bounded "$PY" -m benchmarks.bench_label_supcon --device cuda --dtype "$dtype" --d $d
      done
    done ;;
  tune|tune-bwd)
    machine; build
    phases="fwd fwd-atomic"; [ "$phase" = tune-bwd ] && phases="bwd bwd-atomic"
    step "Triton label_supcon configurations ($phases), bf16, D = 256, N = 32768 (72 candidates, ~4 s each)"
    bounded "$PY" -m benchmarks.tune_triton --n 32768 --d 256 --dtype bfloat16 --phases $phases \
      --out "benchmarks/results/tuning/label_supcon_bfloat16_d256_n32768_${phase}_cuda.json" ;;
  *)
    echo "unknown phase $phase (build, test, bench-supcon, bench-protos, bench-sweep, tune, tune-bwd)"; exit 2 ;;
esac
step "done"
