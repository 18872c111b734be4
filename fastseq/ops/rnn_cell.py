"""fastseq::lstm_cell, fastseq::gru_cell, fastseq::rnn_cell (one recurrent cell step) and their backward ops.

Forward: the GEMMs ``igates = x W_ih^T`` and ``hgates = h W_hh^T`` run through torch (ATen / cuBLAS), then one fused
pointwise kernel of the selected backend adds the biases, applies the gate math and saves what backward needs (the
contract of csrc/rnn_cell.h); on cpu and cuda both are one call into fastseq._C (``*_cell_step``), on the triton
backend the whole step (without peephole) is one fused kernel (see _fully_fused).
Backward: one fused pointwise kernel gives the gradients of the pre-activation gates, then GEMMs give d(input),
d(hx) and the weight gradients (the bias gradients are the gate gradients summed over the batch).

Backward runs on the backend that ran forward, so that the workspace it reads is the one that backend wrote. The
``reference`` backend computes the step with fastseq.reference and differentiates it with torch.autograd in the
autograd formula itself (the reference is the oracle; its workspace is zeros and unused). Outputs that got no
gradient count as zeros.

Shapes: x (N, C); h, c (N, H); w_ih (G*H, C); w_hh (G*H, H); b_ih, b_hh (G*H,) with G = 4 (LSTM), 3 (GRU),
1 (RNN); peephole (3, H) = [p_i; p_f; p_o]. Workspaces: LSTM (N, 4H) = [i, f, g, o]; GRU (N, 4H) = [r, z, n, hn].
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, reference
from ._dispatch import backward_op, call, differentiable_grads, eager_function

DTYPES = {
    "cpu": frozenset({torch.float32, torch.float64, torch.bfloat16}),
    "cuda": frozenset({torch.float32, torch.float16, torch.bfloat16}),
    "triton": frozenset({torch.float32, torch.float16, torch.bfloat16}),
}


def _select(op: str, x: Tensor) -> str:
    return backends.select(op, x.device, x.dtype, DTYPES)


def _kernels(backend: str):
    """The module with the pointwise kernels of `backend` (fastseq._C for cpu and cuda, else the Triton one)."""
    if backend in ("cpu", "cuda"):
        return backends.extension()
    from ..kernels import rnn_cell as tk

    return tk


def _fully_fused(backend: str, x: Tensor) -> bool:
    """Whether the step runs as one Triton kernel: on the triton backend, except for bfloat16 in Triton's
    interpreter, whose tl.dot does not support bfloat16 (triton-lang/triton#11584); the GEMMs then go through torch
    and the Triton pointwise kernel does the rest."""
    return backend == "triton" and not (x.dtype == torch.bfloat16 and backends.triton_interpreting())


def _c(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _empty(like: Tensor) -> Tensor:
    """A fresh empty tensor for a gradient that is not needed (outputs of a custom op must not alias)."""
    return like.new_empty(0)


def _fake(like: Tensor, needed: bool, shape: tuple[int, ...] | None = None) -> Tensor:
    """The fake of a gradient: shaped like `like` (or `shape`) when needed, else empty."""
    if not needed:
        return _empty(like)
    return like.new_empty(like.shape) if shape is None else like.new_empty(shape)


def _grad(g: Tensor | None, like: Tensor) -> Tensor:
    """An incoming gradient as the kernels take it: zeros where the output got none (grads are not materialized,
    which spares filling the workspace's), contiguous."""
    return torch.zeros_like(like) if g is None else g.contiguous()


def _allow_tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def _input_grads(dgates_i: Tensor, dgates_h: Tensor, x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
                 dh_direct: Tensor | None, need_input: bool, need_hx: bool, need_weights: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx = dgates_i W_ih, dh = dh_direct + dgates_h W_hh, dW_ih = dgates_i^T x, dW_hh = dgates_h^T h
    (empty where not needed)."""
    dx = dgates_i @ w_ih if need_input else _empty(x)
    if not need_hx:
        dh = _empty(x)
    elif dh_direct is None:
        dh = dgates_h @ w_hh
    else:
        dh = torch.addmm(dh_direct, dgates_h, w_hh)
    dw_ih = dgates_i.t() @ x if need_weights else _empty(x)
    dw_hh = dgates_h.t() @ h if need_weights else _empty(x)
    return dx, dh, dw_ih, dw_hh


def _needs(ctx, w: int) -> tuple[bool, bool, bool, bool]:
    """(need_input, need_hx, need_weights, need_bias) from ctx.needs_input_grad of (x, h, ..., w_ih at index `w`,
    w_hh, b_ih, b_hh, ...)."""
    n = ctx.needs_input_grad
    return n[0], n[1], n[w] or n[w + 1], n[w + 2] or n[w + 3]


# ---------------------------------------------------------------------------------------------------------- LSTM
def _lstm_cell_impl(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                    b_hh: Tensor | None, peephole: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """hy, cy (N, H), workspace (N, 4H): gates = x W_ih^T + b_ih + h W_hh^T + b_hh (order i, f, g, o),
    c' = f*c + i*g, h' = o*tanh(c'); with peephole, i and f see p_i*c, p_f*c and o sees p_o*c'."""
    backend = _select("lstm_cell", x)
    if backend == "reference":
        hy, cy = reference.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh, peephole)
        return hy, cy, x.new_zeros(x.shape[0], w_hh.shape[0])
    if backend != "triton":
        return backends.extension().lstm_cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh, peephole)
    if peephole is None and _fully_fused(backend, x):
        return _kernels(backend).lstm_cell_fused(x, h, c, w_ih, w_hh, b_ih, b_hh, allow_tf32=_allow_tf32())
    return _kernels(backend).lstm_cell_fwd(x @ w_ih.t(), h @ w_hh.t(), c.contiguous(), _c(b_ih), _c(b_hh),
                                           _c(peephole))


lstm_cell = torch.library.custom_op("fastseq::lstm_cell", _lstm_cell_impl, mutates_args=())


@lstm_cell.register_fake
def _(x, h, c, w_ih, w_hh, b_ih, b_hh, peephole):
    return c.new_empty(c.shape), c.new_empty(c.shape), x.new_empty(x.shape[0], w_hh.shape[0])


def _lstm_cell_backward_impl(dhy: Tensor, dcy: Tensor, x: Tensor, h: Tensor, c: Tensor, cy: Tensor,
                             workspace: Tensor, w_ih: Tensor, w_hh: Tensor, peephole: Tensor | None, backend: str,
                             need_input: bool, need_hx: bool, need_weights: bool, need_bias: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx, dh, dc, dw_ih, dw_hh, db (= db_ih = db_hh), dpeephole of lstm_cell run on `backend` (empty where not
    needed)."""
    dgates, dc, dpeephole = _kernels(backend).lstm_cell_bwd(dhy.contiguous(), dcy.contiguous(), c.contiguous(), cy,
                                                            workspace, _c(peephole))
    dx, dh, dw_ih, dw_hh = _input_grads(dgates, dgates, x, h, w_ih, w_hh, None, need_input, need_hx, need_weights)
    db = dgates.sum(0) if need_bias else _empty(x)
    return dx, dh, dc, dw_ih, dw_hh, db, _empty(x) if dpeephole is None else dpeephole


lstm_cell_backward = torch.library.custom_op("fastseq::lstm_cell_backward", _lstm_cell_backward_impl,
                                                mutates_args=())


@lstm_cell_backward.register_fake
def _(dhy, dcy, x, h, c, cy, workspace, w_ih, w_hh, peephole, backend, need_input, need_hx, need_weights,
      need_bias):
    return (_fake(x, need_input), _fake(h, need_hx), c.new_empty(c.shape), _fake(w_ih, need_weights),
            _fake(w_hh, need_weights), _fake(x, need_bias, (w_hh.shape[0],)),
            _empty(x) if peephole is None else peephole.new_empty(peephole.shape))


def _lstm_setup_context(ctx, inputs, output):
    x, h, c, w_ih, w_hh, b_ih, b_hh, peephole = inputs
    _, cy, workspace = output
    ctx.backend = _select("lstm_cell", x)
    ctx.set_materialize_grads(False)
    # a copy of cy, so that the caller may change cy in place (as torch's LSTMCell allows)
    ctx.save_for_backward(x, h, c, w_ih, w_hh, b_ih, b_hh, peephole, cy.clone(), workspace)


def _lstm_backward(ctx, dhy, dcy, _dworkspace):
    x, h, c, w_ih, w_hh, b_ih, b_hh, peephole, cy, workspace = ctx.saved_tensors
    create_graph = torch.is_grad_enabled()  # a backward that can itself be differentiated (double backward)
    if create_graph or ctx.backend == "reference":
        fn = lambda x, h, c, *params: reference.lstm_cell(x, (h, c), *params)  # noqa: E731
        return tuple(differentiable_grads(fn, [x, h, c, w_ih, w_hh, b_ih, b_hh, peephole], ctx.needs_input_grad,
                                          [dhy, dcy], create_graph))
    dhy, dcy = _grad(dhy, cy), _grad(dcy, cy)
    need_input, need_hx, need_weights, need_bias = _needs(ctx, 3)
    bwd = backward_op(ctx, lstm_cell_backward, _lstm_cell_backward_impl)
    dx, dh, dc, dw_ih, dw_hh, db, dp = bwd(dhy, dcy, x, h, c, cy, workspace, w_ih, w_hh, peephole,
                                                          ctx.backend, need_input, need_hx, need_weights,
                                                          need_bias)
    n = ctx.needs_input_grad
    return (dx if need_input else None, dh if n[1] else None, dc if n[2] else None,
            dw_ih if n[3] else None, dw_hh if n[4] else None, db if n[5] else None,
            (db.clone() if n[5] else db) if n[6] else None, dp if n[7] else None)


lstm_cell.register_autograd(_lstm_backward, setup_context=_lstm_setup_context)


# ----------------------------------------------------------------------------------------------------------- GRU
def _gru_cell_impl(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
    """hy (N, H), workspace (N, 4H): r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z likewise,
    n = tanh(W_in x + b_in + r*(W_hn h + b_hn)), h' = (1-z)*n + z*h."""
    backend = _select("gru_cell", x)
    if backend == "reference":
        return reference.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh), x.new_zeros(x.shape[0], 4 * h.shape[1])
    if backend != "triton":
        return backends.extension().gru_cell_step(x, h, w_ih, w_hh, b_ih, b_hh)
    if _fully_fused(backend, x):
        return _kernels(backend).gru_cell_fused(x, h, w_ih, w_hh, b_ih, b_hh, allow_tf32=_allow_tf32())
    return _kernels(backend).gru_cell_fwd(x @ w_ih.t(), h @ w_hh.t(), h.contiguous(), _c(b_ih), _c(b_hh))


gru_cell = torch.library.custom_op("fastseq::gru_cell", _gru_cell_impl, mutates_args=())


@gru_cell.register_fake
def _(x, h, w_ih, w_hh, b_ih, b_hh):
    return h.new_empty(h.shape), x.new_empty(x.shape[0], 4 * h.shape[1])


def _gru_cell_backward_impl(dhy: Tensor, x: Tensor, h: Tensor, workspace: Tensor, w_ih: Tensor, w_hh: Tensor,
                            backend: str, need_input: bool, need_hx: bool, need_weights: bool, need_bias: bool
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx, dh, dw_ih, dw_hh, db_ih, db_hh of gru_cell run on `backend` (empty where not needed)."""
    d_ig, d_hg, dh_direct = _kernels(backend).gru_cell_bwd(dhy.contiguous(), h.contiguous(), workspace)
    dx, dh, dw_ih, dw_hh = _input_grads(d_ig, d_hg, x, h, w_ih, w_hh, dh_direct, need_input, need_hx,
                                        need_weights)
    if not need_bias:
        return dx, dh, dw_ih, dw_hh, _empty(x), _empty(x)
    return dx, dh, dw_ih, dw_hh, d_ig.sum(0), d_hg.sum(0)


gru_cell_backward = torch.library.custom_op("fastseq::gru_cell_backward", _gru_cell_backward_impl,
                                               mutates_args=())


@gru_cell_backward.register_fake
def _(dhy, x, h, workspace, w_ih, w_hh, backend, need_input, need_hx, need_weights, need_bias):
    return (_fake(x, need_input), _fake(h, need_hx), _fake(w_ih, need_weights), _fake(w_hh, need_weights),
            _fake(x, need_bias, (w_hh.shape[0],)), _fake(x, need_bias, (w_hh.shape[0],)))


def _gru_setup_context(ctx, inputs, output):
    x, h, w_ih, w_hh, b_ih, b_hh = inputs
    ctx.backend = _select("gru_cell", x)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, h, w_ih, w_hh, b_ih, b_hh, output[1])


def _gru_backward(ctx, dhy, _dworkspace):
    x, h, w_ih, w_hh, b_ih, b_hh, workspace = ctx.saved_tensors
    create_graph = torch.is_grad_enabled()  # a backward that can itself be differentiated (double backward)
    if create_graph or ctx.backend == "reference":
        return tuple(differentiable_grads(reference.gru_cell, [x, h, w_ih, w_hh, b_ih, b_hh], ctx.needs_input_grad,
                                          [dhy], create_graph))
    dhy = _grad(dhy, h)
    need_input, need_hx, need_weights, need_bias = _needs(ctx, 2)
    bwd = backward_op(ctx, gru_cell_backward, _gru_cell_backward_impl)
    dx, dh, dw_ih, dw_hh, db_ih, db_hh = bwd(dhy, x, h, workspace, w_ih, w_hh, ctx.backend,
                                                           need_input, need_hx, need_weights, need_bias)
    n = ctx.needs_input_grad
    return (dx if n[0] else None, dh if n[1] else None, dw_ih if n[2] else None, dw_hh if n[3] else None,
            db_ih if n[4] else None, db_hh if n[5] else None)


gru_cell.register_autograd(_gru_backward, setup_context=_gru_setup_context)


# ----------------------------------------------------------------------------------------------------------- RNN
def _rnn_cell_impl(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                   nonlinearity: str) -> Tensor:
    """hy (N, H) = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act = tanh or relu (`nonlinearity`)."""
    backend = _select("rnn_cell", x)
    if backend == "reference":
        return reference.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    if backend != "triton":
        return backends.extension().rnn_cell_step(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    if _fully_fused(backend, x):
        return _kernels(backend).rnn_cell_fused(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity,
                                                allow_tf32=_allow_tf32())
    return _kernels(backend).rnn_cell_fwd(x @ w_ih.t(), h @ w_hh.t(), _c(b_ih), _c(b_hh), nonlinearity)


rnn_cell = torch.library.custom_op("fastseq::rnn_cell", _rnn_cell_impl, mutates_args=())


@rnn_cell.register_fake
def _(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    return h.new_empty(h.shape)


def _rnn_cell_backward_impl(dhy: Tensor, x: Tensor, h: Tensor, hy: Tensor, w_ih: Tensor, w_hh: Tensor,
                            nonlinearity: str, backend: str, need_input: bool, need_hx: bool, need_weights: bool,
                            need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx, dh, dw_ih, dw_hh, db (= db_ih = db_hh) of rnn_cell run on `backend` (empty where not needed)."""
    dgates = _kernels(backend).rnn_cell_bwd(dhy.contiguous(), hy, nonlinearity)
    dx, dh, dw_ih, dw_hh = _input_grads(dgates, dgates, x, h, w_ih, w_hh, None, need_input, need_hx, need_weights)
    return dx, dh, dw_ih, dw_hh, dgates.sum(0) if need_bias else _empty(x)


rnn_cell_backward = torch.library.custom_op("fastseq::rnn_cell_backward", _rnn_cell_backward_impl,
                                               mutates_args=())


@rnn_cell_backward.register_fake
def _(dhy, x, h, hy, w_ih, w_hh, nonlinearity, backend, need_input, need_hx, need_weights, need_bias):
    return (_fake(x, need_input), _fake(h, need_hx), _fake(w_ih, need_weights), _fake(w_hh, need_weights),
            _fake(x, need_bias, (w_hh.shape[0],)))


def _rnn_setup_context(ctx, inputs, output):
    x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity = inputs
    ctx.backend = _select("rnn_cell", x)
    ctx.nonlinearity = nonlinearity
    ctx.save_for_backward(x, h, w_ih, w_hh, b_ih, b_hh, output)


def _rnn_backward(ctx, dhy):
    x, h, w_ih, w_hh, b_ih, b_hh, hy = ctx.saved_tensors
    create_graph = torch.is_grad_enabled()  # a backward that can itself be differentiated (double backward)
    if create_graph or ctx.backend == "reference":
        fn = lambda *args: reference.rnn_cell(*args, nonlinearity=ctx.nonlinearity)  # noqa: E731
        return (*differentiable_grads(fn, [x, h, w_ih, w_hh, b_ih, b_hh], ctx.needs_input_grad, [dhy], create_graph),
                None)
    need_input, need_hx, need_weights, need_bias = _needs(ctx, 2)
    bwd = backward_op(ctx, rnn_cell_backward, _rnn_cell_backward_impl)
    dx, dh, dw_ih, dw_hh, db = bwd(dhy, x, h, hy, w_ih, w_hh, ctx.nonlinearity, ctx.backend,
                                                 need_input, need_hx, need_weights, need_bias)
    n = ctx.needs_input_grad
    return (dx if n[0] else None, dh if n[1] else None, dw_ih if n[2] else None, dw_hh if n[3] else None,
            db if n[4] else None, (db.clone() if n[4] else db) if n[5] else None, None)


rnn_cell.register_autograd(_rnn_backward, setup_context=_rnn_setup_context)

# Eager fast path (see _dispatch): the same forward, context and backward as the custom ops.
_LSTMCellFunction = eager_function("LSTMCellFunction", _lstm_cell_impl, _lstm_setup_context, _lstm_backward, (2,))
_GRUCellFunction = eager_function("GRUCellFunction", _gru_cell_impl, _gru_setup_context, _gru_backward, (1,))
_RNNCellFunction = eager_function("RNNCellFunction", _rnn_cell_impl, _rnn_setup_context, _rnn_backward)


def _in_cxx(op: str, x: Tensor) -> bool:
    """Whether a step runs fastseq._C's `cell` (kernels and autograd formula in C++: the same kernels as the custom
    op's, without a Python autograd.Function's ~20 us a step forward and backward): in eager mode on the cpu and
    cuda backends."""
    return not torch.compiler.is_compiling() and (backends.runs_on_cpu(x, DTYPES) or _select(op, x) in ("cpu", "cuda"))


def lstm_cell_apply(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                    b_hh: Tensor | None, peephole: Tensor | None) -> tuple[Tensor, Tensor]:
    """(h', c') of one LSTM step (2-D, checked inputs), through the fastest path for the current mode."""
    if peephole is None and _in_cxx("lstm_cell", x):
        hy, cy = backends.extension().cell("lstm", x, h, c, w_ih, w_hh, b_ih, b_hh)
        return hy, cy
    hy, cy, _ = call(lstm_cell, _LSTMCellFunction, x, h, c, w_ih, w_hh, b_ih, b_hh, peephole)
    return hy, cy


def gru_cell_apply(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
                   ) -> Tensor:
    """h' of one GRU step (2-D, checked inputs)."""
    if _in_cxx("gru_cell", x):
        return backends.extension().cell("gru", x, h, None, w_ih, w_hh, b_ih, b_hh)[0]
    return call(gru_cell, _GRUCellFunction, x, h, w_ih, w_hh, b_ih, b_hh)[0]


def rnn_cell_apply(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                   nonlinearity: str) -> Tensor:
    """h' of one Elman RNN step (2-D, checked inputs)."""
    if _in_cxx("rnn_cell", x):
        return backends.extension().cell(f"rnn_{nonlinearity}", x, h, None, w_ih, w_hh, b_ih, b_hh)[0]
    return call(rnn_cell, _RNNCellFunction, x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
