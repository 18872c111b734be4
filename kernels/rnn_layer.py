"""Triton step kernels of the recurrent layers: the cell of each mode (LSTM and peephole LSTM, GRU, Elman RNN
tanh/relu) as the time loop of fastseq._C calls it (csrc/rnn_layer.cpp, through the Python adapter of
csrc/bindings.cpp). The loop owns the schedule, the buffers and the GEMMs; each method here runs one step's rows
with the pointwise kernels of kernels/rnn_cell.py, given as tensor views of the loop's buffers (None where absent):
(n, .) rows, unit column stride, contiguous except x W_ih^T of a GRU run in place (the first 3H columns of its
(n, 4H) gates). Run in place (in_place = True), x W_ih^T is overwritten by the gates (LSTM) or h (RNN) it becomes,
and the backward updates the LSTM's dc and the GRU's dh in place: each program of those kernels loads an element
before it stores, at the same address, the value computed from it.
The persistent kernels below (_seq_fwd_kernel, _seq_bwd_kernel) run the loop's whole sequence in one launch
instead, on the same buffers, where persistent_config says they fit (LayerSteps.forward_sequence /
backward_sequence).
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from .aot import AOTSpec
from .rnn_cell import (PW_BLOCK_H, PW_BLOCK_N, PW_WARPS, _aot_spec, _biases, _gru_bwd_kernel, _gru_fwd_kernel,
                       _lstm_bwd_kernel, _lstm_fwd_kernel, _pw_grid, _rnn_bwd_kernel, _rnn_fwd_kernel, _sigmoid,
                       _tanh)

_LSTM = ("lstm", "peephole_lstm")
_MODES = (*_LSTM, "gru", "rnn_tanh", "rnn_relu")


def _launch(kernel, args: tuple, n: int, h: int, *scalars: int, **constexprs) -> None:
    """A pointwise kernel of kernels/rnn_cell.py on (n, h) rows and columns; nothing when n * h == 0."""
    if n and h:
        kernel[_pw_grid(n, h)](*args, n, h, *scalars, **constexprs, BLOCK_N=PW_BLOCK_N, BLOCK_H=PW_BLOCK_H,
                               num_warps=PW_WARPS)


class LayerSteps:
    """The step kernels of one layer direction: mode, the biases b_ih, b_hh (G*H,) or None and the peephole
    (3, H) (peephole_lstm) as the layer's; in_place as above (False: separate outputs, as the CUDA C++ kernels).
    forward_sequence / backward_sequence run the whole loop in one persistent kernel where it fits (persistent:
    None = where the compiled kernel fits the GPU, see persistent_config; True = always, False = never)."""

    def __init__(self, mode: str, b_ih: torch.Tensor | None, b_hh: torch.Tensor | None,
                 peephole: torch.Tensor | None, in_place: bool = True, persistent: bool | None = None):
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {list(_MODES)}, got {mode!r}")
        self.mode, self.in_place, self.persistent = mode, in_place, persistent
        some = b_ih if b_ih is not None else b_hh
        self.has_bias, self.b_ih, self.b_hh = (False, None, None) if some is None else \
            _biases(b_ih, b_hh, some.shape[0], some)
        self.peephole = None if peephole is None else peephole.contiguous()

    def forward(self, gi, hg, h_prev, c_prev, h, c, gates) -> None:
        """One step's rows: gi x W_ih^T and hg h W_hh^T (n, G*H), the previous h (GRU) or c (LSTM) (n, H) in; h, c
        (LSTM) (n, H) and the activated gates (n, 4H) (LSTM, GRU) out."""
        n, hidden = h.shape
        b_ih, b_hh = (self.b_ih, self.b_hh) if self.has_bias else (h, h)  # never read without a bias
        if self.mode in _LSTM:
            peep = self.peephole if self.peephole is not None else h  # never read without a peephole
            _launch(_lstm_fwd_kernel, (gi, hg, c_prev, b_ih, b_hh, peep, h, c, gates), n, hidden,
                    HAS_BIAS=self.has_bias, HAS_PEEPHOLE=self.peephole is not None)
        elif self.mode == "gru":
            _launch(_gru_fwd_kernel, (gi, hg, h_prev, b_ih, b_hh, h, gates), n, hidden, gi.stride(0),
                    HAS_BIAS=self.has_bias)
        else:
            _launch(_rnn_fwd_kernel, (gi, hg, b_ih, b_hh, h), n, hidden, HAS_BIAS=self.has_bias,
                    RELU=self.mode == "rnn_relu")

    def backward(self, dh, dh_out, dc, dc_out, h_prev, c_prev, h, c, gates, dgi, dgh) -> None:
        """One step's rows: dh d h_t (LSTM: d(o * tanh(c))), dc d c_t (LSTM) in; dgi (n, G*H) d(pre-activation
        gates) out, dgh the GRU's recurrent side; dc_out d c_{t-1} (LSTM), dh_out the GRU's direct term
        d h_t * z; the saved h_prev (GRU), c_prev and c (LSTM), h (RNN), gates (LSTM, GRU)."""
        n, hidden = dh.shape
        if self.mode in _LSTM:
            peep = self.peephole
            # the peephole kernel also writes per-program partial sums of dpeephole: the loop sums it itself
            partials = dh.new_empty((triton.cdiv(n, PW_BLOCK_N), 3, hidden), dtype=torch.float32) \
                if peep is not None else dh
            _launch(_lstm_bwd_kernel, (dh, dc, c_prev, c, gates, dh if peep is None else peep, dgi, dc_out, partials),
                    n, hidden, HAS_PEEPHOLE=peep is not None)
        elif self.mode == "gru":
            _launch(_gru_bwd_kernel, (dh, h_prev, gates, dgi, dgh, dh_out), n, hidden)
        else:
            _launch(_rnn_bwd_kernel, (dh, h, dgi), n, hidden, RELU=self.mode == "rnn_relu")

    def _config(self, hidden: int, like: torch.Tensor, w_hr: torch.Tensor | None) -> bool:
        if w_hr is not None:  # the persistent kernels have no projection
            return False
        return persistent_config(self.mode, hidden, like.dtype, like.device, self.peephole is not None,
                                 self.persistent)

    def _seq_biases(self, gates: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.has_bias:
            return self.b_ih, self.b_hh
        zeros = like.new_zeros(gates)
        return zeros, zeros

    def forward_sequence(self, steps, gi, y, c, gates, h0, c0, w_hh, w_hr) -> bool:
        """The whole forward loop in one launch of _seq_fwd_kernel, where it runs (else False). steps: (T, 4) int64
        per step its batch size, first row, rows continuing from the previous step and the previous step's first
        row; gi (rows, G*H); y, c (rows, H); gates (rows, 4H) or None; h0, c0 (N, H); w_hh (G*H, H)."""
        n, hidden = h0.shape
        if not self._config(hidden, h0, w_hr):
            return False
        sched, T = _schedule(steps, h0.device)
        meta = _seq_constexprs(self.mode, hidden, self.peephole is not None, False)
        b_ih, b_hh = self._seq_biases(w_hh.shape[0], y)
        peep = self.peephole if self.peephole is not None else y
        if n and hidden and T:
            _seq_fwd_kernel[(triton.cdiv(n, SEQ_BLOCK_N),)](
                gi, w_hh, b_ih, b_hh, peep, h0, y if c0 is None else c0, y, y if c is None else c,
                y if gates is None else gates, sched, T, n, hidden, gi.stride(0), **meta, **SEQ_OPTIONS)
        return True

    def backward_sequence(self, steps, dy, h_seq, c_seq, gates, dgi, dgh, dh, dc, h0, c0, w_hh, w_hr) -> bool:
        """The whole backward loop in one launch of _seq_bwd_kernel, where it runs (else False): dh, dc (N, H) hold
        d h_n, d c_n and are left holding d h0, d c0; dgi, dgh (rows, G*H) get the gate gradients of every step."""
        n, hidden = h0.shape
        if not self._config(hidden, h0, w_hr):
            return False
        sched, T = _schedule(steps, h0.device)
        meta = _seq_constexprs(self.mode, hidden, self.peephole is not None, True)
        peep = self.peephole if self.peephole is not None else dh
        if n and hidden and T:
            _seq_bwd_kernel[(triton.cdiv(n, SEQ_BLOCK_N),)](
                dy, w_hh, peep, h0, dh if c0 is None else c0, h_seq, dh if c_seq is None else c_seq,
                dh if gates is None else gates, dgi, dgh, dh, dh if dc is None else dc, sched, T, n, hidden, **meta,
                **SEQ_OPTIONS)
        return True


# ----------------------------------------------------------------------------------------------------------------
# Persistent kernels: the whole time loop of one layer direction in one launch. Each program owns BLOCK_N batch rows
# and all H hidden units, so programs never wait for each other (no grid barrier; Triton's interpreter, which runs
# programs one after another, runs them too). h and c stay in registers across the steps; W_hh is loaded once before
# the loop and stays on chip (shared memory); each step reads its rows of x W_ih^T (the loop's GEMM before the
# kernel), adds h W_hh^T with tl.dot, applies the cell and writes h, c and the activated gates. Rows past a packed
# step's batch size are masked: they keep their state, so that a row that ended holds h_n and a row that has not
# started (reverse direction) still holds h0. States are rounded to the storage dtype after each step, as the host
# loop stores them. MODE: 0 LSTM, 1 GRU, 2 RNN tanh, 3 RNN relu. No projection (that case keeps the host loop).
# ----------------------------------------------------------------------------------------------------------------
_log = logging.getLogger("fastseq")
_SEQ_MODES = {"lstm": 0, "peephole_lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
SEQ_BLOCK_N = 16  # rows per program (tl.dot's smallest M)


@triton.jit
def _w_tile(w_ptr, g: tl.constexpr, H, a, b, TRANSPOSE: tl.constexpr):
    """Gate g's block of W_hh (G*H, H) as a (BLOCK_H, BLOCK_H) tile, zero-padded: W_g^T[k, j] = W_hh[g*H + j, k]
    with a = k, b = j (TRANSPOSE, the forward's h W_g^T), else W_g[j, k] with a = j, b = k (the backward's dg W_g)."""
    mask = (a < H)[:, None] & (b < H)[None, :]
    if TRANSPOSE:
        offs = (g * H + b[None, :]).to(tl.int64) * H + a[:, None]
    else:
        offs = (g * H + a[:, None]).to(tl.int64) * H + b[None, :]
    return tl.load(w_ptr + offs, mask=mask, other=0.0)


@triton.jit
def _w_tiles(w_ptr, H, cols, MODE: tl.constexpr, TRANSPOSE: tl.constexpr):
    """The tiles (_w_tile) of every gate of MODE's W_hh: (w0, w1, w2, w3), w0 standing in for the gates the mode
    does not have (never read)."""
    w0 = _w_tile(w_ptr, 0, H, cols, cols, TRANSPOSE)
    w1 = w0
    w2 = w0
    w3 = w0
    if MODE <= 1:
        w1 = _w_tile(w_ptr, 1, H, cols, cols, TRANSPOSE)
        w2 = _w_tile(w_ptr, 2, H, cols, cols, TRANSPOSE)
    if MODE == 0:
        w3 = _w_tile(w_ptr, 3, H, cols, cols, TRANSPOSE)
    return w0, w1, w2, w3


@triton.jit
def _tile(stride, BLOCK_N: tl.constexpr, cols):
    """(BLOCK_N, BLOCK_H) int32 offsets of a tile of rows from its first element: a step adds its first row as a
    scalar, so that the loop keeps 32-bit offsets per element instead of 64-bit ones."""
    return tl.arange(0, BLOCK_N)[:, None] * stride + cols[None, :]


@triton.jit
def _row_mask(rows, n, cmask, EVEN_H: tl.constexpr):
    """The rows of a step's batch (rows < n) and, unless H is the block's width, the columns below H."""
    mask = (rows < n)[:, None]
    if not EVEN_H:
        mask = mask & cmask[None, :]
    return mask


@triton.jit
def _pre(hin, w, bias, gi_ptr, mask, INPUT_PRECISION: tl.constexpr):
    """One gate's pre-activation on a step's rows: h W_g^T + bias + x W_ih,g^T (the step's rows at gi_ptr), float32.
    (In this order: the input rows as the dot's accumulator make the float32 products of Triton 3.6 spill.)"""
    a = tl.dot(hin, w, input_precision=INPUT_PRECISION) + bias
    return a + tl.load(gi_ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _bias(b_ih_ptr, b_hh_ptr, g: tl.constexpr, H, cols, IH: tl.constexpr, HH: tl.constexpr):
    """(1, BLOCK_H) float32: gate g's b_ih (IH) plus its b_hh (HH)."""
    cmask = cols < H
    b = tl.zeros(cols.shape, tl.float32)
    if IH:
        b += tl.load(b_ih_ptr + g * H + cols, mask=cmask, other=0.0).to(tl.float32)
    if HH:
        b += tl.load(b_hh_ptr + g * H + cols, mask=cmask, other=0.0).to(tl.float32)
    return b[None, :]


@triton.jit(do_not_specialize=["gi_ptr", "w_ptr", "b_ih_ptr", "b_hh_ptr", "p_ptr", "h0_ptr", "c0_ptr", "y_ptr",
                               "c_ptr", "ws_ptr", "steps_ptr", "T", "N", "H", "gi_stride"])
def _seq_fwd_kernel(
    gi_ptr,     # (rows, G*H) x W_ih^T of every step, row stride gi_stride (rows = sum of the steps' batch sizes)
    w_ptr,      # (G*H, H) W_hh, contiguous
    b_ih_ptr,   # (G*H,), read only when HAS_BIAS
    b_hh_ptr,   # (G*H,), read only when HAS_BIAS
    p_ptr,      # (3, H) peephole [p_i; p_f; p_o], read only when HAS_PEEPHOLE
    h0_ptr,     # (N, H)
    c0_ptr,     # (N, H) LSTM
    y_ptr,      # (rows, H) out: h of every step
    c_ptr,      # (rows, H) out: c of every step (LSTM)
    ws_ptr,     # (rows, 4H) out: the activated gates (LSTM [i, f, g, o], GRU [r, z, n, hn])
    steps_ptr,  # (T, 4) int64: per step in running order its batch size, first row, rows continuing, previous first
    T, N, H, gi_stride,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PEEPHOLE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr,
):
    if EVEN_H:  # H == BLOCK_H: no column mask, constant strides
        H = BLOCK_H
    first = tl.program_id(0) * BLOCK_N
    rows = first + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    r64 = rows.to(tl.int64)
    dt = y_ptr.dtype.element_ty
    g_tile = _tile(gi_stride, BLOCK_N, cols)
    h_tile = _tile(H, BLOCK_N, cols)
    w_tile = _tile(4 * H, BLOCK_N, cols)
    state = (rows < N)[:, None] & cmask[None, :]
    h = tl.load(h0_ptr + r64[:, None] * H + cols[None, :], mask=state, other=0.0).to(tl.float32)
    if MODE == 0:
        c = tl.load(c0_ptr + r64[:, None] * H + cols[None, :], mask=state, other=0.0).to(tl.float32)
        if HAS_PEEPHOLE:
            p_i = tl.load(p_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            p_f = tl.load(p_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            p_o = tl.load(p_ptr + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    b0 = _bias(b_ih_ptr, b_hh_ptr, 0, H, cols, HAS_BIAS, HAS_BIAS)
    if MODE == 0:
        b1 = _bias(b_ih_ptr, b_hh_ptr, 1, H, cols, HAS_BIAS, HAS_BIAS)
        b2 = _bias(b_ih_ptr, b_hh_ptr, 2, H, cols, HAS_BIAS, HAS_BIAS)
        b3 = _bias(b_ih_ptr, b_hh_ptr, 3, H, cols, HAS_BIAS, HAS_BIAS)
    if MODE == 1:
        b1 = _bias(b_ih_ptr, b_hh_ptr, 1, H, cols, HAS_BIAS, HAS_BIAS)
        b_in = _bias(b_ih_ptr, b_hh_ptr, 2, H, cols, HAS_BIAS, False)
        b_hn = _bias(b_ih_ptr, b_hh_ptr, 2, H, cols, False, HAS_BIAS)
    w0, w1, w2, w3 = _w_tiles(w_ptr, H, cols, MODE, True)  # on chip for the whole loop
    # The products of every gate first (float32: FMA products) or one gate at a time, each gate stored as soon as it
    # is computed (bfloat16: mma): the order in which each compiles without spilling registers.
    products_first: tl.constexpr = w_ptr.dtype.element_ty == tl.float32
    for t in range(T):
        n = tl.load(steps_ptr + 4 * t)
        base = tl.load(steps_ptr + 4 * t + 1) + first  # the step's row of this program's first row
        mask = _row_mask(rows, n, cmask, EVEN_H)
        g_ptr = gi_ptr + base * gi_stride + g_tile
        hb = base * H
        wb = base * (4 * H)
        hin = h.to(w_ptr.dtype.element_ty)  # the recurrent GEMM reads h as stored
        if MODE == 0:
            if products_first:
                a0 = _pre(hin, w0, b0, g_ptr, mask, INPUT_PRECISION)
                a1 = _pre(hin, w1, b1, g_ptr + H, mask, INPUT_PRECISION)
                a2 = _pre(hin, w2, b2, g_ptr + 2 * H, mask, INPUT_PRECISION)
                a3 = _pre(hin, w3, b3, g_ptr + 3 * H, mask, INPUT_PRECISION)
            f = a1 if products_first else _pre(hin, w1, b1, g_ptr + H, mask, INPUT_PRECISION)
            if HAS_PEEPHOLE:
                f += p_f * c
            f = _sigmoid(f)
            tl.store(ws_ptr + wb + H + w_tile, f.to(dt), mask=mask)
            c_new = f * c
            i = a0 if products_first else _pre(hin, w0, b0, g_ptr, mask, INPUT_PRECISION)
            if HAS_PEEPHOLE:
                i += p_i * c
            i = _sigmoid(i)
            tl.store(ws_ptr + wb + w_tile, i.to(dt), mask=mask)
            g = _tanh(a2 if products_first else _pre(hin, w2, b2, g_ptr + 2 * H, mask, INPUT_PRECISION))
            tl.store(ws_ptr + wb + 2 * H + w_tile, g.to(dt), mask=mask)
            c_new = (c_new + i * g).to(dt).to(tl.float32)
            tl.store(c_ptr + hb + h_tile, c_new.to(dt), mask=mask)
            o = a3 if products_first else _pre(hin, w3, b3, g_ptr + 3 * H, mask, INPUT_PRECISION)
            if HAS_PEEPHOLE:
                o += p_o * c_new
            o = _sigmoid(o)
            tl.store(ws_ptr + wb + 3 * H + w_tile, o.to(dt), mask=mask)
            h_new = (o * _tanh(c_new)).to(dt).to(tl.float32)
            c = tl.where(mask, c_new, c)
        else:
            a0 = _pre(hin, w0, b0, g_ptr, mask, INPUT_PRECISION)
        if MODE == 1:
            if products_first:
                a1 = _pre(hin, w1, b1, g_ptr + H, mask, INPUT_PRECISION)
                a2 = tl.dot(hin, w2, input_precision=INPUT_PRECISION) + b_hn
            r = _sigmoid(a0)
            tl.store(ws_ptr + wb + w_tile, r.to(dt), mask=mask)
            z = _sigmoid(a1 if products_first else _pre(hin, w1, b1, g_ptr + H, mask, INPUT_PRECISION))
            tl.store(ws_ptr + wb + H + w_tile, z.to(dt), mask=mask)
            hn = a2 if products_first else tl.dot(hin, w2, input_precision=INPUT_PRECISION) + b_hn
            tl.store(ws_ptr + wb + 3 * H + w_tile, hn.to(dt), mask=mask)
            nn = _tanh(tl.load(g_ptr + 2 * H, mask=mask, other=0.0).to(tl.float32) + b_in + r * hn)
            tl.store(ws_ptr + wb + 2 * H + w_tile, nn.to(dt), mask=mask)
            h_new = ((1.0 - z) * nn + z * h).to(dt).to(tl.float32)
        elif MODE == 2:
            h_new = _tanh(a0).to(dt).to(tl.float32)
        elif MODE == 3:
            h_new = tl.maximum(a0, 0.0, propagate_nan=tl.PropagateNan.ALL).to(dt).to(tl.float32)
        tl.store(y_ptr + hb + h_tile, h_new.to(dt), mask=mask)
        h = tl.where(mask, h_new, h)


@triton.jit(do_not_specialize=["dy_ptr", "w_ptr", "p_ptr", "h0_ptr", "c0_ptr", "h_ptr", "c_ptr", "ws_ptr", "dgi_ptr",
                               "dgh_ptr", "dh_ptr", "dc_ptr", "steps_ptr", "T", "N", "H"])
def _seq_bwd_kernel(
    dy_ptr,     # (rows, H) d(output) of every step
    w_ptr,      # (G*H, H) W_hh, contiguous
    p_ptr,      # (3, H) peephole, read only when HAS_PEEPHOLE
    h0_ptr,     # (N, H)
    c0_ptr,     # (N, H) LSTM
    h_ptr,      # (rows, H) saved h of every step
    c_ptr,      # (rows, H) saved c of every step (LSTM)
    ws_ptr,     # (rows, 4H) saved activated gates (LSTM, GRU)
    dgi_ptr,    # (rows, G*H) out: d(pre-activation gates), the input side
    dgh_ptr,    # (rows, G*H) out: GRU's recurrent side
    dh_ptr,     # (N, H) in: d h_n; out: d h0
    dc_ptr,     # (N, H) in: d c_n; out: d c0 (LSTM)
    steps_ptr,  # (T, 4) int64 as _seq_fwd_kernel's
    T, N, H,
    MODE: tl.constexpr, HAS_PEEPHOLE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr,
):
    """The reverse loop: per step dh += dy, the cell's backward (as kernels/rnn_cell.py's), d h_{t-1} = dgates W_hh
    (plus the GRU's direct term dh * z), with dh and dc in registers; the weight gradients are the caller's GEMMs."""
    if EVEN_H:
        H = BLOCK_H
    first = tl.program_id(0) * BLOCK_N
    rows = first + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    r64 = rows.to(tl.int64)
    dt = dgi_ptr.dtype.element_ty
    wt = w_ptr.dtype.element_ty
    state = (rows < N)[:, None] & cmask[None, :]
    s_off = r64[:, None] * H + cols[None, :]
    dh = tl.load(dh_ptr + s_off, mask=state, other=0.0).to(tl.float32)
    if MODE == 0:
        gates_h = 4 * H  # the row stride of dgi, dgh
    elif MODE == 1:
        gates_h = 3 * H
    else:
        gates_h = H
    h_tile = _tile(H, BLOCK_N, cols)
    w_tile = _tile(4 * H, BLOCK_N, cols)
    g_tile = _tile(gates_h, BLOCK_N, cols)
    if MODE == 0:
        dc = tl.load(dc_ptr + s_off, mask=state, other=0.0).to(tl.float32)
        if HAS_PEEPHOLE:
            p_i = tl.load(p_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            p_f = tl.load(p_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            p_o = tl.load(p_ptr + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    w0, w1, w2, w3 = _w_tiles(w_ptr, H, cols, MODE, False)
    for tt in range(T):
        t = T - 1 - tt
        n = tl.load(steps_ptr + 4 * t)
        base = tl.load(steps_ptr + 4 * t + 1) + first
        n_prev = tl.load(steps_ptr + 4 * t + 2)
        base_prev = tl.load(steps_ptr + 4 * t + 3) + first
        mask = _row_mask(rows, n, cmask, EVEN_H)
        cont = (rows < n_prev)[:, None]  # rows whose previous state is the previous step's (else h0 / c0)
        hb = base * H
        pb = base_prev * H
        wb = base * (4 * H)
        gb = base * gates_h
        d = (dh + tl.load(dy_ptr + hb + h_tile, mask=mask, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        if MODE == 0:
            i = tl.load(ws_ptr + wb + w_tile, mask=mask, other=0.0).to(tl.float32)
            f = tl.load(ws_ptr + wb + H + w_tile, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(ws_ptr + wb + 2 * H + w_tile, mask=mask, other=0.0).to(tl.float32)
            o = tl.load(ws_ptr + wb + 3 * H + w_tile, mask=mask, other=0.0).to(tl.float32)
            cy = tl.load(c_ptr + hb + h_tile, mask=mask, other=0.0).to(tl.float32)
            cx = tl.where(cont, tl.load(c_ptr + pb + h_tile, mask=mask & cont, other=0.0),
                          tl.load(c0_ptr + s_off, mask=mask & ~cont, other=0.0)).to(tl.float32)
            tc = _tanh(cy)
            do = d * tc * o * (1.0 - o)
            dct = dc + d * o * (1.0 - tc * tc)
            if HAS_PEEPHOLE:
                dct += do * p_o
            di = (dct * g * i * (1.0 - i)).to(dt)
            df = (dct * cx * f * (1.0 - f)).to(dt)
            dg = (dct * i * (1.0 - g * g)).to(dt)
            dcx = dct * f
            if HAS_PEEPHOLE:
                dcx += di.to(tl.float32) * p_i + df.to(tl.float32) * p_f
            do = do.to(dt)
            tl.store(dgi_ptr + gb + g_tile, di, mask=mask)
            tl.store(dgi_ptr + gb + H + g_tile, df, mask=mask)
            tl.store(dgi_ptr + gb + 2 * H + g_tile, dg, mask=mask)
            tl.store(dgi_ptr + gb + 3 * H + g_tile, do, mask=mask)
            dh_new = tl.dot(di.to(wt), w0, input_precision=INPUT_PRECISION)
            dh_new += tl.dot(df.to(wt), w1, input_precision=INPUT_PRECISION)
            dh_new += tl.dot(dg.to(wt), w2, input_precision=INPUT_PRECISION)
            dh_new += tl.dot(do.to(wt), w3, input_precision=INPUT_PRECISION)
            dc = tl.where(mask, dcx.to(dt).to(tl.float32), dc)
        elif MODE == 1:
            r = tl.load(ws_ptr + wb + w_tile, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(ws_ptr + wb + H + w_tile, mask=mask, other=0.0).to(tl.float32)
            nn = tl.load(ws_ptr + wb + 2 * H + w_tile, mask=mask, other=0.0).to(tl.float32)
            hn = tl.load(ws_ptr + wb + 3 * H + w_tile, mask=mask, other=0.0).to(tl.float32)
            hx = tl.where(cont, tl.load(h_ptr + pb + h_tile, mask=mask & cont, other=0.0),
                          tl.load(h0_ptr + s_off, mask=mask & ~cont, other=0.0)).to(tl.float32)
            dn = d * (1.0 - z) * (1.0 - nn * nn)
            dr = (dn * hn * r * (1.0 - r)).to(dt)
            dz = (d * (hx - nn) * z * (1.0 - z)).to(dt)
            dnr = (dn * r).to(dt)
            dn = dn.to(dt)
            tl.store(dgi_ptr + gb + g_tile, dr, mask=mask)
            tl.store(dgi_ptr + gb + H + g_tile, dz, mask=mask)
            tl.store(dgi_ptr + gb + 2 * H + g_tile, dn, mask=mask)
            tl.store(dgh_ptr + gb + g_tile, dr, mask=mask)
            tl.store(dgh_ptr + gb + H + g_tile, dz, mask=mask)
            tl.store(dgh_ptr + gb + 2 * H + g_tile, dnr, mask=mask)
            dh_new = (d * z).to(dt).to(tl.float32)
            dh_new += tl.dot(dr.to(wt), w0, input_precision=INPUT_PRECISION)
            dh_new += tl.dot(dz.to(wt), w1, input_precision=INPUT_PRECISION)
            dh_new += tl.dot(dnr.to(wt), w2, input_precision=INPUT_PRECISION)
        else:
            hy = tl.load(h_ptr + hb + h_tile, mask=mask, other=0.0).to(tl.float32)
            if MODE == 2:
                dpre = (d * (1.0 - hy * hy)).to(dt)
            else:
                dpre = tl.where(hy <= 0.0, 0.0, d).to(dt)
            tl.store(dgi_ptr + gb + g_tile, dpre, mask=mask)
            dh_new = tl.dot(dpre.to(wt), w0, input_precision=INPUT_PRECISION)
        dh = tl.where(mask, dh_new.to(dt).to(tl.float32), dh)
    tl.store(dh_ptr + s_off, dh.to(dh_ptr.dtype.element_ty), mask=state)
    if MODE == 0:
        tl.store(dc_ptr + s_off, dc.to(dc_ptr.dtype.element_ty), mask=state)


# The configurations the persistent kernels run in, all of them compiled ahead of time for sm_80 and sm_90 by make
# triton-check (AOT_SPECS below) with both Triton versions CI checks, so that a configuration the launcher compiles
# on a GPU is one that compiles: bfloat16 and float32 storage (float16 keeps the host loop), the hidden units padded
# to 64 or 128 (larger H keeps the host loop: at 256 the tiles of W_hh need more shared memory than a block has),
# 16 warps, biases always given (zeros for none), float32 products in IEEE precision, no specialization on the
# values of the arguments (the JIT compiles what the AOT check compiled).
SEQ_DTYPES = (torch.bfloat16, torch.float32)
SEQ_BLOCK_HS = (64, 128)
# 16 warps, one stage, 128 registers a thread (all that 16 warps can have: left to itself, ptxas takes 32-64 and
# spills in float32 with Triton 3.6)
SEQ_OPTIONS = dict(num_warps=16, num_stages=1, maxnreg=128)


def _block_h(hidden: int) -> int:
    return next((b for b in SEQ_BLOCK_HS if hidden <= b), 0)


def _seq_constexprs(mode: str, hidden: int, has_peephole: bool, backward: bool) -> dict:
    meta = dict(MODE=_SEQ_MODES[mode], HAS_PEEPHOLE=has_peephole, INPUT_PRECISION="ieee", BLOCK_N=SEQ_BLOCK_N,
                BLOCK_H=_block_h(hidden), EVEN_H=hidden == _block_h(hidden))
    if not backward:
        meta["HAS_BIAS"] = True
    return meta


_FITS: dict[tuple, bool] = {}


def persistent_config(mode: str, hidden: int, dtype: torch.dtype, device: torch.device, has_peephole: bool,
                      persistent: bool | None) -> bool:
    """Whether the persistent kernels run a layer direction. On a GPU, from the compiled kernels' own metadata:
    where both directions' kernels fit a block's shared memory and compile without spilling registers (per mode,
    dtype, block of H and whether H fills it). In Triton's interpreter only when asked (persistent=True; bfloat16
    excepted: its tl.dot does not run there)."""
    if persistent is False or mode not in _SEQ_MODES or not _block_h(hidden) or dtype not in SEQ_DTYPES:
        return False
    if device.type != "cuda":
        return bool(persistent) and dtype != torch.bfloat16
    if persistent is True:
        return True
    key = (mode, _block_h(hidden), hidden == _block_h(hidden), dtype, device.index, has_peephole)
    if key not in _FITS:
        _FITS[key] = all(_spills(kernel, _seq_constexprs(mode, hidden, has_peephole, kernel is _seq_bwd_kernel),
                                 dtype, device) == 0 for kernel in (_seq_fwd_kernel, _seq_bwd_kernel))
        _log.debug("rnn_layer %s H=%d %s: persistent kernels %s", mode, hidden, dtype,
                   "fit" if _FITS[key] else "spill or do not fit")
    return _FITS[key]


def _spills(kernel, constexprs: dict, dtype: torch.dtype, device: torch.device) -> int:
    """Registers spilled by `kernel` compiled for these constexprs (Triton's own count, from the compiled binary);
    -1 when it needs more shared memory than a block of the device has."""
    t = torch.empty(1, dtype=dtype, device=device)
    steps = torch.zeros(4, dtype=torch.int64, device=device)
    names = kernel.arg_names
    args = [steps if n == "steps_ptr" else t if n.endswith("_ptr") else 1 for n in names if n not in constexprs]
    compiled = kernel.warmup(*args, grid=(1,), **SEQ_OPTIONS, **constexprs)
    if compiled.metadata.shared > torch.cuda.get_device_properties(device).shared_memory_per_block_optin:
        return -1  # does not launch at all
    compiled._init_handles()
    return compiled.n_spills


def _schedule(steps: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    return steps.to(device, non_blocking=True).contiguous(), steps.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time configurations of the persistent kernels: every configuration they run in (see SEQ_DTYPES); make
# triton-check prints their registers, spills and shared memory per architecture.
# ----------------------------------------------------------------------------------------------------------------
def _aot_specs() -> list[AOTSpec]:
    specs = []
    for dtype in SEQ_DTYPES:
        for block_h in SEQ_BLOCK_HS:
            for hidden in (block_h, block_h - 1):  # H filling the block (EVEN_H) or not
                for mode in ("lstm", "peephole_lstm", "gru", "rnn_tanh", "rnn_relu"):
                    for kernel in (_seq_fwd_kernel, _seq_bwd_kernel):
                        meta = _seq_constexprs(mode, hidden, mode == "peephole_lstm", kernel is _seq_bwd_kernel)
                        specs.append(_aot_spec(kernel, dtype, meta, SEQ_OPTIONS["num_warps"],
                                               SEQ_OPTIONS["num_stages"], i64_ptrs=("steps_ptr",), optional=True,
                                               specialize=False, maxnreg=SEQ_OPTIONS["maxnreg"]))
    return specs


AOT_SPECS: list[AOTSpec] = _aot_specs()
