"""Triton step kernels of the recurrent layers: the cell of each mode (LSTM and peephole LSTM, GRU, Elman RNN
tanh/relu) as the time loop of fastseq._C calls it (csrc/rnn_layer.cpp, through the Python adapter of
csrc/bindings.cpp). The loop owns the schedule, the buffers and the GEMMs; each method here runs one step's rows
with the pointwise kernels of kernels/rnn_cell.py, given as tensor views of the loop's buffers (None where absent):
(n, .) rows, unit column stride, contiguous except x W_ih^T of a GRU run in place (the first 3H columns of its
(n, 4H) gates). Run in place (in_place = True), x W_ih^T is overwritten by the gates (LSTM) or h (RNN) it becomes,
and the backward updates the LSTM's dc and the GRU's dh in place: each program of those kernels loads an element
before it stores, at the same address, the value computed from it.
"""
from __future__ import annotations

import torch
import triton

from .rnn_cell import (PW_BLOCK_H, PW_BLOCK_N, PW_WARPS, _gru_bwd_kernel, _gru_fwd_kernel, _lstm_bwd_kernel,
                       _lstm_fwd_kernel, _pw_grid, _rnn_bwd_kernel, _rnn_fwd_kernel)

_LSTM = ("lstm", "peephole_lstm")
_MODES = (*_LSTM, "gru", "rnn_tanh", "rnn_relu")


def _launch(kernel, args: tuple, n: int, h: int, *scalars: int, **constexprs) -> None:
    """A pointwise kernel of kernels/rnn_cell.py on (n, h) rows and columns; nothing when n * h == 0."""
    if n and h:
        kernel[_pw_grid(n, h)](*args, n, h, *scalars, **constexprs, BLOCK_N=PW_BLOCK_N, BLOCK_H=PW_BLOCK_H,
                               num_warps=PW_WARPS)


class LayerSteps:
    """The step kernels of one layer direction: mode, the biases b_ih, b_hh (G*H,) or None and the peephole
    (3, H) (peephole_lstm) as the layer's; in_place as above (False: separate outputs, as the CUDA C++ kernels)."""

    def __init__(self, mode: str, b_ih: torch.Tensor | None, b_hh: torch.Tensor | None,
                 peephole: torch.Tensor | None, in_place: bool = True):
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {list(_MODES)}, got {mode!r}")
        self.mode, self.in_place = mode, in_place
        self.has_bias = b_ih is not None or b_hh is not None
        some = b_ih if b_ih is not None else b_hh
        self.b_ih = None if some is None else (b_ih.contiguous() if b_ih is not None else torch.zeros_like(some))
        self.b_hh = None if some is None else (b_hh.contiguous() if b_hh is not None else torch.zeros_like(some))
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
