"""Recurrent layers (fastseq.nn.LSTM / GRU / RNN, fastseq.functional.lstm / gru / rnn_*, the fastseq::rnn_layer op):
against torch.nn with the state_dict copied (outputs, final states, gradients of the input, the initial states and
every parameter) over a seeded sweep of configurations; the op against the float64 reference; PackedSequence sorted
and unsorted, unbatched input, T=1 and a long sequence, gradcheck, dropout, bfloat16, opcheck, torch.compile, bad
input."""
from __future__ import annotations

import copy
import dataclasses
import random
import warnings

import pytest
import torch
from conftest import BACKEND_PARAMS, assert_close, assert_within_torch_error, on_backend
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastseq
from fastseq import backends, modes, reference
from fastseq import functional as F
from fastseq import nn as fnn
from fastseq.ops import rnn_layer as op

KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
GATES = {name: m.gates for name, m in modes.MODES.items()}
# The CPU backends: the C++ kernels (without fastseq._C their tests fail, naming the reason) and the reference.
BACKENDS = ["cpu", "reference"]
FAST = "cpu"  # the backend the long and wide checks run on
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-4)}  # (atol, rtol) against torch.nn
# The GPU backends that run here, (backend, device) params: triton on CPU tensors in Triton's interpreter; cuda and
# triton on a GPU (marked gpu). They run in float32 (neither has float64).
GPU_BACKENDS = [p for p in BACKEND_PARAMS if p.values[0][0] in ("cuda", "triton")]


def _backend_cases(cpu_backends: list[str]) -> list:
    """(backend, device, dtype) params: `cpu_backends` in float64, the GPU backends in float32."""
    return ([pytest.param(b, "cpu", torch.float64, id=b) for b in cpu_backends]
            + [pytest.param(*p.values[0], torch.float32, marks=p.marks, id=p.id) for p in GPU_BACKENDS])


