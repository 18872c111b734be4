"""Scaled dot-product attention: fastseq vs torch's SDPA in flash-attention's setup: 16k tokens in total
(batch = 16384 // seq), hidden 2048 (heads = 2048 // head_dim), head dim 64 and 128, sequence 512 to 8k, causal and
not, forward and forward+backward, bf16 on the GPU (plus an arbitrary float mask against torch's efficient backend).
On the CPU: float32, head dim 64, sequence 512 to 2048 with 2k tokens and 4 heads, so that the suite takes about a
minute; on a CPU with native bf16 dot products (AVX512_BF16, as oneDNN reports it) also bf16 at sequence 1024.
TFLOP/s with flash-attention's count: forward 4*b*h*s*s*d (halved when causal), backward 2.5x forward.
On the GPU each of torch's SDPA backends (flash, efficient, cuDNN, math) is timed too where it runs."""
from __future__ import annotations

import contextlib

import pytest
import torch
from common import DEVICE, QUICK, median_ms, peak_mib, run

import fastseq
from fastseq import functional as F

if DEVICE == "cuda":
    DTYPE, TOKENS, HIDDEN = torch.bfloat16, 16384, 2048
    HEAD_DIMS = [128] if QUICK else [64, 128]
    SEQS = [1024] if QUICK else [512, 1024, 2048, 4096, 8192]
    BACKENDS = ["cuda", "triton"]
    MASKS = [None] if QUICK else [None, "float"]
else:
    DTYPE, TOKENS, HIDDEN = torch.float32, 2048, 256
    HEAD_DIMS = [64]
    SEQS = [512] if QUICK else [512, 1024, 2048]
    BACKENDS = ["cpu"]
    MASKS = [None]
CAUSAL = [False] if QUICK else [False, True]
CPU_BF16 = DEVICE == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
TORCH_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                  "math": "MATH"}


def _torch_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, TORCH_BACKENDS[name]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention(benchmark, head_dim, seq, causal, mask, mode, backend):
    _measure(benchmark, head_dim, seq, causal, mask, mode, backend, DTYPE)


@pytest.mark.skipif(not CPU_BF16, reason="bf16 CPU rows: a CPU with native bf16 dot products")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", CAUSAL)
def test_attention_bf16_cpu(benchmark, causal, mode):
    _measure(benchmark, 64, 1024, causal, None, mode, "cpu", torch.bfloat16)


def _measure(benchmark, head_dim, seq, causal, mask, mode, backend, dtype):
    if backend == "cuda" and mode != "fwd":
        pytest.skip("the CUDA C++ kernel is forward-only (its backward is Triton's, benchmarked as triton)")
    if mask is not None and causal:
        pytest.skip("a mask and is_causal cannot both be given")
    benchmark.group = f"sdpa {mode}{' causal' if causal else ''}{' float mask' if mask else ''}"
    b, h = max(TOKENS // seq, 1), HIDDEN // head_dim
    grad = mode != "fwd"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(b, h, seq, head_dim, generator=gen, device=DEVICE, dtype=dtype).requires_grad_(grad)
               for _ in range(3))
    attn_mask = torch.randn(b, 1, seq, seq, generator=gen, device=DEVICE, dtype=dtype) if mask else None
    dout = torch.randn(b, h, seq, head_dim, generator=gen, device=DEVICE, dtype=dtype)

    def step(fn, ctx=contextlib.nullcontext):
        def go():
            with ctx():
                out = fn(q, k, v, attn_mask=attn_mask, is_causal=causal)
                if grad:
                    torch.autograd.grad(out, (q, k, v), dout)
        return go

    ours = step(F.scaled_dot_product_attention, lambda: fastseq.backend(backend))
    theirs = step(torch.nn.functional.scaled_dot_product_attention)
    flops = 4 * b * h * seq * seq * head_dim * (0.5 if causal else 1.0) * (3.5 if grad else 1.0)
    info = dict(shape=f"b={b} h={h} s={seq} d={head_dim}", dtype=str(dtype).replace("torch.", ""), backend=backend,
                flops=flops, peak_MiB=peak_mib(ours), torch_peak_MiB=peak_mib(theirs))
    if DEVICE == "cuda":
        for name in TORCH_BACKENDS:
            try:
                info[f"torch_{name}_ms"] = round(median_ms(step(torch.nn.functional.scaled_dot_product_attention,
                                                                lambda: _torch_backend(name))), 4)
            except RuntimeError:  # this backend does not run this configuration
                info[f"torch_{name}_ms"] = None
    run(benchmark, ours, theirs, **info)
    extra = benchmark.extra_info
    extra["TFLOPs"] = round(flops / extra["ms"] / 1e9, 4)
    extra["torch_TFLOPs"] = round(flops / extra["torch_ms"] / 1e9, 4)
    for name in TORCH_BACKENDS:
        if extra.get(f"torch_{name}_ms"):
            extra[f"speedup_vs_{name}"] = round(extra[f"torch_{name}_ms"] / extra["ms"], 3)
