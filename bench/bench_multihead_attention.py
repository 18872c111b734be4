"""MultiheadAttention: fastseq.nn.MultiheadAttention vs torch.nn.MultiheadAttention (same weights), self-attention
with need_weights=False, batch_first, forward (eval, no grad: torch takes its fused inference path) and
forward+backward (training, dropout 0, gradients of the input and every parameter). Shapes: a BERT-base block's
attention (embed 768, 12 heads, sequence 128 and 512, batch 32) and a long-context one (embed 2048, 16 heads,
sequence 4k, 16k tokens), bf16 on the GPU; float32 on the CPU with the batch and the long sequence shrunk so that
the suite takes about a minute, and bf16 at sequence 512 on a CPU with native bf16 dot products. TFLOP/s: forward 8*T*E^2 (the four projections, T tokens) + 4*b*s^2*E
(attention), backward 2x the projections and 2.5x the attention."""
from __future__ import annotations

import pytest
import torch
from common import DEVICE, QUICK, peak_mib, run

import fastseq

if DEVICE == "cuda":
    DTYPE = torch.bfloat16
    SHAPES = [(768, 12, 128, 32)] if QUICK else [(768, 12, 128, 32), (768, 12, 512, 32), (2048, 16, 4096, 4)]
else:  # (embed, heads, sequence, batch)
    DTYPE = torch.float32
    SHAPES = [(768, 12, 128, 4)] if QUICK else [(768, 12, 128, 8), (768, 12, 512, 2), (2048, 16, 1024, 1)]
BACKENDS = ["cuda", "triton"] if DEVICE == "cuda" else ["cpu"]  # of the attention inside
CPU_BF16 = DEVICE == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "e{}-h{}-s{}-b{}".format(*s))
def test_multihead_attention(benchmark, shape, mode, backend):
    _measure(benchmark, shape, mode, backend, DTYPE)


@pytest.mark.skipif(not CPU_BF16, reason="bf16 CPU rows: a CPU with native bf16 dot products")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_multihead_attention_bf16_cpu(benchmark, mode):
    _measure(benchmark, (768, 12, 512, 2), mode, "cpu", torch.bfloat16)


def _measure(benchmark, shape, mode, backend, dtype):
    embed, heads, seq, batch = shape
    benchmark.group = f"multihead attention {mode}"
    grad = mode != "fwd"
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(embed, heads, batch_first=True, device=DEVICE, dtype=dtype).train(grad)
    ours = fastseq.nn.MultiheadAttention(embed, heads, batch_first=True, device=DEVICE, dtype=dtype).train(grad)
    ours.load_state_dict(theirs.state_dict())
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(batch, seq, embed, generator=gen, device=DEVICE, dtype=dtype).requires_grad_(grad)
    dout = torch.randn(batch, seq, embed, generator=gen, device=DEVICE, dtype=dtype)

    def step(module):
        leaves = (x, *module.parameters())

        def go():
            with torch.set_grad_enabled(grad):
                out = module(x, x, x, need_weights=False)[0]
                if grad:
                    torch.autograd.grad(out, leaves, dout)
        return go

    def ours_step():
        with fastseq.backend(backend):
            step(ours)()

    tokens = batch * seq
    gemm, attention = 8 * tokens * embed ** 2, 4 * batch * seq * seq * embed
    flops = gemm * 3 + attention * 3.5 if grad else gemm + attention
    run(benchmark, ours_step, step(theirs), shape=f"b={batch} s={seq} e={embed} h={heads}",
        dtype=str(dtype).replace("torch.", ""), backend=backend, flops=flops, peak_MiB=peak_mib(ours_step),
        torch_peak_MiB=peak_mib(step(theirs)))
    extra = benchmark.extra_info
    extra["TFLOPs"] = round(flops / extra["ms"] / 1e9, 4)
    extra["torch_TFLOPs"] = round(flops / extra["torch_ms"] / 1e9, 4)
