# Shared by benchmarks/gpu_session.sh and benchmarks/gpu_session_more.sh (sourced, not run).
#
# One device call = one script, at most 560 s (the tool's timeout_s; a machine goes back 30 s after a
# call, and a new one costs 1-2 of a session's 15 minutes). Its phases run one after the other, each under
# its own budget (the BUDGET_* lines of the script, which must add up to CALL_BUDGET_S or less: checked
# at the start, and by tests/test_benchmarks.py), stopped by SIGINT at its budget so that pytest prints its
# summary and writes its junit XML, and by SIGKILL 5 s later. A phase that fails or is stopped does not
# stop the next; what every phase produced is packed into $OUT after each phase, so a call cut short
# still brings back what finished. Nothing here sleeps or retries.
#
# Modes (MLCONTRAST_GPU_DRY_RUN, or the script's first argument):
#   (unset) / gpu   the GPU machine
#   1 / --dry-run   every phase on this CPU machine with tiny problems (Triton under its interpreter, no
#                   CUDA build): checks the script's logic in a minute or two
#   print / --print the phases and their commands, nothing run

CALL_BUDGET_S=540  # the sum of a script's BUDGET_* must not exceed this (a call's timeout_s is 560)
KILL_AFTER_S=5     # SIGKILL this long after the SIGINT of a phase that does not stop

set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
MODE=${MLCONTRAST_GPU_DRY_RUN:-gpu}
case "${1:-}" in
  --dry-run) MODE=1 ;;
  --print) MODE=print ;;
  "") ;;
  *) echo "usage: bash $0 [--dry-run | --print]"; exit 2 ;;
esac
case "$MODE" in
  0 | gpu | "") MODE=gpu ;;
  1 | dry | true) MODE=dry ;;
  print) ;;
  *) echo "MLCONTRAST_GPU_DRY_RUN=$MODE?"; exit 2 ;;
esac
dry() { [ "$MODE" != gpu ]; }   # nothing that needs the GPU machine (dry run, print)
tiny() { [ "$MODE" = dry ]; }   # the dry run's tiny CPU problems (print shows the GPU commands)

OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mlcontrast_gpu.XXXXXX")
LOGS=$WORK/logs
RESULTS=$WORK/benchmarks/results  # packed as benchmarks/results/...: unpack at the repo root
mkdir -p "$LOGS" "$RESULTS"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
export MLCONTRAST_BENCH_RETRIES=0  # the benchmarks' waits for a rebuild in progress: none happens here
START_S=$SECONDS
DEADLINE_S=$((SECONDS + CALL_BUDGET_S))
FAILED=0

step() { echo; echo "=== +$((SECONDS - START_S))s $*"; }

# The sum of this script's BUDGET_* variables; exits when it exceeds the call's budget.
check_budgets() {
  local total=0 name
  for name in $(compgen -v BUDGET_); do total=$((total + ${!name})); done
  echo "phase budgets: $total s of the call's $CALL_BUDGET_S s ($(for n in $(compgen -v BUDGET_); do
    printf '%s=%s ' "${n#BUDGET_}" "${!n}"; done))"
  if [ "$total" -gt "$CALL_BUDGET_S" ]; then echo "the phase budgets exceed $CALL_BUDGET_S s"; exit 2; fi
}

record() {  # record NAME BUDGET SECONDS OUTCOME: one line of the phase table
  printf '%-22s %6s %6s  %s\n' "$1" "$2" "$3" "$4" >> "$LOGS/phases.txt"
}

