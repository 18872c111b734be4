"""The persistent Triton kernels of the recurrent layers (kernels/rnn_layer.py: the whole time loop of a layer
direction in one launch, forward and backward), forced on with FASTSEQ_RNN_PERSISTENT=1: every mode against
torch.nn in float64 (the peephole LSTM against the float64 reference), plain and packed with unsorted lengths,
both directions, with and without h0 / c0, hidden sizes that fill the kernels' block of columns (64, 128) or not, odd
batch; and the kernels checked to have run (the host loop would pass these tests too). In Triton's interpreter
without a GPU (float32: bfloat16's tl.dot does not run there; float16 keeps the host loop)."""
from __future__ import annotations

import pytest
import torch
from conftest import BACKEND_PARAMS, assert_close, on_backend
from test_peephole_lstm import _oracle
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastseq
from fastseq import nn as fnn

TRITON = [p for p in BACKEND_PARAMS if p.values[0][0] == "triton"]
KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu", "peephole_lstm"]
T, N, C = 6, 5, 4
LENGTHS = [6, 2, 5, 6, 3]  # unsorted, odd batch


@pytest.fixture
def persistent_runs(monkeypatch):
    """FASTSEQ_RNN_PERSISTENT=1, and the list of what LayerSteps.forward_sequence / backward_sequence returned."""
    from fastseq.kernels import rnn_layer as tk

    monkeypatch.setenv("FASTSEQ_RNN_PERSISTENT", "1")
    ran = []
    for name in ("forward_sequence", "backward_sequence"):
        original = getattr(tk.LayerSteps, name)
        monkeypatch.setattr(tk.LayerSteps, name,
                            lambda self, *a, _f=original, _n=name: ran.append((_n, _f(self, *a))) or ran[-1][1])
    return ran


def _pair(kind: str, hidden: int, dtype: torch.dtype):
    """(want, ours): the float64 baseline module and fastseq's module in `dtype` with the same weights; want is
    torch's, or for the peephole LSTM fastseq's in float64 run through the reference."""
    torch.manual_seed(hidden)
    kw = dict(bidirectional=True)
    if kind == "peephole_lstm":
        want = fnn.PeepholeLSTM(C, hidden, dtype=torch.float64, **kw)
    else:
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(kind, torch.nn.RNN)
        if kind.startswith("rnn_"):
            kw["nonlinearity"] = kind[4:]
        want = cls(C, hidden, dtype=torch.float64, **kw)
    ours_cls = {"lstm": fnn.LSTM, "gru": fnn.GRU, "peephole_lstm": fnn.PeepholeLSTM}.get(kind, fnn.RNN)
    ours = ours_cls(C, hidden, dtype=dtype, **kw)
    ours.load_state_dict({k: v.to(dtype) for k, v in want.state_dict().items()})
    return want, ours


def _run_baseline(kind, want, x, hx):
    if kind != "peephole_lstm":
        return want(x, hx)
    data = x.data if isinstance(x, PackedSequence) else x
    h0 = torch.zeros(2, N, want.hidden_size, dtype=torch.float64) if hx is None else hx[0]
    c0 = torch.zeros_like(h0) if hx is None else hx[1]
    if isinstance(x, PackedSequence):
        y, h, c = _oracle(want, data, h0[:, x.sorted_indices], c0[:, x.sorted_indices], x.batch_sizes)
        return PackedSequence(y, x.batch_sizes, x.sorted_indices, x.unsorted_indices), \
            (h[:, x.unsorted_indices], c[:, x.unsorted_indices])
    y, h, c = _oracle(want, data, h0, c0, None)
    return y, (h, c)


def _flat(out):
    y, h = out
    return [y.data if isinstance(y, PackedSequence) else y, *(h if isinstance(h, tuple) else (h,))]


