"""fastseq.nn.PeepholeLSTM, the recurrent mode that no torch module offers as a layer: every backend against the
float64 reference (fastseq.reference.rnn_layer per layer direction), multi-layer, bidirectional, packed (unsorted
lengths), with projections, forward and the gradients of every input and parameter; against a loop of
fastseq.nn.PeepholeLSTMCell; and with zero peepholes, against torch.nn.LSTM."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import BACKEND_PARAMS, assert_close, on_backend
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastseq
from fastseq import backends, reference

C, H, T, N = 5, 7, 6, 4
LENGTHS = [6, 2, 5, 3]  # unsorted: the module sorts them and permutes the state


def _module(num_layers: int, bidirectional: bool, proj_size: int, seed: int = 0) -> fastseq.nn.PeepholeLSTM:
    torch.manual_seed(seed)
    return fastseq.nn.PeepholeLSTM(C, H, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size,
                                   dtype=torch.float64)


def _oracle(m: fastseq.nn.PeepholeLSTM, data: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
            batch_sizes: torch.Tensor | None):
    """output data, h_n, c_n of module m (its parameters as they are) by fastseq.reference.rnn_layer per layer
    direction; data (T, N, C) time-major or packed, h0 / c0 in the order of the batch rows of data."""
    dirs = 2 if m.bidirectional else 1
    x, hs, cs = data, [], []
    for layer in range(m.num_layers):
        ys = []
        for d in range(dirs):
            i, suffix = layer * dirs + d, f"l{layer}{'_reverse' if d else ''}"
            p = lambda name: getattr(m, f"{name}_{suffix}", None)  # noqa: E731
            y, h, c = reference.rnn_layer("peephole_lstm", x, h0[i], c0[i], p("weight_ih"), p("weight_hh"),
                                          p("bias_ih"), p("bias_hh"), p("weight_hr"), d == 1, batch_sizes,
                                          p("weight_peephole"))
            ys.append(y)
            hs.append(h)
            cs.append(c)
        x = torch.cat(ys, -1)
    return x, torch.stack(hs), torch.stack(cs)


GPU_BACKENDS = [p for p in BACKEND_PARAMS if p.values[0][0] in ("cuda", "triton")]
CASES = [pytest.param("cpu", "cpu", torch.float64, id="cpu"),
         pytest.param("reference", "cpu", torch.float64, id="reference")] + [
    pytest.param(*p.values[0], torch.float32, marks=p.marks, id=p.id) for p in GPU_BACKENDS]


@pytest.mark.parametrize("backend, device, dtype", CASES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bidirectional, proj_size", [(False, 0), (True, 0), (True, 3)], ids=["uni", "bi", "bi-proj"])
def test_layer_against_reference(backend, device, dtype, packed, bidirectional, proj_size):
    if backend == "cpu" and backends.unavailable_reason("cpu") is not None:
        pytest.fail(f"the cpu backend cannot run: {backends.unavailable_reason('cpu')}")
    m = _module(2, bidirectional, proj_size)
    dirs, hout = 2 if bidirectional else 1, proj_size or H
    gen = torch.Generator().manual_seed(1)
    padded = torch.randn(T, N, C, generator=gen, dtype=torch.float64)
    h0 = torch.randn(2 * dirs, N, hout, generator=gen, dtype=torch.float64)
    c0 = torch.randn(2 * dirs, N, H, generator=gen, dtype=torch.float64)

    ours = copy.deepcopy(m).to(device, dtype)
    leaves = [t.to(device, dtype).requires_grad_() for t in (padded, h0, c0)]
    x = pack_padded_sequence(leaves[0], LENGTHS, enforce_sorted=False) if packed else leaves[0]
    with on_backend(backend):
        y, (h_n, c_n) = ours(x, (leaves[1], leaves[2]))
    y = y.data if packed else y

    want_leaves = [t.clone().requires_grad_() for t in (padded, h0, c0)]
    if packed:
        xp = pack_padded_sequence(want_leaves[0], LENGTHS, enforce_sorted=False)
        order, back = xp.sorted_indices, xp.unsorted_indices
        want_y, want_h, want_c = _oracle(m, xp.data, want_leaves[1][:, order], want_leaves[2][:, order],
                                         xp.batch_sizes)
        want_h, want_c = want_h[:, back], want_c[:, back]
    else:
        want_y, want_h, want_c = _oracle(m, *want_leaves, None)

    atol, rtol = (1e-10, 1e-9) if dtype == torch.float64 else (3e-5, 3e-4)
    for got, want, name in ((y, want_y, "output"), (h_n, want_h, "h_n"), (c_n, want_c, "c_n")):
        assert_close(got, want, atol, rtol, name)
    weights = [torch.linspace(-1, 1, t.numel(), dtype=torch.float64).reshape(t.shape) for t in (want_y, want_h,
                                                                                                  want_c)]
    names = [n for n, _ in m.named_parameters()]
    got_grads = torch.autograd.grad([y, h_n, c_n], [*leaves, *ours.parameters()],
                                    [w.to(device, dtype) for w in weights])
    want_grads = torch.autograd.grad([want_y, want_h, want_c], [*want_leaves, *m.parameters()], weights)
    for got, want, name in zip(got_grads, want_grads, ["input", "h0", "c0", *names], strict=True):
        assert_close(got, want, atol, rtol, f"d{name}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_layer_against_a_loop_of_cells(backend):
    """A bidirectional layer equals PeepholeLSTMCell stepped forward and backward in time with the same weights:
    outputs, final states and the gradients of the input and of every parameter."""
    m = _module(1, True, 0, seed=2)
    cells = []
    for suffix in ("l0", "l0_reverse"):
        cell = fastseq.nn.PeepholeLSTMCell(C, H, dtype=torch.float64)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_peephole"):
            setattr(cell, name, getattr(m, f"{name}_{suffix}"))
        cells.append(cell)
    x = torch.randn(T, N, C, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    with on_backend(backend):
        y, (h_n, c_n) = m(x)
        outs, finals = [], []
        for d, cell in enumerate(cells):
            h = c = torch.zeros(N, H, dtype=torch.float64)
            ys = [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                h, c = cell(x[t], (h, c))
                ys[t] = h
            outs.append(torch.stack(ys))
            finals.append((h, c))
    want_y = torch.cat(outs, -1)
    want_h, want_c = torch.stack([f[0] for f in finals]), torch.stack([f[1] for f in finals])
    for got, want, name in ((y, want_y, "output"), (h_n, want_h, "h_n"), (c_n, want_c, "c_n")):
        assert_close(got, want, 1e-12, 1e-10, name)
    loss = lambda a, b, c: (a * a.sin()).sum() + (b * b.cos()).sum() + c.sum()  # noqa: E731
    params = list(m.parameters())
    for got, want in zip(torch.autograd.grad(loss(y, h_n, c_n), [x, *params]),
                         torch.autograd.grad(loss(want_y, want_h, want_c), [x, *params]), strict=True):
        assert_close(got, want, 1e-12, 1e-10, "gradient")


def test_parameters_are_lstms_plus_peepholes_and_zero_peepholes_are_an_lstm():
    theirs = torch.nn.LSTM(C, H, num_layers=2, bidirectional=True, proj_size=3, dtype=torch.float64)
    ours = fastseq.nn.PeepholeLSTM(C, H, num_layers=2, bidirectional=True, proj_size=3, dtype=torch.float64)
    peepholes = [f"weight_peephole_l{k}{s}" for k in range(2) for s in ("", "_reverse")]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()] + peepholes
    assert all(getattr(ours, n).shape == (3, H) for n in peepholes)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert sorted(missing) == sorted(peepholes) and not unexpected
    with torch.no_grad():
        for n in peepholes:
            getattr(ours, n).zero_()
    x = pack_padded_sequence(torch.randn(T, N, C, dtype=torch.float64), LENGTHS, enforce_sorted=False)
    y, (h, c) = ours(x)
    yt, (ht, ct) = theirs(x)
    assert isinstance(y, PackedSequence)
    for got, want, name in ((y.data, yt.data, "output"), (h, ht, "h_n"), (c, ct, "c_n")):
        assert_close(got, want, 1e-12, 1e-10, name)
