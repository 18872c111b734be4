"""Functional API with the signatures of torch.nn.functional (and torch's cell functions), on fastseq's kernels.
Arguments are checked here, with errors that name the argument, the expected and the actual value."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.fastseq)
from .errors import DeviceError, DTypeError, ShapeError


def _check_floating(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise DTypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_like(t: Tensor | None, ref: Tensor, name: str, ref_name: str, shape: Sequence[int] | None = None) -> None:
    """`t` (if given) must be a tensor with ref's dtype and device, and shape `shape` if given."""
    if t is None:
        return
    _check_floating(t, name)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ShapeError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != ref.device:
        raise DeviceError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise DTypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def layer_norm(input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias over the last len(normalized_shape) dims
    (biased variance), as torch.nn.functional.layer_norm."""
    _check_floating(input, "input")
    shape = [normalized_shape] if isinstance(normalized_shape, numbers.Integral) else list(normalized_shape)
    if not shape or any(not isinstance(s, numbers.Integral) or s <= 0 for s in shape):
        raise ShapeError(f"normalized_shape must be a non-empty sequence of positive ints, got {normalized_shape}")
    if list(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ShapeError(f"Given normalized_shape={shape}, expected input with shape [*, "
                         f"{', '.join(map(str, shape))}], but got input of size {list(input.shape)}")
    _check_like(weight, input, "weight", "input", shape)
    _check_like(bias, input, "bias", "input", shape)
    return ops.layer_norm.apply(input, [int(s) for s in shape], weight, bias, float(eps))


# ---------------------------------------------------------------------------------------------------- cell steps
def _cell_weights(input: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                  gates: int) -> int:
    """Checks input (1-D or 2-D) and the cell parameters (w_ih (G*H, C), w_hh (G*H, H), b_ih, b_hh (G*H,));
    returns the hidden size H."""
    _check_floating(input, "input")
    if input.dim() not in (1, 2):
        raise ShapeError(f"input must be 1-D (input_size,) or 2-D (batch, input_size), got shape {list(input.shape)}")
    _check_floating(w_hh, "w_hh")
    if w_hh.dim() != 2 or w_hh.shape[0] != gates * w_hh.shape[1]:
        raise ShapeError(f"w_hh must have shape [{gates}*hidden_size, hidden_size], got {list(w_hh.shape)}")
    hidden = w_hh.shape[1]
    _check_floating(w_ih, "w_ih")
    if w_ih.dim() != 2 or w_ih.shape[0] != gates * hidden:
        raise ShapeError(f"w_ih must have shape [{gates * hidden}, input_size] ({gates}*hidden_size rows, "
                         f"hidden_size {hidden} from w_hh), got {list(w_ih.shape)}")
    if input.shape[-1] != w_ih.shape[1]:
        raise ShapeError(f"input has inconsistent input_size: got {input.shape[-1]}, expected {w_ih.shape[1]} "
                         f"(w_ih has shape {list(w_ih.shape)})")
    _check_like(w_ih, input, "w_ih", "input")
    _check_like(w_hh, input, "w_hh", "input")
    _check_like(b_ih, input, "b_ih", "input", (gates * hidden,))
    _check_like(b_hh, input, "b_hh", "input", (gates * hidden,))
    return hidden


def _cell_state(t: Tensor, name: str, input: Tensor, hidden: int) -> None:
    """A state tensor must be (batch, hidden_size) for 2-D input, (hidden_size,) for 1-D input."""
    _check_floating(t, name)
    shape = [*input.shape[:-1], hidden]
    if list(t.shape) != shape:
        kind = "(batch, hidden_size)" if input.dim() == 2 else "(hidden_size,) for 1-D input"
        raise ShapeError(f"{name} must have shape {shape} {kind}, got {list(t.shape)}")
    _check_like(t, input, name, "input")


def _lstm_state(hx: Sequence[Tensor], input: Tensor, hidden: int, fn: str) -> tuple[Tensor, Tensor]:
    if isinstance(hx, Tensor) or not isinstance(hx, Sequence) or len(hx) != 2:
        if isinstance(hx, Tensor):
            got = "a Tensor"
        else:
            got = f"{type(hx).__name__} of length {len(hx)}" if isinstance(hx, Sequence) else type(hx).__name__
        raise TypeError(f"{fn}: hx must be a tuple (h, c) of two tensors, got {got}")
    _cell_state(hx[0], "hx[0]", input, hidden)
    _cell_state(hx[1], "hx[1]", input, hidden)
    return hx[0], hx[1]


def _single_state(hx: Tensor, input: Tensor, hidden: int, fn: str) -> Tensor:
    if not isinstance(hx, Tensor):
        raise TypeError(f"{fn}: hx must be a Tensor (batch, hidden_size), got {type(hx).__name__}")
    _cell_state(hx, "hx", input, hidden)
    return hx


def _batched(*ts: Tensor) -> list[Tensor]:
    return [t.unsqueeze(0) for t in ts]


def _lstm(input, hx, w_ih, w_hh, b_ih, b_hh, w_peephole, fn):
    hidden = _cell_weights(input, w_ih, w_hh, b_ih, b_hh, 4)
    h, c = _lstm_state(hx, input, hidden, fn)
    _check_like(w_peephole, input, "w_peephole", "input", (3, hidden))
    x = input
    if input.dim() == 1:
        x, h, c = _batched(x, h, c)
    hy, cy = ops.rnn_cell.lstm_cell_apply(x, h, c, w_ih, w_hh, b_ih, b_hh, w_peephole)
    return (hy, cy) if input.dim() == 2 else (hy.squeeze(0), cy.squeeze(0))


def lstm_cell(input: Tensor, hx: Sequence[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One LSTM step, as torch's lstm_cell: gates = input W_ih^T + b_ih + h W_hh^T + b_hh in the order i, f, g, o;
    i, f, o = sigmoid, g = tanh; c' = f*c + i*g; h' = o*tanh(c'). hx = (h, c); input (N, C) with h, c (N, H), or
    unbatched input (C,) with h, c (H,). Returns (h', c')."""
    return _lstm(input, hx, w_ih, w_hh, b_ih, b_hh, None, "lstm_cell")


def peephole_lstm_cell(input: Tensor, hx: Sequence[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                       b_hh: Tensor | None, w_peephole: Tensor) -> tuple[Tensor, Tensor]:
    """One peephole LSTM step (Gers, Schraudolph & Schmidhuber 2002): lstm_cell with w_peephole (3, H) =
    [p_i; p_f; p_o] and i = sigmoid(.. + p_i*c), f = sigmoid(.. + p_f*c), o = sigmoid(.. + p_o*c')."""
    if w_peephole is None:
        raise TypeError("peephole_lstm_cell: w_peephole must be a Tensor (3, hidden_size), got None")
    return _lstm(input, hx, w_ih, w_hh, b_ih, b_hh, w_peephole, "peephole_lstm_cell")


def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
             b_hh: Tensor | None = None) -> Tensor:
    """One GRU step, as torch's gru_cell: r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z likewise,
    n = tanh(W_in x + b_in + r*(W_hn h + b_hn)), h' = (1-z)*n + z*h (gate order r, z, n). input (N, C) with
    hx (N, H), or (C,) with (H,)."""
    hidden = _cell_weights(input, w_ih, w_hh, b_ih, b_hh, 3)
    h = _single_state(hx, input, hidden, "gru_cell")
    if input.dim() == 1:
        return ops.rnn_cell.gru_cell_apply(*_batched(input, h), w_ih, w_hh, b_ih, b_hh).squeeze(0)
    return ops.rnn_cell.gru_cell_apply(input, h, w_ih, w_hh, b_ih, b_hh)


def _rnn(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    fn = f"rnn_{nonlinearity}_cell"
    hidden = _cell_weights(input, w_ih, w_hh, b_ih, b_hh, 1)
    h = _single_state(hx, input, hidden, fn)
    if input.dim() == 1:
        return ops.rnn_cell.rnn_cell_apply(*_batched(input, h), w_ih, w_hh, b_ih, b_hh, nonlinearity).squeeze(0)
    return ops.rnn_cell.rnn_cell_apply(input, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)


def rnn_tanh_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
                  b_hh: Tensor | None = None) -> Tensor:
    """One Elman RNN step, as torch's rnn_tanh_cell: h' = tanh(input W_ih^T + b_ih + h W_hh^T + b_hh)."""
    return _rnn(input, hx, w_ih, w_hh, b_ih, b_hh, "tanh")


def rnn_relu_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
                  b_hh: Tensor | None = None) -> Tensor:
    """One Elman RNN step, as torch's rnn_relu_cell: h' = relu(input W_ih^T + b_ih + h W_hh^T + b_hh)."""
    return _rnn(input, hx, w_ih, w_hh, b_ih, b_hh, "relu")
