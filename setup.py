"""Builds fastseq._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found (or
FASTSEQ_FORCE_CUDA=1). TORCH_CUDA_ARCH_LIST is honoured (default "8.0;9.0")."""
import glob
import os
import re
import shutil
import subprocess
import tempfile

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _compiler_accepts(flag: str) -> bool:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = [os.environ.get("CXX", "c++"), flag, src, "-o", os.path.join(d, "t")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def _cpu_flags() -> list[str]:
    """AVX2 code paths of at::vec when this CPU has them (the build runs on the machine that uses it);
    FASTSEQ_NO_AVX2=1 gives the portable code. AVX-512 is opt-in (FASTSEQ_AVX512=1, where the CPU has it): on the
    2-core Zen 4 it measured no consistent gain (recurrent layers at one row: 0.9-1.1x of the AVX2 build, some rows
    slower; the layers at more rows run oneDNN either way). Both builds pass the whole suite. The layer norm slowdown
    once blamed on it (13x at width 768) does not reproduce (AVX-512 build, 4096 x 768 forward+backward: 2.7x torch);
    its likely cause is the first touch of fresh memory, which an AVX2 build shows alike (4096 x 8192
    forward+backward: ~340 ms a call for its first four calls, then ~50 ms)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        flags = set()
    if os.environ.get("FASTSEQ_NO_AVX2") == "1" or not {"avx2", "fma", "f16c"} <= flags:
        return ["-DCPU_CAPABILITY=DEFAULT"]
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags and os.environ.get("FASTSEQ_AVX512") == "1":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX512",
                "-DCPU_CAPABILITY_AVX512"]
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def _find_cuda_home() -> str | None:
    """The CUDA toolkit's root: CUDA_HOME/CUDA_PATH when set, else torch's guess (the parent of the folder of the
    nvcc on PATH) when it holds include/cuda_runtime.h, else where nvcc says it lives (`nvcc -dryrun` prints its
    own folder as _HERE_: right also when the nvcc on PATH is a wrapper script), else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = [cpp_extension.CUDA_HOME]
    try:
        out = subprocess.run(["nvcc", "-dryrun", "--version"], capture_output=True, text=True, timeout=60)
        here = re.search(r"^#\$ _HERE_=(.*)$", out.stdout + out.stderr, re.M)
        if here:
            candidates.append(os.path.dirname(here.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if _is_toolkit(c)), None)


def _with_cuda() -> bool:
    """True when building the CUDA kernels; points torch's extension builder at the toolkit found."""
    import torch

    forced = os.environ.get("FASTSEQ_FORCE_CUDA") == "1"
    if torch.version.cuda is None and not forced:
        return False
    home = _find_cuda_home()
    if not _is_toolkit(home):
        if not forced and cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
            return False  # a CUDA torch on a machine without the toolkit: CPU kernels only
        raise RuntimeError(
            "fastseq: building the CUDA kernels needs the CUDA toolkit, but none was found: looked at CUDA_HOME and "
            f"CUDA_PATH, torch's guess {cpp_extension.CUDA_HOME!r}, the folder `nvcc -dryrun` names and "
            "/usr/local/cuda for include/cuda_runtime.h. Set CUDA_HOME to the toolkit's root (the folder with "
            "bin/nvcc and include/cuda_runtime.h).")
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home  # read by CUDAExtension and BuildExtension
    return True


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/bindings.cpp", "csrc/rnn_layer.cpp"] + rel("csrc/cpu/*.cpp")
    cxx = ["-O3"] + _cpu_flags()  # the C++ standard is torch's (C++20 for torch 2.13)
    if _compiler_accepts("-fopenmp"):
        cxx.append("-fopenmp")
    ldflags = ["-fopenmp"] if "-fopenmp" in cxx else []
    include = [os.path.join(ROOT, "csrc")]
    if not _with_cuda():
        return cpp_extension.CppExtension("fastseq._C", sources, include_dirs=include,
                                          extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").replace(".", "").split()
    cxx += ["-DWITH_CUDA", "-DFASTSEQ_CUDA_ARCHS=" + "_".join("sm" + a for a in archs)]
    sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*_glue.cpp")
    nvcc = ["-O3", "-lineinfo", "-DWITH_CUDA"]
    return cpp_extension.CUDAExtension("fastseq._C", sources, include_dirs=include,
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                       extra_link_args=ldflags)


setup(
    packages=["fastseq", "fastseq.nn", "fastseq.ops", "fastseq.kernels"],
    package_dir={"fastseq": "fastseq", "fastseq.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
