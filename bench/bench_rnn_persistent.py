"""The persistent Triton layer kernels (one launch for the whole time loop of a layer direction, forward and
backward) against cuDNN (torch.nn.LSTM / GRU on cuda) and against fastseq's host loop (the same Triton cell kernels,
a launch per step): T in {100, 1024}, N in {1, 8, 16, 64}, H in {64, 128} (C = H, 1 layer, 1 direction), bf16 and
float32, forward (no autograd graph) and forward+backward. extra_info: kernel (what ran: "persistent", or "host loop"
where the compiled kernel does not fit), host_ms and host_speedup = host_ms / ms. GPU only."""
from __future__ import annotations

import os

import pytest
import torch
from common import DEVICE, QUICK, median_ms, peak_mib, run, sequence_step

import fastseq
from fastseq import nn as fnn

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="the persistent kernels run on a GPU")
SHAPES = [(100, 8, 128)] if QUICK else [(t, n, h) for h in (64, 128) for t in (100, 1024) for n in (1, 8, 16, 64)]
GATES = {"lstm": 4, "gru": 3}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-N{n}-H{h}" for t, n, h in SHAPES])
@pytest.mark.parametrize("kind", list(GATES))
def test_persistent_layer(benchmark, kind, shape, dtype, mode):
    from fastseq.kernels import rnn_layer as tk

    t, n, h = shape
    grad = mode != "fwd"
    benchmark.group = f"{kind} persistent {mode}"
    theirs = getattr(torch.nn, kind.upper())(h, h, device=DEVICE, dtype=dtype)
    ours = getattr(fnn, kind.upper())(h, h, device=DEVICE, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(t, n, h, generator=gen, device=DEVICE).to(dtype).requires_grad_(grad)
    dy = torch.randn(t, n, h, generator=gen, device=DEVICE).to(dtype)

    def step(module, persistent: str | None = None):
        """A forward (and backward) of `module`; fastseq's on the triton backend with FASTSEQ_RNN_PERSISTENT set to
        `persistent` ("" lets the selection rule choose, "0" is the host loop), torch's as it is (None)."""
        run_module = sequence_step(module, x, dy, grad)
        if persistent is None:
            return run_module

        def go():
            os.environ["FASTSEQ_RNN_PERSISTENT"] = persistent
            try:
                with fastseq.backend("triton"):
                    run_module()
            finally:
                del os.environ["FASTSEQ_RNN_PERSISTENT"]
        return go

    fits = tk.persistent_config(kind, h, dtype, x.device, False, None)
    ours_step = step(ours, "" if fits else "0")
    host_ms = median_ms(step(ours, "0"))
    flops = 2 * t * n * 2 * h * GATES[kind] * h * (3 if grad else 1)
    run(benchmark, ours_step, step(theirs), shape=f"T={t} N={n} C={h} H={h}", dtype=str(dtype)[6:],
        backend="triton", flops=flops, peak_MiB=peak_mib(ours_step), torch_peak_MiB=peak_mib(step(theirs)),
        kernel="persistent" if fits else "host loop",
        host_ms=round(host_ms, 4))
    benchmark.extra_info["host_speedup"] = round(host_ms / benchmark.extra_info["ms"], 3)
