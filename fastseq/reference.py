"""Reference implementations written from the equations in DESIGN.md, in plain PyTorch, for any floating dtype
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
    mean = sum_j x_j / N, rstd = 1 / sqrt(sum_j (x_j - mean)^2 / N + eps)."""
    xc = x.to(_compute_dtype(x))
    mean = xc.mean(dim=-1)
    var = (xc - mean[:, None]).square().mean(dim=-1)
    rstd = torch.rsqrt(var + eps)
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
