"""`python -m fastseq check`: every op on every available backend against the reference on random inputs.

One line per op and backend with the worst relative error and pass/fail. Relative error is
max|out - ref| / max(max|ref|, 1e-6), the reference computed in float64.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from . import backends, modes, reference
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


def _worst_error(ours: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor], args: list[torch.Tensor],
                 seed: int) -> float:
    """Worst relative error of ours(*args) and its gradients against ref on the same inputs in float64."""
    got = _grads(ours, args, seed)
    want = _grads(ref, [a.to(torch.float64) for a in args], seed)
    return max(_rel(a, e) for a, e in zip(got, want))


def check_layer_norm(device: str, dtype: torch.dtype) -> float:
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for m, n in ((37, 1023), (8, 4096), (3, 33)):
        x = torch.randn(m, n, generator=gen, dtype=torch.float64)
        w, b = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
        cast = [t.to(device, dtype) for t in (x, w, b)]
        worst = max(worst, _worst_error(lambda x, w, b: F.layer_norm(x, (n,), w, b),
                                        lambda x, w, b: reference.layer_norm(x, [n], w, b), cast, m))
    return worst


def _check_cell(device: str, dtype: torch.dtype, gates: int, states: int, ours: Callable, ref: Callable,
                peephole: bool = False) -> float:
    """Worst relative error of a cell step (outputs concatenated) and the gradients of every input."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for n, c, h in ((5, 33, 257), (64, 128, 128), (1, 7, 3)):
        rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
        x, hx = rn(n, c), [rn(n, h) for _ in range(states)]
        params = [rn(gates * h, c) / h ** 0.5, rn(gates * h, h) / h ** 0.5, rn(gates * h), rn(gates * h)]
        params += [rn(3, h)] if peephole else []
        cast = [t.to(device, dtype) for t in (x, *hx, *params)]
        worst = max(worst, _worst_error(ours, ref, cast, n))
    return worst


def check_lstm_cell(device: str, dtype: torch.dtype) -> float:
    return _check_cell(device, dtype, 4, 2, lambda x, h, c, *p: torch.cat(F.lstm_cell(x, (h, c), *p), -1),
                       lambda x, h, c, *p: torch.cat(reference.lstm_cell(x, (h, c), *p), -1))


def check_peephole_lstm_cell(device: str, dtype: torch.dtype) -> float:
    return _check_cell(device, dtype, 4, 2, lambda x, h, c, *p: torch.cat(F.peephole_lstm_cell(x, (h, c), *p), -1),
                       lambda x, h, c, *p: torch.cat(reference.lstm_cell(x, (h, c), *p), -1), peephole=True)


def check_gru_cell(device: str, dtype: torch.dtype) -> float:
    return _check_cell(device, dtype, 3, 1, F.gru_cell, reference.gru_cell)


def check_rnn_tanh_cell(device: str, dtype: torch.dtype) -> float:
    return _check_cell(device, dtype, 1, 1, F.rnn_tanh_cell, reference.rnn_cell)