# phase NAME BUDGET_S COMMAND...: COMMAND under at most BUDGET_S seconds (less when the call's deadline is
# nearer), its output to the console (QUIET=1: only to the log) and $LOGS/NAME.log. Returns its status.
phase() {
  local name=$1 budget=$2 rc start outcome
  shift 2
  local left=$((DEADLINE_S - SECONDS))
  [ "$budget" -gt "$left" ] && budget=$left
  step "$name (${budget} s): $(printf '%q ' "$@")"
  if [ "$budget" -lt 5 ]; then
    record "$name" "$budget" 0 "NOT RUN: the call's budget is spent"
    return 124
  fi
  if [ "$MODE" = print ]; then
    record "$name" "$budget" 0 "printed"
    return 0
  fi
  start=$SECONDS
  if [ "${QUIET:-0}" = 1 ]; then
    timeout -s INT -k "$KILL_AFTER_S" "$budget" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
  else
    timeout -s INT -k "$KILL_AFTER_S" "$budget" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
  fi
  # pytest's 5 (no test ran): on a CPU machine the GPU test modules skip themselves.
  [ "$rc" -eq 5 ] && tiny && rc=0 && echo "(dry run: no test ran on this machine)"
  case $rc in
    0) outcome=ok ;;
    124 | 137) outcome="STOPPED at its budget (rc $rc)" ;;
    *) outcome="FAILED (rc $rc)" ;;
  esac
  [ "$rc" -eq 0 ] || FAILED=1
  record "$name" "$budget" $((SECONDS - start)) "$outcome"
  echo "--- $name: $outcome after $((SECONDS - start)) s"
  [ "${QUIET:-0}" = 1 ] || pack  # not from the background build: one packer at a time
  return "$rc"
}

skip_phase() {  # skip_phase NAME REASON
  step "$1: skipped: $2"
  record "$1" - 0 "skipped: $2"
}

# pytest with the plugins of the GPU machine (pytest-xdist's -n, pytest-timeout's --timeout); where one is
# missing (a dry run here) its options are dropped, with a note.
pytest_cmd() {
  local args=() arg drop_next=0 have_xdist=1 have_timeout=1
  if tiny; then
    "$PY" -c "import xdist" 2>/dev/null || have_xdist=0
    "$PY" -c "import pytest_timeout" 2>/dev/null || have_timeout=0
  fi
  for arg in "$@"; do
    if [ "$drop_next" = 1 ]; then drop_next=0; continue; fi
    if [ "$arg" = -n ] && [ "$have_xdist" = 0 ]; then
      drop_next=1; echo "(pytest-xdist missing: -n dropped)" >&2; continue
    fi
    if [ "$arg" = --timeout ] && [ "$have_timeout" = 0 ]; then
      drop_next=1; echo "(pytest-timeout missing: --timeout dropped)" >&2; continue
    fi
    args+=("$arg")
  done
  PYTEST=("$PY" -m pytest -p no:cacheprovider -rs "${args[@]}")
}

export PY MODE
preflight() {  # run as a phase: `phase preflight BUDGET bash -c preflight`
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  cores: $(nproc)  mode: $MODE"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
  nvcc --version 2>&1 | tail -2
  local tool
  for tool in compute-sanitizer ncu cuobjdump; do echo "$tool: $(command -v "$tool" || echo missing)"; done
  "$PY" - <<'EOF'
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
plugins = ("xdist", "pytest_timeout", "expecttest")
print("importable:", {m: importlib.util.find_spec(m) is not None for m in plugins})
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
else:
    print("no CUDA GPU")
EOF
}
export -f preflight

