"""Reference implementations written from the equations in docs/design.md, in plain PyTorch, for any floating dtype
(float64 included). They are the oracle of the tests and the ``reference`` backend; nothing here imports the rest
of fastseq. Half-precision inputs are computed in float32 and rounded once at the end."""
from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------- layer norm
def layer_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, N) -> y (M, N), mean (M,), rstd (M,):  y = (x - mean) * rstd * weight + bias,
    mean = sum_j x_j / N, rstd = 1 / sqrt(sum_j (x_j - mean)^2 / N + eps). A row of finite x whose sums overflow
    is computed as x / s (s = 2^floor(log2 max|x|)): mean = s mean(x/s), rstd = 1 / (s sqrt(var(x/s) + eps/s^2))."""
    xc = x.to(_compute_dtype(x))
    mean = xc.mean(dim=-1)
    var = (xc - mean[:, None]).square().mean(dim=-1)
    rstd = torch.rsqrt(var + eps)
    overflow = ~(torch.isfinite(mean) & torch.isfinite(var)) & torch.isfinite(xc).all(dim=-1)
    if overflow.any():
        s = torch.where(overflow, torch.exp2(torch.floor(torch.log2(xc.detach().abs().amax(dim=-1)))), 1.0)
        xs = xc / s[:, None]
        ms = xs.mean(dim=-1)
        vs = (xs - ms[:, None]).square().mean(dim=-1)
        mean = torch.where(overflow, ms * s, mean)
        rstd = torch.where(overflow, 1.0 / (s * torch.sqrt(vs + eps / (s * s))), rstd)
    y = (xc - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(xc.dtype)
    if bias is not None:
        y = y + bias.to(xc.dtype)
    return y.to(x.dtype), mean, rstd


def layer_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of layer_norm_forward: xhat = (x - mean) * rstd, g = dy * weight,
    dx = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat)), dweight = sum_rows(dy * xhat), dbias = sum_rows(dy)."""
    cd = mean.dtype
    dyc, xhat = dy.to(cd), (x.to(cd) - mean[:, None]) * rstd[:, None]
    g = dyc * weight.to(cd) if weight is not None else dyc
    dx = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dyc * xhat).sum(0).to(x.dtype), dyc.sum(0).to(x.dtype)


