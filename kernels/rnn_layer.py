"""Triton recurrent layers: one direction of one layer over a whole sequence (LSTM with optional projection, GRU,
Elman RNN), forward and backward, with the contract of csrc/rnn_layer.h (the C++ backends' arguments, saved tensors
and results).

The time loop runs on the host and launches per step a library GEMM and the pointwise kernels of
kernels/rnn_cell.py, which read their rows straight out of the sequence buffers and write into them:
- forward: ``x W_ih^T`` of every step in one GEMM; per step ``hg = h W_hh^T`` (torch.mm into a step buffer), then the
  cell's pointwise kernel writes h, c and the activated gates of the step into the sequence buffers; with a
  projection ``h = (o * tanh(c)) W_hr^T`` (torch.mm into y).
- backward: per step in reverse, ``dh += dy``, the pointwise backward kernel writes the step's d(pre-activation
  gates) into a (rows, G*H) buffer and ``dh = dgates W_hh``; then dx, dW_ih, dW_hh, the bias gradients and dW_hr are
  a few GEMMs and sums over all steps.
Packed sequences run each step on its active rows only. Some kernels run in place: the LSTM's activated gates over
x W_ih^T, the Elman RNN's h over x W_ih^T, the LSTM's dc and the GRU's dh state; each program of those kernels loads
an element before it stores, at the same address, the value computed from it. GRU keeps x W_ih^T (rows, 3H) apart
from its (rows, 4H) gates [r, z, n, hn].
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from .rnn_cell import (PW_BLOCK_H, PW_BLOCK_N, PW_WARPS, _biases, _check, _gru_bwd_kernel, _gru_fwd_kernel,
                       _lstm_bwd_kernel, _lstm_fwd_kernel, _pw_grid, _rnn_bwd_kernel, _rnn_fwd_kernel)

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _launch(kernel, ptrs: tuple, m: int, h: int, **constexprs) -> None:
    """A pointwise kernel of kernels/rnn_cell.py on (m, h) rows and columns; nothing when m * h == 0."""
    if m and h:
        kernel[_pw_grid(m, h)](*ptrs, m, h, **constexprs, BLOCK_N=PW_BLOCK_N, BLOCK_H=PW_BLOCK_H,
                               num_warps=PW_WARPS)


@dataclasses.dataclass
class _Schedule:
    """The steps of a (possibly packed) sequence in the order they run: k = 0 .. T-1 is time step k, or T-1-k when
    reversed. Step k works on batch rows [0, rows[k]), stored at rows [off[k], off[k] + rows[k]) of the
    (total, .) layout. Rows [0, prev[k]) continue from step k-1, rows [prev[k], rows[k]) start from h0 / c0;
    rows [done[k], rows[k]) take their last step at step k."""

    rows: list[int]
    off: list[int]
    prev: list[int]
    done: list[int]
    total: int
    uniform: bool  # every step runs on all N rows

    @classmethod
    def of(cls, x: torch.Tensor, n: int, batch_sizes: torch.Tensor | None, reverse: bool) -> _Schedule:
        if batch_sizes is None:
            sizes = [n] * x.shape[0]
        else:
            if not isinstance(batch_sizes, torch.Tensor) or batch_sizes.device.type != "cpu" \
                    or batch_sizes.dtype != torch.int64 or batch_sizes.dim() != 1:
                got = (f"{batch_sizes.dtype} of shape {tuple(batch_sizes.shape)} on {batch_sizes.device}"
                       if isinstance(batch_sizes, torch.Tensor) else type(batch_sizes).__name__)
                raise TypeError(f"batch_sizes: expected a 1-D int64 tensor on the CPU, got {got}")
            sizes = batch_sizes.tolist()
            if sizes and sizes[0] != n:
                raise ValueError(f"batch_sizes: expected batch_sizes[0] to equal the batch size of h0 ({n}), got "
                                 f"{sizes[0]}")
            if any(s < 1 or (i and s > sizes[i - 1]) for i, s in enumerate(sizes)):
                raise ValueError(f"batch_sizes: expected positive and non-increasing sizes, got {sizes}")
            if sum(sizes) != x.shape[0]:
                raise ValueError(f"x: expected sum(batch_sizes) = {sum(sizes)} rows, got {x.shape[0]}")
        first = [0]
        for s in sizes:
            first.append(first[-1] + s)
        order = list(reversed(range(len(sizes)))) if reverse else list(range(len(sizes)))
        rows = [sizes[t] for t in order]
        prev = [min(rows[k - 1], rows[k]) if k else 0 for k in range(len(rows))]
        done = [min(rows[k + 1], rows[k]) if k + 1 < len(rows) else 0 for k in range(len(rows))]
        return cls(rows, [first[t] for t in order], prev, done, first[-1], all(s == n for s in sizes))

    def segments(self, k: int) -> Iterator[tuple[int, int, bool]]:
        """(lo, hi, continues) for the row ranges of step k whose state comes from one place: the previous step
        (continues) or the initial state."""
        if self.prev[k]:
            yield 0, self.prev[k], True
        if self.rows[k] > self.prev[k]:
            yield self.prev[k], self.rows[k], False

    def prev_index(self, device: torch.device) -> torch.Tensor:
        """(total,) the row of every step's previous h in cat([h_seq, h0]) (h_seq of step k-1, or h0)."""
        index = [0] * self.total
        for k in range(len(self.rows)):
            for lo, hi, continues in self.segments(k):
                start = self.off[k - 1] if continues else self.total
                index[self.off[k] + lo:self.off[k] + hi] = range(start + lo, start + hi)
        return torch.tensor(index, dtype=torch.int64).to(device)