def _modules(kind: str, input_size: int, hidden_size: int, dtype=torch.float64, **kw):
    """A torch.nn module and the fastseq one with the same weights (copied through the state_dict)."""
    cls = {"lstm": "LSTM", "gru": "GRU"}.get(kind, "RNN")
    if kind.startswith("rnn_"):
        kw["nonlinearity"] = kind[4:]
    if not kw.get("proj_size"):
        kw.pop("proj_size", None)  # GRU and RNN reject the argument
    theirs = getattr(torch.nn, cls)(input_size, hidden_size, dtype=dtype, **kw)
    ours = getattr(fnn, cls)(input_size, hidden_size, dtype=dtype, **kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _states(kind, num_layers, dirs, n, hidden, proj, dtype, gen, unbatched=False):
    shape = (num_layers * dirs,) if unbatched else (num_layers * dirs, n)
    h = torch.randn(*shape, proj or hidden, generator=gen, dtype=torch.float64).to(dtype)
    if kind != "lstm":
        return h
    return h, torch.randn(*shape, hidden, generator=gen, dtype=torch.float64).to(dtype)


def _flat(out) -> list[torch.Tensor]:
    """output (or its packed data), h_n (, c_n) of a module's result."""
    y, h = out
    return [y.data if isinstance(y, PackedSequence) else y, *(h if isinstance(h, tuple) else (h,))]


def _leaves(x, hx) -> list[torch.Tensor]:
    return [x] + ([] if hx is None else list(hx) if isinstance(hx, tuple) else [hx])


def _to(obj, device):
    """A tensor, PackedSequence or tuple of tensors (or None) on `device`."""
    if obj is None or isinstance(obj, (torch.Tensor, PackedSequence)):
        return obj if obj is None else obj.to(device)
    return tuple(t.to(device) for t in obj)


def _detach(x, hx):
    fresh = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    if isinstance(x, PackedSequence):
        x = PackedSequence(fresh(x.data), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    else:
        x = fresh(x)
    if hx is not None:
        hx = tuple(fresh(t) for t in hx) if isinstance(hx, tuple) else fresh(hx)
    return x, hx


def _check_against_torch(theirs, ours, x, hx, tol, seed=0, backend=None, names=None, device="cpu"):
    """Runs both modules on copies of (x, hx), ours on `device` (moved there), torch's on the CPU; compares outputs,
    then the gradients of x, hx and every parameter for random upstream gradients."""
    xt, hxt = _detach(x, hx)
    xo, hxo = _detach(_to(x, device), _to(hx, device))
    ours.to(device)
    want = _flat(theirs(xt, hxt))
    with on_backend(backend or FAST):
        got = _flat(ours(xo, hxo))
    atol, rtol = tol
    names = ["output", "h_n", "c_n"]
    for g, w, name in zip(got, want, names):
        assert_close(g, w, atol, rtol, name)
    gen = torch.Generator().manual_seed(seed)
    douts = [torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype) for w in want]
    inputs_t = [t.data if isinstance(t, PackedSequence) else t for t in _leaves(xt, hxt)]
    inputs_o = [t.data if isinstance(t, PackedSequence) else t for t in _leaves(xo, hxo)]
    gw = torch.autograd.grad(want, inputs_t + list(theirs.parameters()), douts)
    with on_backend(backend or FAST):
        gg = torch.autograd.grad(got, inputs_o + list(ours.parameters()), [d.to(device) for d in douts])
    gnames = ["dinput", "dh0", "dc0"][: len(inputs_t)] + [f"d{n}" for n, _ in ours.named_parameters()]
    for g, w, name in zip(gg, gw, gnames):
        assert_close(g, w, atol, rtol, name)


def _sweep(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    configs = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        hidden = rng.choice([1, 3, 7, 16, 33])
        configs.append(dict(kind=kind, num_layers=rng.randint(1, 3), bidirectional=rng.random() < 0.5,
                            batch_first=rng.random() < 0.5, bias=rng.random() < 0.75,
                            proj_size=rng.choice([0, 0, max(hidden - 2, 1)]) if kind == "lstm" and hidden > 1 else 0,
                            input_size=rng.choice([1, 2, 5, 17, 64]), hidden_size=hidden, T=rng.choice([1, 2, 5, 9]),
                            N=rng.choice([1, 2, 3, 8]), hx=rng.random() < 0.7))
    return configs


SWEEP = _sweep(24, 1234)
# The part of the sweep that runs in Triton's interpreter (a step costs it ~20 ms): every kind, bidirectional,
# 3 layers, no bias, projection, batch_first, T up to 9.
INTERPRETER_SWEEP = [0, 1, 4, 6, 15, 17, 20]


def _sweep_id(i: int, c: dict) -> str:
    return (f"{i}-{c['kind']}-L{c['num_layers']}{'-bi' if c['bidirectional'] else ''}"
            f"{'-bf' if c['batch_first'] else ''}{'' if c['bias'] else '-nobias'}"
            f"{'-p%d' % c['proj_size'] if c['proj_size'] else ''}")


@pytest.mark.parametrize("cfg", SWEEP, ids=[_sweep_id(i, c) for i, c in enumerate(SWEEP)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sweep_against_torch(cfg, dtype):
    _sweep_case(cfg, dtype)


def _gpu_sweep_params() -> list:
    """(backend_device, cfg) params: the whole sweep on a GPU, INTERPRETER_SWEEP in Triton's interpreter."""
    return [pytest.param(p.values[0], SWEEP[i], marks=p.marks, id=f"{p.id}-{_sweep_id(i, SWEEP[i])}")
            for p in GPU_BACKENDS
            for i in (range(len(SWEEP)) if p.values[0][1] == "cuda" else INTERPRETER_SWEEP)]


@pytest.mark.parametrize("backend_device, cfg", _gpu_sweep_params())
def test_sweep_against_torch_gpu_backends(backend_device, cfg):
    """The seeded sweep on the cuda and triton backends in float32 (torch's modules on the CPU)."""
    backend, device = backend_device
    _sweep_case(cfg, torch.float32, backend, device)


def _sweep_case(cfg: dict, dtype: torch.dtype, backend: str | None = None, device: str = "cpu") -> None:
    kind, L, bi = cfg["kind"], cfg["num_layers"], cfg["bidirectional"]
    kw = dict(num_layers=L, bidirectional=bi, batch_first=cfg["batch_first"], bias=cfg["bias"])
    if cfg["proj_size"]:
        kw["proj_size"] = cfg["proj_size"]
    torch.manual_seed(SWEEP.index(cfg))
    theirs, ours = _modules(kind, cfg["input_size"], cfg["hidden_size"], dtype, **kw)
    gen = torch.Generator().manual_seed(7)
    T, N = cfg["T"], cfg["N"]
    shape = (N, T) if cfg["batch_first"] else (T, N)
    x = torch.randn(*shape, cfg["input_size"], generator=gen, dtype=torch.float64).to(dtype)
    hx = _states(kind, L, 2 if bi else 1, N, cfg["hidden_size"], cfg["proj_size"], dtype, gen) if cfg["hx"] else None
    _check_against_torch(theirs, ours, x, hx, TOL[dtype], backend=backend, device=device)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend, device, dtype", _backend_cases(BACKENDS))
def test_reference_backend_and_bidirectional_projection(kind, backend, device, dtype):
    """Each backend on a 2-layer bidirectional module (LSTM with projection) against torch in float64 (the GPU
    backends in float32)."""
    kw = dict(num_layers=2, bidirectional=True, proj_size=3 if kind == "lstm" else 0)
    theirs, ours = _modules(kind, 5, 6, dtype, **kw)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64).to(dtype)
    _check_against_torch(theirs, ours, x, _states(kind, 2, 2, 3, 6, kw["proj_size"], dtype, gen), TOL[dtype],
                         backend=backend, device=device)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", KINDS + ["lstm_proj"])
@pytest.mark.parametrize("backend, device, dtype", _backend_cases([FAST]))
def test_op_against_reference(backend, device, dtype, kind, reverse, packed):
    """fastseq::rnn_layer on each fast backend against fastseq.reference.rnn_layer in float64: outputs and the
    gradients of every input, packed (ragged batch) and not, both directions (the GPU backends in float32)."""
    mode = "lstm" if kind == "lstm_proj" else kind
    gen = torch.Generator().manual_seed(3)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    T, N, C, H, P = 6, 4, 5, 7, 3 if kind == "lstm_proj" else 0
    G, hout = GATES[mode], P or H
    batch_sizes = torch.tensor([4, 4, 3, 2, 2, 1]) if packed else None
    x = rn(int(batch_sizes.sum()), C) if packed else rn(T, N, C)
    args = [x, rn(N, hout), rn(N, H) if mode == "lstm" else None, rn(G * H, C) * 0.4, rn(G * H, hout) * 0.4,
            rn(G * H), rn(G * H), rn(P, H) * 0.4 if P else None]
    want_leaves = [None if a is None else a.requires_grad_() for a in args]
    leaves = [None if a is None else a.detach().to(device, dtype).requires_grad_() for a in args]
    atol, rtol = (1e-12, 1e-10) if dtype == torch.float64 else TOL[dtype]
    with on_backend(backend):
        got = [t for t in op.apply(mode, *leaves, None, reverse, batch_sizes) if t is not None]
    want = [t for t in reference.rnn_layer(mode, *want_leaves, reverse, batch_sizes) if t is not None]
    for g, w, name in zip(got, want, ["y", "h_n", "c_n"]):
        assert_close(g, w, atol, rtol, name)
    douts = [rn(*w.shape) for w in want]
    with on_backend(backend):
        gg = torch.autograd.grad(got, [a for a in leaves if a is not None], [d.to(device, dtype) for d in douts])
    gw = torch.autograd.grad(want, [a for a in want_leaves if a is not None], douts)
    for i, (g, w) in enumerate(zip(gg, gw)):
        assert_close(g, w, atol, rtol, f"grad {i}")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [7, 1])
@pytest.mark.parametrize("packed, reverse", [(False, False), (True, True)])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_time_loop_in_one_parallel_region(kind, packed, reverse, threads, rows):
    """The CPU float32 time loop of a few rows, which runs in one parallel region with the hidden units split
    between threads (H = 100, 260: a part panel at the end; 3 threads on 2 cores: uneven split, waiting threads),
    its forward on W_hh packed (7 rows) or as it is (1 row), against fastseq.reference.rnn_layer in float64:
    outputs and the gradients of every input."""
    gen = torch.Generator().manual_seed(11)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    T, N, C, H, G = 5, rows, 9, 100 if rows == 7 else 260, GATES[kind]  # N * H * G*H >= 2 * 32768: 2+ workers
    batch_sizes = torch.tensor([7, 6, 6, 3, 1] if rows == 7 else [1] * 5) if packed else None
    x = rn(int(batch_sizes.sum()), C) if packed else rn(T, N, C)
    args = [x, rn(N, H), rn(N, H) if kind == "lstm" else None, rn(G * H, C) * 0.3, rn(G * H, H) * 0.1,
            rn(G * H), rn(G * H), None]
    want_leaves = [None if a is None else a.requires_grad_() for a in args]
    leaves = [None if a is None else a.detach().float().requires_grad_() for a in args]
    want = [t for t in reference.rnn_layer(kind, *want_leaves, reverse, batch_sizes) if t is not None]
    douts = [rn(*w.shape) for w in want]
    gw = torch.autograd.grad(want, [a for a in want_leaves if a is not None], douts)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with on_backend("cpu"):
            got = [t for t in op.apply(kind, *leaves, None, reverse, batch_sizes) if t is not None]
            gg = torch.autograd.grad(got, [a for a in leaves if a is not None], [d.float() for d in douts])
    finally:
        torch.set_num_threads(before)
    for g, w, name in zip(got, want, ["y", "h_n", "c_n"]):
        assert_close(g, w, 1e-5, 1e-4, name)
    for i, (g, w) in enumerate(zip(gg, gw)):
        assert_close(g, w, 1e-4, 1e-4, f"grad {i}")


@pytest.mark.sanitize
@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend, device, dtype", _backend_cases([FAST]))
def test_packed_sequence(backend, device, dtype, kind, enforce_sorted):
    """PackedSequence in and out, lengths unsorted (enforce_sorted=False) with a length-1 sequence, or sorted;
    2 bidirectional layers, with hx given and without."""
    lengths = [5, 4, 3, 3, 1] if enforce_sorted else [3, 1, 5, 4, 2]
    kw = dict(num_layers=2, bidirectional=True, proj_size=2 if kind == "lstm" else 0)
    theirs, ours = _modules(kind, 3, 4, dtype, **kw)
    gen = torch.Generator().manual_seed(5)
    padded = torch.randn(max(lengths), len(lengths), 3, generator=gen, dtype=torch.float64).to(dtype)
    x = pack_padded_sequence(padded, lengths, enforce_sorted=enforce_sorted)
    for hx in (None, _states(kind, 2, 2, len(lengths), 4, kw["proj_size"], dtype, gen)):
        _check_against_torch(theirs, ours, x, hx, TOL[dtype], backend=backend, device=device)
    with on_backend(backend):
        y, _ = ours(_to(x, device))
    assert isinstance(y, PackedSequence)
    assert torch.equal(y.batch_sizes, x.batch_sizes)
    for a, b in ((y.sorted_indices, x.sorted_indices), (y.unsorted_indices, x.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a.cpu(), b)


@pytest.mark.parametrize("chunk_steps", [1, 3])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", KINDS + ["lstm_proj"])
def test_no_grad_forward_in_chunks(monkeypatch, kind, packed, chunk_steps):
    """Without grad a layer direction runs in chunks of steps, the state carried from chunk to chunk, so that what
    the op keeps for a backward stays bounded: outputs and final states equal torch's (2 bidirectional layers, hx
    given; packed with unsorted lengths, one of them 1, or not), and the op runs more than once per direction."""
    proj = 2 if kind == "lstm_proj" else 0
    kind = kind.removesuffix("_proj")
    theirs, ours = _modules(kind, 3, 4, num_layers=2, bidirectional=True, proj_size=proj)
    gen = torch.Generator().manual_seed(3)
    padded = torch.randn(7, 4, 3, generator=gen, dtype=torch.float64)
    x = pack_padded_sequence(padded, [7, 1, 5, 4], enforce_sorted=False) if packed else padded
    hx = _states(kind, 2, 2, 4, 4, proj, torch.float64, gen)
    gate_columns = 4 * 4 if kind in ("lstm", "gru") else 4
    monkeypatch.setattr(F, "_CHUNK_BYTES", chunk_steps * 4 * gate_columns * 8)  # 4 rows, float64
    calls = []
    apply = op.apply
    monkeypatch.setattr(op, "apply", lambda *args: calls.append(args) or apply(*args))
    with torch.no_grad():
        got, want = ours(x, hx), theirs(x, hx)
    assert len(calls) >= 2 * 2 * 3  # 7 steps in chunks of at most 3, per layer direction
    for i, (g, w) in enumerate(zip(_flat(got), _flat(want), strict=True)):
        assert_close(g, w, *TOL[torch.float64], f"output {i}")


@pytest.mark.parametrize("kind", ["lstm", "peephole_lstm", "gru", "rnn_tanh"])
def test_forward_without_grad_saves_nothing(kind):
    """A layer direction run for inference (_infer: no backward follows) returns the outputs of one run for training
    bit for bit and none of the four tensors a backward would read (c_n None without a cell state)."""
    m = modes.mode(kind)
    gen = torch.Generator().manual_seed(4)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, h0 = rand(6, 3, 5), rand(3, 4)
    c0 = rand(3, 4) if m.cell else None
    args = (kind, x, h0, c0, rand(m.gates * 4, 5), rand(m.gates * 4, 4), rand(m.gates * 4), rand(m.gates * 4), None,
            rand(3, 4) if m.peephole else None, False, None)
    with on_backend(FAST):
        train, infer = op._forward(*args), op._infer(*args)
    assert len(infer) == 3 and (infer[2] is None) == (not m.cell)
    for i in range(2 + m.cell):
        assert_close(infer[i], train[i], 0, 0, f"output {i}")
    assert any(t.numel() for t in train[3:])


ONEDNN_DTYPES = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])


def _onednn_case(monkeypatch, onednn: str, dtype: torch.dtype, seed: int, **kw):
    """FASTSEQ_ONEDNN=onednn; (theirs, ours, x, hx, gen, calls): torch's and fastseq's 2-layer bidirectional
    LSTM(24, 32) with the same weights, input (16, 16, 24) and hx in `dtype`, the generator that made them, and the
    list of oneDNN's layer direction calls that fill in as ops.rnn_layer.onednn_forward runs."""
    monkeypatch.setenv("FASTSEQ_ONEDNN", onednn)
    theirs, ours = _modules("lstm", 24, 32, dtype, num_layers=2, bidirectional=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 16, 24, generator=gen).to(dtype)
    hx = _states("lstm", 2, 2, 16, 32, 0, dtype, gen)
    calls = []
    forward = op.onednn_forward
    monkeypatch.setattr(op, "onednn_forward", lambda *args: calls.append(args) or forward(*args))
    return theirs, ours, x, hx, gen, calls


@pytest.mark.parametrize("onednn", ["0", "1", ""])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", ONEDNN_DTYPES, ids=str)
def test_no_grad_lstm_on_onednn(monkeypatch, dtype, bias, onednn):
    """A float32 / bfloat16 LSTM forward without grad on the cpu backend runs oneDNN's LSTM primitive where it is
    faster (FASTSEQ_ONEDNN unset), everywhere it can run (1) or nowhere (0): outputs and final states equal torch's
    (2 bidirectional layers, 16 rows, hx given, with and without biases), and the layer directions ran where the rule
    says."""
    theirs, ours, x, hx, _, calls = _onednn_case(monkeypatch, onednn, dtype, 9, bias=bias)
    with torch.no_grad(), fastseq.backend("cpu"):
        got, want = ours(x, hx), theirs(x, hx)
    assert len(calls) == (0 if onednn == "0" else 4)
    tol = (2e-2, 2e-2) if dtype == torch.bfloat16 else TOL[torch.float32]
    for i, (g, w) in enumerate(zip(_flat(got), _flat(want), strict=True)):
        assert g.dtype == w.dtype
        assert_close(g, w, *tol, f"output {i}")


@pytest.mark.parametrize("onednn", ["0", "1", ""])
@pytest.mark.parametrize("dtype", ONEDNN_DTYPES, ids=str)
def test_lstm_training_on_onednn(monkeypatch, dtype, onednn):
    """An LSTM forward for a backward on the cpu backend runs oneDNN's LSTM primitive in training mode where it is
    faster (FASTSEQ_ONEDNN unset: here float32 at 16 rows, T=16 and H=32), everywhere it can run (1)
    or nowhere (0): outputs, final states and the gradients of the input, the states and every parameter equal
    torch.nn.LSTM's (bfloat16: within 2x torch's own error against float64; 2 bidirectional layers, hx given), and a
    second derivative (double backward) runs."""
    theirs, ours, x, hx, gen, calls = _onednn_case(monkeypatch, onednn, dtype, 10)
    reference = copy.deepcopy(theirs).double()  # bfloat16 is checked against float64 (torch's error in bfloat16)
    leaves_o, leaves_t, leaves_r = ([t.clone().to(d).requires_grad_() for t in (x, *hx)]
                                    for d in (dtype, dtype, torch.float64))
    with fastseq.backend("cpu"):
        got = _flat(ours(leaves_o[0], tuple(leaves_o[1:])))
    want = _flat(theirs(leaves_t[0], tuple(leaves_t[1:])))
    exact = _flat(reference(leaves_r[0], tuple(leaves_r[1:])))
    assert len(calls) == (0 if onednn == "0" else 4)
    douts = [torch.randn(w.shape, generator=gen).to(dtype) for w in want]
    grads_o = torch.autograd.grad(got, leaves_o + list(ours.parameters()), douts, create_graph=True)
    # torch too with create_graph: ATen's LSTM backward for a graph is another implementation (less accurate in bf16)
    grads_t = torch.autograd.grad(want, leaves_t + list(theirs.parameters()), douts, create_graph=True)
    grads_r = torch.autograd.grad(exact, leaves_r + list(reference.parameters()), [d.double() for d in douts])
    for i, (g, w, r) in enumerate(zip(got + list(grads_o), want + list(grads_t), exact + list(grads_r),
                                      strict=True)):
        assert g.dtype == w.dtype
        if dtype == torch.bfloat16:
            assert_within_torch_error(g, w, r, f"output or gradient {i}")
        else:
            assert_close(g, w, *TOL[torch.float32], f"output or gradient {i}")
    second = torch.autograd.grad(grads_o[0].float().square().sum(), ours.weight_hh_l0)[0]
    assert second.shape == ours.weight_hh_l0.shape and bool(torch.isfinite(second).all())


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_onednn_selection_rule(monkeypatch):
    """Which LSTM layer directions run on oneDNN: plain LSTM (no projection, peephole or packed input), float32
    (bfloat16 where the CPU has it), on the cpu backend, with oneDNN enabled, where the measured rule says it wins
    (inference, float32: from 4 rows below H=1024, from 16 rows at any H, with at least 256 rows in all steps
    together, 1600 at H=1024; training, float32: from 8 rows below H=1024 and 256 rows in all; bfloat16 up to H=256
    from T=16, up to 128 from T=4) or FASTSEQ_ONEDNN=1; each refusal says why."""
    monkeypatch.delenv("FASTSEQ_ONEDNN", raising=False)

    def rejects(n=16, hidden=32, dtype=torch.float32, mode="lstm", grad=False, proj=False, peephole=False,
                packed=False, steps=100):
        x = torch.zeros(steps, n, 8, dtype=dtype, requires_grad=grad)
        h0, c0 = torch.zeros(n, 4 if proj else hidden, dtype=dtype), torch.zeros(n, hidden, dtype=dtype)
        w_ih, w_hh = torch.zeros(4 * hidden, 8, dtype=dtype), torch.zeros(4 * hidden, 4 if proj else hidden,
                                                                           dtype=dtype)
        w_hr = torch.zeros(4, hidden, dtype=dtype) if proj else None
        p = torch.zeros(3, hidden, dtype=dtype) if peephole else None
        sizes = torch.full((steps,), n) if packed else None
        return op.onednn_rejects(mode, x, h0, c0, w_ih, w_hh, None, None, w_hr, p, sizes)

    assert rejects() is None
    assert rejects(n=4, hidden=512) is None and rejects(n=16, hidden=1024) is None
    assert "faster at 2 rows" in rejects(n=2) and "faster at 8 rows" in rejects(n=8, hidden=1024)
    for kw in ({"proj": True}, {"peephole": True, "mode": "peephole_lstm"}, {"packed": True}, {"mode": "gru"}):
        assert "plain LSTM only" in rejects(**kw)
    assert rejects(n=8, grad=True) is None and rejects(n=64, hidden=512, grad=True) is None
    assert "faster at 4 rows, T=100, hidden size 32 (training)" in rejects(n=4, grad=True)
    assert "(training)" in rejects(n=16, hidden=1024, grad=True) and "(inference)" in rejects(n=2)
    # few steps: oneDNN's per-call copy of the weights into its layout is not repaid
    assert rejects(n=16, steps=16) is None and "16 rows, T=15, hidden size 32 (inference)" in rejects(n=16, steps=15)
    assert rejects(n=64, steps=4) is None and "T=1," in rejects(n=64, steps=1)
    assert rejects(n=16, hidden=1024, steps=100) is None and "T=99" in rejects(n=16, hidden=1024, steps=99)
    assert rejects(n=8, steps=32, grad=True) is None and "T=31" in rejects(n=8, steps=31, grad=True)
    if torch.bfloat16 in ONEDNN_DTYPES:
        assert rejects(n=1, hidden=256, dtype=torch.bfloat16, grad=True) is None
        assert "(training)" in rejects(n=16, hidden=512, dtype=torch.bfloat16, grad=True)
        assert "T=15" in rejects(n=1, hidden=256, steps=15, dtype=torch.bfloat16, grad=True)
        assert rejects(n=1, hidden=128, steps=4, dtype=torch.bfloat16, grad=True) is None
        assert "T=3" in rejects(n=1, hidden=128, steps=3, dtype=torch.bfloat16, grad=True)
        assert rejects(n=1, steps=1, dtype=torch.bfloat16) is None
        assert rejects(n=16, steps=2, dtype=torch.bfloat16) is None
        assert "16 rows, T=1" in rejects(n=16, steps=1, dtype=torch.bfloat16)
        assert "T=15" in rejects(n=16, hidden=1024, steps=15, dtype=torch.bfloat16)
        assert rejects(n=16, hidden=1024, steps=16, dtype=torch.bfloat16) is None
    assert "got torch.float64" in rejects(dtype=torch.float64)
    with torch.backends.mkldnn.flags(enabled=False):
        assert "mkldnn.enabled is False" in rejects()
    with fastseq.backend("reference"):
        assert "cpu backend" in rejects()
    if torch.bfloat16 in ONEDNN_DTYPES:
        assert rejects(n=1, dtype=torch.bfloat16) is None
    monkeypatch.setenv("FASTSEQ_ONEDNN", "1")
    assert rejects(n=1) is None
    monkeypatch.setenv("FASTSEQ_ONEDNN", "0")
    assert rejects() == "FASTSEQ_ONEDNN=0"
    monkeypatch.setenv("FASTSEQ_ONEDNN", "yes")
    with pytest.raises(ValueError, match="FASTSEQ_ONEDNN must be 0 or 1"):
        rejects()


@pytest.mark.parametrize("user_stream", [False, True])
@pytest.mark.parametrize("backend_device", [p for p in GPU_BACKENDS if p.values[0][1] == "cuda"])
def test_bidirectional_directions_on_two_streams(monkeypatch, backend_device, user_stream):
    """On CUDA the reverse direction of a layer runs on a side stream (its backward follows, as autograd runs a
    backward on its forward's stream), and outputs and gradients equal torch's: 2 bidirectional LSTM layers with a
    projection, on the default stream and on a stream of the caller's."""
    backend, device = backend_device
    streams = []
    direction = F._direction
    monkeypatch.setattr(F, "_direction", lambda *a: streams.append(torch.cuda.current_stream()) or direction(*a))
    theirs, ours = _modules("lstm", 33, 64, torch.float32, num_layers=2, bidirectional=True, proj_size=16)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(50, 8, 33, generator=gen)
    hx = _states("lstm", 2, 2, 8, 64, 16, torch.float32, gen)
    caller = torch.cuda.Stream() if user_stream else torch.cuda.current_stream()
    with torch.cuda.stream(caller):
        _check_against_torch(theirs, ours, x, hx, TOL[torch.float32], backend=backend, device=device)
    torch.cuda.synchronize()
    assert len(streams) == 4  # forward of 2 layers x 2 directions; a backward calls no _direction
    assert streams[0] != caller and streams[2] != caller  # the reverse direction runs first, on the side stream
    assert streams[1] == caller and streams[3] == caller


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_unbatched(kind, batch_first):
    theirs, ours = _modules(kind, 4, 5, num_layers=2, bidirectional=True, batch_first=batch_first)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    for hx in (None, _states(kind, 2, 2, 1, 5, 0, torch.float64, gen, unbatched=True)):
        _check_against_torch(theirs, ours, x, hx, TOL[torch.float64])


@pytest.mark.parametrize("kind", KINDS)
def test_t1_and_empty_batch(kind):
    theirs, ours = _modules(kind, 3, 4, num_layers=2)
    gen = torch.Generator().manual_seed(8)
    _check_against_torch(theirs, ours, torch.randn(1, 3, 3, generator=gen, dtype=torch.float64), None,
                         TOL[torch.float64])
    # float32 with a state at 3 and 20 rows: one step multiplies W_ih and W_hh as they are, no packed copy, by
    # fastseq's matrix-vector products at 3 rows (sizes not multiples of a vector) and the library GEMM at 20
    for n in (3, 20):
        theirs32, ours32 = _modules(kind, 21, 37, torch.float32, num_layers=2)
        _check_against_torch(theirs32, ours32, torch.randn(1, n, 21, generator=gen),
                             _states(kind, 2, 1, n, 37, 0, torch.float32, gen), TOL[torch.float32])
    with on_backend(FAST):
        y, _ = ours(torch.randn(4, 0, 3, dtype=torch.float64))
    assert y.shape == theirs(torch.randn(4, 0, 3, dtype=torch.float64))[0].shape


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_long_sequence(kind):
    """T=300 in float64: no drift against torch, finite; the states stay bounded."""
    theirs, ours = _modules(kind, 8, 16, bidirectional=True)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(300, 2, 8, generator=gen, dtype=torch.float64) * 3
    _check_against_torch(theirs, ours, x, None, TOL[torch.float64])


@pytest.mark.parametrize("kind", KINDS + ["lstm_proj"])
def test_gradcheck(kind):
    mode = "lstm" if kind == "lstm_proj" else kind
    gen = torch.Generator().manual_seed(10)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    T, N, C, H, P = 3, 2, 2, 3, 2 if kind == "lstm_proj" else 0
    G, hout = GATES[mode], P or H
    params = [t for _ in range(2) for t in [rn(G * H, C), rn(G * H, hout), rn(G * H), rn(G * H)]
              + ([rn(P, H)] if P else [])]  # both directions
    h0 = rn(2, N, hout)
    c0 = rn(2, N, H) if mode == "lstm" else None

    def fn(x, h0, c0, *params):
        hx = (h0, c0) if mode == "lstm" else h0
        return getattr(F, mode)(x, hx, params, True, 1, 0.0, False, True, False)

    with on_backend(FAST):
        assert torch.autograd.gradcheck(fn, (rn(T, N, C), h0, c0, *params))
    batch_sizes = torch.tensor([2, 1, 1])  # packed, ragged

    def packed(x, h0, c0, *params):
        hx = (h0, c0) if mode == "lstm" else h0
        return getattr(F, mode)(x, hx, params, True, 1, 0.0, False, True, False, batch_sizes=batch_sizes)

    with on_backend(FAST):
        assert torch.autograd.gradcheck(packed, (rn(4, C), h0, c0, *params))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout(kind):
    """Training: stochastic, shape kept, dropout applied between layers only (the first layer's state and the
    last layer's output untouched). Eval: deterministic and equal to torch."""
    theirs, ours = _modules(kind, 6, 8, num_layers=3, dropout=0.5)
    x = torch.randn(5, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    theirs.eval()
    ours.eval()
    _check_against_torch(theirs, ours, x, None, TOL[torch.float64])
    with on_backend(FAST):
        y_eval, h_eval = ours(x)
        ours.train()
        torch.manual_seed(0)
        y1, h1 = ours(x)
        y2, _ = ours(x)
    h_eval, h1 = (h_eval[0], h1[0]) if kind == "lstm" else (h_eval, h1)
    assert y1.shape == y_eval.shape and h1.shape == h_eval.shape
    assert not torch.equal(y1, y2), "dropout in training should be stochastic"
    assert_close(h1[0], h_eval[0], 1e-12, 1e-12, "layer 0 state (before any dropout)")
    assert not torch.allclose(h1[1], h_eval[1]), "layer 1 sees dropout on layer 0's output"
    assert (y1 != 0).all(), "no dropout on the last layer's output"


def test_bfloat16_within_torch_error():
    theirs, ours = _modules("lstm", 32, 32, dtype=torch.float64, num_layers=2)
    x = torch.randn(8, 4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    ref = theirs(x)[0]
    tb = theirs.to(torch.bfloat16)
    ob = ours.to(torch.bfloat16)
    with on_backend(FAST):
        got = ob(x.bfloat16())[0]
    assert got.dtype == torch.bfloat16
    assert_within_torch_error(got, tb(x.bfloat16())[0], ref, "bf16 LSTM output", factor=2.0)


def _half_params() -> list:
    """(backend_device, dtype) params of the GPU backends: float16, and bfloat16 on a GPU (Triton's interpreter
    mis-rounds bfloat16)."""
    return [pytest.param(p.values[0], dtype, marks=p.marks, id=f"{p.id}-{str(dtype)[6:]}") for p in GPU_BACKENDS
            for dtype in ((torch.float16, torch.bfloat16) if p.values[0][1] == "cuda" else (torch.float16,))]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("backend_device, dtype", _half_params())
def test_half_within_torch_error_gpu_backends(backend_device, dtype, kind):
    """Output and the gradient of the input in float16 / bfloat16: error against float64 no more than twice torch's
    (its modules on the CPU, in the same dtype)."""
    backend, device = backend_device
    theirs, ours = _modules(kind, 32, 32, num_layers=2)
    x = torch.randn(8, 4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    dy = torch.randn(8, 4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    results = []
    for module, where in ((theirs, "cpu"), (copy.deepcopy(theirs).to(dtype), "cpu"), (ours.to(device, dtype), device)):
        xi = x.to(where, module.weight_ih_l0.dtype).requires_grad_()
        with on_backend(backend if module is ours else "reference"):
            y = module(xi)[0]
            (dx,) = torch.autograd.grad(y, xi, dy.to(y))
        results.append((y, dx))
    (ref_y, ref_dx), (torch_y, torch_dx), (y, dx) = results
    assert y.dtype == dtype
    assert_within_torch_error(y, torch_y, ref_y, f"{dtype} {kind} output", factor=2.0)
    assert_within_torch_error(dx, torch_dx, ref_dx, f"{dtype} {kind} dinput", factor=2.0)


def test_state_dict_both_ways_and_flatten():
    theirs = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3)
    ours = fnn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert "weight_hr_l1_reverse" in ours.state_dict()
    theirs.load_state_dict(ours.state_dict())
    ours.flatten_parameters()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    # RNNBase, not torch.nn.LSTM / GRU / RNN, whose instances torch.compile refuses to trace
    for module in (ours, fnn.GRU(2, 2), fnn.RNN(2, 2)):
        assert isinstance(module, torch.nn.RNNBase)
        assert not isinstance(module, (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_forward_reads_the_parameters_of_the_call(kind):
    """forward uses the module's parameters as they are at the call, as torch's does: after one is replaced, and
    under torch.func.functional_call (other tensors for one call, the module's own after it)."""
    theirs, ours = _modules(kind, 4, 5, torch.float32)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, generator=gen)
    ours(x)  # a first call with the original parameters
    other = {n: torch.randn(p.shape, generator=gen) for n, p in theirs.named_parameters()}
    with on_backend(FAST):
        got = torch.func.functional_call(ours, other, (x,))
    want = torch.func.functional_call(theirs, other, (x,))
    for i, (g, w) in enumerate(zip(_flat(got), _flat(want), strict=True)):
        assert_close(g, w, *TOL[torch.float32], f"functional_call output {i}")
    # float64 parameters for a float64 input: torch's dtype check sees the call's parameters too
    other64 = {n: t.double() for n, t in other.items()}
    with on_backend(FAST):
        got = torch.func.functional_call(ours, other64, (x.double(),))
    want = torch.func.functional_call(theirs, other64, (x.double(),))
    for i, (g, w) in enumerate(zip(_flat(got), _flat(want), strict=True)):
        assert_close(g, w, *TOL[torch.float64], f"float64 functional_call output {i}")
    ours.weight_hh_l0 = torch.nn.Parameter(other["weight_hh_l0"])
    theirs.weight_hh_l0 = torch.nn.Parameter(other["weight_hh_l0"].clone())
    with on_backend(FAST):
        got = ours(x)
    for i, (g, w) in enumerate(zip(_flat(got), _flat(theirs(x)), strict=True)):
        assert_close(g, w, *TOL[torch.float32], f"output {i} after replacing weight_hh_l0")


def test_falls_back_with_warning():
    """Where no backend of the device can run the op (here float16 on the CPU: the cpu backend lacks it, and triton
    is not among the CPU's backends unless requested) the op runs on the reference backend with a one-time warning,
    never silently."""
    backends._warned.clear()
    theirs, ours = _modules("gru", 3, 4, dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, _ = ours(torch.randn(2, 2, 3, dtype=torch.float16))
    assert y.dtype == torch.float16
    assert any("rnn_layer runs on the reference backend" in str(w.message) for w in caught)


@pytest.mark.parametrize("kind", ["lstm_proj", "gru", "rnn_relu"])
def test_opcheck(kind):
    _opcheck(kind, FAST, "cpu", torch.float64)


@pytest.mark.parametrize("backend_device", GPU_BACKENDS)
def test_opcheck_gpu_backends(backend_device):
    backend, device = backend_device
    _opcheck("lstm_proj", backend, device, torch.float32)


def _opcheck(kind: str, backend: str, device: str, dtype: torch.dtype) -> None:
    """torch.library.opcheck of fastseq::rnn_layer on `backend`, padded and packed (reversed)."""
    mode = "lstm" if kind == "lstm_proj" else kind
    gen = torch.Generator().manual_seed(13)
    rn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()  # noqa: E731
    C, H, P = 3, 4, 2 if kind == "lstm_proj" else 0
    G, hout = GATES[mode], P or H
    params = [rn(G * H, C), rn(G * H, hout), rn(G * H), rn(G * H), rn(P, H) if P else None]
    for x, bs, reverse in ((rn(3, 2, C), None, False), (rn(4, C), torch.tensor([2, 1, 1]), True)):
        args = (mode, x, rn(2, hout), rn(2, H) if mode == "lstm" else None, *params, None, reverse, bs)
        with on_backend(backend):
            torch.library.opcheck(torch.ops.fastseq.rnn_layer, args)


def test_torch_compile_fullgraph():
    """fastseq.functional.lstm traces into one graph (the custom op with its fake and autograd formula). The modules
    do too (tests/test_integration.py): they derive from torch.nn.RNNBase, not from torch.nn.LSTM / GRU / RNN, whose
    instances Dynamo refuses unless torch._dynamo.config.allow_rnn is set."""
    theirs, ours = _modules("lstm", 3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        y, h, c = F.lstm(x, None, params, True, 2, 0.0, False, True, False)
        return y, (h, c)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y, (h, c) = compiled(x, *ours._flat_weights)
    yt, (ht, ct) = theirs(x)
    assert_close(y, yt, 1e-10, 1e-9, "output")
    (gx,) = torch.autograd.grad((y.sum() + h.sum() + c.sum()), x)
    (gt,) = torch.autograd.grad((yt.sum() + ht.sum() + ct.sum()), x)
    assert_close(gx, gt, 1e-10, 1e-9, "dinput")


def _error_kind(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


@pytest.mark.parametrize("case", ["feature_size", "hx_shape", "hx_layers", "hx_dims", "input_dtype", "hx_dtype",
                                  "input_dims", "packed_device"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bad_input_errors_like_torch(kind, case):
    theirs, ours = _modules(kind, 3, 4, dtype=torch.float32, num_layers=2)
    x = torch.randn(5, 2, 3)
    L = 2
    make = {
        "feature_size": lambda: (torch.randn(5, 2, 4), None),
        "hx_shape": lambda: (x, _states(kind, L, 1, 3, 4, 0, torch.float32, torch.Generator())),
        "hx_layers": lambda: (x, _states(kind, 1, 1, 2, 4, 0, torch.float32, torch.Generator())),
        "hx_dims": lambda: (x, _states(kind, L, 1, 2, 4, 0, torch.float32, torch.Generator(), unbatched=True)),
        "input_dtype": lambda: (x.double(), None),
        "hx_dtype": lambda: (x, _states(kind, L, 1, 2, 4, 0, torch.float64, torch.Generator())),
        "input_dims": lambda: (torch.randn(5, 2, 3, 1), None),
        "packed_device": lambda: (pack_padded_sequence(torch.randn(5, 2, 3, device="meta"), [5, 3]), None),
    }[case]
    args = make()
    e_theirs = _error_kind(lambda: theirs(*args))
    with fastseq.backend(FAST):
        e_ours = _error_kind(lambda: ours(*args))
    assert e_theirs is not None and e_ours is not None, (e_theirs, e_ours)
    assert isinstance(e_ours, type(e_theirs)), f"torch raised {type(e_theirs).__name__}, fastseq {e_ours!r}"


def test_functional_errors_name_the_argument():
    w = [torch.randn(12, 3), torch.randn(12, 4)]
    with pytest.raises(RuntimeError, match="input_size. Expected 3, got 5"):
        F.gru(torch.randn(2, 1, 5), None, w, False)
    with pytest.raises(RuntimeError, match="params must hold 2 tensors"):
        F.gru(torch.randn(2, 1, 3), None, w + [torch.randn(12)], False)
    with pytest.raises(RuntimeError, match="hx"):
        F.gru(torch.randn(2, 1, 3), torch.randn(1, 2, 4), w, False)
    with pytest.raises(RuntimeError, match="weight_hh_l0 must have shape"):
        F.gru(torch.randn(2, 1, 3), None, [w[0], torch.randn(12, 5)], False)
    with pytest.raises(RuntimeError, match="sequence length"):
        F.gru(torch.randn(0, 1, 3), None, w, False)
    with pytest.raises(TypeError, match="batch_sizes"):
        F.gru(torch.randn(2, 3), None, w, False, batch_sizes=torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["lstm_proj", "peephole_lstm", "gru", "rnn_relu"])
def test_time_loop_out_of_place_as_on_cuda(kind, packed):
    """The time loop as the CUDA kernels run it, not in place (x W_ih^T in a buffer of its own, the backward's dc or
    dh state alternating between two buffers), here with the Triton step kernels in Triton's interpreter told not
    to run in place, against the same steps in place: outputs, saved tensors and gradients equal."""
    if backends.unavailable_reason("triton") is not None or backends.extension() is None:
        pytest.skip(f"needs the triton backend and fastseq._C: {backends.unavailable_reason('triton')}")
    from fastseq.kernels.rnn_layer import LayerSteps

    mode = "lstm" if kind == "lstm_proj" else kind
    gen = torch.Generator().manual_seed(17)
    rn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    G, C, H, P, N = modes.mode(mode).gates, 5, 6, 3 if kind == "lstm_proj" else 0, 4
    hout, cell = P or H, mode in ("lstm", "peephole_lstm")
    batch_sizes = torch.tensor([4, 3, 3, 1]) if packed else None
    x = rn(11, C) if packed else rn(4, N, C)
    args = [x, rn(N, hout), rn(N, H) if cell else None, rn(G * H, C) * 0.4, rn(G * H, hout) * 0.4, rn(G * H),
            rn(G * H), rn(P, H) * 0.4 if P else None, rn(3, H) * 0.5 if mode == "peephole_lstm" else None]
    ext = backends.extension()
    results = []
    for in_place in (True, False):
        steps = LayerSteps(mode, args[5], args[6], args[8], in_place=in_place)
        y, h_n, c_n, saved = ext.rnn_layer_fwd(mode, *args, True, batch_sizes, steps)
        dy, dh_n = torch.linspace(-1, 1, y.numel()).reshape(y.shape), torch.linspace(1, -1, h_n.numel()).reshape(
            h_n.shape)
        dc_n = torch.ones_like(c_n) if cell else None
        saved = [torch.empty(0) if t is None else t for t in saved]  # the absent ones are not read
        dx, dh0, dc0, dws = ext.rnn_layer_bwd(mode, dy, dh_n, dc_n, *args, True, batch_sizes, saved, steps)
        results.append([y, h_n, c_n, *saved, dx, dh0, dc0, *dws])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"result {i}: {m}")


def test_mode_tables_agree():
    """fastseq/modes.py is csrc/rnn_modes.h's table in Python: the same modes, in the same order, with the same
    fields."""
    ext = backends.extension()
    if ext is None:
        pytest.fail("fastseq._C is not built")
    assert [dataclasses.astuple(m) for m in modes.MODES.values()] == [tuple(t) for t in ext.rnn_modes]
