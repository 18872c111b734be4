#!/usr/bin/env bash
# make compat TORCH_SPEC=torch==X TRITON_SPEC=triton==Y [EXTRA_SPECS="numpy<2.4"] [COMPAT_TESTS="tests"]
# Builds and tests fastseq against one pair of torch and Triton, apart from the default .venv: a virtual
# environment .venv-compat/<pair>, a copy of the working tree (tracked and untracked files that git does not ignore)
# in build/compat/<pair> built there (ninja's objects kept between runs), `fastseq info`; where torch is a CUDA build
# (PyPI's wheels are) the CUDA extension is built for TORCH_CUDA_ARCH_LIST (default 8.0;9.0) and
# tools/cuda_kernels.py checks that every kernel has machine code for every architecture; with COMPAT_AOT=1 every
# Triton kernel is compiled ahead of time for sm_80/sm_90 with that Triton; then the test suite.
# pip's cache is kept (~/.cache/pip), so a second run downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TORCH_SPEC:?TORCH_SPEC, e.g. torch==2.11.0}" "${TRITON_SPEC:?TRITON_SPEC, e.g. triton==3.6.0}"
PYTHON=${PYTHON:-python3}
EXTRA_SPECS=${EXTRA_SPECS:-}
COMPAT_TESTS=${COMPAT_TESTS:-tests}
name=$(echo "$TORCH_SPEC-$TRITON_SPEC" | tr -c 'A-Za-z0-9.\n-' '_')
venv=$PWD/.venv-compat/$name
tree=build/compat/$name
py=$venv/bin/python
t0=$(date +%s)
say() { echo "compat[$name] $(( $(date +%s) - t0 ))s: $*"; }

test -x "$py" || "$PYTHON" -m venv "$venv"
# An exact pair is asked for: the machine's cap on torch releases (a pip constraint file) does not apply to it.
# shellcheck disable=SC2086
PIP_CONSTRAINT=/dev/null "$py" -m pip install -q "$TORCH_SPEC" "$TRITON_SPEC" $EXTRA_SPECS setuptools wheel \
  pybind11 ninja numpy pytest pytest-benchmark hypothesis
say "installed $("$py" -c 'import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)')"

# The tree as it stands (file times kept, so that ninja recompiles only what changed); stale sources removed.
mkdir -p "$tree"
find "$tree" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$tree"
cd "$tree"
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" -m pip install -q --no-build-isolation --no-deps -e .
say "built"
"$py" -m fastseq info
if "$py" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  "$py" -c 'from fastseq import _C; import sys; sys.exit(not _C.with_cuda)' \
    || { echo "compat: torch is a CUDA build but fastseq._C was built without CUDA"; exit 1; }
  "$py" tools/cuda_kernels.py
fi
if [ "${COMPAT_AOT:-0}" = 1 ]; then
  env -u TRITON_INTERPRET "$py" -m fastseq.kernels.aot
  say "Triton kernels compiled ahead of time"
fi
# shellcheck disable=SC2086
"$py" -m pytest $COMPAT_TESTS -q -p no:cacheprovider
say "passed"