@dataclasses.dataclass
class _Layer:
    """The validated, contiguous operands of one layer direction; b_ih, b_hh as the cell kernels take them."""

    mode: str
    gates: int
    hidden: int
    hout: int
    n: int
    x2d: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor | None
    w_ih: torch.Tensor
    w_hh: torch.Tensor
    w_hr: torch.Tensor | None
    has_bias: bool
    b_ih: torch.Tensor
    b_hh: torch.Tensor

    @classmethod
    def of(cls, mode: str, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None, w_ih: torch.Tensor,
           w_hh: torch.Tensor, b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, w_hr: torch.Tensor | None,
           packed: bool) -> _Layer:
        if mode not in _GATES:
            raise ValueError(f"mode: expected 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got {mode!r}")
        if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
            raise TypeError(f"x: expected a float32, float16 or bfloat16 tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() != (2 if packed else 3):
            want = "2 dims (sum(batch_sizes), C)" if packed else "3 dims (T, N, C)"
            raise ValueError(f"x: expected {want}, got shape {tuple(x.shape)}")
        g = _GATES[mode]
        if not isinstance(w_ih, torch.Tensor) or w_ih.dim() != 2 or w_ih.shape[0] % g:
            raise ValueError(f"w_ih: expected shape ({g}*H, C), got "
                             f"{tuple(w_ih.shape) if isinstance(w_ih, torch.Tensor) else type(w_ih).__name__}")
        hidden, c = w_ih.shape[0] // g, w_ih.shape[1]
        _check("w_ih", w_ih, (g * hidden, c), x)
        if x.shape[-1] != c:
            raise ValueError(f"x: expected {c} features (w_ih's input size), got shape {tuple(x.shape)}")
        if w_hr is not None and mode != "lstm":
            raise ValueError(f"w_hr: the projection is only supported for mode 'lstm', got mode {mode!r}")
        hout = hidden if w_hr is None else w_hr.shape[0]
        if w_hr is not None:
            _check("w_hr", w_hr, (hout, hidden), x)
        _check("w_hh", w_hh, (g * hidden, hout), x)
        if not isinstance(h0, torch.Tensor) or h0.dim() != 2:
            raise ValueError(f"h0: expected shape (N, {hout}), got "
                             f"{tuple(h0.shape) if isinstance(h0, torch.Tensor) else type(h0).__name__}")
        n = h0.shape[0] if packed else x.shape[1]  # packed: batch_sizes[0] is checked against it
        _check("h0", h0, (n, hout), x)
        if mode == "lstm":
            if c0 is None:
                raise ValueError("c0: expected a tensor for mode 'lstm', got None")
            _check("c0", c0, (n, hidden), x)
        elif c0 is not None:
            raise ValueError(f"c0: expected None for mode {mode!r}")
        has_bias, b_ih, b_hh = _biases(b_ih, b_hh, g * hidden, x)
        x2d = x.contiguous().view(x.shape[0] if packed else x.shape[0] * x.shape[1], c)
        return cls(mode, g, hidden, hout, n, x2d, h0.contiguous(), None if c0 is None else c0.contiguous(),
                   w_ih.contiguous(), w_hh.contiguous(), None if w_hr is None else w_hr.contiguous(), has_bias,
                   b_ih, b_hh)


def rnn_layer_fwd(mode: str, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None, w_ih: torch.Tensor,
                  w_hh: torch.Tensor, b_ih: torch.Tensor | None, b_hh: torch.Tensor | None,
                  w_hr: torch.Tensor | None, reverse: bool, batch_sizes: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """One layer direction over a sequence. x (T, N, C), or packed (sum(batch_sizes), C) with batch_sizes (T,)
    int64 on the CPU; h0 (N, Hout); c0 (N, H) (LSTM, else None); w_ih (G*H, C); w_hh (G*H, Hout); b_ih, b_hh (G*H,)
    or None; w_hr (Hout, H) (LSTM projection) or None. Returns y (T, N, Hout) (packed: (sum(batch_sizes), Hout)),
    h_n (N, Hout), c_n (N, H) (None unless LSTM) and the saved tensors rnn_layer_bwd takes: [h of every step
    (rows, Hout), the activated gates (rows, 4H) (LSTM [i, f, g, o], GRU [r, z, n, hn]), c of every step (rows, H)
    (LSTM), o * tanh(c) (rows, H) (with w_hr)], rows = T*N or sum(batch_sizes)."""
    L = _Layer.of(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes is not None)
    S = _Schedule.of(x, L.n, batch_sizes, reverse)
    lstm, gru, proj, h = mode == "lstm", mode == "gru", w_hr is not None, L.hidden
    new = L.x2d.new_empty
    y = new(S.total, L.hout)
    c_seq = new(S.total, h) if lstm else None
    h_raw = new(S.total, h) if proj else None
    gates = new(S.total, 4 * h) if lstm or gru else None
    # x W_ih^T of every step: the LSTM's gates and the Elman RNN's y take it and the cell kernels overwrite it.
    gi = gates if lstm else new(S.total, 3 * h) if gru else y
    torch.mm(L.x2d, L.w_ih.t(), out=gi)
    hg = new(L.n, L.gates * h)  # h W_hh^T of the current step
    h_n = L.h0.clone()
    c_n = L.c0.clone() if lstm else None
    w_hh_t = L.w_hh.t()
    h_cell = h_raw if proj else y  # where the cell writes its h
    for k, (n, off) in enumerate(zip(S.rows, S.off)):
        np_, off_prev = S.prev[k], S.off[k - 1] if k else 0
        if np_:
            torch.mm(y[off_prev:off_prev + np_], w_hh_t, out=hg[:np_])
        if n > np_:
            torch.mm(L.h0[np_:n], w_hh_t, out=hg[np_:n])
        if lstm:
            for lo, hi, continues in S.segments(k):
                cx = c_seq[off_prev + lo:off_prev + hi] if continues else L.c0[lo:hi]
                a, b = off + lo, off + hi
                _launch(_lstm_fwd_kernel, (gates[a:b], hg[lo:hi], cx, L.b_ih, L.b_hh, cx, h_cell[a:b], c_seq[a:b],
                                           gates[a:b]), hi - lo, h, HAS_BIAS=L.has_bias, HAS_PEEPHOLE=False)
            if proj:
                torch.mm(h_raw[off:off + n], L.w_hr.t(), out=y[off:off + n])
        elif gru:
            for lo, hi, continues in S.segments(k):
                hx = y[off_prev + lo:off_prev + hi] if continues else L.h0[lo:hi]
                a, b = off + lo, off + hi
                _launch(_gru_fwd_kernel, (gi[a:b], hg[lo:hi], hx, L.b_ih, L.b_hh, y[a:b], gates[a:b]), hi - lo, h,
                        HAS_BIAS=L.has_bias)
        else:
            _launch(_rnn_fwd_kernel, (y[off:off + n], hg[:n], L.b_ih, L.b_hh, y[off:off + n]), n, h,
                    HAS_BIAS=L.has_bias, RELU=mode == "rnn_relu")
        d = S.done[k]  # rows [d, n) end here
        if n > d:
            h_n[d:n] = y[off + d:off + n]
            if lstm:
                c_n[d:n] = c_seq[off + d:off + n]
    saved = [y.clone()] + [t for t in (gates, c_seq, h_raw) if t is not None]
    if batch_sizes is None:
        y.resize_(x.shape[0], L.n, L.hout)  # in place: a view would refuse in-place use of the output
    return y, h_n, c_n, saved


def rnn_layer_bwd(mode: str, dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor | None, x: torch.Tensor,
                  h0: torch.Tensor, c0: torch.Tensor | None, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, w_hr: torch.Tensor | None, reverse: bool,
                  batch_sizes: torch.Tensor | None, saved: list[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """Backward of rnn_layer_fwd. dy like y, dh_n like h_n, dc_n like c_n (LSTM; None counts as zeros); the inputs
    and `saved` of the forward. Returns dx, dh0, dc0 (None unless LSTM) and [dw_ih, dw_hh, db_ih, db_hh, dw_hr]
    (None where the input is None)."""
    L = _Layer.of(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes is not None)
    S = _Schedule.of(x, L.n, batch_sizes, reverse)
    lstm, gru, proj, h, n_all = mode == "lstm", mode == "gru", w_hr is not None, L.hidden, L.n
    ref = L.x2d
    _check("dy", dy, (S.total, L.hout) if batch_sizes is not None else (x.shape[0], n_all, L.hout), ref)
    _check("dh_n", dh_n, (n_all, L.hout), ref)
    if lstm and dc_n is not None:
        _check("dc_n", dc_n, (n_all, h), ref)
    elif not lstm and dc_n is not None:
        raise ValueError(f"dc_n: expected None for mode {mode!r}")
    shapes = {"h_seq": (S.total, L.hout)}
    if lstm or gru:
        shapes["gates"] = (S.total, 4 * h)
    if lstm:
        shapes["c_seq"] = (S.total, h)
    if proj:
        shapes["h_raw"] = (S.total, h)
    if len(saved) != len(shapes):
        raise ValueError(f"saved: expected {len(shapes)} tensors (rnn_layer_fwd's), got {len(saved)}")
    for (name, shape), t in zip(shapes.items(), saved):
        _check(f"saved {name}", t, shape, ref)
    saved = dict(zip(shapes, (t.contiguous() for t in saved)))
    h_seq, gates, c_seq, h_raw = (saved.get(k) for k in ("h_seq", "gates", "c_seq", "h_raw"))
    dy2d = dy.contiguous().view(S.total, L.hout)
    new = ref.new_empty
    # dh / dc rows [0, n) hold the gradient flowing into h / c of the current step from later steps (and dh_n / dc_n
    # for rows that end there); once every step has run they hold dh0 / dc0.
    dh = dh_n.contiguous().clone()
    dc = (torch.zeros_like(L.c0) if dc_n is None else dc_n.contiguous().clone()) if lstm else None
    # d(pre-activation gates) of every step; GRU's differ between the input and the recurrent side (n gate).
    dgi = new(S.total, L.gates * h)
    dgh = new(S.total, L.gates * h) if gru else dgi
    dh_all = new(S.total, L.hout) if proj else None  # with a projection: dh of every step (for dW_hr)
    dh_raw = new(n_all, h) if proj else None  # and d(o * tanh(c)) of the current step
    for k in reversed(range(len(S.rows))):
        n, off, off_prev = S.rows[k], S.off[k], S.off[k - 1] if k else 0
        if proj:
            torch.add(dh[:n], dy2d[off:off + n], out=dh_all[off:off + n])
            torch.mm(dh_all[off:off + n], L.w_hr, out=dh_raw[:n])
        else:
            dh[:n] += dy2d[off:off + n]
        if lstm:
            dhy = dh_raw if proj else dh
            for lo, hi, continues in S.segments(k):
                cx = c_seq[off_prev + lo:off_prev + hi] if continues else L.c0[lo:hi]
                a, b = off + lo, off + hi
                # dc rows: d c_t in, d c_{t-1} out
                _launch(_lstm_bwd_kernel, (dhy[lo:hi], dc[lo:hi], cx, c_seq[a:b], gates[a:b], cx, dgi[a:b],
                                           dc[lo:hi], dgi), hi - lo, h, HAS_PEEPHOLE=False)
        elif gru:
            for lo, hi, continues in S.segments(k):
                hx = h_seq[off_prev + lo:off_prev + hi] if continues else L.h0[lo:hi]
                a, b = off + lo, off + hi
                # dh rows: d h_t in, the direct term d h_{t-1} = d h_t * z out
                _launch(_gru_bwd_kernel, (dh[lo:hi], hx, gates[a:b], dgi[a:b], dgh[a:b], dh[lo:hi]), hi - lo, h)
        else:
            _launch(_rnn_bwd_kernel, (dh[:n], h_seq[off:off + n], dgi[off:off + n]), n, h, RELU=mode == "rnn_relu")
        if gru:
            dh[:n].addmm_(dgh[off:off + n], L.w_hh)
        else:
            torch.mm(dgi[off:off + n], L.w_hh, out=dh[:n])
    dw_hh = _dw_hh(S, dgh, h_seq, L.h0, reverse)
    dx = (dgi @ L.w_ih).view(x.shape)
    dw_ih = dgi.t() @ L.x2d
    db_ih = dgi.sum(0) if b_ih is not None else None
    db_hh = None if b_hh is None else dgh.sum(0) if gru else dgi.sum(0) if db_ih is None else db_ih.clone()
    dw_hr = dh_all.t() @ h_raw if proj else None
    return dx, dh, dc, [dw_ih, dw_hh, db_ih, db_hh, dw_hr]


def _dw_hh(S: _Schedule, dgh: torch.Tensor, h_seq: torch.Tensor, h0: torch.Tensor, reverse: bool) -> torch.Tensor:
    """dW_hh = sum over steps of dgates_hh^T h_prev. With every step on all N rows, h_prev of the steps after the
    first is h of the sequence shifted by one step: two GEMMs. Otherwise h_prev is gathered (one index_select) for
    one GEMM."""
    n = h0.shape[0]
    if not S.rows:
        return dgh.new_zeros(dgh.shape[1], h0.shape[1])
    if not S.uniform:
        return dgh.t() @ torch.cat([h_seq, h0]).index_select(0, S.prev_index(h0.device))
    dw_hh = dgh[S.off[0]:S.off[0] + n].t() @ h0
    rest = S.total - n
    if rest:
        a, b = (0, n) if reverse else (n, 0)
        dw_hh.addmm_(dgh[a:a + rest].t(), h_seq[b:b + rest])
    return dw_hh
