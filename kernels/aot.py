"""Ahead-of-time compile check of every Triton kernel (no GPU needed).

Each kernel module lists its configurations as ``AOT_SPECS``; this compiles each for sm_80 and sm_90, prints
registers, stack (spilled registers) and shared memory, and exits non-zero when one fails or needs more shared
memory than the part (except configurations marked optional, which their launcher takes only where they fit).
Run with ``python -m fastseq.kernels.aot`` (TRITON_INTERPRET must be unset).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory per block: A100, H100
MODULES = ("layer_norm", "rnn_cell", "rnn_layer", "attention")


@dataclasses.dataclass
class AOTSpec:
    """One configuration of one kernel: ``signature`` maps every argument to a Triton type ("*fp32", "i32",
    "fp32", "constexpr"), ``constexprs`` gives the constexpr values. As Triton's JIT does for typical launches,
    pointers are compiled as 16-byte aligned, and so are the integer arguments named in ``divisible_by_16``."""

    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] = ()
    # A configuration that the launcher chooses only where its compiled kernel fits (the persistent layer kernels):
    # one that needs more shared memory than the part is reported as not fitting instead of failing the check.
    optional: bool = False
    # False: no assumption on the arguments' values (as a kernel JIT-compiled with do_not_specialize on them).
    specialize: bool = True
    maxnreg: int | None = None  # registers per thread, as the launcher's maxnreg

    def attrs(self) -> dict[tuple[int, ...], list[list[Any]]]:
        names = list(self.signature)
        if not self.specialize:
            return {}
        return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                if self.signature[n].startswith("*") or n in self.divisible_by_16}

    @property
    def name(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        dtype = next((t[1:] for t in self.signature.values() if t.startswith("*")), "")
        regs = f",r{self.maxnreg}" if self.maxnreg else ""
        return f"{self.fn.__name__}[{dtype},{params},w{self.num_warps},s{self.num_stages}{regs}]"


def _resource_usage(cubin: bytes) -> str:
    """Registers and spills from cuobjdump (shipped with Triton's wheel); '?' if it is not found."""
    from triton.backends.nvidia import compiler as nvc

    try:
        tool = os.path.join(os.path.dirname(nvc.__file__), "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", out)
        return f"regs={m.group(1)} stack={m.group(2)}" if m else "regs=?"
    except OSError:
        return "regs=?"


@functools.cache
def specs() -> list[AOTSpec]:
    out: list[AOTSpec] = []
    for mod in MODULES:
        try:
            m = importlib.import_module(f"fastseq.kernels.{mod}")
        except ModuleNotFoundError:
            continue
        out.extend(m.AOT_SPECS)
    return out


def _compile(index: int) -> tuple[bool, str]:
    """Compiles spec `index` of specs() for sm_80 and sm_90; (ok, report lines)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = specs()[index]
    print(f"triton-check: compiling {spec.name}", file=sys.stderr, flush=True)
    ok, lines = True, []
    for cc in (80, 90):
        try:
            src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs())
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                               options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                        **({"maxnreg": spec.maxnreg} if spec.maxnreg else {})})
            fits = k.metadata.shared <= SHARED_LIMIT[cc]
            ok &= fits or spec.optional
            verdict = "ok  " if fits else "n/a " if spec.optional else "FAIL"
            lines.append(f"{verdict} sm_{cc} {spec.name}: shared={k.metadata.shared} "
                         f"{_resource_usage(k.asm['cubin'])}{'' if fits else ' (more shared memory than the part)'}")
        except Exception as e:  # noqa: BLE001 - any compile error is a failure to report
            ok = False
            lines.append(f"FAIL sm_{cc} {spec.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return ok, "\n".join(lines)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("triton-check: unset TRITON_INTERPRET to compile ahead of time", file=sys.stderr)
        return 2
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = len(specs())
    # A compiler that aborts (LLVM's "Broken module") takes its worker process down: the executor then fails with
    # BrokenProcessPool instead of waiting forever, and the configuration each worker was on is on stderr.
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile, range(n)))
    for _, report in results:
        print(report)
    failed = sum(not ok for ok, _ in results)
    print(f"triton-check: {n - failed} of {n} kernel configurations compiled for sm_80 and sm_90, {failed} failed")
    return 1 if failed or not n else 0


if __name__ == "__main__":
    sys.exit(main())
