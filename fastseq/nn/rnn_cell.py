"""fastseq.nn.LSTMCell, GRUCell, RNNCell (drop-in for torch's) and PeepholeLSTMCell (an LSTM cell with peepholes)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F


def _zeros(module: torch.nn.RNNCellBase, input: Tensor) -> Tensor:
    return torch.zeros(*input.shape[:-1], module.hidden_size, dtype=input.dtype, device=input.device)


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell (same arguments, parameters, initialisation and state_dict) on fastseq's fused step:
    gates = x W_ih^T + b_ih + h W_hh^T + b_hh (i, f, g, o), c' = f*c + i*g, h' = o*tanh(c')."""

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if hx is None:
            hx = (_zeros(self, input), _zeros(self, input))
        return F.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(torch.nn.GRUCell):
    """torch.nn.GRUCell (same arguments, parameters, initialisation and state_dict) on fastseq's fused step:
    r, z = sigmoid(..), n = tanh(W_in x + b_in + r*(W_hn h + b_hn)), h' = (1-z)*n + z*h."""

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return F.gru_cell(input, _zeros(self, input) if hx is None else hx, self.weight_ih, self.weight_hh,
                          self.bias_ih, self.bias_hh)


class RNNCell(torch.nn.RNNCell):
    """torch.nn.RNNCell (same arguments, parameters, initialisation and state_dict) on fastseq's fused step:
    h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh), or relu with nonlinearity="relu"."""

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        cell = F.rnn_tanh_cell if self.nonlinearity == "tanh" else F.rnn_relu_cell
        return cell(input, _zeros(self, input) if hx is None else hx, self.weight_ih, self.weight_hh,
                    self.bias_ih, self.bias_hh)


class PeepholeLSTMCell(torch.nn.RNNCellBase):
    """An LSTM cell with peephole connections (Gers, Schraudolph & Schmidhuber 2002): LSTMCell's parameters plus
    weight_peephole (3, hidden_size) = [p_i; p_f; p_o], with i = sigmoid(.. + p_i*c), f = sigmoid(.. + p_f*c),
    o = sigmoid(.. + p_o*c'). Every parameter starts uniform in (-1/sqrt(hidden_size), 1/sqrt(hidden_size))."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)
        self.weight_peephole = torch.nn.Parameter(torch.empty(3, hidden_size, device=device, dtype=dtype))
        self.reset_parameters()  # RNNCellBase's: every parameter, the peephole weights included

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if hx is None:
            hx = (_zeros(self, input), _zeros(self, input))
        return F.peephole_lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                    self.weight_peephole)
