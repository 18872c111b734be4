"""fastseq::rnn_layer and fastseq::rnn_layer_backward: one direction of one recurrent layer (LSTM with optional
projection, GRU, Elman RNN tanh/relu) over a whole sequence, the time loop in the backend (the contract of
csrc/rnn_layer.h). The layer loop (layers, directions, dropout between layers) is fastseq.functional's.

Forward: one GEMM gives the input projection of every step, then each step is a GEMM of h with W_hh^T and the fused
cell kernel, on the active rows only for packed sequences. Backward: the fused pointwise backward per step in reverse,
the weight gradients as a few GEMMs over all steps.

What backward needs is returned by the op as four extra outputs (so that torch.compile sees them), fixed in number
and shape whatever the backend: h_seq (rows, Hout) h of every step; gates (rows, 4H) the activated gates
(LSTM [i, f, g, o], GRU [r, z, n, W_hn h + b_hn]); c_seq (rows, H) c of every step (LSTM); h_raw (rows, H)
o * tanh(c) before the projection (LSTM with w_hr); rows = T*N, or sum(batch_sizes) packed. Where a tensor does not
apply it is empty (0,). Absent c_n (not LSTM) is empty (0,) too.

Backends: ``cpu`` (fastseq._C, time loop in C++: float32 / float64 / bfloat16), ``cuda`` (fastseq._C, a host loop
in C++ of cuBLAS GEMMs and the CUDA cell kernels: float32 / float16 / bfloat16), ``triton`` (fastseq.kernels.rnn_layer,
a host loop of torch GEMMs and the Triton cell kernels: float32 / float16 / bfloat16). Elsewhere fastseq.backends.select
falls back to ``reference`` with its one-time warning; the reference backend runs fastseq.reference.rnn_layer (saved
outputs are zeros, unused) and its backward differentiates the reference with torch.autograd. Backward runs on the
backend that ran forward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, reference
from ._dispatch import call, differentiable_grads, eager_function

DTYPES = {
    "cpu": frozenset({torch.float32, torch.float64, torch.bfloat16}),
    "cuda": frozenset({torch.float32, torch.float16, torch.bfloat16}),
    "triton": frozenset({torch.float32, torch.float16, torch.bfloat16}),
}
MODES = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def _select(x: Tensor) -> str:
    return backends.select("rnn_layer", x.device, x.dtype, DTYPES)


def _kernels(backend: str):
    """The module with rnn_layer_fwd / rnn_layer_bwd of `backend` (fastseq._C for cpu and cuda, else the Triton
    launchers)."""
    if backend in ("cpu", "cuda"):
        return backends.extension()
    from ..kernels import rnn_layer as tk

    return tk


def _shapes(mode: str, x: Tensor, h0: Tensor, w_hh: Tensor, w_hr: Tensor | None, batch_sizes: Tensor | None
            ) -> dict[str, tuple[int, ...]]:
    """Shapes of the forward outputs: y, h_n, c_n and the saved h_seq, gates, c_seq, h_raw."""
    lstm = mode == "lstm"
    hidden = w_hh.shape[0] // (4 if lstm else 3 if mode == "gru" else 1)
    hout, n = w_hh.shape[1], h0.shape[0]
    rows = x.shape[0] if batch_sizes is not None else x.shape[0] * x.shape[1]
    return {"y": (*x.shape[:-1], hout), "h_n": (n, hout), "c_n": (n, hidden) if lstm else (0,),
            "h_seq": (rows, hout), "gates": (rows, 4 * hidden) if mode in ("lstm", "gru") else (0,),
            "c_seq": (rows, hidden) if lstm else (0,), "h_raw": (rows, hidden) if w_hr is not None else (0,)}


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _forward(mode: str, x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
              b_hh: Tensor | None, w_hr: Tensor | None, reverse: bool, batch_sizes: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y, h_n, c_n, h_seq, gates, c_seq, h_raw for one layer direction: x (T, N, C) (or packed (sum(batch_sizes), C)
    with batch_sizes (T,) int64 on the CPU), h0 (N, Hout), c0 (N, H) (LSTM, else None), w_ih (G*H, C),
    w_hh (G*H, Hout), b_ih, b_hh (G*H,), w_hr (Hout, H) (LSTM projection; Hout = H without)."""
    backend = _select(x)
    if backend != "reference":
        y, h_n, c_n, saved = _kernels(backend).rnn_layer_fwd(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                                             batch_sizes)
        it = iter(saved)
        h_seq = next(it)
        gates = next(it) if mode in ("lstm", "gru") else None
        c_seq = next(it) if mode == "lstm" else None
        h_raw = next(it) if w_hr is not None else None
        return (y, h_n, _or_empty(c_n, x), h_seq, _or_empty(gates, x), _or_empty(c_seq, x),
                _or_empty(h_raw, x))
    y, h_n, c_n = reference.rnn_layer(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, batch_sizes)
    s = _shapes(mode, x, h0, w_hh, w_hr, batch_sizes)
    return (y, h_n, _or_empty(c_n, x), *(x.new_zeros(s[k]) for k in ("h_seq", "gates", "c_seq", "h_raw")))


