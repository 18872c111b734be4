"""`python -m fastseq check`: every op on every available backend against the reference on random inputs.

One line per op and backend with the worst relative error and pass/fail. Relative error is
max|out - ref| / max(max|ref|, 1e-6), the reference computed in float64.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from . import backends, reference
from . import functional as F

TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item() if ref.numel() else 0.0


def _grads(fn: Callable[..., torch.Tensor], args: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    args = [a.detach().requires_grad_() for a in args]
    out = fn(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    return [out, *torch.autograd.grad(out, args, g)]


def check_layer_norm(device: str, dtype: torch.dtype) -> float:
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for m, n in ((37, 1023), (8, 4096), (3, 33)):
        x = torch.randn(m, n, generator=gen, dtype=torch.float64)
        w, b = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
        cast = [t.to(device, dtype) for t in (x, w, b)]
        got = _grads(lambda x, w, b: F.layer_norm(x, (n,), w, b), cast, m)
        want = _grads(lambda x, w, b: reference.layer_norm(x, [n], w, b), [t.to(device, torch.float64)
                                                                          for t in cast], m)
        worst = max(worst, *(_rel(a, e) for a, e in zip(got, want)))
    return worst


CHECKS: dict[str, Callable[[str, torch.dtype], float]] = {"layer_norm": check_layer_norm}
DTYPES_BY_DEVICE = {"cpu": (torch.float32, torch.float64, torch.bfloat16),
                    "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def main() -> int:
    failures = 0
    for name in backends.available():
        devices = ["cuda"] if name == "cuda" else ["cpu"] if name == "cpu" else \
            (["cuda"] if torch.cuda.is_available() else ["cpu"])
        for device in devices:
            for dtype in DTYPES_BY_DEVICE[device]:
                if name == "triton" and dtype == torch.float64:
                    continue
                for op, fn in CHECKS.items():
                    with backends.backend(name), warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        err = fn(device, dtype)
                    fell_back = [str(w.message) for w in caught if "runs on the" in str(w.message)]
                    ok = err <= TOL[dtype] and not fell_back
                    failures += not ok
                    note = f"  ({fell_back[0]})" if fell_back else ""
                    print(f"{'pass' if ok else 'FAIL'}  {op:<22} {name:<10} {device:<5} {str(dtype):<15} "
                          f"worst rel err {err:.2e} (tol {TOL[dtype]:.0e}){note}")
    print(f"check: {'all passed' if failures == 0 else f'{failures} failed'}")
    return 1 if failures else 0
