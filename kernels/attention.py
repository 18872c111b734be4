"""Scaled dot-product attention, flash style, forward and backward, in Triton.

Forward (per query row i, over keys j):  s_ij = scale * q_i . k_j + mask_ij  (-inf where is_causal and j > i),
    lse_i = log sum_j exp(s_ij),  p_ij = exp(s_ij - lse_i),  out_i = sum_j z_ij p_ij v_j,
    with z_ij = keep_ij / (1 - dropout_p) (keep_ij = rand(seed, offset + ((b*Hq + h)*L + i)*S + j) >= dropout_p;
    z = 1 without dropout). The softmax is computed online block by block in float32 with exp2 (log2(e) folded into
    the scale), so the L x S scores never reach memory. A row with no visible key gives out = 0 and lse = -inf.
Backward:  D_i = dout_i . out_i,  dp_ij = z_ij dout_i . v_j,  ds_ij = p_ij (dp_ij - D_i),
    dv_j = sum_i z_ij p_ij dout_i,  dk_j = scale * sum_i ds_ij q_i,  dq_i = scale * sum_j ds_ij k_j;
    ds is also the gradient of an additive mask. One kernel over key blocks produces dk, dv (looping over the query
    blocks and, with GQA, over the query heads sharing the key head); a second over query blocks produces dq (and ds
    when asked for), so every gradient is summed in a fixed order (deterministic).

q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), Hq a multiple of Hk (query head h reads key/value head
h // (Hq // Hk)); any strides with a unit last dim. float16 / bfloat16 (float32 accumulation) or float32 (tl.dot in
"ieee" precision, or "tf32" when allowed). Head dims up to 256, padded to a power of two with masks.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .aot import AOTSpec

LOG2E = 1.4426950408889634  # the kernels spell it (and ln 2 = 0.6931471805599453) as literals
MAX_HEAD_DIM = 256
_MAX_GRID_Y = 65535  # B * Hq programs along the grid's second axis


def unsupported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these kernels cannot run attention of q (B, Hq, L, E) and v (B, Hk, S, Ev) (the limits of their tiles
    and grid), or None: the one statement of those limits (fastseq.ops.attention asks it before choosing them)."""
    e, ev = q.shape[-1], v.shape[-1]
    if not (1 <= e <= MAX_HEAD_DIM and 1 <= ev <= MAX_HEAD_DIM):
        return f"the Triton kernels need head dims in [1, {MAX_HEAD_DIM}], got E={e}, Ev={ev}"
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        return f"the Triton kernels support batch * heads up to {_MAX_GRID_Y}, got {q.shape[0] * q.shape[1]}"
    return None
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
# Block sizes by padded head dim max(BLOCK_E, BLOCK_EV) and dtype width (2-byte / 4-byte), as
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward and dq: BLOCK_M % BLOCK_N == 0 (query block over key blocks);
# dk/dv: BLOCK_N % BLOCK_M == 0 (key block over query blocks). Chosen so that the plain variants compile without
# spills for sm_90 with 16-aligned pointers and strides (as the JIT specializes them); all fit A100's 163 KiB.
_FWD_CONFIGS = {
    (64, 2): (128, 64, 4, 3), (128, 2): (128, 64, 8, 3), (256, 2): (64, 32, 4, 2),
    (64, 4): (64, 32, 8, 2), (128, 4): (32, 16, 8, 2), (256, 4): (32, 16, 8, 1),
}
_DKDV_CONFIGS = {
    (64, 2): (32, 128, 8, 3), (128, 2): (32, 128, 8, 2), (256, 2): (16, 32, 8, 2),
    (64, 4): (16, 32, 4, 2), (128, 4): (16, 64, 8, 1), (256, 4): (16, 32, 8, 1),
}
_DQ_CONFIGS = {
    (64, 2): (128, 32, 4, 3), (128, 2): (128, 32, 8, 2), (256, 2): (64, 16, 4, 1),
    (64, 4): (64, 32, 8, 2), (128, 4): (32, 16, 4, 2), (256, 4): (32, 16, 8, 1),
}
_PRE_BLOCK_M = 64
_INTERPRET_BLOCK = 16  # the interpreter runs every configuration with 16 x 16 tiles, 1 stage