rnn_layer = torch.library.custom_op("fastseq::rnn_layer", _forward, mutates_args=())


@rnn_layer.register_fake
def _(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, batch_sizes):
    return tuple(x.new_empty(s) for s in _shapes(mode, x, h0, w_hh, w_hr, batch_sizes).values())


def _backward_impl(mode: str, dy: Tensor, dh_n: Tensor, dc_n: Tensor | None, x: Tensor, h0: Tensor,
                   c0: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                   w_hr: Tensor | None, reverse: bool, batch_sizes: Tensor | None, h_seq: Tensor, gates: Tensor,
                   c_seq: Tensor, h_raw: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                        Tensor, Tensor]:
    """dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr of rnn_layer run on `backend` (cpu, cuda or triton; empty (0,)
    where the input is absent); dy, dh_n, dc_n: the gradients of y, h_n, c_n (dc_n None counts as zeros)."""
    saved = [h_seq] + ([gates] if mode in ("lstm", "gru") else []) + ([c_seq] if mode == "lstm" else []) \
        + ([h_raw] if w_hr is not None else [])
    dx, dh0, dc0, dws = _kernels(backend).rnn_layer_bwd(mode, dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                        w_hr, reverse, batch_sizes, saved)
    return (dx, dh0, _or_empty(dc0, x), *(_or_empty(t, x) for t in dws))


rnn_layer_backward = torch.library.custom_op("fastseq::rnn_layer_backward", _backward_impl, mutates_args=())


@rnn_layer_backward.register_fake
def _(mode, dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, batch_sizes, h_seq, gates, c_seq,
      h_raw, backend):
    return tuple(x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))


def _setup_context(ctx, inputs, output):
    mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, batch_sizes = inputs
    ctx.mode, ctx.reverse, ctx.backend = mode, reverse, _select(x)
    ctx.set_materialize_grads(False)
    saved = output[3:] if ctx.backend != "reference" else ()
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, *saved)


def _reference_grads(ctx, inputs: list[Tensor | None], batch_sizes: Tensor | None, grads: list[Tensor]
                     ) -> list[Tensor | None]:
    """Gradients of fastseq.reference.rnn_layer with respect to `inputs` (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    by torch.autograd (None for None inputs)."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        x, h0, c0, *params = leaves
        y, h_n, c_n = reference.rnn_layer(ctx.mode, x, h0, c0, *params, ctx.reverse, batch_sizes)
        outs = (y, h_n) if c_n is None else (y, h_n, c_n)
        present = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad(outs, present, grads[: len(outs)], allow_unused=True))
    return [None if t is None else next(got) for t in leaves]


def _backward_with(backward_op):
    """The autograd formula, running the fused backward through `backward_op` (the custom op, or in eager mode its
    implementation directly)."""

    def backward(ctx, dy, dh_n, dc_n, *_saved_grads):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, *saved = ctx.saved_tensors
        lstm = ctx.mode == "lstm"
        y_shape = (*x.shape[:-1], w_hh.shape[1])
        dy = x.new_zeros(y_shape) if dy is None else dy.contiguous()
        dh_n = torch.zeros_like(h0) if dh_n is None else dh_n.contiguous()
        dc_n = None if not lstm or dc_n is None else dc_n.contiguous()
        inputs = [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr]
        if torch.is_grad_enabled():  # create_graph: a backward that can itself be differentiated
            fn = lambda *t: reference.rnn_layer(ctx.mode, *t, ctx.reverse, batch_sizes)  # noqa: E731
            grads = differentiable_grads(fn, inputs, ctx.needs_input_grad[1:9], [dy, dh_n, dc_n])
            return (None, *grads, None, None)
        if ctx.backend != "reference":
            grads = backward_op(ctx.mode, dy, dh_n, dc_n, *inputs, ctx.reverse, batch_sizes, *saved, ctx.backend)
        else:
            dc = torch.zeros_like(c0) if lstm and dc_n is None else dc_n
            grads = _reference_grads(ctx, inputs, batch_sizes, [dy, dh_n, dc])
        need = ctx.needs_input_grad[1:9]
        return (None, *(g if n and t is not None else None for g, n, t in zip(grads, need, inputs)), None, None)

    return backward


rnn_layer.register_autograd(_backward_with(rnn_layer_backward), setup_context=_setup_context)
_RNNLayerFunction = eager_function("RNNLayerFunction", _forward, _setup_context, _backward_with(_backward_impl),
                                   non_differentiable=(3, 4, 5, 6))


def apply(mode: str, x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
          b_hh: Tensor | None, w_hr: Tensor | None, reverse: bool, batch_sizes: Tensor | None
          ) -> tuple[Tensor, Tensor, Tensor | None]:
    """y, h_n, c_n (None unless LSTM) of one layer direction, through the fastest path for the current mode."""
    y, h_n, c_n, *_ = call(rnn_layer, _RNNLayerFunction, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                           batch_sizes)
    return y, h_n, c_n if mode == "lstm" else None