def layer_norm(input: Tensor, normalized_shape: list[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Layer norm over the last len(normalized_shape) dims (differentiable, for autograd-based checks)."""
    n = 1
    for s in normalized_shape:
        n *= s
    x = input.reshape(-1, n)
    w = weight.reshape(n) if weight is not None else None
    b = bias.reshape(n) if bias is not None else None
    return layer_norm_forward(x, w, b, eps)[0].reshape(input.shape)


# ---------------------------------------------------------------------------------------------------- cell steps
def _gates(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
           ) -> tuple[Tensor, Tensor]:
    gi, gh = x @ w_ih.t(), h @ w_hh.t()
    if b_ih is not None:
        gi = gi + b_ih
    if b_hh is not None:
        gh = gh + b_hh
    return gi, gh


def lstm_cell(x: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, peephole: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """gates = x W_ih^T + b_ih + h W_hh^T + b_hh in the order i, f, g, o; i, f, o = sigmoid, g = tanh;
    c' = f*c + i*g; h' = o*tanh(c'). With peephole = [p_i; p_f; p_o] (3, H): i and f see p*c, o sees p_o*c'."""
    h, c = hx
    gi, gh = _gates(x, h, w_ih, w_hh, b_ih, b_hh)
    i, f, g, o = (gi + gh).chunk(4, dim=-1)
    if peephole is not None:
        i, f = i + peephole[0] * c, f + peephole[1] * c
    i, f, g = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g)
    c_new = f * c + i * g
    if peephole is not None:
        o = o + peephole[2] * c_new
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
             b_hh: Tensor | None = None) -> Tensor:
    """r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z likewise, n = tanh(W_in x + b_in + r*(W_hn h + b_hn)),
    h' = (1 - z)*n + z*h; gate order r, z, n."""
    gi, gh = _gates(x, h, w_ih, w_hh, b_ih, b_hh)
    ir, iz, in_ = gi.chunk(3, dim=-1)
    hr, hz, hn = gh.chunk(3, dim=-1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return (1 - z) * n + z * h


def rnn_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
             b_hh: Tensor | None = None, nonlinearity: str = "tanh") -> Tensor:
    """h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh), or relu."""
    gi, gh = _gates(x, h, w_ih, w_hh, b_ih, b_hh)
    return torch.tanh(gi + gh) if nonlinearity == "tanh" else torch.relu(gi + gh)


# ---------------------------------------------------------------------------------------------- sequence layers
def rnn_layer(mode: str, x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor | None = None, b_hh: Tensor | None = None, w_hr: Tensor | None = None,
              reverse: bool = False, batch_sizes: Tensor | None = None, peephole: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one recurrent layer over a sequence, a time loop over lstm_cell / gru_cell / rnn_cell.
    mode: "lstm", "peephole_lstm" (lstm_cell with peephole (3, H)), "gru", "rnn_tanh", "rnn_relu". x (T, N, C) time-major, or packed (sum(batch_sizes), C) with
    batch_sizes (T,) non-increasing (PackedSequence's layout): step t then updates rows [0, batch_sizes[t]) of the
    state only, the other rows keep theirs. reverse runs t = T-1 .. 0. h0 (N, Hout), c0 (N, H) (LSTM);
    w_hr (Hout, H) projects the LSTM's h: h_t = (o * tanh(c_t)) W_hr^T. Returns y (T, N, Hout) (packed:
    (sum(batch_sizes), Hout)) holding h_t of every step, h_n (N, Hout) and c_n (N, H) (None unless LSTM): the state
    of each row after its last step. Half types are computed in float32 and rounded at the end."""
    cd = _compute_dtype(x)
    x, h, c = x.to(cd), h0.to(cd), None if c0 is None else c0.to(cd)
    w_ih, w_hh = w_ih.to(cd), w_hh.to(cd)
    b_ih, b_hh, w_hr, peephole = (None if t is None else t.to(cd) for t in (b_ih, b_hh, w_hr, peephole))
    n_all = h.shape[0]
    if batch_sizes is None:
        sizes, xs = [n_all] * x.shape[0], list(x.unbind(0))
    else:
        sizes = [int(s) for s in batch_sizes.tolist()]
        xs = list(x.split(sizes, 0))
    ys: list[Tensor | None] = [None] * len(sizes)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        n = sizes[t]
        if mode in ("lstm", "peephole_lstm"):
            hn, cn = lstm_cell(xs[t], (h[:n], c[:n]), w_ih, w_hh, b_ih, b_hh, peephole)
            if w_hr is not None:
                hn = hn @ w_hr.t()
            c = cn if n == n_all else torch.cat([cn, c[n:]])
        elif mode == "gru":
            hn = gru_cell(xs[t], h[:n], w_ih, w_hh, b_ih, b_hh)
        elif mode in ("rnn_tanh", "rnn_relu"):
            hn = rnn_cell(xs[t], h[:n], w_ih, w_hh, b_ih, b_hh, mode[4:])
        else:
            raise ValueError(f"mode must be 'lstm', 'peephole_lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got {mode!r}")
        h = hn if n == n_all else torch.cat([hn, h[n:]])
        ys[t] = hn
    y = torch.stack(ys) if batch_sizes is None else torch.cat(ys)
    return y.to(h0.dtype), h.to(h0.dtype), None if c is None else c.to(h0.dtype)


# ------------------------------------------------------------------------------------------------------ attention
def sdpa_probs(q: Tensor, k: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float
               ) -> tuple[Tensor, Tensor]:
    """q (B, Hq, L, E), k (B, Hk, S, E) with Hq a multiple of Hk (query head h reads key head h // (Hq // Hk)),
    attn_mask additive, broadcastable to (B, Hq, L, S). Returns p = softmax(s) and lse = logsumexp(s) over the keys,
    s = q k^T * scale + mask (-inf above the top-left diagonal when is_causal); a row with no visible key has p = 0
    and lse = -inf; a NaN or +inf score makes its row NaN (as torch's softmax). Computed in float32 (float64 for
    float64); differentiable without NaN for finite inputs."""
    cd = _compute_dtype(q)
    kc = k.to(cd) if k.dim() < 3 else k.to(cd).repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = q.to(cd) @ kc.transpose(-1, -2) * scale
    if attn_mask is not None:
        s = s + attn_mask.to(cd)
    if is_causal:
        L, S = s.shape[-2], s.shape[-1]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    m = s.detach().amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # a +inf or NaN score makes the row NaN, as softmax
    e = torch.exp(s - m)
    den = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(den == 0, torch.ones_like(den), den)
    return p, (m + torch.log(den)).squeeze(-1)


def _drop(p: Tensor, keep: Tensor | None, dropout_p: float) -> Tensor:
    if keep is None:
        return p
    return p * keep.to(p.dtype) * (0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p))


def _sum_groups(t: Tensor, hk: int) -> Tensor:
    """(B, Hq, ...) -> (B, Hk, ...): sums the Hq // Hk query heads that share a key/value head."""
    return t.reshape(t.shape[0], hk, t.shape[1] // hk, *t.shape[2:]).sum(2)


def sdpa_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float,
                 dropout_p: float = 0.0, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """out = (p * z) v with p, lse from sdpa_probs and z = keep / (1 - dropout_p) (z = 1 when keep is None; keep is
    a bool tensor broadcastable to (B, Hq, L, S), True = kept). v (B, Hk, S, Ev). Returns out (B, Hq, L, Ev) in
    q's dtype and lse (B, Hq, L) in float32 (float64 for float64)."""
    p, lse = sdpa_probs(q, k, attn_mask, is_causal, scale)
    vc = v.to(p.dtype).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (_drop(p, keep, dropout_p) @ vc).to(q.dtype), lse


def sdpa_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, attn_mask: Tensor | None,
                  is_causal: bool, scale: float, dropout_p: float = 0.0, keep: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sdpa_forward: with D_i = dout_i . out_i, dp = z * (dout v^T), ds = p * (dp - D) (also the
    gradient of the additive mask), dv = (p z)^T dout, dq = scale * ds k, dk = scale * ds^T q (dk, dv summed over
    the query heads sharing a key head). Returns dq, dk, dv in q's dtype and ds (B, Hq, L, S) in float32 (float64
    for float64)."""
    p, _ = sdpa_probs(q, k, attn_mask, is_causal, scale)
    cd, hk, group = p.dtype, k.shape[-3], q.shape[-3] // k.shape[-3]
    do = dout.to(cd)
    kc, vc = (t.to(cd).repeat_interleave(group, dim=-3) for t in (k, v))
    dp = _drop(do @ vc.transpose(-1, -2), keep, dropout_p)
    ds = p * (dp - (do * out.to(cd)).sum(-1, keepdim=True))
    dv = _sum_groups(_drop(p, keep, dropout_p).transpose(-1, -2) @ do, hk)
    dq = ds @ kc * scale
    dk = _sum_groups(ds.transpose(-1, -2) @ q.to(cd), hk) * scale
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), ds


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, keep: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) v with torch's signature: (..., L, E), (..., S, E), (..., S, Ev); a bool mask
    (True = take part) becomes 0 / -inf; scale defaults to 1 / sqrt(E); with enable_gqa, key/value heads (dim -3)
    are repeated. Dropout only through an explicit `keep` (bool, broadcastable to (..., L, S)). Differentiable."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=attn_mask.device).masked_fill(
            ~attn_mask, float("-inf"))
    if query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    p, _ = sdpa_probs(query, key, attn_mask, is_causal, scale)
    return (_drop(p, keep, dropout_p) @ value.to(p.dtype)).to(query.dtype)
