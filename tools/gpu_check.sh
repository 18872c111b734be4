#!/usr/bin/env bash
# make gpu-check RESULTS_DIR=...: everything a GPU can tell about fastseq, in at most 10 minutes of wall time, on a
# machine whose python3 already has torch, triton, pybind11, ninja, pytest and pytest-benchmark (no network needed).
# Stages in order of value, each under a time budget (seconds, overridable), each writing its results into
# RESULTS_DIR as it goes, so that a run cut off still returns what ran:
#   build      100  the extension for this GPU's architecture only, all cores; `fastseq info`; the kernels' SASS
#   check       90  `python -m fastseq check`: every op on every backend and dtype against the float64 reference
#   tests      150  the GPU tests (-m gpu; pytest-xdist where installed), junit XML, skip reasons listed
#   sanitizer   80  compute-sanitizer memcheck and racecheck on the small tests marked `sanitize`
#   bench      140  the GPU benchmarks against cuDNN / torch's SDPA backends / torch's layer norm, a line per row
#                   (shares: persistent layer kernels 25%, recurrent layers 25%, attention 25%, cells 10%,
#                   layer norm 8%, MultiheadAttention 7%)
#   summary         one page: machine, commit, each stage's status and time, test counts, the benchmark table
# Eight files at most (what the device returns): summary.md build.txt check.txt gpu-tests.txt gpu-tests.xml
# sanitizer.txt bench.jsonl bench.txt. Without a GPU (a dry run) the GPU stages report themselves skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
R=${RESULTS_DIR:-bench/results/latest}
PY=${PY:-python3}
mkdir -p "$R"
R=$(cd "$R" && pwd)
export PYTHONUNBUFFERED=1
SUMMARY=$R/summary.md
status=0
t_start=$(date +%s)

gpu=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)
{
  echo "# fastseq gpu-check"
  echo
  echo "- commit: ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "- date: $(date -u +%FT%TZ)"
  echo "- gpu: ${gpu:-none}; $(nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  echo "- $("$PY" -c 'import platform, torch; print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)' 2>&1)"
  echo "- cores: $(nproc)"
  echo
  echo "| stage | status | seconds | budget |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

# stage NAME BUDGET FILE CMD...: runs CMD under `timeout BUDGET`, output to FILE (appended) and the terminal; a line
# in the summary when it ends.
stage() {
  local name=$1 budget=$2 file=$3; shift 3
  local t0 rc result
  t0=$(date +%s)
  echo "=== $name (budget ${budget}s): $*" | tee -a "$file"
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$file"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) result=passed ;;
    124|137) result="CUT OFF at its budget"; status=1 ;;
    *) result="FAILED (exit $rc)"; status=1 ;;
  esac
  echo "=== $name: $result in $(( $(date +%s) - t0 ))s" | tee -a "$file"
  echo "| $name | $result | $(( $(date +%s) - t0 )) | $budget |" >> "$SUMMARY"
  return "$rc"
}
skipped() {  # skipped NAME FILE REASON
  echo "=== $1: skipped: $3" | tee -a "$2"
  echo "| $1 | skipped: $3 | 0 | - |" >> "$SUMMARY"
}

# (build) This GPU's architecture only (all architectures of the default list where there is none), all cores.
arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "8.0;9.0")')
build() {
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . \
    && "$PY" -m fastseq info \
    && if "$PY" -c 'import sys; from fastseq import _C; sys.exit(not _C.with_cuda)'; then
         "$PY" tools/cuda_kernels.py
       else
         echo "fastseq._C has no CUDA kernels (torch $("$PY" -c 'import torch; print(torch.__version__)') has no CUDA or no toolkit was found)"
       fi
}
: > "$R/build.txt"
export -f build
export PY arch
stage build "${BUDGET_BUILD:-100}" "$R/build.txt" bash -c build || { echo "gpu-check: the build failed"; }

: > "$R/check.txt"
stage check "${BUDGET_CHECK:-90}" "$R/check.txt" "$PY" -m fastseq check

: > "$R/gpu-tests.txt"
if [ -z "$gpu" ]; then
  skipped tests "$R/gpu-tests.txt" "no CUDA device (torch.cuda.is_available() is False)"
else
  xdist=()
  "$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 8)  # 8 processes: Triton's compiles run in parallel
  per_test=()
  "$PY" -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout 90)
  stage tests "${BUDGET_TESTS:-150}" "$R/gpu-tests.txt" "$PY" -m pytest tests -q -m gpu -rsfE -p no:cacheprovider \
    "${xdist[@]}" "${per_test[@]}" --junitxml="$R/gpu-tests.xml"
fi

: > "$R/sanitizer.txt"
if [ -z "$gpu" ]; then
  skipped sanitizer "$R/sanitizer.txt" "no CUDA device"
elif ! command -v compute-sanitizer > /dev/null; then
  skipped sanitizer "$R/sanitizer.txt" "compute-sanitizer is not on PATH"
else
  sanitize() {
    local rc=0 tool
    for tool in memcheck racecheck; do
      echo "--- compute-sanitizer --tool $tool"
      compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" -m pytest tests -q -m "gpu and sanitize" \
        -p no:cacheprovider || rc=1
    done
    return $rc
  }
  export -f sanitize
  stage sanitizer "${BUDGET_SANITIZER:-80}" "$R/sanitizer.txt" bash -c sanitize
fi

: > "$R/bench.txt"
: > "$R/bench.jsonl"
if [ -z "$gpu" ]; then
  skipped bench "$R/bench.txt" "no CUDA device (make bench benchmarks the CPU)"
else
  # Each benchmark file under its own share of the budget, most valuable first: the persistent layer kernels and
  # the recurrent layers against cuDNN, attention against torch's SDPA backends, the cells, layer norm,
  # MultiheadAttention. Each row is appended
  # to bench.jsonl as soon as it is measured, so a file cut off at its budget keeps the rows it measured.
  export BENCH_JSONL=$R/bench.jsonl
  total=${BUDGET_BENCH:-140}
  for entry in rnn_persistent:25 rnn_layer:25 attention:25 rnn_cell:10 layer_norm:8 multihead_attention:7; do
    name=${entry%%:*}
    stage "bench-$name" $(( total * ${entry##*:} / 100 )) "$R/bench.txt" "$PY" -m pytest -q -p no:randomly \
      -p no:cacheprovider "bench/bench_$name.py"
  done
fi

# (summary) test counts from the junit XML, the check's verdicts, the benchmark table.
"$PY" tools/gpu_summary.py "$R" "$(( $(date +%s) - t_start ))" >> "$SUMMARY" 2>&1
[ -s "$R/bench.jsonl" ] && "$PY" bench/report.py "$R/bench.jsonl" >> "$R/bench.txt" 2>&1
cat "$SUMMARY"
echo "gpu-check: $([ $status -eq 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - t_start ))s; results in $R"
exit $status
