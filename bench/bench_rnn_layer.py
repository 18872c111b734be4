"""Recurrent layers: fastseq.nn.LSTM / GRU / RNN (the cpu backend on the CPU; cuda and triton on the GPU) vs
torch.nn.LSTM / GRU / RNN (oneDNN on the CPU, cuDNN on the GPU) over a whole sequence, forward (inference, no
autograd graph) and forward+backward (gradients of the input and every parameter).
Shapes: T=100, N=64, C=H=512 (PyTorch's fastrnns default) with 1 layer and with 2 bidirectional layers; small
batches N in {1, 8, 16} with H in {128, 256, 512, 1024} (GPU: {128, 512}), C = H, T = 100, 1 layer; float32 on the
CPU, bf16 and float32 on the GPU (cuDNN's float32 may use TF32 as torch allows); on a CPU with native bf16 dot
products (AVX512_BF16, as oneDNN reports it) also bf16 LSTM and GRU rows at N in {1, 16}, H = 256. Decoding (one
step a call, as an inference loop over a model's own outputs runs it): LSTM and GRU forward at T = 1, N in
{1, 16, 64}, C = H = 512, float32. FLOPs count the GEMMs: 2*T*N*(C_l+H)*G*H per direction and layer (C_l = the
layer's input size: C, then D*H), x3 with backward."""
from __future__ import annotations

import pytest
import torch
from common import DEVICE, QUICK, peak_mib, run, sequence_step

import fastseq
from fastseq import nn as fnn

T = 100
# (N, H, num_layers, bidirectional); C = H. On the GPU H in {128, 512} only, in bf16 and float32, so that make
# gpu-check's benchmark stage stays within its budget.
SMALL_HS = (128, 512) if DEVICE == "cuda" else (128, 256, 512, 1024)
SHAPES = [(8, 256, 1, False)] if QUICK else (
    [(64, 512, 1, False), (64, 512, 2, True)] + [(n, h, 1, False) for n in (1, 8, 16) for h in SMALL_HS])
DTYPES = [torch.bfloat16, torch.float32] if DEVICE == "cuda" else [torch.float32]
BACKENDS = ["cuda", "triton"] if DEVICE == "cuda" else ["cpu"]
CPU_BF16 = DEVICE == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
BF16_SHAPES = [(1, 256, 1, False), (16, 256, 1, False)]
DECODE_SHAPES = [(16, 512, 1, False)] if QUICK else [(n, 512, 1, False) for n in (1, 16, 64)]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # rnn: tanh


def _flops(steps: int, n: int, c: int, h: int, layers: int, bidirectional: bool, gates: int, grad: bool) -> int:
    dirs = 2 if bidirectional else 1
    per = sum(2 * steps * n * ((c if layer == 0 else dirs * h) + h) * gates * h for layer in range(layers)) * dirs
    return per * (3 if grad else 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-H{h}-L{L}{'-bi' if bi else ''}" for n, h, L, bi in SHAPES])
@pytest.mark.parametrize("kind", list(GATES))
def test_rnn_layer(benchmark, kind, shape, dtype, mode, backend):
    _measure(benchmark, kind, shape, dtype, mode, backend)


@pytest.mark.skipif(not CPU_BF16, reason="bf16 CPU rows: a CPU with native bf16 dot products")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", BF16_SHAPES, ids=[f"N{n}-H{h}" for n, h, _, _ in BF16_SHAPES])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_layer_bf16_cpu(benchmark, kind, shape, mode):
    _measure(benchmark, kind, shape, torch.bfloat16, mode, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=[f"N{n}-H{h}" for n, h, _, _ in DECODE_SHAPES])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_layer_decode(benchmark, kind, shape, backend):
    _measure(benchmark, kind, shape, torch.float32, "fwd", backend, steps=1)


def _measure(benchmark, kind, shape, dtype, mode, backend, steps=T):
    n, h, layers, bidirectional = shape
    c = h
    benchmark.group = f"{kind} layer {mode}"
    grad = mode != "fwd"
    theirs = getattr(torch.nn, kind.upper())(c, h, num_layers=layers, bidirectional=bidirectional, device=DEVICE,
                                             dtype=dtype)
    ours = getattr(fnn, kind.upper())(c, h, num_layers=layers, bidirectional=bidirectional, device=DEVICE,
                                      dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(steps, n, c, generator=gen, device=DEVICE).to(dtype).requires_grad_(grad)
    dy = torch.randn(steps, n, (2 if bidirectional else 1) * h, generator=gen, device=DEVICE).to(dtype)

    def step(module):
        return sequence_step(module, x, dy, grad)

    def ours_step():
        with fastseq.backend(backend):
            step(ours)()

    flops = _flops(steps, n, c, h, layers, bidirectional, GATES[kind], grad)
    run(benchmark, ours_step, step(theirs),
        shape=f"T={steps} N={n} C={c} H={h} L={layers}{' bi' if bidirectional else ''}",
        dtype=str(dtype)[6:], backend=backend, flops=flops, peak_MiB=peak_mib(ours_step),
        torch_peak_MiB=peak_mib(step(theirs)))
    benchmark.extra_info["TFLOPs"] = round(flops / benchmark.extra_info["ms"] / 1e9, 3)
    benchmark.extra_info["torch_TFLOPs"] = round(flops / benchmark.extra_info["torch_ms"] / 1e9, 3)
