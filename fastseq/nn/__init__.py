"""Drop-in modules: the constructor arguments, parameter names, initialisation and state_dict of their torch.nn
counterparts, with forward on fastseq's kernels."""
from .activation import MultiheadAttention
from .normalization import LayerNorm
from .rnn import GRU, LSTM, RNN, PeepholeLSTM
from .rnn_cell import GRUCell, LSTMCell, PeepholeLSTMCell, RNNCell

__all__ = ["LayerNorm", "LSTMCell", "GRUCell", "RNNCell", "PeepholeLSTMCell", "LSTM", "PeepholeLSTM", "GRU", "RNN",
           "MultiheadAttention"]
