"""Checks the machine code in a CUDA build of fastseq._C: every architecture the extension says it was built for
is in the binary, and every __global__ kernel of csrc/cuda/*.cu has machine code (SASS) for each of them.
Prints, per kernel and architecture, the instantiations, element types, most registers and local (spill) bytes, as
`cuobjdump --dump-resource-usage` reports them. Exit 1 when a kernel or an architecture is missing.

    python tools/cuda_kernels.py [path/to/_C.so]      (default: the fastseq._C that imports)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A kernel's name in its source: `__global__ void [__launch_bounds__(...)] name(`.
_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(", re.S)
_DTYPES = {"float": re.compile(r"\bfloat\b"), "double": re.compile(r"\bdouble\b"),
           "half": re.compile(r"__half\b|c10::Half"), "bf16": re.compile(r"__nv_bfloat16\b|c10::BFloat16")}


def cuobjdump() -> str:
    """cuobjdump from the CUDA toolkit, PATH, or the copy that Triton's wheel ships."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit("cuda_kernels: no cuobjdump (looked in $CUDA_HOME/bin, PATH and Triton's wheel)")


def source_kernels() -> dict[str, str]:
    """{kernel name: source file} for every __global__ function of csrc/cuda."""
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        with open(path) as f:
            for name in _KERNEL.findall(f.read()):
                out[name] = os.path.relpath(path, ROOT)
    return out


def resource_usage(so: str) -> dict[str, dict[str, dict[str, int]]]:
    """{arch ("sm_80"): {demangled kernel: {"REG": .., "LOCAL": .., "SHARED": .., "STACK": ..}}}."""
    text = subprocess.run([cuobjdump(), "--dump-resource-usage", so], capture_output=True, text=True,
                          check=True).stdout
    usage: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
    arch, mangled = None, []
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+\w*)", line):
            arch = m.group(1)
        elif (m := re.match(r"\s*Function (\S+):", line)) and arch:
            mangled.append((arch, m.group(1)))
        elif "REG:" in line and mangled and len(mangled[-1]) == 2:
            mangled[-1] = (*mangled[-1], {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)})
    names = subprocess.run(["c++filt"], input="\n".join(m for _, m, *_ in mangled), capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for (arch, _, *res), name in zip(mangled, names):
        usage[arch][name] = res[0] if res else {}
    return dict(usage)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        so, archs = argv[1], None
    else:
        from fastseq import _C

        if not _C.with_cuda:
            print("cuda_kernels: fastseq._C was built without CUDA")
            return 1
        so, archs = _C.__file__, ["sm_" + a[2:] for a in _C.cuda_archs.split("_")]
    usage = resource_usage(so)
    status = 0
    if archs is not None and sorted(usage) != sorted(archs):
        print(f"FAIL architectures in {os.path.basename(so)}: {sorted(usage)}, built for {archs}")
        status = 1
    kernels = source_kernels()
    print(f"{len(kernels)} kernels in csrc/cuda; machine code per architecture "
          "(instantiations, element types, most registers, most local bytes):")
    for name, src in kernels.items():
        cells = []
        for arch in sorted(usage):
            inst = [(k, r) for k, r in usage[arch].items() if re.search(rf"\b{name}\b", k)]
            if not inst:
                cells.append(f"{arch}: MISSING")
                status = 1
                continue
            dtypes = "/".join(d for d, p in _DTYPES.items() if any(p.search(k) for k, _ in inst)) or "-"
            regs = max(r.get("REG", 0) for _, r in inst)
            local = max(r.get("LOCAL", 0) for _, r in inst)
            cells.append(f"{arch}: {len(inst):3d} x {dtypes:<16} regs<={regs:3d} local<={local}")
        print(f"  {name:<36} {'  |  '.join(cells)}   ({src})")
    counts = {arch: len(k) for arch, k in usage.items()}
    if len(set(counts.values())) > 1:
        print(f"FAIL the architectures hold different numbers of kernels: {counts}")
        status = 1
    print(("ok  " if status == 0 else "FAIL") + f" cuda kernels: {counts}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
