"""fastseq.nn.LSTM, GRU, RNN: drop-in for torch's (constructor, parameter names, initialisation, state_dict), with
forward on fastseq's sequence kernels (fastseq.functional.lstm / gru / rnn_tanh / rnn_relu); and PeepholeLSTM,
LSTM with peephole connections (fastseq.functional.peephole_lstm).

They derive from torch.nn.RNNBase, not from torch.nn.LSTM / GRU / RNN: torch.compile refuses to trace instances of
those three classes (unless torch._dynamo.config.allow_rnn is set), and these modules trace into one graph. What
torch's three classes add to RNNBase (their constructors, LSTM's cell-state checks and permutation) is taken over
here unchanged, so arguments, errors, parameters and state_dict are torch's."""
from __future__ import annotations

import operator

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .. import functional as F
from .. import modes

_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def _permute(states: tuple[Tensor, ...], permutation: Tensor | None) -> tuple[Tensor, ...]:
    return states if permutation is None else tuple(s.index_select(1, permutation) for s in states)


class _Recurrent:
    """forward for torch.nn.RNNBase subclasses, with torch's semantics: batched (3-D) and unbatched (2-D) input,
    batch_first, PackedSequence in and out (the state permuted by its sorted_indices / unsorted_indices), hx None
    for zeros; torch's own argument checks (check_forward_args), then fastseq.functional."""

    fastseq_mode: str | None = None  # the mode of fastseq/modes.py, where not the one torch's mode names

    def forward(self, input, hx=None):
        # the parameters as they are now, read straight from _parameters (also under torch.func.functional_call):
        # ~0.5 us where torch's _update_flat_weights takes ~5.5; _flat_weights (which torch's checks read) follows
        params = self._parameters
        weights = [params[n] if n in params else getattr(self, n, None) for n in self._flat_weights_names]
        if any(map(operator.is_not, weights, self._flat_weights)):
            self._init_flat_weights()
        mode = self.fastseq_mode or _MODES[self.mode]
        lstm = modes.mode(mode).cell
        dirs = 2 if self.bidirectional else 1
        hout = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batched, n = True, int(batch_sizes[0])
        else:
            data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D tensor "
                                 f"instead")
            batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not batched:
                data = data.unsqueeze(batch_dim)
            n = data.size(batch_dim)
        if hx is None:
            states = (data.new_zeros(self.num_layers * dirs, n, hout),)
            if lstm:
                states += (data.new_zeros(self.num_layers * dirs, n, self.hidden_size),)
        else:
            states = tuple(hx) if lstm else (hx,)
            if lstm and len(states) != 2:
                raise RuntimeError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got {len(states)}")
            if not packed:
                want = 3 if batched else 2
                if any(s.dim() != want for s in states):
                    dims = ", ".join(f"{s.dim()}-D" for s in states)
                    what = "hx and cx" if lstm else "hx"
                    raise RuntimeError(f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, {what} should "
                                       f"also be {want}-D but got ({dims}) tensor{'s' if lstm else ''}")
                if not batched:
                    states = tuple(s.unsqueeze(1) for s in states)
        self.check_forward_args(data, states if lstm else states[0], batch_sizes)
        states = _permute(states, sorted_indices)
        fn = getattr(F, mode)
        out = fn(data, states if lstm else states[0], weights, self.bias, self.num_layers,
                 float(self.dropout), self.training, self.bidirectional, self.batch_first, batch_sizes=batch_sizes)
        output, hidden = out[0], tuple(out[1:])
        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            hidden = _permute(hidden, unsorted_indices)
        elif not batched:
            output = output.squeeze(batch_dim)
            hidden = tuple(h.squeeze(1) for h in hidden)
        return output, hidden if lstm else hidden[0]


class LSTM(_Recurrent, torch.nn.RNNBase):
    """torch.nn.LSTM (same arguments incl. proj_size, parameters weight_ih_l{k}[_reverse], weight_hh_..., bias_...,
    weight_hr_..., initialisation and state_dict) on fastseq's sequence kernels: per step
    gates = x W_ih^T + b_ih + h W_hh^T + b_hh (i, f, g, o), c' = f*c + i*g, h' = o*tanh(c') (times W_hr^T with
    proj_size). LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None); forward(input, hx=None) -> output, (h_n, c_n)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__("LSTM", *args, **kwargs)

    # torch.nn.LSTM's own: the cell state c has hidden_size features (h has proj_size with projections).
    get_expected_cell_size = torch.nn.LSTM.get_expected_cell_size
    check_forward_args = torch.nn.LSTM.check_forward_args
    permute_hidden = torch.nn.LSTM.permute_hidden


class PeepholeLSTM(LSTM):
    """An LSTM with peephole connections (Gers, Schraudolph & Schmidhuber 2002) over whole sequences: LSTM's
    arguments, parameters and forward (proj_size, bidirectional, packed sequences, h0/c0 included), plus
    weight_peephole_l{k}[_reverse] (3, hidden_size) = [p_i; p_f; p_o] per layer and direction, with
    i = sigmoid(.. + p_i*c), f = sigmoid(.. + p_f*c), o = sigmoid(.. + p_o*c'): a layer of
    fastseq.nn.PeepholeLSTMCell steps. Every parameter starts uniform in (-1/sqrt(hidden_size), 1/sqrt(hidden_size));
    the flat parameter order is LSTM's with w_peephole last per layer direction."""

    fastseq_mode = "peephole_lstm"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        like = self.weight_ih_l0
        for i, names in enumerate(self._all_weights):
            layer, direction = divmod(i, 2 if self.bidirectional else 1)
            name = f"weight_peephole_l{layer}{'_reverse' if direction else ''}"
            setattr(self, name, torch.nn.Parameter(like.new_empty(3, self.hidden_size)))
            names.append(name)
        self._flat_weights_names = [name for names in self._all_weights for name in names]
        self._init_flat_weights()
        self.reset_parameters()  # RNNBase's: every parameter, the peephole weights included

    def flatten_parameters(self) -> None:
        """Nothing to do: cuDNN's flat weight buffer serves torch's LSTM kernels, not these."""


def _no_proj_size(kwargs: dict) -> None:
    if "proj_size" in kwargs:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


class GRU(_Recurrent, torch.nn.RNNBase):
    """torch.nn.GRU (same arguments, parameters, initialisation and state_dict) on fastseq's sequence kernels:
    r, z = sigmoid(..), n = tanh(W_in x + b_in + r*(W_hn h + b_hn)), h' = (1-z)*n + z*h.
    GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0, bidirectional=False,
    device=None, dtype=None); forward(input, hx=None) -> output, h_n."""

    def __init__(self, *args, **kwargs) -> None:
        _no_proj_size(kwargs)
        super().__init__("GRU", *args, **kwargs)


class RNN(_Recurrent, torch.nn.RNNBase):
    """torch.nn.RNN (same arguments incl. nonlinearity, parameters, initialisation and state_dict) on fastseq's
    sequence kernels: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh), or relu. RNN(input_size, hidden_size,
    num_layers=1, nonlinearity="tanh", bias=True, batch_first=False, dropout=0.0, bidirectional=False, device=None,
    dtype=None); forward(input, hx=None) -> output, h_n."""

    def __init__(self, *args, **kwargs) -> None:
        _no_proj_size(kwargs)
        if len(args) > 3:  # nonlinearity is the fourth positional argument, before those RNNBase takes
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(f"RNN_{self.nonlinearity.upper()}", *args, **kwargs)
