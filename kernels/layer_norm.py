"""Layer norm over the last dim of a contiguous (M, N) matrix, forward and backward, in Triton.

Forward:  mean = sum(x) / N,  var = sum((x - mean)^2) / N (biased),  rstd = 1 / sqrt(var + eps),
          xhat = (x - mean) * rstd,  y = xhat * weight + bias.
Backward: g = dy * weight,  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
          dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy).
Statistics and all arithmetic are float32; inputs and outputs are float32, float16 or bfloat16.

A row that fits in one block (N <= MAX_FUSED_FWD / MAX_FUSED_BWD) is held in registers; wider rows are walked in
chunks twice (statistics, then normalise / dx). dweight and dbias are deterministic: each backward program sums its
group of rows into a float32 partial row, and a second kernel sums the partials over the groups.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .aot import AOTSpec

# Rows of up to MAX_FUSED_FWD (forward) / MAX_FUSED_BWD (backward) elements are held in registers as float32
# whatever the storage dtype (forward: x, weight, bias; backward: x, dy, weight and the dweight / dbias sums, so its
# cap is half); wider rows take the looped kernels with chunks of LOOP_BLOCK elements. Larger caps spill registers.
MAX_FUSED_FWD = 16384
MAX_FUSED_BWD = 8192
LOOP_BLOCK = 4096
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_REDUCE_BLOCK_G = 32
_REDUCE_BLOCK_N = 64


@triton.jit
def _scaled_stats(X, N, eps, offs, BLOCK_N: tl.constexpr):
    """mean, rstd of a row whose sums overflow although its x are finite: the statistics of x / s with
    s = 2^floor(log2 max|x|) (exact), scaled back; NaN when the row holds inf or NaN (as torch gives)."""
    amax = 0.0
    for start in range(0, N, BLOCK_N):
        x = tl.load(X + start + offs, mask=start + offs < N, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0), propagate_nan=tl.PropagateNan.ALL)
    s = tl.math.exp2(tl.floor(tl.math.log2(amax)))
    total = 0.0
    for start in range(0, N, BLOCK_N):
        x = tl.load(X + start + offs, mask=start + offs < N, other=0.0).to(tl.float32)
        total += tl.sum(x / s, axis=0)
    ms = total / N
    m2 = 0.0
    for start in range(0, N, BLOCK_N):
        mask = start + offs < N
        x = tl.load(X + start + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x / s - ms, 0.0)
        m2 += tl.sum(d * d, axis=0)
    rstd = 1.0 / (s * tl.sqrt(m2 / N + eps / (s * s)))
    finite = amax < float("inf")
    return tl.where(finite, ms * s, float("nan")), tl.where(finite, rstd, float("nan"))


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) row stride stride_x, x.dtype
    Y,  # (M, N) row stride stride_y, x.dtype
    W,  # (N,) x.dtype; read only if HAS_WEIGHT
    B,  # (N,) x.dtype; read only if HAS_BIAS
    Mean,  # (M,) float32
    Rstd,  # (M,) float32
    stride_x,
    stride_y,
    N,
    eps,
    BLOCK_N: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LOOPED: tl.constexpr,
):
    """One program per row. LOOPED: chunks of BLOCK_N, statistics merged chunk by chunk (Chan et al.)."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    offs = tl.arange(0, BLOCK_N)
    if LOOPED:
        mean = 0.0
        m2 = 0.0
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            n = start + n_b
            mean_b = tl.sum(x, axis=0) / n_b
            d = tl.where(mask, x - mean_b, 0.0)
            delta = mean_b - mean
            mean += delta * (n_b / n)
            m2 += tl.sum(d * d, axis=0) + delta * delta * (start * (n_b / n))
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        if m2 == float("inf") or mean != mean:  # a sum overflowed (or inf/NaN in the row)
            mean, rstd = _scaled_stats(X, N, eps, offs, BLOCK_N)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        mask = offs < N
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        if var == float("inf"):  # a sum overflowed (or inf in the row): statistics of the scaled row
            mean, rstd = _scaled_stats(X, N, eps, offs, BLOCK_N)
            xc = tl.where(mask, x - mean, 0.0)
        y = xc * rstd
        if HAS_WEIGHT:
            y *= tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) row stride stride_dy, x.dtype
    X,  # (M, N) row stride stride_x, x.dtype
    DX,  # (M, N) row stride stride_dx, x.dtype
    W,  # (N,) x.dtype; read only if HAS_WEIGHT
    Mean,  # (M,) float32
    Rstd,  # (M,) float32
    DWp,  # (groups, N) float32 partial dweight, zero-filled if LOOPED; written only if COMPUTE_DW
    DBp,  # (groups, N) float32 partial dbias, zero-filled if LOOPED; written only if COMPUTE_DB
    stride_dy,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_program,
    BLOCK_N: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    LOOPED: tl.constexpr,
):
    """Program g handles rows [g * rows_per_program, (g + 1) * rows_per_program) and writes their sums of
    dy * xhat and dy into row g of DWp and DBp. LOOPED: chunks of BLOCK_N, partials accumulated in place."""
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    DWp += pid * N
    DBp += pid * N
    offs = tl.arange(0, BLOCK_N)
    if LOOPED:
        for row in range(row_start, row_end):
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            x_row = X + row * stride_x
            dy_row = DY + row * stride_dy
            dx_row = DX + row * stride_dx
            sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
            sum_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + offs
                mask = cols < N
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                g = dy
                if HAS_WEIGHT:
                    g *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                sum_g += g
                sum_gx += g * xhat
                if COMPUTE_DW:
                    tl.store(DWp + cols, tl.load(DWp + cols, mask=mask) + dy * xhat, mask=mask)
                if COMPUTE_DB:
                    tl.store(DBp + cols, tl.load(DBp + cols, mask=mask) + dy, mask=mask)
            c_g = tl.sum(sum_g, axis=0) / N
            c_gx = tl.sum(sum_gx, axis=0) / N
            for start in range(0, N, BLOCK_N):
                cols = start + offs
                mask = cols < N
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean) * rstd
                g = dy
                if HAS_WEIGHT:
                    g *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                dx = (g - c_g - xhat * c_gx) * rstd
                tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
    else:
        mask = offs < N
        if HAS_WEIGHT:
            w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy
            if HAS_WEIGHT:
                g *= w
            c_g = tl.sum(g, axis=0) / N
            c_gx = tl.sum(g * xhat, axis=0) / N
            dx = (g - c_g - xhat * c_gx) * rstd
            tl.store(DX + row * stride_dx + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw += dy * xhat
            if COMPUTE_DB:
                db += dy
        if COMPUTE_DW:
            tl.store(DWp + offs, dw, mask=mask)
        if COMPUTE_DB:
            tl.store(DBp + offs, db, mask=mask)


@triton.jit
def _sum_partials_kernel(
    P,  # (G, N) float32
    Out,  # (N,) out dtype
    G,
    N,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Out[j] = sum_g P[g, j] for the BLOCK_N columns of this program, summed in float32."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g[:, None] < G) & col_mask[None, :]
        acc += tl.load(P + g[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=col_mask)


def _block_n(N: int, max_fused: int) -> tuple[int, bool]:
    """(BLOCK_N, LOOPED) for rows of N elements."""
    if N <= max_fused:
        return triton.next_power_of_2(N), False
    return LOOP_BLOCK, True


def _num_warps(block_n: int) -> int:
    """One warp per 512 elements of a block, 1 to 16."""
    return min(max(block_n // 512, 1), 16)


def _check(name: str, t: Optional[Tensor], x: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if t is None:
        return
    if t.shape != shape:
        raise ValueError(f"layer_norm: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"layer_norm: {name} must have dtype {dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"layer_norm: {name} must be on {x.device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"layer_norm: {name} must be contiguous")


def _check_x(x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"layer_norm: x must be 2-D (M, N), got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"layer_norm: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError("layer_norm: the normalized size N must be positive, got 0")
    if not x.is_contiguous():
        raise ValueError("layer_norm: x must be contiguous")


def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """y = (x - mean) * rstd * weight + bias over rows of x (M, N). Returns y (M, N) in x.dtype, mean (M,) and
    rstd (M,) in float32."""
    _check_x(x)
    M, N = x.shape
    _check("weight", weight, x, (N,), x.dtype)
    _check("bias", bias, x, (N,), x.dtype)
    y = torch.empty_like(x)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return y, mean, rstd
    block_n, looped = _block_n(N, MAX_FUSED_FWD)
    _layer_norm_fwd_kernel[(M,)](
        x, y, x if weight is None else weight, x if bias is None else bias, mean, rstd,
        x.stride(0), y.stride(0), N, eps,
        BLOCK_N=block_n, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, LOOPED=looped,
        num_warps=_num_warps(block_n),
    )
    return y, mean, rstd


def _num_groups(M: int, num_warps: int, device: torch.device) -> int:
    """Programs that share the rows when dweight/dbias are summed: about two blocks' worth per SM."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return min(M, sms * max(32 // num_warps, 2))
    return min(M, 4)


def _sum_partials(partial: Tensor, dtype: torch.dtype) -> Tensor:
    G, N = partial.shape
    out = torch.empty(N, dtype=dtype, device=partial.device)
    _sum_partials_kernel[(triton.cdiv(N, _REDUCE_BLOCK_N),)](
        partial, out, G, N, BLOCK_G=_REDUCE_BLOCK_G, BLOCK_N=_REDUCE_BLOCK_N, num_warps=4)
    return out


def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   need_dweight: bool, need_dbias: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of layer_norm_fwd. Returns dx (M, N), dweight (N,) and dbias (N,) in x.dtype, or None where
    not needed."""
    _check_x(x)
    M, N = x.shape
    _check("dy", dy, x, (M, N), x.dtype)
    _check("weight", weight, x, (N,), x.dtype)
    _check("mean", mean, x, (M,), torch.float32)
    _check("rstd", rstd, x, (M,), torch.float32)
    if need_dweight and weight is None:
        raise ValueError("layer_norm: need_dweight is set but weight is None")
    dx = torch.empty_like(x)
    if M == 0:
        zeros = torch.zeros(N, dtype=x.dtype, device=x.device)
        return dx, zeros if need_dweight else None, zeros.clone() if need_dbias else None
    block_n, looped = _block_n(N, MAX_FUSED_BWD)
    num_warps = _num_warps(block_n)
    groups = _num_groups(M, num_warps, x.device) if (need_dweight or need_dbias) else M
    rows_per_program = triton.cdiv(M, groups)
    groups = triton.cdiv(M, rows_per_program)
    alloc = torch.zeros if looped else torch.empty
    dw_partial = alloc((groups, N), dtype=torch.float32, device=x.device) if need_dweight else mean
    db_partial = alloc((groups, N), dtype=torch.float32, device=x.device) if need_dbias else mean
    _layer_norm_bwd_kernel[(groups,)](
        dy, x, dx, x if weight is None else weight, mean, rstd, dw_partial, db_partial,
        dy.stride(0), x.stride(0), dx.stride(0), M, N, rows_per_program,
        BLOCK_N=block_n, HAS_WEIGHT=weight is not None, COMPUTE_DW=need_dweight, COMPUTE_DB=need_dbias,
        LOOPED=looped, num_warps=num_warps,
    )
    dweight = _sum_partials(dw_partial, x.dtype) if need_dweight else None
    dbias = _sum_partials(db_partial, x.dtype) if need_dbias else None
    return dx, dweight, dbias


def _fwd_spec(dtype: str, block_n: int, has_weight: bool, has_bias: bool, looped: bool) -> AOTSpec:
    sig = {"X": f"*{dtype}", "Y": f"*{dtype}", "W": f"*{dtype}", "B": f"*{dtype}", "Mean": "*fp32",
           "Rstd": "*fp32", "stride_x": "i64", "stride_y": "i64", "N": "i32", "eps": "fp32",
           "BLOCK_N": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr", "LOOPED": "constexpr"}
    return AOTSpec(_layer_norm_fwd_kernel, sig,
                   {"BLOCK_N": block_n, "HAS_WEIGHT": has_weight, "HAS_BIAS": has_bias, "LOOPED": looped},
                   num_warps=_num_warps(block_n))


def _bwd_spec(dtype: str, block_n: int, has_weight: bool, dw: bool, db: bool, looped: bool) -> AOTSpec:
    sig = {"DY": f"*{dtype}", "X": f"*{dtype}", "DX": f"*{dtype}", "W": f"*{dtype}", "Mean": "*fp32",
           "Rstd": "*fp32", "DWp": "*fp32", "DBp": "*fp32", "stride_dy": "i64", "stride_x": "i64",
           "stride_dx": "i64", "M": "i32", "N": "i32", "rows_per_program": "i32",
           "BLOCK_N": "constexpr", "HAS_WEIGHT": "constexpr", "COMPUTE_DW": "constexpr", "COMPUTE_DB": "constexpr",
           "LOOPED": "constexpr"}
    return AOTSpec(_layer_norm_bwd_kernel, sig,
                   {"BLOCK_N": block_n, "HAS_WEIGHT": has_weight, "COMPUTE_DW": dw, "COMPUTE_DB": db,
                    "LOOPED": looped},
                   num_warps=_num_warps(block_n))


def _aot_specs() -> list[AOTSpec]:
    """Each kernel at the caps, the looped chunk and two benchmark widths, every dtype with weight and bias; the
    weightless / biasless variants at the caps and looped in float32 and bfloat16."""
    out: list[AOTSpec] = []
    for dtype in ("fp32", "fp16", "bf16"):
        for block_n in (1024, 4096, MAX_FUSED_FWD):
            out.append(_fwd_spec(dtype, block_n, True, True, False))
        out.append(_fwd_spec(dtype, LOOP_BLOCK, True, True, True))
        for block_n in (1024, MAX_FUSED_BWD):
            out.append(_bwd_spec(dtype, block_n, True, True, True, False))
        out.append(_bwd_spec(dtype, LOOP_BLOCK, True, True, True, True))
    for dtype in ("fp32", "bf16"):
        for looped in (False, True):
            fwd_block, bwd_block = (LOOP_BLOCK, LOOP_BLOCK) if looped else (MAX_FUSED_FWD, MAX_FUSED_BWD)
            out.append(_fwd_spec(dtype, fwd_block, False, False, looped))
            out.append(_fwd_spec(dtype, fwd_block, True, False, looped))
            out.append(_bwd_spec(dtype, bwd_block, False, False, False, looped))
            out.append(_bwd_spec(dtype, bwd_block, True, True, False, looped))
    for dtype in ("fp32", "fp16", "bf16"):
        out.append(AOTSpec(_sum_partials_kernel, {"P": "*fp32", "Out": f"*{dtype}", "G": "i32", "N": "i32",
                                                  "BLOCK_G": "constexpr", "BLOCK_N": "constexpr"},
                           {"BLOCK_G": _REDUCE_BLOCK_G, "BLOCK_N": _REDUCE_BLOCK_N}, num_warps=4))
    return out


AOT_SPECS: list[AOTSpec] = _aot_specs()
