"""Recurrent cell steps: fastseq vs torch's cells (torch.lstm_cell / gru_cell / rnn_tanh_cell, which on CUDA
already fuse the pointwise part) for one step at N in {1, 16, 64, 256}, H in {128, 512, 1024}, C = H, forward and
forward+backward (gradients of the input, the state and every parameter). FLOPs count the GEMMs: 2*N*(C+H)*G*H per
step (G = 4 LSTM, 3 GRU, 1 RNN), x3 with backward."""
from __future__ import annotations

import pytest
import torch
from common import DEVICE, QUICK, peak_mib, run

import fastseq
from fastseq import functional as F

NS = [64] if QUICK else [1, 16, 64, 256]
HS = [512] if QUICK else [128, 512, 1024]
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BACKENDS = ["cuda", "triton"] if DEVICE == "cuda" else ["cpu"]
CELLS = {"lstm": (4, F.lstm_cell, torch.lstm_cell), "gru": (3, F.gru_cell, torch.gru_cell),
         "rnn_tanh": (1, F.rnn_tanh_cell, torch.rnn_tanh_cell)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("h", HS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("cell", list(CELLS))
def test_rnn_cell(benchmark, cell, n, h, mode, backend):
    benchmark.group = f"{cell}_cell {mode}"
    gates, ours_fn, torch_fn = CELLS[cell]
    c = h
    grad = mode != "fwd"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=DEVICE) * scale).to(DTYPE)  # noqa: E731
    x, hx = rand(n, c), [rand(n, h) for _ in range(2 if cell == "lstm" else 1)]
    params = [rand(gates * h, c, scale=h ** -0.5), rand(gates * h, h, scale=h ** -0.5), rand(gates * h),
              rand(gates * h)]
    leaves = [t.requires_grad_(grad) for t in (x, *hx, *params)]
    douts = [rand(n, h) for _ in hx]

    def step(fn):
        def go():
            out = fn(x, tuple(hx) if cell == "lstm" else hx[0], *params)
            if grad:
                torch.autograd.grad(out, leaves, douts)
        return go

    flops = 2 * n * (c + h) * gates * h * (3 if grad else 1)
    # the backend chosen around the measurement, not in each call: entering the context costs ~2 us, which at
    # N = 1 would count against fastseq what its callers do not pay (the default backend needs no context)
    with fastseq.backend(backend):
        run(benchmark, step(ours_fn), step(torch_fn), shape=f"N={n} C={c} H={h}", dtype=str(DTYPE),
            backend=backend, flops=flops, peak_MiB=peak_mib(step(ours_fn)), torch_peak_MiB=peak_mib(step(torch_fn)))
    benchmark.extra_info["TFLOPs"] = round(flops / benchmark.extra_info["ms"] / 1e9, 3)
    benchmark.extra_info["torch_TFLOPs"] = round(flops / benchmark.extra_info["torch_ms"] / 1e9, 3)