def _check(kind, backend, device, dtype, hidden, packed, with_hx, atol, rtol, persistent_runs):
    want, ours = _pair(kind, hidden, dtype)
    ours.to(device)
    gen = torch.Generator().manual_seed(3)
    padded = torch.randn(T, N, C, generator=gen, dtype=torch.float64)
    cell = kind in ("lstm", "peephole_lstm")
    states = [torch.randn(2, N, hidden, generator=gen, dtype=torch.float64) for _ in range(2 if cell else 1)]
    leaves_w = [t.clone().requires_grad_() for t in (padded, *states)]
    leaves_o = [t.to(device, dtype).requires_grad_() for t in (padded, *states)]

    def args(leaves):
        x = pack_padded_sequence(leaves[0], LENGTHS, enforce_sorted=False) if packed else leaves[0]
        hx = None if not with_hx else tuple(leaves[1:]) if cell else leaves[1]
        return x, hx

    wanted = _flat(_run_baseline(kind, want, *args(leaves_w)))
    with on_backend(backend):
        got = _flat(ours(*args(leaves_o)))
    for g, w, name in zip(got, wanted, ["output", "h_n", "c_n"]):
        assert_close(g, w, atol, rtol, name)
    douts = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in wanted]
    used = leaves_w if with_hx else leaves_w[:1]
    gw = torch.autograd.grad(wanted, used + list(want.parameters()), douts)
    with on_backend(backend):
        gg = torch.autograd.grad(got, (leaves_o if with_hx else leaves_o[:1]) + list(ours.parameters()),
                                 [d.to(device, dtype) for d in douts])
    names = ["dinput", "dh0", "dc0"][:len(used)] + [f"d{n}" for n, _ in ours.named_parameters()]
    for g, w, name in zip(gg, gw, names, strict=True):
        assert_close(g, w, atol, rtol, name)
    # both directions ran in the persistent kernels, forward and backward
    assert persistent_runs.count(("forward_sequence", True)) == 2, persistent_runs
    assert persistent_runs.count(("backward_sequence", True)) == 2, persistent_runs


@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("hidden", [1, 33, 64, 100, 128])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend_device", TRITON)
def test_against_torch_float32(backend_device, kind, hidden, packed, with_hx, persistent_runs):
    backend, device = backend_device
    _check(kind, backend, device, torch.float32, hidden, packed, with_hx, 3e-5, 3e-4, persistent_runs)


def test_off_and_projection_keep_the_host_loop(monkeypatch):
    """FASTSEQ_RNN_PERSISTENT=0, LSTMs with projections, float16 and H > 128 run the host loop; a bad value is an
    error."""
    from fastseq import backends
    from fastseq.kernels import rnn_layer as tk

    if backends.unavailable_reason("triton") is not None:
        pytest.skip(backends.unavailable_reason("triton"))
    b = torch.zeros(8)
    for value, w_hr, want in (("0", None, False), ("1", torch.zeros(1, 2), False), ("1", None, True)):
        monkeypatch.setenv("FASTSEQ_RNN_PERSISTENT", value)
        steps = fastseq.ops.rnn_layer._steps("triton", "lstm", b, b, None)
        assert steps._config(2, torch.zeros(1, 2), w_hr) == want, (value, w_hr)
    monkeypatch.setenv("FASTSEQ_RNN_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="FASTSEQ_RNN_PERSISTENT"):
        fastseq.ops.rnn_layer._steps("triton", "lstm", b, b, None)
    assert tk.persistent_config("lstm", 129, torch.float32, torch.device("cpu"), False, True) is False
    assert tk.persistent_config("lstm", 128, torch.float16, torch.device("cpu"), False, True) is False
    assert tk.persistent_config("lstm", 128, torch.float32, torch.device("cpu"), False, True) is True


def test_every_launch_is_compiled_ahead_of_time():
    """Each configuration the launchers can run (any H up to the largest block, every mode and dtype, both
    directions) is one that make triton-check compiles for sm_80 / sm_90 (AOT_SPECS: same kernel, constexprs,
    pointer dtype and launch options), so that its registers, spills and shared memory are the ones reported."""
    from fastseq import backends

    if backends.unavailable_reason("triton") is not None:
        pytest.skip(backends.unavailable_reason("triton"))
    from fastseq.kernels import rnn_layer as tk
    from fastseq.kernels.rnn_cell import _aot_spec

    def key(spec):
        return (spec.fn, spec.signature["w_ptr"], tuple(sorted(spec.constexprs.items())), spec.num_warps,
                spec.num_stages, spec.maxnreg, spec.specialize)

    compiled = {key(spec) for spec in tk.AOT_SPECS}
    for dtype in tk.SEQ_DTYPES:
        for mode in KINDS:
            for hidden in range(1, max(tk.SEQ_BLOCK_HS) + 1):
                for kernel in (tk._seq_fwd_kernel, tk._seq_bwd_kernel):
                    meta = tk._seq_constexprs(mode, hidden, mode == "peephole_lstm", kernel is tk._seq_bwd_kernel)
                    launched = _aot_spec(kernel, dtype, meta, tk.SEQ_OPTIONS["num_warps"],
                                         tk.SEQ_OPTIONS["num_stages"], i64_ptrs=("steps_ptr",),
                                         maxnreg=tk.SEQ_OPTIONS["maxnreg"], specialize=False)
                    assert key(launched) in compiled, (mode, dtype, hidden, kernel)
