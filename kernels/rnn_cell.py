"""Triton recurrent cell steps: LSTM (optionally with peepholes), GRU and Elman RNN, forward and backward.

Two kinds of forward step share one workspace layout, so one backward kernel serves both:
- pointwise (``*_cell_fwd``): the caller computes ``igates = x W_ih^T`` and ``hgates = h W_hh^T`` with library
  GEMMs; the kernel adds the biases and applies the gate math (the C++ contract of csrc/rnn_cell.h);
- fused (``*_cell_fused``): each program computes a (BLOCK_N x BLOCK_H) tile of every gate of one column block
  with ``tl.dot`` (K-loops over C and over H) and applies biases and gate math in the epilogue, so the
  pre-activation gates never reach memory.

Math (torch's conventions; gate math in float32):
- LSTM, gates i, f, g, o: ``pre = igates + b_ih + hgates + b_hh``; ``i, f, o = sigmoid``, ``g = tanh``;
  ``cy = f*cx + i*g``; ``hy = o*tanh(cy)``. Peephole (3, H) = [p_i; p_f; p_o] adds ``p_i*cx`` to pre_i,
  ``p_f*cx`` to pre_f and ``p_o*cy`` to pre_o. Workspace (N, 4H) = [i, f, g, o].
- GRU, gates r, z, n: ``r = sigmoid(ig_r + b_ir + hg_r + b_hr)``, z likewise, ``hn = hg_n + b_hn``,
  ``n = tanh(ig_n + b_in + r*hn)``, ``hy = (1-z)*n + z*hx``. Workspace (N, 4H) = [r, z, n, hn].
- RNN: ``hy = tanh(pre)`` or ``relu(pre)`` with ``pre = ig + b_ih + hg + b_hh``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import AOTSpec

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_NONLINEARITIES = {"tanh": 0, "relu": 1}

# Pointwise kernels: one (PW_BLOCK_N x PW_BLOCK_H) tile per program.
PW_BLOCK_N, PW_BLOCK_H, PW_WARPS = 8, 128, 4
# Fused kernels: (BLOCK_N, BLOCK_H, BLOCK_K, num_warps, num_stages). "small" keeps many programs alive when the
# batch is small (the step is then bound by reading the weights); "large" reuses each weight tile over 64 rows.
FUSED_CONFIGS = {"small": (16, 32, 32, 4, 3), "large": (64, 32, 32, 8, 3)}
FUSED_LARGE_MIN_N = 256


def _fused_config(n: int) -> tuple[int, int, int, int, int]:
    return FUSED_CONFIGS["large" if n >= FUSED_LARGE_MIN_N else "small"]


# ----------------------------------------------------------------------------------------------------------------
# Gate math shared by the kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)) through exp(-|x|), finite for any finite x."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tanh(x):
    """sign(x) * (1 - exp(-2|x|)) / (1 + exp(-2|x|)), finite for any finite x."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _lstm_epilogue(pre_i, pre_f, pre_g, pre_o, cx, rows, cols, N, H, b_ih_ptr, b_hh_ptr, p_ptr,
                   hy_ptr, cy_ptr, ws_ptr, HAS_BIAS: tl.constexpr, HAS_PEEPHOLE: tl.constexpr):
    """pre_*: (BLOCK_N, BLOCK_H) float32 gate pre-activations without biases; cx: the float32 (BLOCK_N, BLOCK_H)
    cell state tile; writes hy, cy and the workspace."""
    rmask = rows < N
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h_off = r64 * H + cols[None, :]
    g_off = r64 * (4 * H) + cols[None, :]
    if HAS_BIAS:
        pre_i += (tl.load(b_ih_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                  + tl.load(b_hh_ptr + cols, mask=cmask, other=0.0).to(tl.float32))[None, :]
        pre_f += (tl.load(b_ih_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32)
                  + tl.load(b_hh_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32))[None, :]
        pre_g += (tl.load(b_ih_ptr + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32)
                  + tl.load(b_hh_ptr + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32))[None, :]
        pre_o += (tl.load(b_ih_ptr + 3 * H + cols, mask=cmask, other=0.0).to(tl.float32)
                  + tl.load(b_hh_ptr + 3 * H + cols, mask=cmask, other=0.0).to(tl.float32))[None, :]
    if HAS_PEEPHOLE:
        pre_i += tl.load(p_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] * cx
        pre_f += tl.load(p_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] * cx
    i = _sigmoid(pre_i)
    f = _sigmoid(pre_f)
    g = _tanh(pre_g)
    cy = f * cx + i * g
    if HAS_PEEPHOLE:
        pre_o += tl.load(p_ptr + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] * cy
    o = _sigmoid(pre_o)
    hy = o * _tanh(cy)
    ty = hy_ptr.dtype.element_ty
    tl.store(hy_ptr + h_off, hy.to(ty), mask=mask)
    tl.store(cy_ptr + h_off, cy.to(ty), mask=mask)
    tl.store(ws_ptr + g_off, i.to(ty), mask=mask)
    tl.store(ws_ptr + g_off + H, f.to(ty), mask=mask)
    tl.store(ws_ptr + g_off + 2 * H, g.to(ty), mask=mask)
    tl.store(ws_ptr + g_off + 3 * H, o.to(ty), mask=mask)


@triton.jit
def _gru_epilogue(pre_r, pre_z, ig_n, hg_n, hx, rows, cols, N, H, b_ih_ptr, b_hh_ptr, hy_ptr, ws_ptr,
                  HAS_BIAS: tl.constexpr):
    """pre_r, pre_z: (BLOCK_N, BLOCK_H) float32 sums of both GEMMs without biases; ig_n, hg_n: the n gate's
    two GEMM terms, kept apart; hx: the float32 hidden state tile; writes hy and the workspace [r, z, n, hn]."""
    rmask = rows < N
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h_off = r64 * H + cols[None, :]
    w_off = r64 * (4 * H) + cols[None, :]
    if HAS_BIAS:
        pre_r += (tl.load(b_ih_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                  + tl.load(b_hh_ptr + cols, mask=cmask, other=0.0).to(tl.float32))[None, :]
        pre_z += (tl.load(b_ih_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32)
                  + tl.load(b_hh_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32))[None, :]
        ig_n += tl.load(b_ih_ptr + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        hg_n += tl.load(b_hh_ptr + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    r = _sigmoid(pre_r)
    z = _sigmoid(pre_z)
    n = _tanh(ig_n + r * hg_n)
    hy = (1.0 - z) * n + z * hx
    ty = hy_ptr.dtype.element_ty
    tl.store(hy_ptr + h_off, hy.to(ty), mask=mask)
    tl.store(ws_ptr + w_off, r.to(ty), mask=mask)
    tl.store(ws_ptr + w_off + H, z.to(ty), mask=mask)
    tl.store(ws_ptr + w_off + 2 * H, n.to(ty), mask=mask)
    tl.store(ws_ptr + w_off + 3 * H, hg_n.to(ty), mask=mask)


@triton.jit
def _rnn_epilogue(pre, rows, cols, N, H, b_ih_ptr, b_hh_ptr, hy_ptr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr):
    """pre: (BLOCK_N, BLOCK_H) float32 sum of both GEMMs without biases; writes hy = tanh/relu(pre + biases)."""
    rmask = rows < N
    cmask = cols < H
    mask = rmask[:, None] & cmask[None, :]
    h_off = rows.to(tl.int64)[:, None] * H + cols[None, :]
    if HAS_BIAS:
        pre += (tl.load(b_ih_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                + tl.load(b_hh_ptr + cols, mask=cmask, other=0.0).to(tl.float32))[None, :]
    if RELU:
        hy = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN, as torch
    else:
        hy = _tanh(pre)
    tl.store(hy_ptr + h_off, hy.to(hy_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Pointwise forward kernels (GEMMs done by the caller). Grid: (cdiv(N, BLOCK_N), cdiv(H, BLOCK_H)).
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _lstm_fwd_kernel(
    ig_ptr,    # (N, 4H) x W_ih^T, contiguous
    hg_ptr,    # (N, 4H) h W_hh^T, contiguous
    cx_ptr,    # (N, H)
    b_ih_ptr,  # (4H,), read only when HAS_BIAS
    b_hh_ptr,  # (4H,), read only when HAS_BIAS
    p_ptr,     # (3, H) peephole rows p_i, p_f, p_o, read only when HAS_PEEPHOLE
    hy_ptr,    # (N, H) out
    cy_ptr,    # (N, H) out
    ws_ptr,    # (N, 4H) out: [i, f, g, o]
    N, H,
    HAS_BIAS: tl.constexpr, HAS_PEEPHOLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < N)[:, None] & (cols < H)[None, :]
    g_off = rows.to(tl.int64)[:, None] * (4 * H) + cols[None, :]
    pre_i = tl.load(ig_ptr + g_off, mask=mask, other=0.0).to(tl.float32) \
        + tl.load(hg_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    pre_f = tl.load(ig_ptr + g_off + H, mask=mask, other=0.0).to(tl.float32) \
        + tl.load(hg_ptr + g_off + H, mask=mask, other=0.0).to(tl.float32)
    pre_g = tl.load(ig_ptr + g_off + 2 * H, mask=mask, other=0.0).to(tl.float32) \
        + tl.load(hg_ptr + g_off + 2 * H, mask=mask, other=0.0).to(tl.float32)
    pre_o = tl.load(ig_ptr + g_off + 3 * H, mask=mask, other=0.0).to(tl.float32) \
        + tl.load(hg_ptr + g_off + 3 * H, mask=mask, other=0.0).to(tl.float32)
    cx = tl.load(cx_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _lstm_epilogue(pre_i, pre_f, pre_g, pre_o, cx, rows, cols, N, H, b_ih_ptr, b_hh_ptr, p_ptr,
                   hy_ptr, cy_ptr, ws_ptr, HAS_BIAS, HAS_PEEPHOLE)


@triton.jit
def _gru_fwd_kernel(
    ig_ptr,    # (N, 3H) x W_ih^T, row stride ig_stride (3H, or 4H where it is the first columns of ws, in place)
    hg_ptr,    # (N, 3H) h W_hh^T, contiguous
    hx_ptr,    # (N, H)
    b_ih_ptr,  # (3H,), read only when HAS_BIAS
    b_hh_ptr,  # (3H,), read only when HAS_BIAS
    hy_ptr,    # (N, H) out
    ws_ptr,    # (N, 4H) out: [r, z, n, hn]
    N, H, ig_stride,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < N)[:, None] & (cols < H)[None, :]
    g_off = rows.to(tl.int64)[:, None] * (3 * H) + cols[None, :]
    i_off = rows.to(tl.int64)[:, None] * ig_stride + cols[None, :]
    pre_r = tl.load(ig_ptr + i_off, mask=mask, other=0.0).to(tl.float32) \
        + tl.load(hg_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    pre_z = tl.load(ig_ptr + i_off + H, mask=mask, other=0.0).to(tl.float32) \
        + tl.load(hg_ptr + g_off + H, mask=mask, other=0.0).to(tl.float32)
    ig_n = tl.load(ig_ptr + i_off + 2 * H, mask=mask, other=0.0).to(tl.float32)
    hg_n = tl.load(hg_ptr + g_off + 2 * H, mask=mask, other=0.0).to(tl.float32)
    hx = tl.load(hx_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _gru_epilogue(pre_r, pre_z, ig_n, hg_n, hx, rows, cols, N, H, b_ih_ptr, b_hh_ptr, hy_ptr, ws_ptr, HAS_BIAS)


@triton.jit
def _rnn_fwd_kernel(
    ig_ptr,    # (N, H) x W_ih^T, contiguous
    hg_ptr,    # (N, H) h W_hh^T, contiguous
    b_ih_ptr,  # (H,), read only when HAS_BIAS
    b_hh_ptr,  # (H,), read only when HAS_BIAS
    hy_ptr,    # (N, H) out
    N, H,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < N)[:, None] & (cols < H)[None, :]
    off = rows.to(tl.int64)[:, None] * H + cols[None, :]
    pre = tl.load(ig_ptr + off, mask=mask, other=0.0).to(tl.float32) \
        + tl.load(hg_ptr + off, mask=mask, other=0.0).to(tl.float32)
    _rnn_epilogue(pre, rows, cols, N, H, b_ih_ptr, b_hh_ptr, hy_ptr, HAS_BIAS, RELU)


# ----------------------------------------------------------------------------------------------------------------
# Backward kernels (pointwise; serve both forward kinds). Grid: (cdiv(N, BLOCK_N), cdiv(H, BLOCK_H)).
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _lstm_bwd_kernel(
    dhy_ptr,   # (N, H)
    dcy_ptr,   # (N, H)
    cx_ptr,    # (N, H)
    cy_ptr,    # (N, H)
    ws_ptr,    # (N, 4H) [i, f, g, o]
    p_ptr,     # (3, H) peephole, read only when HAS_PEEPHOLE
    dg_ptr,    # (N, 4H) out: d(pre-activation gates)
    dcx_ptr,   # (N, H) out
    dp_ptr,    # (cdiv(N, BLOCK_N), 3, H) float32 out: per-program partial sums of dpeephole, when HAS_PEEPHOLE
    N, H,
    HAS_PEEPHOLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """tc = tanh(cy); do_pre = dhy*tc*o*(1-o); dc = dcy + dhy*o*(1-tc^2) [+ do_pre*p_o];
    di_pre = dc*g*i*(1-i); df_pre = dc*cx*f*(1-f); dg_pre = dc*i*(1-g^2); dcx = dc*f [+ di_pre*p_i + df_pre*p_f];
    dpeephole = column sums of [di_pre*cx; df_pre*cx; do_pre*cy]. Rows past N load zeros and contribute zero."""
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    mask = (rows < N)[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h_off = r64 * H + cols[None, :]
    g_off = r64 * (4 * H) + cols[None, :]
    dhy = tl.load(dhy_ptr + h_off, mask=mask, other=0.0).to(tl.float32)
    dcy = tl.load(dcy_ptr + h_off, mask=mask, other=0.0).to(tl.float32)
    cx = tl.load(cx_ptr + h_off, mask=mask, other=0.0).to(tl.float32)
    cy = tl.load(cy_ptr + h_off, mask=mask, other=0.0).to(tl.float32)
    i = tl.load(ws_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(ws_ptr + g_off + H, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(ws_ptr + g_off + 2 * H, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(ws_ptr + g_off + 3 * H, mask=mask, other=0.0).to(tl.float32)
    tc = _tanh(cy)
    do_pre = dhy * tc * o * (1.0 - o)
    dc = dcy + dhy * o * (1.0 - tc * tc)
    if HAS_PEEPHOLE:
        p_i = tl.load(p_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        p_f = tl.load(p_ptr + H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        p_o = tl.load(p_ptr + 2 * H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dc += do_pre * p_o
    di_pre = dc * g * i * (1.0 - i)
    df_pre = dc * cx * f * (1.0 - f)
    dg_pre = dc * i * (1.0 - g * g)
    dcx = dc * f
    if HAS_PEEPHOLE:
        dcx += di_pre * p_i + df_pre * p_f
        dp_off = pid_n.to(tl.int64) * (3 * H) + cols
        tl.store(dp_ptr + dp_off, tl.sum(di_pre * cx, axis=0), mask=cmask)
        tl.store(dp_ptr + dp_off + H, tl.sum(df_pre * cx, axis=0), mask=cmask)
        tl.store(dp_ptr + dp_off + 2 * H, tl.sum(do_pre * cy, axis=0), mask=cmask)
    ty = dg_ptr.dtype.element_ty
    tl.store(dg_ptr + g_off, di_pre.to(ty), mask=mask)
    tl.store(dg_ptr + g_off + H, df_pre.to(ty), mask=mask)
    tl.store(dg_ptr + g_off + 2 * H, dg_pre.to(ty), mask=mask)
    tl.store(dg_ptr + g_off + 3 * H, do_pre.to(ty), mask=mask)
    tl.store(dcx_ptr + h_off, dcx.to(ty), mask=mask)


@triton.jit
def _gru_bwd_kernel(
    dhy_ptr,   # (N, H)
    hx_ptr,    # (N, H)
    ws_ptr,    # (N, 4H) [r, z, n, hn]
    dig_ptr,   # (N, 3H) out: d(x W_ih^T + b_ih)
    dhg_ptr,   # (N, 3H) out: d(h W_hh^T + b_hh)
    dhx_ptr,   # (N, H) out: direct term dhy*z only
    N, H,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dn_pre = dhy*(1-z)*(1-n^2); dr_pre = dn_pre*hn*r*(1-r); dz_pre = dhy*(hx-n)*z*(1-z);
    d_igates = [dr_pre, dz_pre, dn_pre]; d_hgates = [dr_pre, dz_pre, dn_pre*r]; dhx = dhy*z."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < N)[:, None] & (cols < H)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h_off = r64 * H + cols[None, :]
    w_off = r64 * (4 * H) + cols[None, :]
    g_off = r64 * (3 * H) + cols[None, :]
    dhy = tl.load(dhy_ptr + h_off, mask=mask, other=0.0).to(tl.float32)
    hx = tl.load(hx_ptr + h_off, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(ws_ptr + w_off, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(ws_ptr + w_off + H, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(ws_ptr + w_off + 2 * H, mask=mask, other=0.0).to(tl.float32)
    hn = tl.load(ws_ptr + w_off + 3 * H, mask=mask, other=0.0).to(tl.float32)
    dn_pre = dhy * (1.0 - z) * (1.0 - n * n)
    dr_pre = dn_pre * hn * r * (1.0 - r)
    dz_pre = dhy * (hx - n) * z * (1.0 - z)
    ty = dig_ptr.dtype.element_ty
    tl.store(dig_ptr + g_off, dr_pre.to(ty), mask=mask)
    tl.store(dig_ptr + g_off + H, dz_pre.to(ty), mask=mask)
    tl.store(dig_ptr + g_off + 2 * H, dn_pre.to(ty), mask=mask)
    tl.store(dhg_ptr + g_off, dr_pre.to(ty), mask=mask)
    tl.store(dhg_ptr + g_off + H, dz_pre.to(ty), mask=mask)
    tl.store(dhg_ptr + g_off + 2 * H, (dn_pre * r).to(ty), mask=mask)
    tl.store(dhx_ptr + h_off, (dhy * z).to(ty), mask=mask)


@triton.jit
def _rnn_bwd_kernel(
    dhy_ptr,   # (N, H)
    hy_ptr,    # (N, H)
    dg_ptr,    # (N, H) out: d(pre-activation)
    N, H,
    RELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """tanh: dpre = dhy*(1-hy^2); relu: dpre = 0 where hy <= 0, else dhy (NaN passes dhy on, as torch)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < N)[:, None] & (cols < H)[None, :]
    off = rows.to(tl.int64)[:, None] * H + cols[None, :]
    dhy = tl.load(dhy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    hy = tl.load(hy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        dg = tl.where(hy <= 0.0, 0.0, dhy)  # as torch: a NaN output passes dhy on
    else:
        dg = dhy * (1.0 - hy * hy)
    tl.store(dg_ptr + off, dg.to(dg_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Fused forward kernels: GEMMs + gate math. Grid: (cdiv(N, BLOCK_N), cdiv(H, BLOCK_H)).
# x, hx and the weights may have any row stride (unit column stride); a weight tile is read transposed:
# (BLOCK_K, BLOCK_H) = W[gate*H + cols, k0:k0+BLOCK_K]^T, so acc_gate += A @ W_gate^T.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _gemm_tile_ptrs(a_ptr, w_ptr, r64, w_rows, k0, sa_n, sw_r, K, N, H, BLOCK_K: tl.constexpr):
    """Pointers and masks of one K step: A tile (BLOCK_N, BLOCK_K) and the gate-0 weight tile (BLOCK_K, BLOCK_H);
    gate g's tile is g * H * sw_r further. Rows are int64 offsets; columns are contiguous (int32 keeps the
    contiguity visible to the compiler, so loads vectorize)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    kmask = kk < K
    a_ptrs = a_ptr + r64[:, None] * sa_n + kk[None, :]
    a_mask = (r64 < N)[:, None] & kmask[None, :]
    w_ptrs = w_ptr + w_rows[None, :] * sw_r + kk[:, None]
    w_mask = kmask[:, None] & (w_rows < H)[None, :]
    return a_ptrs, a_mask, w_ptrs, w_mask


@triton.jit
def _lstm_fused_kernel(
    x_ptr,     # (N, C) row stride sxn, unit column stride
    hx_ptr,    # (N, H) row stride shn, unit column stride
    cx_ptr,    # (N, H) contiguous
    w_ih_ptr,  # (4H, C) row stride swir, unit column stride
    w_hh_ptr,  # (4H, H) row stride swhr, unit column stride
    b_ih_ptr,  # (4H,), read only when HAS_BIAS
    b_hh_ptr,  # (4H,), read only when HAS_BIAS
    hy_ptr,    # (N, H) out
    cy_ptr,    # (N, H) out
    ws_ptr,    # (N, 4H) out: [i, f, g, o]
    N, C, H, sxn, shn, swir, swhr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r64 = rows.to(tl.int64)
    w_rows = cols.to(tl.int64)
    ih_gate_step = tl.cast(H, tl.int64) * swir  # from one gate's weight rows to the next
    hh_gate_step = tl.cast(H, tl.int64) * swhr
    acc_i = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        a_ptrs, a_mask, w, w_mask = _gemm_tile_ptrs(x_ptr, w_ih_ptr, r64, w_rows, k0, sxn, swir,
                                                    C, N, H, BLOCK_K)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        acc_i = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_i, input_precision=INPUT_PRECISION)
        w += ih_gate_step
        acc_f = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_f, input_precision=INPUT_PRECISION)
        w += ih_gate_step
        acc_g = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_g, input_precision=INPUT_PRECISION)
        w += ih_gate_step
        acc_o = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_o, input_precision=INPUT_PRECISION)
    for k0 in range(0, H, BLOCK_K):
        a_ptrs, a_mask, w, w_mask = _gemm_tile_ptrs(hx_ptr, w_hh_ptr, r64, w_rows, k0, shn, swhr,
                                                    H, N, H, BLOCK_K)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        acc_i = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_i, input_precision=INPUT_PRECISION)
        w += hh_gate_step
        acc_f = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_f, input_precision=INPUT_PRECISION)
        w += hh_gate_step
        acc_g = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_g, input_precision=INPUT_PRECISION)
        w += hh_gate_step
        acc_o = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_o, input_precision=INPUT_PRECISION)
    mask = (rows < N)[:, None] & (cols < H)[None, :]
    cx = tl.load(cx_ptr + r64[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _lstm_epilogue(acc_i, acc_f, acc_g, acc_o, cx, rows, cols, N, H, b_ih_ptr, b_hh_ptr, None,
                   hy_ptr, cy_ptr, ws_ptr, HAS_BIAS, False)


@triton.jit
def _gru_fused_kernel(
    x_ptr,     # (N, C) row stride sxn, unit column stride
    hx_ptr,    # (N, H) row stride shn, unit column stride
    w_ih_ptr,  # (3H, C) row stride swir, unit column stride
    w_hh_ptr,  # (3H, H) row stride swhr, unit column stride
    b_ih_ptr,  # (3H,), read only when HAS_BIAS
    b_hh_ptr,  # (3H,), read only when HAS_BIAS
    hy_ptr,    # (N, H) out
    ws_ptr,    # (N, 4H) out: [r, z, n, hn]
    N, C, H, sxn, shn, swir, swhr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r64 = rows.to(tl.int64)
    w_rows = cols.to(tl.int64)
    ih_gate_step = tl.cast(H, tl.int64) * swir  # from one gate's weight rows to the next
    hh_gate_step = tl.cast(H, tl.int64) * swhr
    acc_r = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    acc_in = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    acc_hn = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        a_ptrs, a_mask, w, w_mask = _gemm_tile_ptrs(x_ptr, w_ih_ptr, r64, w_rows, k0, sxn, swir,
                                                    C, N, H, BLOCK_K)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        acc_r = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_r, input_precision=INPUT_PRECISION)
        w += ih_gate_step
        acc_z = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_z, input_precision=INPUT_PRECISION)
        w += ih_gate_step
        acc_in = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_in, input_precision=INPUT_PRECISION)
    for k0 in range(0, H, BLOCK_K):
        a_ptrs, a_mask, w, w_mask = _gemm_tile_ptrs(hx_ptr, w_hh_ptr, r64, w_rows, k0, shn, swhr,
                                                    H, N, H, BLOCK_K)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        acc_r = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_r, input_precision=INPUT_PRECISION)
        w += hh_gate_step
        acc_z = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_z, input_precision=INPUT_PRECISION)
        w += hh_gate_step
        acc_hn = tl.dot(a, tl.load(w, mask=w_mask, other=0.0), acc_hn, input_precision=INPUT_PRECISION)
    mask = (rows < N)[:, None] & (cols < H)[None, :]
    hx = tl.load(hx_ptr + r64[:, None] * shn + cols[None, :], mask=mask, other=0.0)
    _gru_epilogue(acc_r, acc_z, acc_in, acc_hn, hx.to(tl.float32), rows, cols, N, H, b_ih_ptr, b_hh_ptr,
                  hy_ptr, ws_ptr, HAS_BIAS)


@triton.jit
def _rnn_fused_kernel(
    x_ptr,     # (N, C) row stride sxn, unit column stride
    hx_ptr,    # (N, H) row stride shn, unit column stride
    w_ih_ptr,  # (H, C) row stride swir, unit column stride
    w_hh_ptr,  # (H, H) row stride swhr, unit column stride
    b_ih_ptr,  # (H,), read only when HAS_BIAS
    b_hh_ptr,  # (H,), read only when HAS_BIAS
    hy_ptr,    # (N, H) out
    N, C, H, sxn, shn, swir, swhr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r64 = rows.to(tl.int64)
    w_rows = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        a_ptrs, a_mask, w, w_mask = _gemm_tile_ptrs(x_ptr, w_ih_ptr, r64, w_rows, k0, sxn, swir,
                                                    C, N, H, BLOCK_K)
        acc = tl.dot(tl.load(a_ptrs, mask=a_mask, other=0.0), tl.load(w, mask=w_mask, other=0.0), acc,
                     input_precision=INPUT_PRECISION)
    for k0 in range(0, H, BLOCK_K):
        a_ptrs, a_mask, w, w_mask = _gemm_tile_ptrs(hx_ptr, w_hh_ptr, r64, w_rows, k0, shn, swhr,
                                                    H, N, H, BLOCK_K)
        acc = tl.dot(tl.load(a_ptrs, mask=a_mask, other=0.0), tl.load(w, mask=w_mask, other=0.0), acc,
                     input_precision=INPUT_PRECISION)
    _rnn_epilogue(acc, rows, cols, N, H, b_ih_ptr, b_hh_ptr, hy_ptr, HAS_BIAS, RELU)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], ref: torch.Tensor) -> None:
    """Same dtype and device as ``ref`` and exactly ``shape``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of the other inputs), got {t.dtype}")
    if t.device != ref.device:
        raise RuntimeError(f"{name}: expected device {ref.device} (the device of the other inputs), got {t.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def _state(name: str, t: torch.Tensor) -> tuple[int, int]:
    """The (N, H) of a state tensor that fixes the shapes of the others; its dtype must be supported."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (N, H) tensor, got shape {tuple(t.shape)}")
    return t.shape[0], t.shape[1]


def _biases(b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, size: int, ref: torch.Tensor):
    """(has_bias, b_ih, b_hh), contiguous; a missing one of the two becomes zeros, both missing: ref twice
    (never read)."""
    if b_ih is None and b_hh is None:
        return False, ref, ref
    if b_ih is not None:
        _check("b_ih", b_ih, (size,), ref)
    if b_hh is not None:
        _check("b_hh", b_hh, (size,), ref)
    zeros = torch.zeros(size, dtype=ref.dtype, device=ref.device)
    b_ih = zeros if b_ih is None else b_ih.contiguous()
    b_hh = zeros if b_hh is None else b_hh.contiguous()
    return True, b_ih, b_hh


def _relu(nonlinearity: str) -> bool:
    if nonlinearity not in _NONLINEARITIES:
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    return nonlinearity == "relu"


def _pw_grid(n: int, h: int) -> tuple[int, int]:
    return triton.cdiv(n, PW_BLOCK_N), triton.cdiv(h, PW_BLOCK_H)


def lstm_cell_fwd(igates: torch.Tensor, hgates: torch.Tensor, cx: torch.Tensor, b_ih: torch.Tensor | None,
                  b_hh: torch.Tensor | None, peephole: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LSTM step after the GEMMs. igates, hgates (N, 4H); cx (N, H); b_ih, b_hh (4H,) or None; peephole (3, H)
    or None. Returns hy (N, H), cy (N, H), workspace (N, 4H) = [i, f, g, o]."""
    n, h = _state("cx", cx)
    _check("igates", igates, (n, 4 * h), cx)
    _check("hgates", hgates, (n, 4 * h), cx)
    has_bias, b_ih, b_hh = _biases(b_ih, b_hh, 4 * h, cx)
    if peephole is not None:
        _check("peephole", peephole, (3, h), cx)
    hy = cx.new_empty((n, h))
    cy = cx.new_empty((n, h))
    ws = cx.new_empty((n, 4 * h))
    if n and h:
        cx = cx.contiguous()
        _lstm_fwd_kernel[_pw_grid(n, h)](
            igates.contiguous(), hgates.contiguous(), cx, b_ih, b_hh,
            cx if peephole is None else peephole.contiguous(), hy, cy, ws, n, h,
            HAS_BIAS=has_bias, HAS_PEEPHOLE=peephole is not None, BLOCK_N=PW_BLOCK_N, BLOCK_H=PW_BLOCK_H,
            num_warps=PW_WARPS)
    return hy, cy, ws


def lstm_cell_bwd(dhy: torch.Tensor, dcy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                  workspace: torch.Tensor, peephole: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LSTM step backward. dhy, dcy, cx, cy (N, H); workspace (N, 4H) from the forward; peephole (3, H) or None.
    Returns dgates (N, 4H) = d(pre-activation gates) (also the bias gradient rows), dcx (N, H), and dpeephole (3, H)
    (None without peephole), summed over the batch deterministically."""
    n, h = _state("cx", cx)
    _check("dhy", dhy, (n, h), cx)
    _check("dcy", dcy, (n, h), cx)
    _check("cy", cy, (n, h), cx)
    _check("workspace", workspace, (n, 4 * h), cx)
    if peephole is not None:
        _check("peephole", peephole, (3, h), cx)
    dgates = cx.new_empty((n, 4 * h))
    dcx = cx.new_empty((n, h))
    grid = _pw_grid(n, h)
    dp_part = None
    if peephole is not None:
        dp_part = torch.zeros((grid[0], 3, h), dtype=torch.float32, device=cx.device)
    if n and h:
        cx = cx.contiguous()
        _lstm_bwd_kernel[grid](
            dhy.contiguous(), dcy.contiguous(), cx, cy.contiguous(), workspace.contiguous(),
            cx if peephole is None else peephole.contiguous(), dgates, dcx, dgates if dp_part is None else dp_part,
            n, h, HAS_PEEPHOLE=peephole is not None, BLOCK_N=PW_BLOCK_N, BLOCK_H=PW_BLOCK_H, num_warps=PW_WARPS)
    dpeephole = None if dp_part is None else dp_part.sum(0).to(cx.dtype)
    return dgates, dcx, dpeephole


def gru_cell_fwd(igates: torch.Tensor, hgates: torch.Tensor, hx: torch.Tensor, b_ih: torch.Tensor | None,
                 b_hh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """GRU step after the GEMMs. igates, hgates (N, 3H); hx (N, H); b_ih, b_hh (3H,) or None.
    Returns hy (N, H), workspace (N, 4H) = [r, z, n, hn] with hn = hgates_n + b_hn."""
    n, h = _state("hx", hx)
    _check("igates", igates, (n, 3 * h), hx)
    _check("hgates", hgates, (n, 3 * h), hx)
    has_bias, b_ih, b_hh = _biases(b_ih, b_hh, 3 * h, hx)
    hy = hx.new_empty((n, h))
    ws = hx.new_empty((n, 4 * h))
    if n and h:
        _gru_fwd_kernel[_pw_grid(n, h)](
            igates.contiguous(), hgates.contiguous(), hx.contiguous(), b_ih, b_hh, hy, ws, n, h, 3 * h,
            HAS_BIAS=has_bias, BLOCK_N=PW_BLOCK_N, BLOCK_H=PW_BLOCK_H, num_warps=PW_WARPS)
    return hy, ws


def gru_cell_bwd(dhy: torch.Tensor, hx: torch.Tensor, workspace: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRU step backward. dhy, hx (N, H); workspace (N, 4H). Returns d_igates (N, 3H), d_hgates (N, 3H) and
    dhx (N, H), the direct term dhy*z only (the caller adds d_hgates @ W_hh)."""
    n, h = _state("hx", hx)
    _check("dhy", dhy, (n, h), hx)
    _check("workspace", workspace, (n, 4 * h), hx)
    d_ig = hx.new_empty((n, 3 * h))
    d_hg = hx.new_empty((n, 3 * h))
    dhx = hx.new_empty((n, h))
    if n and h:
        _gru_bwd_kernel[_pw_grid(n, h)](
            dhy.contiguous(), hx.contiguous(), workspace.contiguous(), d_ig, d_hg, dhx, n, h,
            BLOCK_N=PW_BLOCK_N, BLOCK_H=PW_BLOCK_H, num_warps=PW_WARPS)
    return d_ig, d_hg, dhx


def rnn_cell_fwd(igates: torch.Tensor, hgates: torch.Tensor, b_ih: torch.Tensor | None, b_hh: torch.Tensor | None,
                 nonlinearity: str) -> torch.Tensor:
    """Elman RNN step after the GEMMs. igates, hgates (N, H); b_ih, b_hh (H,) or None; nonlinearity 'tanh' or
    'relu'. Returns hy (N, H)."""
    relu = _relu(nonlinearity)
    n, h = _state("igates", igates)
    _check("hgates", hgates, (n, h), igates)
    has_bias, b_ih, b_hh = _biases(b_ih, b_hh, h, igates)
    hy = igates.new_empty((n, h))
    if n and h:
        _rnn_fwd_kernel[_pw_grid(n, h)](
            igates.contiguous(), hgates.contiguous(), b_ih, b_hh, hy, n, h,
            HAS_BIAS=has_bias, RELU=relu, BLOCK_N=PW_BLOCK_N, BLOCK_H=PW_BLOCK_H, num_warps=PW_WARPS)
    return hy


def rnn_cell_bwd(dhy: torch.Tensor, hy: torch.Tensor, nonlinearity: str) -> torch.Tensor:
    """Elman RNN step backward. dhy, hy (N, H). Returns d(pre-activation) (N, H)."""
    relu = _relu(nonlinearity)
    n, h = _state("hy", hy)
    _check("dhy", dhy, (n, h), hy)
    dgates = hy.new_empty((n, h))
    if n and h:
        _rnn_bwd_kernel[_pw_grid(n, h)](
            dhy.contiguous(), hy.contiguous(), dgates, n, h,
            RELU=relu, BLOCK_N=PW_BLOCK_N, BLOCK_H=PW_BLOCK_H, num_warps=PW_WARPS)
    return dgates


def _fused_inputs(x: torch.Tensor, hx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, gates: int):
    """Checks the GEMM operands of a fused step; returns (N, C, H)."""
    n, h = _state("hx", hx)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != n:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 2-D ({n}, C) tensor, got {shape}")
    c = x.shape[1]
    _check("x", x, (n, c), hx)
    _check("w_ih", w_ih, (gates * h, c), hx)
    _check("w_hh", w_hh, (gates * h, h), hx)
    return n, c, h


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    """t itself when its columns are contiguous (any row stride is fine), else a contiguous copy."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _fused_launch_args(x, hx, w_ih, w_hh, n, c, h, allow_tf32):
    """Scalar arguments, constexprs and launch options shared by the fused kernels."""
    block_n, block_h, block_k, warps, stages = _fused_config(n)
    prec = "tf32" if allow_tf32 and x.dtype == torch.float32 else "ieee"
    scalars = (n, c, h, x.stride(0), hx.stride(0), w_ih.stride(0), w_hh.stride(0))
    meta = dict(INPUT_PRECISION=prec, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_K=block_k,
                num_warps=warps, num_stages=stages)
    return (triton.cdiv(n, block_n), triton.cdiv(h, block_h)), scalars, meta


def lstm_cell_fused(x: torch.Tensor, hx: torch.Tensor, cx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                    b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, allow_tf32: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole LSTM step in one kernel. x (N, C); hx, cx (N, H); w_ih (4H, C); w_hh (4H, H); b_ih, b_hh (4H,) or
    None. float32 GEMMs use tf32 only when allow_tf32. Returns hy, cy (N, H), workspace (N, 4H) = [i, f, g, o]."""
    n, c, h = _fused_inputs(x, hx, w_ih, w_hh, 4)
    _check("cx", cx, (n, h), hx)
    has_bias, b_ih, b_hh = _biases(b_ih, b_hh, 4 * h, hx)
    hy = hx.new_empty((n, h))
    cy = hx.new_empty((n, h))
    ws = hx.new_empty((n, 4 * h))
    if n and h:
        x, hx, w_ih, w_hh = _unit_cols(x), _unit_cols(hx), _unit_cols(w_ih), _unit_cols(w_hh)
        grid, scalars, meta = _fused_launch_args(x, hx, w_ih, w_hh, n, c, h, allow_tf32)
        _lstm_fused_kernel[grid](x, hx, cx.contiguous(), w_ih, w_hh, b_ih, b_hh, hy, cy, ws, *scalars,
                                 HAS_BIAS=has_bias, **meta)
    return hy, cy, ws


def gru_cell_fused(x: torch.Tensor, hx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                   b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, allow_tf32: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole GRU step in one kernel. x (N, C); hx (N, H); w_ih (3H, C); w_hh (3H, H); b_ih, b_hh (3H,) or None.
    Returns hy (N, H), workspace (N, 4H) = [r, z, n, hn]."""
    n, c, h = _fused_inputs(x, hx, w_ih, w_hh, 3)
    has_bias, b_ih, b_hh = _biases(b_ih, b_hh, 3 * h, hx)
    hy = hx.new_empty((n, h))
    ws = hx.new_empty((n, 4 * h))
    if n and h:
        x, hx, w_ih, w_hh = _unit_cols(x), _unit_cols(hx), _unit_cols(w_ih), _unit_cols(w_hh)
        grid, scalars, meta = _fused_launch_args(x, hx, w_ih, w_hh, n, c, h, allow_tf32)
        _gru_fused_kernel[grid](x, hx, w_ih, w_hh, b_ih, b_hh, hy, ws, *scalars, HAS_BIAS=has_bias, **meta)
    return hy, ws


def rnn_cell_fused(x: torch.Tensor, hx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                   b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, nonlinearity: str,
                   allow_tf32: bool = False) -> torch.Tensor:
    """Whole Elman RNN step in one kernel. x (N, C); hx (N, H); w_ih (H, C); w_hh (H, H); b_ih, b_hh (H,) or
    None; nonlinearity 'tanh' or 'relu'. Returns hy (N, H)."""
    relu = _relu(nonlinearity)
    n, c, h = _fused_inputs(x, hx, w_ih, w_hh, 1)
    has_bias, b_ih, b_hh = _biases(b_ih, b_hh, h, hx)
    hy = hx.new_empty((n, h))
    if n and h:
        x, hx, w_ih, w_hh = _unit_cols(x), _unit_cols(hx), _unit_cols(w_ih), _unit_cols(w_hh)
        grid, scalars, meta = _fused_launch_args(x, hx, w_ih, w_hh, n, c, h, allow_tf32)
        _rnn_fused_kernel[grid](x, hx, w_ih, w_hh, b_ih, b_hh, hy, *scalars, HAS_BIAS=has_bias, RELU=relu, **meta)
    return hy


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time configurations: every kernel at every configuration the launchers above can pick.
# ----------------------------------------------------------------------------------------------------------------
def _aot_spec(fn, dtype: torch.dtype, constexprs: dict, num_warps: int, num_stages: int = 3,
              fp32_ptrs: tuple[str, ...] = (), i64_ptrs: tuple[str, ...] = (), **options) -> AOTSpec:
    """fn's configuration: pointers to `dtype` (float32 for fp32_ptrs, int64 for i64_ptrs), other arguments i32;
    options: AOTSpec's other fields."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in fp32_ptrs else "*i64" if name in i64_ptrs else _PTR[dtype]
        else:
            sig[name] = "i32"
    return AOTSpec(fn=fn, signature=sig, constexprs=constexprs, num_warps=num_warps, num_stages=num_stages,
                   **options)


def _aot_specs() -> list[AOTSpec]:
    specs = []
    pw = dict(BLOCK_N=PW_BLOCK_N, BLOCK_H=PW_BLOCK_H)
    for dt in _DTYPES:
        for bias in (False, True):
            for peep in (False, True):
                specs.append(_aot_spec(_lstm_fwd_kernel, dt, dict(HAS_BIAS=bias, HAS_PEEPHOLE=peep, **pw), PW_WARPS))
            specs.append(_aot_spec(_gru_fwd_kernel, dt, dict(HAS_BIAS=bias, **pw), PW_WARPS))
            for relu in (False, True):
                specs.append(_aot_spec(_rnn_fwd_kernel, dt, dict(HAS_BIAS=bias, RELU=relu, **pw), PW_WARPS))
        for peep in (False, True):
            specs.append(_aot_spec(_lstm_bwd_kernel, dt, dict(HAS_PEEPHOLE=peep, **pw), PW_WARPS,
                                   fp32_ptrs=("dp_ptr",) if peep else ()))
        specs.append(_aot_spec(_gru_bwd_kernel, dt, dict(pw), PW_WARPS))
        for relu in (False, True):
            specs.append(_aot_spec(_rnn_bwd_kernel, dt, dict(RELU=relu, **pw), PW_WARPS))
        precisions = ("ieee", "tf32") if dt == torch.float32 else ("ieee",)
        for block_n, block_h, block_k, warps, stages in FUSED_CONFIGS.values():
            tiles = dict(BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_K=block_k)
            for prec in precisions:
                for bias in (False, True):
                    for fn in (_lstm_fused_kernel, _gru_fused_kernel):
                        specs.append(_aot_spec(fn, dt, dict(HAS_BIAS=bias, INPUT_PRECISION=prec, **tiles),
                                               warps, stages))
                    for relu in (False, True):
                        specs.append(_aot_spec(_rnn_fused_kernel, dt, dict(HAS_BIAS=bias, RELU=relu,
                                                                           INPUT_PRECISION=prec, **tiles),
                                               warps, stages))
    return specs


AOT_SPECS: list[AOTSpec] = _aot_specs()
