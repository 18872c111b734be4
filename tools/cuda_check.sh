#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu for sm_80 and sm_90 with -Xptxas -v and prints registers and spills per kernel;
# then compiles the *_glue.cpp files syntax-only against torch's headers (the CPU wheel lacks one generated CUDA
# header, c10/cuda/impl/cuda_cmake_macros.h, which gets an empty stand-in here). Any error fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
NVCC=${NVCC:-nvcc}
out=build/cuda-check
mkdir -p "$out/stub/c10/cuda/impl"
: > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
status=0
for cu in csrc/cuda/*.cu; do
  name=$(basename "$cu" .cu)
  if ! "$NVCC" -std=c++20 -O3 -lineinfo -Icsrc -gencode arch=compute_80,code=sm_80 \
      -gencode arch=compute_90,code=sm_90 -Xptxas -v -c "$cu" -o "$out/$name.o" > "$out/$name.log" 2>&1; then
    cat "$out/$name.log"; echo "FAIL nvcc $cu"; status=1; continue
  fi
  # one line per kernel and architecture: registers, spill stores/loads
  awk '/Compiling entry function/ {match($0, /_Z[^'"'"']*/); fn=substr($0, RSTART, RLENGTH); match($0, /sm_[0-9]+/); arch=substr($0, RSTART, RLENGTH)}
       /bytes spill stores/ {spill=$5 "/" $9}
       /Used [0-9]+ registers/ {match($0, /Used [0-9]+ registers/); print "  " arch " regs=" substr($0, RSTART+5, RLENGTH-15) " spills(st/ld)=" spill "  " fn}' \
      "$out/$name.log" | c++filt | sort -u | cut -c1-160
  spills=$(grep -Eo '[0-9]+ bytes spill' "$out/$name.log" | awk '{s+=$1} END {print s+0}')
  echo "ok   nvcc $cu (total spill bytes: $spills)"
done
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CUDA_INC=$(dirname "$(dirname "$(command -v "$NVCC")")")/include
for glue in csrc/cuda/*_glue.cpp; do
  if c++ -std=c++20 -fsyntax-only -DWITH_CUDA -Icsrc -I"$out/stub" $TORCH_INC -I"$PY_INC" -I"$CUDA_INC" \
      -I/usr/local/cuda/include "$glue"; then
    echo "ok   c++ -fsyntax-only $glue"
  else
    echo "FAIL c++ -fsyntax-only $glue"; status=1
  fi
done
exit $status