@triton.jit
def _fwd_block(acc, l_i, m_i, q, K_blk, V_blk, Mask_blk, rng_blk, start_n, offs_m, offs_ml, offs_n, offs_e,
               offs_ev, L, S, stride_ks, stride_vs, stride_ml, stride_ms, qk_scale, dropout_p, drop_scale, seed,
               HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax: returns the updated (acc, l_i, m_i). MASKED: the block reaches past S
    or crosses the causal diagonal, so out-of-range and invisible keys are set to -inf."""
    cols = start_n + offs_n
    if MASKED:
        kv_mask = cols < S
        k_t = tl.load(K_blk + offs_n[None, :] * stride_ks + offs_e[:, None],
                      mask=(offs_e[:, None] < HEAD_E) & kv_mask[None, :], other=0.0)
        v = tl.load(V_blk + offs_n[:, None] * stride_vs + offs_ev[None, :],
                    mask=kv_mask[:, None] & (offs_ev[None, :] < HEAD_EV), other=0.0)
    else:
        k_t = tl.load(K_blk + offs_n[None, :] * stride_ks + offs_e[:, None], mask=offs_e[:, None] < HEAD_E,
                      other=0.0)
        v = tl.load(V_blk + offs_n[:, None] * stride_vs + offs_ev[None, :], mask=offs_ev[None, :] < HEAD_EV,
                    other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if HAS_MASK:
        mmask = offs_m[:, None] < L
        if MASKED:
            mmask = mmask & (cols[None, :] < S)
        s += tl.load(Mask_blk + offs_ml[:, None] * stride_ml + offs_n[None, :] * stride_ms, mask=mmask,
                     other=0.0).to(tl.float32) * 1.4426950408889634
    if MASKED:
        visible = cols[None, :] < S
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if HAS_MASK or MASKED:  # a row may have seen no finite score yet
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        rand = tl.rand(seed, rng_blk + offs_ml[:, None].to(tl.int64) * S + offs_n[None, :])
        p = tl.where(rand >= dropout_p, p * drop_scale, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, Hq, L, E) strides (stride_qb, stride_qh, stride_ql, 1), q.dtype
    K,  # (B, Hk, S, E) strides (stride_kb, stride_kh, stride_ks, 1), q.dtype
    V,  # (B, Hk, S, Ev) strides (stride_vb, stride_vh, stride_vs, 1), q.dtype
    Mask,  # (B, Hq, L, S) strides (stride_mb, stride_mh, stride_ml, stride_ms), 0 on broadcast dims; read if HAS_MASK
    Out,  # (B, Hq, L, Ev) contiguous, q.dtype
    Lse,  # (B, Hq, L) contiguous, float32
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh, stride_ml, stride_ms,
    Hq, L, S, group,  # group = Hq // Hk
    qk_scale,  # scale * log2(e)
    dropout_p, drop_scale, seed, offset,  # drop_scale = 1 / (1 - dropout_p), 0 when dropout_p == 1
    HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (m, b * Hq + h): query rows [m * BLOCK_M, (m + 1) * BLOCK_M) of head h in batch b. Key blocks wholly
    visible and inside S take the unmasked path; the tail block and the causal diagonal the masked one; blocks
    wholly above the causal diagonal are skipped."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    offs_ml = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_ml
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_mask = offs_m < L
    Q_blk = Q + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_ql
    q = tl.load(Q_blk + offs_ml[:, None] * stride_ql + offs_e[None, :],
                mask=row_mask[:, None] & (offs_e[None, :] < HEAD_E), other=0.0)
    K_bh = K + b * stride_kb + hk * stride_kh
    V_bh = V + b * stride_vb + hk * stride_vh
    Mask_bm = Mask + b * stride_mb + h * stride_mh + start_m.to(tl.int64) * stride_ml
    rng_bm = offset + (pid_bh * L + start_m) * S

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    full_end = (S // BLOCK_N) * BLOCK_N
    hi = S
    if IS_CAUSAL:
        full_end = tl.minimum(full_end, start_m)
        hi = tl.minimum(S, start_m + BLOCK_M)
    K_blk, V_blk, Mask_blk, rng_blk = K_bh, V_bh, Mask_bm, rng_bm
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, K_blk, V_blk, Mask_blk, rng_blk, start_n, offs_m, offs_ml, offs_n, offs_e, offs_ev, L, S,
            stride_ks, stride_vs, stride_ml, stride_ms, qk_scale, dropout_p, drop_scale, seed, HEAD_E, HEAD_EV,
            IS_CAUSAL, HAS_MASK, HAS_DROPOUT, False, DOT_PRECISION)
        K_blk += BLOCK_N * stride_ks
        V_blk += BLOCK_N * stride_vs
        Mask_blk += BLOCK_N * stride_ms
        rng_blk += BLOCK_N
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, K_blk, V_blk, Mask_blk, rng_blk, start_n, offs_m, offs_ml, offs_n, offs_e, offs_ev, L, S,
            stride_ks, stride_vs, stride_ml, stride_ms, qk_scale, dropout_p, drop_scale, seed, HEAD_E, HEAD_EV,
            IS_CAUSAL, HAS_MASK, HAS_DROPOUT, True, DOT_PRECISION)
        K_blk += BLOCK_N * stride_ks
        V_blk += BLOCK_N * stride_vs
        Mask_blk += BLOCK_N * stride_ms
        rng_blk += BLOCK_N

    empty = l_i == 0.0  # no visible key: out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row0 = pid_bh * L + start_m
    tl.store(Out + row0 * HEAD_EV + offs_ml[:, None] * HEAD_EV + offs_ev[None, :], out.to(Out.dtype.element_ty),
             mask=row_mask[:, None] & (offs_ev[None, :] < HEAD_EV))
    tl.store(Lse + row0 + offs_ml, lse, mask=row_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,  # (B, Hq, L, Ev) strides (stride_ob, stride_oh, stride_ol, 1), q.dtype
    DOut,  # (B, Hq, L, Ev) strides (stride_db, stride_dh, stride_dl, 1), q.dtype
    Delta,  # (B, Hq, L) contiguous, float32
    stride_ob, stride_oh, stride_ol,
    stride_db, stride_dh, stride_dl,
    Hq, L,
    HEAD_EV: tl.constexpr, BLOCK_EV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta_i = sum_e dout_ie * out_ie in float32."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    offs_ml = tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    mask = ((start_m + offs_ml) < L)[:, None] & (offs_ev[None, :] < HEAD_EV)
    m64 = start_m.to(tl.int64)
    o = tl.load(Out + b * stride_ob + h * stride_oh + m64 * stride_ol + offs_ml[:, None] * stride_ol + offs_ev[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_db + h * stride_dh + m64 * stride_dl + offs_ml[:, None] * stride_dl
                 + offs_ev[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh * L + start_m + offs_ml, tl.sum(o * do, 1), mask=(start_m + offs_ml) < L)


@triton.jit
def _dkdv_block(dk, dv, k, v, Q_blk, DO_blk, Lse_blk, Delta_blk, Mask_blk, rng_blk, start_m, offs_ml, offs_n,
                offs_e, offs_ev, L, S, stride_ql, stride_dl, stride_ml, stride_ms, qk_scale, dropout_p, drop_scale,
                seed, HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                CAUSAL_DIAG: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query block's contribution to the dk, dv of a key block, in transposed (key x query) orientation.
    offs_n are the key block's global indices. Rows past L load lse = -inf and so get p = 0; keys past S give rows
    of dk, dv that are never stored. CAUSAL_DIAG: the block crosses the diagonal, invisible pairs are set to -inf."""
    rows = start_m + offs_ml
    row_mask = rows < L
    q = tl.load(Q_blk + offs_ml[:, None] * stride_ql + offs_e[None, :],
                mask=row_mask[:, None] & (offs_e[None, :] < HEAD_E), other=0.0)
    do = tl.load(DO_blk + offs_ml[:, None] * stride_dl + offs_ev[None, :],
                 mask=row_mask[:, None] & (offs_ev[None, :] < HEAD_EV), other=0.0)
    lse = tl.load(Lse_blk + offs_ml, mask=row_mask, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty rows: p = 0
    delta = tl.load(Delta_blk + offs_ml, mask=row_mask, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    if HAS_MASK:
        s_t += tl.load(Mask_blk + offs_ml[None, :] * stride_ml + offs_n[:, None] * stride_ms,
                       mask=row_mask[None, :] & (offs_n[:, None] < S), other=0.0).to(tl.float32) * 1.4426950408889634
    if CAUSAL_DIAG:
        s_t = tl.where(offs_n[:, None] <= rows[None, :], s_t, float("-inf"))
    p_t = tl.math.exp2(s_t - lse2[None, :])
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        rand = tl.rand(seed, rng_blk + offs_ml[None, :].to(tl.int64) * S + offs_n[:, None])
        keep = rand >= dropout_p
        pd_t = tl.where(keep, p_t * drop_scale, 0.0)
        dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
    else:
        pd_t = p_t
    dv += tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # (B, Hq, L, E) strides (stride_qb, stride_qh, stride_ql, 1), q.dtype
    K,  # (B, Hk, S, E) strides (stride_kb, stride_kh, stride_ks, 1), q.dtype
    V,  # (B, Hk, S, Ev) strides (stride_vb, stride_vh, stride_vs, 1), q.dtype
    Mask,  # (B, Hq, L, S) strides (stride_mb, stride_mh, stride_ml, stride_ms), 0 on broadcast dims; read if HAS_MASK
    DOut,  # (B, Hq, L, Ev) strides (stride_db, stride_dh, stride_dl, 1), q.dtype
    Lse,  # (B, Hq, L) contiguous, float32
    Delta,  # (B, Hq, L) contiguous, float32
    DK,  # (B, Hk, S, E) contiguous, q.dtype
    DV,  # (B, Hk, S, Ev) contiguous, q.dtype
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_db, stride_dh, stride_dl,
    Hq, Hk, L, S, group,  # group = Hq // Hk
    sm_scale, qk_scale,  # scale, scale * log2(e)
    dropout_p, drop_scale, seed, offset,
    HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (n, b * Hk + hk): dk, dv of keys [n * BLOCK_N, (n + 1) * BLOCK_N) of key head hk, summed over the
    query heads of its group and all query blocks (causal: from the block holding query n * BLOCK_N on, the
    BLOCK_N / BLOCK_M blocks on the diagonal masked)."""
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hk
    hk = pid_bh % Hk
    offs_ml = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    col_mask = offs_n < S
    n64 = start_n.to(tl.int64)
    k = tl.load(K + b * stride_kb + hk * stride_kh + n64 * stride_ks + tl.arange(0, BLOCK_N)[:, None] * stride_ks
                + offs_e[None, :], mask=col_mask[:, None] & (offs_e[None, :] < HEAD_E), other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + n64 * stride_vs + tl.arange(0, BLOCK_N)[:, None] * stride_vs
                + offs_ev[None, :], mask=col_mask[:, None] & (offs_ev[None, :] < HEAD_EV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], dtype=tl.float32)
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    lo = 0
    lo64 = 0
    mid = 0
    if IS_CAUSAL:  # queries before start_n see none of these keys; [start_n, start_n + BLOCK_N) cross the diagonal
        lo = start_n
        lo64 = n64
        mid = tl.minimum(start_n + BLOCK_N, L)
    for g in range(0, group):
        h = hk * group + g
        bh = b * Hq + h
        Q_blk = Q + b * stride_qb + h * stride_qh + lo64 * stride_ql
        DO_blk = DOut + b * stride_db + h * stride_dh + lo64 * stride_dl
        Lse_blk = Lse + bh * L + lo64
        Delta_blk = Delta + bh * L + lo64
        Mask_blk = Mask + b * stride_mb + h * stride_mh + lo64 * stride_ml
        rng_blk = offset + (bh * L + lo64) * S
        for start_m in range(lo, mid, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, Q_blk, DO_blk, Lse_blk, Delta_blk, Mask_blk, rng_blk, start_m, offs_ml, offs_n, offs_e,
                offs_ev, L, S, stride_ql, stride_dl, stride_ml, stride_ms, qk_scale, dropout_p, drop_scale, seed,
                HEAD_E, HEAD_EV, HAS_MASK, HAS_DROPOUT, True, DOT_PRECISION)
            Q_blk += BLOCK_M * stride_ql
            DO_blk += BLOCK_M * stride_dl
            Lse_blk += BLOCK_M
            Delta_blk += BLOCK_M
            Mask_blk += BLOCK_M * stride_ml
            rng_blk += BLOCK_M * S
        for start_m in range(mid, L, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, Q_blk, DO_blk, Lse_blk, Delta_blk, Mask_blk, rng_blk, start_m, offs_ml, offs_n, offs_e,
                offs_ev, L, S, stride_ql, stride_dl, stride_ml, stride_ms, qk_scale, dropout_p, drop_scale, seed,
                HEAD_E, HEAD_EV, HAS_MASK, HAS_DROPOUT, False, DOT_PRECISION)
            Q_blk += BLOCK_M * stride_ql
            DO_blk += BLOCK_M * stride_dl
            Lse_blk += BLOCK_M
            Delta_blk += BLOCK_M
            Mask_blk += BLOCK_M * stride_ml
            rng_blk += BLOCK_M * S
    row0 = pid_bh * S + start_n
    rows = tl.arange(0, BLOCK_N)
    tl.store(DK + row0 * HEAD_E + rows[:, None] * HEAD_E + offs_e[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=col_mask[:, None] & (offs_e[None, :] < HEAD_E))
    tl.store(DV + row0 * HEAD_EV + rows[:, None] * HEAD_EV + offs_ev[None, :], dv.to(DV.dtype.element_ty),
             mask=col_mask[:, None] & (offs_ev[None, :] < HEAD_EV))


@triton.jit
def _dq_block(dq, q, do, lse2, delta, K_blk, V_blk, Mask_blk, rng_blk, DS_blk, start_n, offs_m, offs_ml, offs_n,
              offs_e, offs_ev, L, S, stride_ks, stride_vs, stride_ml, stride_ms, qk_scale, dropout_p, drop_scale, seed,
              HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, NEED_DS: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block's contribution to dq (and its tile of ds). MASKED as in _fwd_block."""
    cols = start_n + offs_n
    if MASKED:
        kv_mask = cols < S
        k = tl.load(K_blk + offs_n[:, None] * stride_ks + offs_e[None, :],
                    mask=kv_mask[:, None] & (offs_e[None, :] < HEAD_E), other=0.0)
        v_t = tl.load(V_blk + offs_n[None, :] * stride_vs + offs_ev[:, None],
                      mask=(offs_ev[:, None] < HEAD_EV) & kv_mask[None, :], other=0.0)
    else:
        k = tl.load(K_blk + offs_n[:, None] * stride_ks + offs_e[None, :], mask=offs_e[None, :] < HEAD_E, other=0.0)
        v_t = tl.load(V_blk + offs_n[None, :] * stride_vs + offs_ev[:, None], mask=offs_ev[:, None] < HEAD_EV,
                      other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_MASK:
        mmask = offs_m[:, None] < L
        if MASKED:
            mmask = mmask & (cols[None, :] < S)
        s += tl.load(Mask_blk + offs_ml[:, None] * stride_ml + offs_n[None, :] * stride_ms, mask=mmask,
                     other=0.0).to(tl.float32) * 1.4426950408889634
    if MASKED:
        visible = cols[None, :] < S
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        rand = tl.rand(seed, rng_blk + offs_ml[:, None].to(tl.int64) * S + offs_n[None, :])
        dp = tl.where(rand >= dropout_p, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if NEED_DS:
        ds_mask = (offs_m[:, None] < L) & (cols[None, :] < S)
        tl.store(DS_blk + offs_ml[:, None].to(tl.int64) * S + offs_n[None, :], ds, mask=ds_mask)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # (B, Hq, L, E) strides (stride_qb, stride_qh, stride_ql, 1), q.dtype
    K,  # (B, Hk, S, E) strides (stride_kb, stride_kh, stride_ks, 1), q.dtype
    V,  # (B, Hk, S, Ev) strides (stride_vb, stride_vh, stride_vs, 1), q.dtype
    Mask,  # (B, Hq, L, S) strides (stride_mb, stride_mh, stride_ml, stride_ms), 0 on broadcast dims; read if HAS_MASK
    DOut,  # (B, Hq, L, Ev) strides (stride_db, stride_dh, stride_dl, 1), q.dtype
    Lse,  # (B, Hq, L) contiguous, float32
    Delta,  # (B, Hq, L) contiguous, float32
    DQ,  # (B, Hq, L, E) contiguous, q.dtype
    DS,  # (B, Hq, L, S) contiguous, float32; written only if NEED_DS (zero-filled by the caller when IS_CAUSAL)
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_db, stride_dh, stride_dl,
    Hq, L, S, group,  # group = Hq // Hk
    sm_scale, qk_scale,  # scale, scale * log2(e)
    dropout_p, drop_scale, seed, offset,
    HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, NEED_DS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (m, b * Hq + h): dq of query rows [m * BLOCK_M, (m + 1) * BLOCK_M) of head h, over the key blocks the
    forward visits (same unmasked / masked split)."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    offs_ml = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_ml
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_mask = offs_m < L
    m64 = start_m.to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + m64 * stride_ql + offs_ml[:, None] * stride_ql + offs_e[None, :],
                mask=row_mask[:, None] & (offs_e[None, :] < HEAD_E), other=0.0)
    do = tl.load(DOut + b * stride_db + h * stride_dh + m64 * stride_dl + offs_ml[:, None] * stride_dl
                 + offs_ev[None, :], mask=row_mask[:, None] & (offs_ev[None, :] < HEAD_EV), other=0.0)
    row0 = pid_bh * L + start_m
    lse = tl.load(Lse + row0 + offs_ml, mask=row_mask, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty rows: p = 0
    delta = tl.load(Delta + row0 + offs_ml, mask=row_mask, other=0.0)
    K_bh = K + b * stride_kb + hk * stride_kh
    V_bh = V + b * stride_vb + hk * stride_vh
    Mask_bm = Mask + b * stride_mb + h * stride_mh + m64 * stride_ml
    rng_bm = offset + row0 * S
    DS_bm = DS + row0 * S

    dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    full_end = (S // BLOCK_N) * BLOCK_N
    hi = S
    if IS_CAUSAL:
        full_end = tl.minimum(full_end, start_m)
        hi = tl.minimum(S, start_m + BLOCK_M)
    K_blk, V_blk, Mask_blk, rng_blk, DS_blk = K_bh, V_bh, Mask_bm, rng_bm, DS_bm
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, K_blk, V_blk, Mask_blk, rng_blk, DS_blk, start_n, offs_m, offs_ml,
                       offs_n, offs_e, offs_ev, L, S, stride_ks, stride_vs, stride_ml, stride_ms, qk_scale, dropout_p,
                       drop_scale, seed, HEAD_E, HEAD_EV, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, NEED_DS, False,
                       DOT_PRECISION)
        K_blk += BLOCK_N * stride_ks
        V_blk += BLOCK_N * stride_vs
        Mask_blk += BLOCK_N * stride_ms
        rng_blk += BLOCK_N
        DS_blk += BLOCK_N
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, K_blk, V_blk, Mask_blk, rng_blk, DS_blk, start_n, offs_m, offs_ml,
                       offs_n, offs_e, offs_ev, L, S, stride_ks, stride_vs, stride_ml, stride_ms, qk_scale, dropout_p,
                       drop_scale, seed, HEAD_E, HEAD_EV, IS_CAUSAL, HAS_MASK, HAS_DROPOUT, NEED_DS, True,
                       DOT_PRECISION)
        K_blk += BLOCK_N * stride_ks
        V_blk += BLOCK_N * stride_vs
        Mask_blk += BLOCK_N * stride_ms
        rng_blk += BLOCK_N
        DS_blk += BLOCK_N
    tl.store(DQ + row0 * HEAD_E + offs_ml[:, None] * HEAD_E + offs_e[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_mask[:, None] & (offs_e[None, :] < HEAD_E))


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_d(e: int) -> int:
    return max(16, triton.next_power_of_2(e))


def _table_key(block_e: int, block_ev: int, dtype: torch.dtype) -> tuple[int, int]:
    return max(64, block_e, block_ev), 2 if dtype.itemsize == 2 else 4


def _config(table: dict, block_e: int, block_ev: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a kernel, from its table (fixed 16 x 16 in the interpreter)."""
    if _interpret():
        return _INTERPRET_BLOCK, _INTERPRET_BLOCK, 4, 1
    return table[_table_key(block_e, block_ev, dtype)]


def _unit_last(t: Tensor) -> Tensor:
    """t itself when its last dim is unit-strided (or of size <= 1), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]
                  ) -> tuple[int, int, int, int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"sdpa: {name} must be 4-D (B, H, len, dim), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"sdpa: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"sdpa: {name} must be on {q.device}, got {t.device}")
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"sdpa: q must be float16, bfloat16 or float32, got {q.dtype}")
    B, Hq, L, E = q.shape
    _, Hk, S, Ev = v.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"sdpa: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != Hk or Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"sdpa: k and v must have the same number of heads dividing q's {Hq}, got k {k.shape[1]}, "
                         f"v {Hk}")
    if k.shape[2] != S:
        raise ValueError(f"sdpa: k and v must have the same length, got k {k.shape[2]}, v {S}")
    if k.shape[3] != E:
        raise ValueError(f"sdpa: k's head dim must equal q's {E}, got {k.shape[3]}")
    limit = unsupported(q, v)
    if limit is not None:
        raise ValueError(f"sdpa: {limit}")
    if attn_mask is not None:
        if attn_mask.dim() != 4:
            raise ValueError(f"sdpa: attn_mask must be 4-D, got shape {tuple(attn_mask.shape)}")
        if not attn_mask.is_floating_point():
            raise TypeError(f"sdpa: attn_mask must be a float tensor (additive), got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"sdpa: attn_mask must be on {q.device}, got {attn_mask.device}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, Hq, L, S))
        except RuntimeError:
            raise ValueError(f"sdpa: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"{(B, Hq, L, S)}") from None
    return B, Hq, Hk, L, S, E, Ev


def _dropout_args(dropout_p: float) -> tuple[float, float]:
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"sdpa: dropout_p must be in [0, 1], got {dropout_p}")
    return float(dropout_p), (0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p))


