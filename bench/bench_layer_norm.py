"""Layer norm: fastseq vs torch at M=4096, N in {768, 1024, 4096, 8192, 16384}, forward and forward+backward, and
at one row of N=768 (a decoding step: the per-call overhead). GB/s counts the bytes an ideal kernel moves: forward
2*numel*size (read x, write y), backward 3*numel*size. On a CPU with native bf16 (AVX512_BF16, as oneDNN reports
it) also bf16 at M=4096, N in {768, 1024}."""
from __future__ import annotations

import pytest
import torch
from common import DEVICE, QUICK, copy_gbps, peak_mib, run

import fastseq
from fastseq import functional as F

SHAPES = [(4096, 1024), (1, 768)] if QUICK else [(4096, n) for n in (768, 1024, 4096, 8192, 16384)] + [(1, 768)]
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BACKENDS = ["cuda", "triton"] if DEVICE == "cuda" else ["cpu"]
CPU_BF16 = DEVICE == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("m,n", SHAPES)
def test_layer_norm(benchmark, m, n, mode, backend):
    _measure(benchmark, m, n, mode, backend, DTYPE)


@pytest.mark.skipif(not CPU_BF16, reason="bf16 CPU rows: a CPU with native bf16 dot products")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("n", [768, 1024])
def test_layer_norm_bf16_cpu(benchmark, n, mode):
    _measure(benchmark, 4096, n, mode, "cpu", torch.bfloat16)


def _measure(benchmark, m, n, mode, backend, dtype):
    benchmark.group = f"layer_norm {mode}"
    x = torch.randn(m, n, device=DEVICE, dtype=dtype, requires_grad=mode != "fwd")
    w = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=mode != "fwd")
    b = torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=mode != "fwd")
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)

    def step(f):
        def go():
            y = f(x, (n,), w, b)
            if mode != "fwd":
                y.backward(dy)
        return go

    nbytes = x.numel() * x.element_size() * (2 if mode == "fwd" else 5)
    with fastseq.backend(backend):  # around the measurement, not in each call (as bench_rnn_cell)
        run(benchmark, step(F.layer_norm), step(torch.nn.functional.layer_norm), shape=f"M={m} N={n}",
            dtype=str(dtype), backend=backend, bytes=nbytes, copy_GBps=round(copy_gbps(), 1),
            peak_MiB=peak_mib(step(F.layer_norm)), torch_peak_MiB=peak_mib(step(torch.nn.functional.layer_norm)))
    ms = benchmark.extra_info["ms"]
    benchmark.extra_info["GBps"] = round(nbytes / ms / 1e6, 1)
    benchmark.extra_info["torch_GBps"] = round(nbytes / benchmark.extra_info["torch_ms"] / 1e6, 1)
