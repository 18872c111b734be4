"""fastseq::rnn_layer and fastseq::rnn_layer_backward: one direction of one recurrent layer (a mode of
fastseq/modes.py: LSTM with optional projection and peephole LSTM, GRU, Elman RNN tanh/relu) over a whole sequence.
The layer loop (layers, directions, dropout between layers) is fastseq.functional's.

The time loop is fastseq._C's (csrc/rnn_layer.cpp, the contract of csrc/rnn_layer.h) for every backend: one GEMM
gives the input projection of every step, then each step is a GEMM of h with W_hh^T and the fused cell kernel of the
backend, on the active rows only for packed sequences; backward runs the fused pointwise backward per step in
reverse and the weight gradients as a few GEMMs over all steps. The backend gives the cell kernels: ``cpu`` (C++
row kernels: float32 / float64 / bfloat16), ``cuda`` (the CUDA cell kernels: float32 / float16 / bfloat16),
``triton`` (the Triton cell kernels of fastseq.kernels.rnn_layer, called back from the loop: float32 / float16 /
bfloat16). Elsewhere fastseq.backends.select falls back to ``reference`` with its one-time warning: it runs
fastseq.reference.rnn_layer (saved outputs are zeros, unused) and its backward differentiates the reference with
torch.autograd. The backward runs on the backend that ran the forward (recorded in setup_context).

What backward needs is returned by the op as four extra outputs (so that torch.compile sees them), fixed in number
and shape whatever the backend: h_seq (rows, Hout) h of every step; gates (rows, 4H) the activated gates
(LSTM [i, f, g, o], GRU [r, z, n, W_hn h + b_hn]); c_seq (rows, H) c of every step (LSTM); h_raw (rows, H)
o * tanh(c) before the projection (LSTM with w_hr); rows = T*N, or sum(batch_sizes) packed. Where a tensor does not
apply it is empty (0,). Absent c_n (not LSTM) is empty (0,) too.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import backends, modes, reference
from ._dispatch import call, differentiable_grads, eager_function, needs_grad

DTYPES = {
    "cpu": frozenset({torch.float32, torch.float64, torch.bfloat16}),
    "cuda": frozenset({torch.float32, torch.float16, torch.bfloat16}),
    "triton": frozenset({torch.float32, torch.float16, torch.bfloat16}),
}


def _limits(name: str) -> str | None:
    if name == "triton" and backends.extension() is None:
        return "the Triton layer's time loop is fastseq._C's, which is not built"
    return None


def _select(x: Tensor) -> str:
    # limits only without the extension: select caches its choices where there are none to consult
    return backends.select("rnn_layer", x.device, x.dtype, DTYPES, None if backends.extension() else _limits)


_PERSISTENT = {"0": False, "1": True, "": None}


def _steps(backend: str, mode: str, b_ih: Tensor | None, b_hh: Tensor | None, peephole: Tensor | None):
    """The step kernels the time loop of fastseq._C calls: those of the tensors' device (None) or Triton's, whose
    persistent kernels run the whole loop where they fit (FASTSEQ_RNN_PERSISTENT=0: never, 1: wherever they run,
    unset: where the compiled kernel fits the GPU)."""
    if backend != "triton":
        return None
    from ..kernels import rnn_layer as tk

    value = os.environ.get("FASTSEQ_RNN_PERSISTENT", "")
    if value not in _PERSISTENT:
        raise ValueError(f"FASTSEQ_RNN_PERSISTENT must be 0 or 1 (or unset), got {value!r}")
    return tk.LayerSteps(mode, b_ih, b_hh, peephole, persistent=_PERSISTENT[value])


def _shapes(mode: str, x: Tensor, h0: Tensor, w_hh: Tensor, w_hr: Tensor | None, batch_sizes: Tensor | None
            ) -> dict[str, tuple[int, ...]]:
    """Shapes of the forward outputs: y, h_n, c_n and the saved h_seq, gates, c_seq, h_raw."""
    m = modes.mode(mode)
    hidden = w_hh.shape[0] // m.gates
    hout, n = w_hh.shape[1], h0.shape[0]
    rows = x.shape[0] if batch_sizes is not None else x.shape[0] * x.shape[1]
    return {"y": (*x.shape[:-1], hout), "h_n": (n, hout), "c_n": (n, hidden) if m.cell else (0,),
            "h_seq": (rows, hout), "gates": (rows, m.saved * hidden) if m.saved else (0,),
            "c_seq": (rows, hidden) if m.cell else (0,), "h_raw": (rows, hidden) if w_hr is not None else (0,)}


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _forward(mode: str, x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
             b_hh: Tensor | None, w_hr: Tensor | None, peephole: Tensor | None, reverse: bool,
             batch_sizes: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y, h_n, c_n, h_seq, gates, c_seq, h_raw for one layer direction: x (T, N, C) (or packed (sum(batch_sizes), C)
    with batch_sizes (T,) int64 on the CPU), h0 (N, Hout), c0 (N, H) (LSTM modes, else None), w_ih (G*H, C),
    w_hh (G*H, Hout), b_ih, b_hh (G*H,), w_hr (Hout, H) (LSTM projection; Hout = H without), peephole (3, H)
    (peephole_lstm)."""
    y, h_n, c_n, saved = _run(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, reverse, batch_sizes, True)
    if saved is None:  # the reference backend: zeros, unused
        s = _shapes(mode, x, h0, w_hh, w_hr, batch_sizes)
        saved = [x.new_zeros(s[k]) for k in ("h_seq", "gates", "c_seq", "h_raw")]
    return (y, h_n, *(_or_empty(t, x) for t in (c_n, *saved)))