def _mask_args(attn_mask: Optional[Tensor], q: Tensor, shape: tuple[int, int, int, int]) -> tuple[Tensor, list[int]]:
    if attn_mask is None:
        return q, [0, 0, 0, 0]
    m = attn_mask.expand(shape)
    return m, list(m.stride())


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def sdpa_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool, scale: float,
             dropout_p: float, seed: int, offset: int, allow_tf32: bool = False) -> tuple[Tensor, Tensor]:
    """out = softmax(q k^T * scale + mask) v with dropout (see the module docstring). Returns out (B, Hq, L, Ev) in
    q's dtype and lse (B, Hq, L) float32 (-inf for rows with no visible key, whose out is 0)."""
    B, Hq, Hk, L, S, E, Ev = _check_inputs(q, k, v, attn_mask)
    p, drop_scale = _dropout_args(dropout_p)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = torch.empty((B, Hq, L, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    mask, ms = _mask_args(attn_mask, q, (B, Hq, L, S))
    block_e, block_ev = _block_d(E), _block_d(Ev)
    bm, bn, warps, stages = _config(_FWD_CONFIGS, block_e, block_ev, q.dtype)
    _attn_fwd_kernel[(triton.cdiv(L, bm), B * Hq)](
        q, k, v, mask, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *ms,
        Hq, L, S, Hq // Hk, scale * LOG2E, p, drop_scale, seed, offset,
        HEAD_E=E, HEAD_EV=Ev, BLOCK_E=block_e, BLOCK_EV=block_ev, BLOCK_M=bm, BLOCK_N=bn, IS_CAUSAL=bool(is_causal),
        HAS_MASK=attn_mask is not None, HAS_DROPOUT=p > 0.0, DOT_PRECISION=_precision(q.dtype, allow_tf32),
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def sdpa_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, attn_mask: Optional[Tensor],
             is_causal: bool, scale: float, dropout_p: float, seed: int, offset: int, need_dmask: bool,
             allow_tf32: bool = False) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients of sdpa_fwd (same arguments; out and lse from it). Returns dq, dk, dv (contiguous, shaped like q,
    k, v) and, when need_dmask, ds (B, Hq, L, S) float32, the gradient of the additive mask before it is reduced to
    the mask's shape (None otherwise)."""
    B, Hq, Hk, L, S, E, Ev = _check_inputs(q, k, v, attn_mask)
    for name, t, shape, dtype in (("dout", dout, (B, Hq, L, Ev), q.dtype), ("out", out, (B, Hq, L, Ev), q.dtype),
                                  ("lse", lse, (B, Hq, L), torch.float32)):
        if tuple(t.shape) != shape:
            raise ValueError(f"sdpa: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"sdpa: {name} must have dtype {dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"sdpa: {name} must be on {q.device}, got {t.device}")
    p, drop_scale = _dropout_args(dropout_p)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    dout, out, lse = _unit_last(dout), _unit_last(out), lse.contiguous()
    dq = torch.empty((B, Hq, L, E), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hk, S, E), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, Hk, S, Ev), dtype=q.dtype, device=q.device)
    ds = None
    if need_dmask:
        alloc = torch.zeros if is_causal or L == 0 or S == 0 else torch.empty
        ds = alloc((B, Hq, L, S), dtype=torch.float32, device=q.device)
    if B * Hq == 0 or L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), ds
    mask, ms = _mask_args(attn_mask, q, (B, Hq, L, S))
    block_e, block_ev = _block_d(E), _block_d(Ev)
    precision = _precision(q.dtype, allow_tf32)
    flags = dict(IS_CAUSAL=bool(is_causal), HAS_MASK=attn_mask is not None, HAS_DROPOUT=p > 0.0,
                 DOT_PRECISION=precision)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), *ms, dout.stride(0), dout.stride(1), dout.stride(2))

    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    pre_m = _INTERPRET_BLOCK if _interpret() else _PRE_BLOCK_M
    _attn_bwd_preprocess_kernel[(triton.cdiv(L, pre_m), B * Hq)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), Hq, L, HEAD_EV=Ev, BLOCK_EV=block_ev, BLOCK_M=pre_m, num_warps=4)

    bm, bn, warps, stages = _config(_DKDV_CONFIGS, block_e, block_ev, q.dtype)
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, bn), B * Hk)](
        q, k, v, mask, dout, lse, delta, dk, dv, *strides,
        Hq, Hk, L, S, Hq // Hk, scale, scale * LOG2E, p, drop_scale, seed, offset,
        HEAD_E=E, HEAD_EV=Ev, BLOCK_E=block_e, BLOCK_EV=block_ev, BLOCK_M=bm, BLOCK_N=bn, **flags,
        num_warps=warps, num_stages=stages,
    )
    bm, bn, warps, stages = _config(_DQ_CONFIGS, block_e, block_ev, q.dtype)
    _attn_bwd_dq_kernel[(triton.cdiv(L, bm), B * Hq)](
        q, k, v, mask, dout, lse, delta, dq, q if ds is None else ds, *strides,
        Hq, L, S, Hq // Hk, scale, scale * LOG2E, p, drop_scale, seed, offset,
        HEAD_E=E, HEAD_EV=Ev, BLOCK_E=block_e, BLOCK_EV=block_ev, BLOCK_M=bm, BLOCK_N=bn, NEED_DS=need_dmask,
        **flags, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv, ds


_STRIDES_Q_K_V_MASK = ("stride_qb", "stride_qh", "stride_ql", "stride_kb", "stride_kh", "stride_ks", "stride_vb",
                       "stride_vh", "stride_vs", "stride_mb", "stride_mh", "stride_ml", "stride_ms")
_DROPOUT_SIG = {"dropout_p": "fp32", "drop_scale": "fp32", "seed": "i64", "offset": "i64"}


def _spec(fn, pointers: dict[str, str], ints: tuple[str, ...], floats: tuple[str, ...], constexprs: dict,
          num_warps: int, num_stages: int) -> AOTSpec:
    sig = dict(pointers)
    sig.update({name: "i32" for name in ints})
    sig.update({name: "fp32" for name in floats})
    sig.update(_DROPOUT_SIG if "dropout_p" in fn.arg_names else {})
    sig.update({name: "constexpr" for name in constexprs})
    aligned = tuple(name for name in ints if name.startswith("stride_") and name != "stride_ms")
    return AOTSpec(fn, {name: sig[name] for name in fn.arg_names}, constexprs, num_warps, num_stages, aligned)


def _kernel_specs(dt: str, torch_dtype: torch.dtype, e: int, ev: int, causal: bool, mask: bool, dropout: bool,
                  need_ds: bool, precision: str) -> list[AOTSpec]:
    """The forward, dk/dv and dq kernels as sdpa_fwd / sdpa_bwd launch them for one dtype, head dims and flags."""
    block_e, block_ev = _block_d(e), _block_d(ev)
    flags = {"HEAD_E": e, "HEAD_EV": ev, "BLOCK_E": block_e, "BLOCK_EV": block_ev}
    tail = {"IS_CAUSAL": causal, "HAS_MASK": mask, "HAS_DROPOUT": dropout}
    if mask:  # a mask contiguous in its last dim: the JIT specializes stride_ms == 1
        flags["stride_ms"] = 1
    key = _table_key(block_e, block_ev, torch_dtype)
    bwd_strides = _STRIDES_Q_K_V_MASK + ("stride_db", "stride_dh", "stride_dl")
    out = []
    bm, bn, w, s = _FWD_CONFIGS[key]
    out.append(_spec(_attn_fwd_kernel, {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Mask": f"*{dt}",
                                        "Out": f"*{dt}", "Lse": "*fp32"},
                     _STRIDES_Q_K_V_MASK + ("Hq", "L", "S", "group"), ("qk_scale",),
                     {**flags, "BLOCK_M": bm, "BLOCK_N": bn, **tail, "DOT_PRECISION": precision}, w, s))
    bwd_ptrs = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Mask": f"*{dt}", "DOut": f"*{dt}", "Lse": "*fp32",
                "Delta": "*fp32"}
    bm, bn, w, s = _DKDV_CONFIGS[key]
    out.append(_spec(_attn_bwd_dkdv_kernel, {**bwd_ptrs, "DK": f"*{dt}", "DV": f"*{dt}"},
                     bwd_strides + ("Hq", "Hk", "L", "S", "group"), ("sm_scale", "qk_scale"),
                     {**flags, "BLOCK_M": bm, "BLOCK_N": bn, **tail, "DOT_PRECISION": precision}, w, s))
    bm, bn, w, s = _DQ_CONFIGS[key]
    out.append(_spec(_attn_bwd_dq_kernel, {**bwd_ptrs, "DQ": f"*{dt}", "DS": "*fp32"},
                     bwd_strides + ("Hq", "L", "S", "group"), ("sm_scale", "qk_scale"),
                     {**flags, "BLOCK_M": bm, "BLOCK_N": bn, **tail, "NEED_DS": need_ds,
                      "DOT_PRECISION": precision}, w, s))
    return out


