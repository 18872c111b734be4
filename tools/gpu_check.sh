#!/usr/bin/env bash
# make gpu-check: on a machine with a GPU and no network whose python3 already has torch, triton, pybind11 and
# ninja. Builds the CUDA extension in place, runs every GPU test (backends cuda and triton), compute-sanitizer
# memcheck on a small subset, and the GPU benchmarks; everything lands in RESULTS_DIR, a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
R=${RESULTS_DIR:-bench/results/latest}
mkdir -p "$R"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME CMD...: runs CMD, output to $R/NAME.txt and the terminal, remembers a failure
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$R/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; git rev-parse HEAD; date -u +%FT%TZ; } \
  > "$R/machine.txt" 2>&1
MAX_JOBS=${MAX_JOBS:-16} step build python3 -m pip install --no-index --no-deps --no-build-isolation -e . \
  || { echo "gpu-check: the build failed"; exit 1; }
step info python3 -m fastseq info
step check python3 -m fastseq check
step gpu-tests python3 -m pytest tests -q -m gpu -p no:cacheprovider --junitxml="$R/gpu-tests.xml"
if command -v compute-sanitizer > /dev/null; then
  step sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest tests -q -m "gpu and sanitize" \
    -p no:cacheprovider
fi
step bench python3 -m pytest bench -q -p no:cacheprovider --benchmark-json="$R/bench.json"
step table python3 bench/report.py "$R/bench.json"
echo "gpu-check: $([ $status -eq 0 ] && echo passed || echo FAILED); results in $R"
exit $status