def check_rnn_layer(device: str, dtype: torch.dtype) -> float:
    """Bidirectional LSTM and peephole LSTM with projection, GRU and Elman RNN layers over a padded and a packed
    (ragged) batch: outputs, final states and the gradients of every input against fastseq.reference.rnn_layer per
    direction."""
    gen = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    worst = 0.0
    for mode, proj in (("lstm", 5), ("peephole_lstm", 5), ("gru", 0), ("rnn_tanh", 0)):
        m = modes.mode(mode)
        g = m.gates
        for t, n, c, h, batch_sizes in ((7, 5, 33, 17, None), (5, 4, 8, 64, torch.tensor([4, 3, 3, 1, 1]))):
            hout = proj or h
            x = rn(int(batch_sizes.sum()), c) if batch_sizes is not None else rn(t, n, c)
            states = [rn(2, n, hout)] + ([rn(2, n, h)] if m.cell else [])
            params = [p for _ in range(2) for p in [rn(g * h, c) / h ** 0.5, rn(g * h, hout) / h ** 0.5, rn(g * h),
                                                    rn(g * h)] + ([rn(proj, h) / h ** 0.5] if proj else [])
                      + ([rn(3, h) * 0.5] if m.peephole else [])]
            per = len(params) // 2

            def ours(x, *rest):
                hx, ps = (tuple(rest[:2]), rest[2:]) if m.cell else (rest[0], rest[1:])
                out = getattr(F, mode)(x, hx, list(ps), True, 1, 0.0, False, True, False, batch_sizes=batch_sizes)
                return torch.cat([o.flatten() for o in out])

            def ref(x, *rest):
                k = 2 if m.cell else 1
                hx, ps = rest[:k], rest[k:]
                outs = []
                for d in range(2):
                    w = ps[d * per:(d + 1) * per]
                    outs.append(reference.rnn_layer(mode, x, hx[0][d], hx[1][d] if m.cell else None, *w[:4],
                                                    w[4] if proj else None, d == 1, batch_sizes,
                                                    w[-1] if m.peephole else None))
                parts = [torch.cat([outs[0][0], outs[1][0]], -1), torch.stack([outs[0][1], outs[1][1]])]
                parts += [torch.stack([outs[0][2], outs[1][2]])] if m.cell else []
                return torch.cat([o.flatten() for o in parts])

            cast = [v.to(device, dtype) for v in (x, *states, *params)]
            worst = max(worst, _worst_error(ours, ref, cast, t))
    return worst


def check_scaled_dot_product_attention(device: str, dtype: torch.dtype) -> float:
    """Output and gradients of q, k, v and a float mask with GQA and L != S, and a causal call; head dim 64 so that
    the CUDA C++ kernel runs too."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    for (b, hq, hk, l, s, e), causal in (((2, 4, 2, 33, 47, 64), False), ((1, 2, 2, 129, 129, 64), True)):
        args = [rn(b, hq, l, e), rn(b, hk, s, e), rn(b, hk, s, e)] + ([] if causal else [rn(b, 1, l, s)])
        cast = [t.to(device, dtype) for t in args]
        kw = dict(is_causal=causal, enable_gqa=True)
        worst = max(worst, _worst_error(lambda *a: F.scaled_dot_product_attention(*a, **kw),
                                        lambda *a: reference.scaled_dot_product_attention(*a, **kw), cast, l))
    return worst


CHECKS: dict[str, Callable[[str, torch.dtype], float]] = {
    "layer_norm": check_layer_norm, "lstm_cell": check_lstm_cell, "peephole_lstm_cell": check_peephole_lstm_cell,
    "gru_cell": check_gru_cell, "rnn_tanh_cell": check_rnn_tanh_cell, "rnn_layer": check_rnn_layer,
    "scaled_dot_product_attention": check_scaled_dot_product_attention}
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
                if name == "triton" and dtype == torch.bfloat16 and backends.triton_interpreting():
                    print(f"skip  {'(all ops)':<28} {name:<10} {device:<5} {str(dtype):<15} Triton's interpreter "
                          "truncates float32 to bfloat16 and miscomputes bfloat16 tl.dot (a GPU run checks it)")
                    continue
                for op, fn in CHECKS.items():
                    with backends.backend(name), warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        err = fn(device, dtype)
                    fell_back = [str(w.message) for w in caught if "runs on the" in str(w.message)]
                    ok = err <= TOL[dtype]
                    failures += not ok
                    # an op this backend does not implement for these inputs ran elsewhere, by design: say where
                    status = ("pass" if ok else "FAIL") if not fell_back else ("skip" if ok else "FAIL")
                    note = f"  ({fell_back[0]})" if fell_back else ""
                    print(f"{status}  {op:<28} {name:<10} {device:<5} {str(dtype):<15} "
                          f"worst rel err {err:.2e} (tol {TOL[dtype]:.0e}){note}")
    print(f"check: {'all passed' if failures == 0 else f'{failures} failed'}")
    return 1 if failures else 0