def _aot_specs() -> list[AOTSpec]:
    """Every block configuration the launchers pick: float16 / bfloat16 / float32 x head dims 64, 128 and 256
    (256: bfloat16, float32), plain; the flag variants at bfloat16: causal (64, 128), and at head dim 128 a mask
    with its gradient, dropout, causal with dropout; float32 with tf32 at head dim 64."""
    out: list[AOTSpec] = []
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for dt, torch_dtype in dtypes.items():
        for hd in (64, 128):
            out += _kernel_specs(dt, torch_dtype, hd, hd, False, False, False, False, "ieee")
            out.append(AOTSpec(_attn_bwd_preprocess_kernel,
                               {"Out": f"*{dt}", "DOut": f"*{dt}", "Delta": "*fp32", "stride_ob": "i32",
                                "stride_oh": "i32", "stride_ol": "i32", "stride_db": "i32", "stride_dh": "i32",
                                "stride_dl": "i32", "Hq": "i32", "L": "i32", "HEAD_EV": "constexpr",
                                "BLOCK_EV": "constexpr", "BLOCK_M": "constexpr"},
                               {"HEAD_EV": hd, "BLOCK_EV": hd, "BLOCK_M": _PRE_BLOCK_M}, num_warps=4,
                               divisible_by_16=("stride_ob", "stride_oh", "stride_ol", "stride_db", "stride_dh",
                                                "stride_dl")))
    for dt in ("bf16", "fp32"):
        out += _kernel_specs(dt, dtypes[dt], 256, 256, False, False, False, False, "ieee")
    for hd in (64, 128):
        out += _kernel_specs("bf16", torch.bfloat16, hd, hd, True, False, False, False, "ieee")
    for causal, mask, dropout, need_ds in ((False, True, False, True), (False, False, True, False),
                                           (True, False, True, False)):
        out += _kernel_specs("bf16", torch.bfloat16, 128, 128, causal, mask, dropout, need_ds, "ieee")
    out += _kernel_specs("fp32", torch.float32, 64, 64, False, False, False, False, "tf32")
    return out


AOT_SPECS: list[AOTSpec] = _aot_specs()
