"""The recurrent modes: csrc/rnn_modes.h's table, in Python (the reference, the ops, the Triton steps and the
modules read it; tests/test_rnn_layer.py checks that it equals fastseq._C.rnn_modes). A new mode is one entry
here and there, and one cell function per backend."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    gates: int  # G: blocks of H rows in W_ih and W_hh (lstm i, f, g, o; gru r, z, n)
    saved: int  # blocks of H in the saved activated gates per row (lstm [i, f, g, o], gru [r, z, n, hn]); 0: none
    cell: bool  # a cell state c besides h
    peephole: bool  # a (3, H) peephole weight [p_i; p_f; p_o]
    projection: bool  # accepts w_hr (proj_size)


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("lstm", 4, 4, True, False, True),
    Mode("peephole_lstm", 4, 4, True, True, True),
    Mode("gru", 3, 4, False, False, False),
    Mode("rnn_tanh", 1, 0, False, False, False),
    Mode("rnn_relu", 1, 0, False, False, False),
)}


def mode(name: str) -> Mode:
    """The entry of mode `name`; ValueError naming the modes for an unknown one."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {name!r}") from None