# Wheels carried in .whl (expecttest for opcheck; see benchmarks/README.md), installed to /tmp/site.
install_wheels() {
  ls .whl/*.whl > /dev/null 2>&1 || return 0
  if dry; then echo "would install $(ls .whl/*.whl | tr '\n' ' ')to /tmp/site"; return 0; fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && echo "installed $(ls .whl)"
}

# Tuned Triton configurations committed (or carried) under benchmarks/results/tuning/: every benchmark
# process then runs them and records them in its metadata.
use_tuned() {
  local files
  files=$(ls benchmarks/results/tuning/*_cuda.json 2>/dev/null) || true
  [ -n "$files" ] && [ "$MODE" != print ] || return 0
  MLCONTRAST_TRITON_CONFIGS="$("$PY" -m benchmarks.tune_triton --emit-env $files)" && export MLCONTRAST_TRITON_CONFIGS
  echo "tuned Triton configurations: $MLCONTRAST_TRITON_CONFIGS"
}

# ---- the CUDA extension for sm_90 -------------------------------------------------------------------
# A build carried in .device_build (from an earlier call's device_build.tgz) is used when it was built
# against the same torch from the same sources; otherwise build_start builds in the background, into
# $WORK/build (not in place: the phases running meanwhile must not load a half-written library), and
# build_install puts the library into mlcontrast/ once it is done.

source_hash() { find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16; }

use_carried_build() {
  local torch_version
  [ -f .device_build/_C.abi3.so ] || return 1
  torch_version=$("$PY" -c "import torch; print(torch.__version__)")
  if [ "$(cat .device_build/torch_version 2>/dev/null)" != "$torch_version" ] \
    || [ "$(cat .device_build/source_hash 2>/dev/null)" != "$(source_hash)" ]; then
    echo "the carried .device_build is of another torch or other sources: building"
    return 1
  fi
  echo "using the carried build .device_build (torch $torch_version, sources $(source_hash))"
  dry || cp .device_build/_C.abi3.so mlcontrast/_C.abi3.so
}

build_cmd() {
  if tiny; then  # no CUDA build on the CPU machine: the plumbing only
    BUILD=("$PY" -c "print('dry run: would build: MLCONTRAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 \
$PY setup.py build_ext --build-lib $WORK/build/lib --build-temp $WORK/build/temp')")
  else
    BUILD=(env MLCONTRAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12
      "$PY" setup.py build_ext --build-lib "$WORK/build/lib" --build-temp "$WORK/build/temp")
  fi
}

BUILD_PID=
build_start() {  # build_start BUDGET_S: the build in the background, its log in $LOGS/build.log
  if use_carried_build; then return 0; fi
  build_cmd
  (QUIET=1 phase build "$1" "${BUILD[@]}"; echo $? > "$WORK/build.rc") &
  BUILD_PID=$!
}

build_install() {  # waits for the background build, installs the library, keeps it for the next call
  [ -n "$BUILD_PID" ] || return 0
  step "waiting for the CUDA build (its log: logs/build.log)"
  wait "$BUILD_PID"
  BUILD_PID=
  tail -5 "$LOGS/build.log" 2>/dev/null
  local so
  so=$(ls "$WORK"/build/lib/mlcontrast/_C*.so 2>/dev/null | head -1)
  if [ "$(cat "$WORK/build.rc" 2>/dev/null)" != 0 ] || [ -z "$so" ]; then
    dry && { echo "dry run: nothing built, the local extension stays"; return 0; }
    echo "CUDA BUILD FAILED OR UNFINISHED: the CUDA phases run without the cuda backend"
    FAILED=1
    return 1
  fi
  cp "$so" mlcontrast/_C.abi3.so
  mkdir -p "$WORK/device_build/.device_build"
  cp "$so" "$WORK/device_build/.device_build/_C.abi3.so"
  "$PY" -c "import torch; print(torch.__version__)" > "$WORK/device_build/.device_build/torch_version"
  source_hash > "$WORK/device_build/.device_build/source_hash"
  tar czf "$OUT/device_build.tgz" -C "$WORK/device_build" .device_build && echo "kept the build: device_build.tgz"
}

# ---- packing: at most 8 files come back from $OUT ---------------------------------------------------
# session.log (the console), phases.txt, logs.tgz (every phase's log, junit XML, check.json),
# results.tgz (benchmarks/results/...: unpack at the repo root), device_build.tgz (.device_build/...).
pack() {
  cp "$LOGS/phases.txt" "$OUT/phases.txt" 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
  if [ -n "$(ls -A "$RESULTS")" ]; then tar czf "$OUT/results.tgz" -C "$WORK" benchmarks/results; fi
}

finish() {
  [ -n "$BUILD_PID" ] && kill "$BUILD_PID" 2>/dev/null
  pack
  step "done in $((SECONDS - START_S)) s; phases (name, budget s, took s, outcome):"
  cat "$LOGS/phases.txt" 2>/dev/null
  echo "results: $(cd "$WORK" && ls benchmarks/results 2>/dev/null | tr '\n' ' ')"
  echo "under \$OUT ($OUT): $(ls "$OUT" | tr '\n' ' ')"
}
trap finish EXIT