def _infer(mode: str, x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
           b_hh: Tensor | None, w_hr: Tensor | None, peephole: Tensor | None, reverse: bool,
           batch_sizes: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """y, h_n, c_n (None without a cell state) of _forward for a forward that no backward follows: the copy of every
    step's h that the backward would read is not made (inference holds y, the loop's gate and c buffers and nothing
    more)."""
    return _run(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, reverse, batch_sizes, False)[:3]


def _run(mode: str, x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
         b_hh: Tensor | None, w_hr: Tensor | None, peephole: Tensor | None, reverse: bool,
         batch_sizes: Tensor | None, need_saved: bool) -> tuple:
    """y, h_n, c_n (None without a cell state) and the four tensors a backward reads (None from the reference
    backend; None each where absent or not need_saved) on the backend select picks."""
    backend = _select(x)
    if backend == "reference":
        return (*reference.rnn_layer(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, batch_sizes, peephole),
                None)
    return backends.extension().rnn_layer_fwd(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, reverse,
                                              batch_sizes, _steps(backend, mode, b_ih, b_hh, peephole), need_saved)


rnn_layer = torch.library.custom_op("fastseq::rnn_layer", _forward, mutates_args=())


@rnn_layer.register_fake
def _(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, reverse, batch_sizes):
    return tuple(x.new_empty(s) for s in _shapes(mode, x, h0, w_hh, w_hr, batch_sizes).values())


def _backward_impl(mode: str, dy: Tensor, dh_n: Tensor, dc_n: Tensor | None, x: Tensor, h0: Tensor,
                   c0: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                   w_hr: Tensor | None, peephole: Tensor | None, reverse: bool, batch_sizes: Tensor | None,
                   h_seq: Tensor, gates: Tensor, c_seq: Tensor, h_raw: Tensor, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dpeephole of rnn_layer run on `backend` (cpu, cuda or
    triton; empty (0,) where the input is absent); dy, dh_n, dc_n: the gradients of y, h_n, c_n (dc_n None counts as
    zeros)."""
    dx, dh0, dc0, dws = backends.extension().rnn_layer_bwd(
        mode, dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, reverse, batch_sizes,
        [h_seq, gates, c_seq, h_raw], _steps(backend, mode, b_ih, b_hh, peephole))
    return (dx, dh0, _or_empty(dc0, x), *(_or_empty(t, x) for t in dws))


rnn_layer_backward = torch.library.custom_op("fastseq::rnn_layer_backward", _backward_impl, mutates_args=())


@rnn_layer_backward.register_fake
def _(mode, dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, reverse, batch_sizes, h_seq, gates,
      c_seq, h_raw, backend):
    return tuple(x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole))


def _setup_context(ctx, inputs, output):
    mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, reverse, batch_sizes = inputs
    ctx.mode, ctx.reverse, ctx.backend = mode, reverse, _select(x)  # recorded where the forward ran
    ctx.set_materialize_grads(False)
    saved = output[3:] if ctx.backend != "reference" else ()
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, batch_sizes, *saved)


def _backward_with(backward_op):
    """The autograd formula, running the fused backward through `backward_op` (the custom op, or in eager mode its
    implementation directly)."""

    def backward(ctx, dy, dh_n, dc_n, *_saved_grads):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, batch_sizes, *saved = ctx.saved_tensors
        cell = modes.mode(ctx.mode).cell
        y_shape = (*x.shape[:-1], w_hh.shape[1])
        dy = x.new_zeros(y_shape) if dy is None else dy.contiguous()
        dh_n = torch.zeros_like(h0) if dh_n is None else dh_n.contiguous()
        dc_n = None if not cell or dc_n is None else dc_n.contiguous()
        inputs = [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole]
        need = ctx.needs_input_grad[1:10]
        create_graph = torch.is_grad_enabled()  # a backward that can itself be differentiated (double backward)
        if create_graph or ctx.backend == "reference":
            def fn(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole):
                return reference.rnn_layer(ctx.mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ctx.reverse,
                                           batch_sizes, peephole)

            grads = differentiable_grads(fn, inputs, need, [dy, dh_n, dc_n], create_graph)
        else:
            grads = backward_op(ctx.mode, dy, dh_n, dc_n, *inputs, ctx.reverse, batch_sizes, *saved, ctx.backend)
        return (None, *(g if n and t is not None else None for g, n, t in zip(grads, need, inputs)), None, None)

    return backward


rnn_layer.register_autograd(_backward_with(rnn_layer_backward), setup_context=_setup_context)
_RNNLayerFunction = eager_function("RNNLayerFunction", _forward, _setup_context, _backward_with(_backward_impl),
                                   non_differentiable=(3, 4, 5, 6), inference=_infer)


# ---- oneDNN's LSTM primitive ----
# An LSTM layer direction on the CPU (functional._direction) runs oneDNN's LSTM layer primitive (through ATen's
# mkldnn_rnn_layer, the primitive torch.nn.LSTM runs there, forward and backward) where it is faster than fastseq's
# loop: results and gradients as torch's (float32 outputs bit for bit). FASTSEQ_ONEDNN=0 turns it off, =1 uses it
# wherever it can run; unset, where it wins (_onednn_wins).
_ONEDNN = {"0": False, "1": True, "": None}


def _onednn_wins(n: int, steps: int, hidden: int, dtype: torch.dtype, train: bool) -> bool:
    """Where oneDNN's LSTM beats fastseq's loop, measured with FASTSEQ_ONEDNN=0 against =1 alternated in one process
    (tools/onednn_rule.py [--train] [--dtype bfloat16] --ts 1,4,16,32,64,100: fastseq.nn.LSTM, C=H, 2-core Zen 4
    with AVX512_BF16, the better of two runs of each), for n rows and `steps` time steps.
    oneDNN pays per call for putting the weights in its own layout (a copy of W_ih and W_hh, whatever the number of
    steps), which fastseq's loop does not (it packs W_hh only, and only at few rows): at few steps fastseq's loop
    is ahead (float32 at T=1: 1.0-10x, inference and training alike; T=4: up to 4x), and oneDNN needs about 256
    rows in all (T * n; 1600 at H=1024) to repay it.
    Inference (no grad), float32: from 4 rows below H=1024 (1.1-1.9x at T=100; 4-8 rows at H=1024: 0.8-1.0x) and
    from 16 rows at any H, with T * n >= 256 (>= 1600 at H=1024). At fewer rows fastseq's loop is ahead (up to 2x
    at 2 rows, H=1024): a step's recurrent GEMM is then a matrix-vector product, which its packed GEMM runs with one
    barrier a step. bfloat16 (oneDNN's native bf16 dot products: 1.1-5x) except at 16 rows and more when T=1
    (0.24-0.97x), or T < 16 with H=1024 (0.37-0.59x).
    Training (forward and backward): float32 from 8 rows below H=1024 with T * n >= 256 (1.1-1.26x at 8-16 rows
    and T=100, 0.96-1.26x at 32-64, where both run near the machine's sgemm peak; T=16: 1.0-1.1x); fastseq's loop at
    fewer rows (1.0-2.2x at 1-2 rows; 4 rows 0.8-1.04x) and at H=1024 (0.94-1.04x: even). bfloat16 at H <= 256
    from T=16 and at H <= 128 from T=4 (1.1-2.5x); from H=512 fastseq's loop (up to 3.7x at H=1024, where oneDNN's
    bf16 backward is slow here), and at fewer steps (2-5x at H=256, T <= 4)."""
    rows = n * steps
    if dtype == torch.bfloat16:
        if train:
            return (hidden <= 128 and steps >= 4) or (hidden <= 256 and steps >= 16)
        return n < 16 or (steps > 1 and (hidden < 1024 or steps >= 16))
    if train:
        return n >= 8 and hidden < 1024 and rows >= 256
    return (n >= 16 or (n >= 4 and hidden < 1024)) and rows >= (256 if hidden < 1024 else 1600)


def onednn_rejects(mode: str, x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor,
                   b_ih: Tensor | None, b_hh: Tensor | None, w_hr: Tensor | None, peephole: Tensor | None,
                   batch_sizes: Tensor | None) -> str | None:
    """Why this layer direction (apply's arguments) does not run on oneDNN's LSTM primitive, or None when it does:
    for training where a tensor needs grad, else for inference."""
    raw = backends.raw_env("FASTSEQ_ONEDNN", b"FASTSEQ_ONEDNN")
    value = "" if raw is None else raw.decode() if isinstance(raw, bytes) else raw
    if value not in _ONEDNN:
        raise ValueError(f"FASTSEQ_ONEDNN must be 0 or 1 (or unset), got {value!r}")
    if _ONEDNN[value] is False:
        return "FASTSEQ_ONEDNN=0"
    if mode != "lstm" or w_hr is not None or peephole is not None or batch_sizes is not None:
        return "oneDNN runs the plain LSTM only (no projection, peephole or packed input)"
    if torch.compiler.is_compiling():
        return "under torch.compile the layer is fastseq's op"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "oneDNN is not available or torch.backends.mkldnn.enabled is False"
    if x.dtype != torch.float32 and not (x.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return f"oneDNN's LSTM here takes float32 (and bfloat16 where the CPU has it), got {x.dtype}"
    if x.numel() == 0 or _select(x) != "cpu":
        return "not a non-empty input on the cpu backend"
    train = needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    if _ONEDNN[value] is None and not _onednn_wins(h0.shape[0], x.shape[0], w_hh.shape[1], x.dtype, train):
        return (f"fastseq's loop is faster at {h0.shape[0]} rows, T={x.shape[0]}, hidden size {w_hh.shape[1]} "
                f"({'training' if train else 'inference'})")
    return None


def onednn_forward(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                    b_hh: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """y (T, N, H), h_n, c_n (N, H) of an LSTM layer direction by oneDNN; where a tensor needs grad, in training
    mode: ATen's autograd formula of mkldnn_rnn_layer (oneDNN's backward, differentiable itself for a double
    backward) gives the gradients, as for torch.nn.LSTM."""
    hidden = w_hh.shape[1]
    train = needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    has_biases = b_ih is not None or b_hh is not None
    b_ih, b_hh = (x.new_zeros(w_hh.shape[0]) if b is None else b for b in (b_ih, b_hh))  # read if has_biases
    y, h_n, c_n, _ = torch.ops.aten.mkldnn_rnn_layer(
        x.contiguous(), w_ih.contiguous(), w_hh.contiguous(), b_ih.contiguous(), b_hh.contiguous(), h0.contiguous(),
        c0.contiguous(), reverse, [], 2, hidden, 1, has_biases, False, False, train)  # 2: LSTM (cuDNN's numbering)
    return y, h_n, c_n


def apply(mode: str, x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
          b_hh: Tensor | None, w_hr: Tensor | None, peephole: Tensor | None, reverse: bool,
          batch_sizes: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """y, h_n, c_n (None unless the mode has a cell state) of one layer direction, through the fastest path for the
    current mode."""
    y, h_n, c_n = call(rnn_layer, _RNNLayerFunction, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole,
                       reverse, batch_sizes)[:3]
    return y, h_n, c_n if modes.mode(mode).cell else None
