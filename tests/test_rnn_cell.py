"""Recurrent cell steps (LSTM, peephole LSTM, GRU, Elman RNN tanh/relu): every backend against the float64 reference
and against torch's cells with the same weights, outputs and the gradients of the input, the state and every
parameter; modules, custom ops, torch.compile and bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_close, assert_within_torch_error, dtype_cases, on_backend

import fastseq
from fastseq import backends, reference
from fastseq import functional as F

KINDS = ["lstm", "peephole", "gru", "rnn_tanh", "rnn_relu"]
TORCH_KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]  # the kinds torch has
GATES = {"lstm": 4, "peephole": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
HIDDEN = [1, 3, 33, 257, 1024]
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}  # relative to the largest reference element of each tensor
DTYPES = {"cpu": [torch.float32, torch.float64, torch.bfloat16], "cuda": [torch.float32, torch.float16, torch.bfloat16]}


def _dtypes(backend: str, device: str) -> list[torch.dtype]:
    if _interpreted(backend, device):
        # float16 runs the fully fused steps; bfloat16 the pointwise kernels after torch's GEMMs, since Triton's
        # interpreter does not support bfloat16 tl.dot (triton-lang/triton#11584).
        return [torch.float32, torch.float16, torch.bfloat16]
    return [d for d in DTYPES[device] if not (backend == "triton" and d == torch.float64)]


def _interpreted(backend: str, device: str) -> bool:
    return backend == "triton" and device == "cpu"


def _n_states(kind: str) -> int:
    return 2 if kind in ("lstm", "peephole") else 1


def _names(kind: str, bias: bool = True) -> list[str]:
    outs = ["hy", "cy"][: _n_states(kind)]
    ins = ["dx", "dh", "dc"][: 1 + _n_states(kind)] + ["dw_ih", "dw_hh"]
    return outs + ins + (["db_ih", "db_hh"] if bias else []) + (["dpeephole"] if kind == "peephole" else [])


def _inputs(kind, n, c, h, bias=True, x_scale=1.0, seed=0, unbatched=False):
    """Float64 CPU (x, states, params) and upstream grads; params = [w_ih, w_hh, b_ih, b_hh(, peephole)] with
    torch's initialisation bound 1/sqrt(H) for the weights, so the gates are neither saturated nor flat."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    un = lambda *s: (torch.rand(*s, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(h)  # noqa: E731
    gates = GATES[kind]
    x = rn(n, c) * x_scale
    states = [rn(n, h) for _ in range(_n_states(kind))]
    params = [un(gates * h, c), un(gates * h, h), rn(gates * h) if bias else None, rn(gates * h) if bias else None]
    if kind == "peephole":
        params.append(rn(3, h) * 0.5)
    grads = [rn(n, h) for _ in range(_n_states(kind))]
    if kind == "rnn_relu":  # no gradient through the kink, where a rounding of the input flips relu'
        pre = x @ params[0].t() + states[0] @ params[1].t() + sum(b for b in params[2:] if b is not None)
        grads[0] = torch.where(pre.abs() < 0.05, 0.0, grads[0])
    if unbatched:
        x, states, grads = x[0], [s[0] for s in states], [d[0] for d in grads]
    return x, states, params, grads


def _call(kind: str, impl: str, x, states, params):
    """The step by fastseq ('ours'), fastseq.reference ('ref') or torch's cell functions ('torch'); a tuple."""
    if impl == "ours":
        fn = {"lstm": F.lstm_cell, "peephole": F.peephole_lstm_cell, "gru": F.gru_cell,
              "rnn_tanh": F.rnn_tanh_cell, "rnn_relu": F.rnn_relu_cell}[kind]
    elif impl == "torch":
        fn = {"lstm": torch.lstm_cell, "gru": torch.gru_cell, "rnn_tanh": torch.rnn_tanh_cell,
              "rnn_relu": torch.rnn_relu_cell}[kind]
    elif kind in ("lstm", "peephole"):
        fn = reference.lstm_cell
    else:
        fn = lambda x, h, *p: reference.gru_cell(x, h, *p) if kind == "gru" else \
            reference.rnn_cell(x, h, *p, nonlinearity=kind[4:])  # noqa: E731
    out = fn(x, tuple(states) if _n_states(kind) == 2 else states[0], *params)
    return out if isinstance(out, tuple) else (out,)


def _fwd_bwd(kind, impl, x, states, params, grads, dtype, device):
    """Outputs, then the gradients of x, the states and every parameter given, for leaves cast to dtype/device."""
    cast = lambda t: None if t is None else t.to(device, dtype).requires_grad_()  # noqa: E731
    x, states, params = cast(x), [cast(s) for s in states], [cast(p) for p in params]
    outs = _call(kind, impl, x, states, params)
    leaves = [x, *states, *(p for p in params if p is not None)]
    return [*outs, *torch.autograd.grad(outs, leaves, [d.to(device, dtype) for d in grads])]


def _compare(kind, backend, device, dtype, data, bias=True):
    with on_backend(backend):
        ours = _fwd_bwd(kind, "ours", *data, dtype, device)
    ref = _fwd_bwd(kind, "ref", *data, torch.float64, "cpu")
    names = _names(kind, bias)
    assert len(ours) == len(ref) == len(names)
    if dtype in TOL:
        for name, o, r in zip(names, ours, ref):
            assert o.dtype == dtype and o.device.type == device, name
            tol = TOL[dtype] * max(1.0, r.abs().max().item())
            assert_close(o, r, tol, TOL[dtype], f"{kind} {name} {dtype}")
    else:  # half types: at most 2x the error of torch's own cell (the reference's ops for the peephole cell)
        theirs = _fwd_bwd(kind, "torch" if kind in TORCH_KINDS else "ref", *data, dtype, device)
        for name, o, t, r in zip(names, ours, theirs, ref):
            assert o.dtype == dtype, name
            # The largest error over a handful of elements (bias gradients at H = 1) is mostly luck: 4x there.
            assert_within_torch_error(o, t, r, f"{kind} {name} {dtype}", factor=2.0 if o.numel() >= 16 else 4.0)


CASES = dtype_cases(_dtypes)  # (backend, device, dtype): _compare's tolerance is TOL[dtype]


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_against_reference(backend, device, dtype, kind, hidden):
    slow = _interpreted(backend, device) and hidden >= 257  # the interpreter: few rows, float32 only at 1024
    if slow and hidden >= 1024 and dtype != torch.float32:
        pytest.skip("Triton's interpreter runs hidden size 1024 in float32 only (minutes per dtype otherwise)")
    n, c = (2, 8) if slow else (5, 11)
    _compare(kind, backend, device, dtype, _inputs(kind, n, c, hidden))


@pytest.mark.parametrize("n, c, hidden", [(1, 8, 33), (2, 37, 5), (3, 3, 16), (4, 64, 1), (4, 100, 100)])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_few_rows_gate_gemm(kind, n, c, hidden):
    """At most 4 float32 rows the CPU step's gate GEMMs are fastseq's own (a dot product per output, rows of w four at
    a time, the vector tail of K and the last group of fewer than 4 rows of w separately): against the reference,
    forward and backward; with input sizes below a vector's width it is the library GEMM."""
    _compare(kind, "cpu", "cpu", torch.float32, _inputs(kind, n, c, hidden))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_against_torch_same_weights(backend_device, kind, bias):
    backend, device = backend_device
    data = _inputs(kind, 6, 13, 33, bias=bias, seed=1)
    with on_backend(backend):
        ours = _fwd_bwd(kind, "ours", *data, torch.float32, device)
    theirs = _fwd_bwd(kind, "torch", *data, torch.float32, device)
    for name, o, t in zip(_names(kind, bias), ours, theirs, strict=True):
        assert_close(o, t, 2e-5 * max(1.0, t.abs().max().item()), 2e-5, f"{kind} {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_without_bias(backend_device, kind):
    backend, device = backend_device
    _compare(kind, backend, device, torch.float32, _inputs(kind, 4, 9, 17, bias=False), bias=False)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_of_one_and_unbatched(backend_device, kind):
    backend, device = backend_device
    _compare(kind, backend, device, torch.float32, _inputs(kind, 1, 9, 33))
    _compare(kind, backend, device, torch.float32, _inputs(kind, 1, 9, 33, unbatched=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend, device, dtype", CASES)
def test_large_inputs_saturate_without_nan(backend, device, dtype, kind):
    _compare(kind, backend, device, dtype, _inputs(kind, 7, 16, 33, x_scale=50.0, seed=2))


@pytest.mark.sanitize
def test_non_contiguous_inputs_and_weights(backend_device):
    backend, device = backend_device
    x = torch.randn(12, 22, device=device)[::2, ::2]  # (6, 11), strided
    h, c = torch.randn(6, 66, device=device)[:, ::2], torch.randn(33, 6, device=device).t()
    w_ih = torch.randn(11, 132, device=device).t() * 0.2  # (132, 11) transposed
    w_hh, b = torch.randn(132, 66, device=device)[:, ::2] * 0.2, torch.randn(264, device=device)[::2]
    args = [t.requires_grad_() for t in (x, h, c, w_ih, w_hh, b)]
    with on_backend(backend):
        ours = F.lstm_cell(args[0], (args[1], args[2]), args[3], args[4], args[5], None)
        ours_g = torch.autograd.grad(ours, args, [torch.ones_like(ours[0]), torch.ones_like(ours[1])])
    theirs = torch.lstm_cell(args[0], (args[1], args[2]), args[3], args[4], args[5], None)
    theirs_g = torch.autograd.grad(theirs, args, [torch.ones_like(theirs[0]), torch.ones_like(theirs[1])])
    for o, t in zip((*ours, *ours_g), (*theirs, *theirs_g), strict=True):
        assert_close(o, t, 5e-5, 2e-5)


@pytest.mark.parametrize("used", [0, 1])
def test_lstm_gradients_when_one_output_is_unused(backend_device, used):
    backend, device = backend_device
    x, (h, c), params, _ = _inputs("lstm", 4, 6, 9)
    leaves = [t.float().to(device).requires_grad_() for t in (x, h, c, *params)]
    with on_backend(backend):
        ours = torch.autograd.grad(F.lstm_cell(leaves[0], leaves[1:3], *leaves[3:])[used].sum(), leaves)
    theirs = torch.autograd.grad(torch.lstm_cell(leaves[0], leaves[1:3], *leaves[3:])[used].sum(), leaves)
    for o, t in zip(ours, theirs, strict=True):
        assert_close(o, t, 2e-5 * max(1.0, t.abs().max().item()), 2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(backend_device, kind):
    backend, device = backend_device
    x, states, params, grads = _inputs(kind, 0, 5, 7)
    with on_backend(backend):
        out = _fwd_bwd(kind, "ours", x, states, params, grads, torch.float32, device)
    for name, t, r in zip(_names(kind), out, _fwd_bwd(kind, "ref", x, states, params, grads, torch.float32, "cpu"),
                          strict=True):
        assert_close(t, r, 0, 0, name)  # empty, or zero gradients of the parameters


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    x, states, params, _ = _inputs(kind, 3, 4, 5, seed=3)
    leaves = [t.requires_grad_() for t in (x, *states, *params)]
    ns = _n_states(kind)
    fn = lambda x, *rest: _call(kind, "ours", x, list(rest[:ns]), list(rest[ns:]))  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def _op_args(kind: str, requires_grad: bool, bias: bool = True):
    x, states, params, _ = _inputs(kind, 3, 4, 5, bias=bias)
    ts = [None if t is None else t.float().requires_grad_(requires_grad) for t in (x, *states, *params)]
    if kind in ("lstm", "peephole"):
        return torch.ops.fastseq.lstm_cell.default, (*ts, None) if kind == "lstm" else tuple(ts)
    if kind == "gru":
        return torch.ops.fastseq.gru_cell.default, tuple(ts)
    return torch.ops.fastseq.rnn_cell.default, (*ts, kind[4:])


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    for requires_grad, bias in ((False, True), (True, True), (True, False)):
        torch.library.opcheck(*_op_args(kind, requires_grad, bias))


def test_opcheck_backward_ops():
    x, h, c, dh, dc = (torch.randn(3, 5) for _ in range(5))
    x = torch.randn(3, 4)
    w4, w3, w1 = torch.randn(20, 4), torch.randn(15, 4), torch.randn(5, 4)
    u4, u3, u1 = torch.randn(20, 5), torch.randn(15, 5), torch.randn(5, 5)
    p = torch.randn(3, 5)
    hy, cy, ws = torch.ops.fastseq.lstm_cell(x, h, c, w4, u4, None, None, p)
    for needs in ((True, True, True, True), (False, True, False, False)):
        torch.library.opcheck(torch.ops.fastseq.lstm_cell_backward.default,
                              (dh, dc, x, h, c, cy, ws, w4, u4, p, "cpu", *needs))
        hy, ws = torch.ops.fastseq.gru_cell(x, h, w3, u3, None, None)
        torch.library.opcheck(torch.ops.fastseq.gru_cell_backward.default, (dh, x, h, ws, w3, u3, "cpu", *needs))
        hy = torch.ops.fastseq.rnn_cell(x, h, w1, u1, None, None, "relu")
        torch.library.opcheck(torch.ops.fastseq.rnn_cell_backward.default,
                              (dh, x, h, hy, w1, u1, "relu", "cpu", *needs))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_cxx_autograd_equals_the_custom_op(kind, bias):
    """The eager path of the cpu backend (fastseq._C.cell: the step and its autograd formula in C++) gives the
    custom op's outputs and gradients (its Python autograd formula, what torch.compile runs) bit for bit, for every
    subset of the inputs requiring grad that a caller has (all, the parameters only, the input only)."""
    x, states, params, grads = _inputs(kind, 3, 4, 5, bias=bias)
    for wanted in ("all", "params", "input"):
        def run(ours: bool):
            ts = [None if t is None else t.float() for t in (x, *states, *params)]
            ns = _n_states(kind)
            leaves = {"all": ts, "params": ts[1 + ns:], "input": ts[:1]}[wanted]
            leaves = [t.requires_grad_() for t in leaves if t is not None]
            if ours:
                out = _call(kind, "ours", ts[0], ts[1:1 + ns], ts[1 + ns:])
            else:
                op, _ = _op_args(kind, False)
                extra = (None,) if kind == "lstm" else () if kind == "gru" else (kind[4:],)
                out = op(*ts, *extra)
                out = out[:ns] if isinstance(out, tuple) else (out,)
            assert ("CellFunction" in out[0].grad_fn.name()) == ours
            return [*out, *torch.autograd.grad(out, leaves, [d.float() for d in grads])]

        with fastseq.backend("cpu"):
            for i, (a, b) in enumerate(zip(run(True), run(False), strict=True)):
                assert_close(a, b, 0, 0, f"{kind} {wanted} tensor {i}")


def test_backward_runs_on_the_backend_of_forward():
    """A step run on the reference backend and differentiated outside that block still gets its gradients right."""
    data = _inputs("gru", 4, 6, 9)
    with fastseq.backend("reference"):
        x = data[0].float().requires_grad_()
        hy = F.gru_cell(x, data[1][0].float(), *(p.float() for p in data[2]))
    got = torch.autograd.grad(hy, x, data[3][0].float())[0]
    want = _fwd_bwd("gru", "ref", *data, torch.float64, "cpu")[1]
    assert_close(got, want, 2e-5, 2e-5, "dx")


MODULES = [(fastseq.nn.LSTMCell, torch.nn.LSTMCell, {}), (fastseq.nn.GRUCell, torch.nn.GRUCell, {}),
           (fastseq.nn.RNNCell, torch.nn.RNNCell, {}), (fastseq.nn.RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"})]


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", MODULES)
@pytest.mark.parametrize("batched", [True, False])
def test_module_matches_torch_and_shares_state_dict(ours_cls, torch_cls, kwargs, batched):
    torch.manual_seed(0)
    theirs, ours = torch_cls(7, 33, **kwargs), ours_cls(7, 33, **kwargs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(*([5] if batched else []), 7, requires_grad=True)
    for hx in (None, "given"):
        if hx is not None:
            h = torch.randn(*x.shape[:-1], 33)
            hx = (h, torch.randn_like(h)) if torch_cls is torch.nn.LSTMCell else h
        y, y2 = ours(x, hx), theirs(x, hx)
        y, y2 = (y, y2) if isinstance(y, tuple) else ((y,), (y2,))
        for o, t in zip(y, y2, strict=True):
            assert_close(o, t, 2e-5, 2e-5, "output")
        loss = lambda ys: sum((t * torch.linspace(-1, 1, t.numel()).reshape(t.shape)).sum() for t in ys)  # noqa
        for o, t in zip(torch.autograd.grad(loss(y), (x, *ours.parameters())),
                        torch.autograd.grad(loss(y2), (x, *theirs.parameters())), strict=True):
            assert_close(o, t, 1e-4, 1e-5, "grad")


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", MODULES)
@pytest.mark.parametrize("extra", [{}, {"bias": False}, {"dtype": torch.float64}])
def test_module_construction_like_torch(ours_cls, torch_cls, kwargs, extra):
    torch.manual_seed(1)
    theirs = torch_cls(8, 6, **kwargs, **extra)
    torch.manual_seed(1)
    ours = ours_cls(8, 6, **kwargs, **extra)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():  # same initialisation, same RNG draws
        assert torch.equal(ours.state_dict()[k], v) and ours.state_dict()[k].dtype == v.dtype, k
    assert repr(ours) == repr(theirs)
    x = torch.randn(3, 8, dtype=extra.get("dtype", torch.float32))
    y, y2 = ours(x), theirs(x)
    for o, t in zip(y if isinstance(y, tuple) else (y,), y2 if isinstance(y2, tuple) else (y2,), strict=True):
        assert_close(o, t, 2e-5, 2e-5)


def test_module_rejects_an_unknown_nonlinearity_like_torch():
    cell = fastseq.nn.RNNCell(3, 4, nonlinearity="gelu")
    with pytest.raises(RuntimeError, match="Unknown nonlinearity: gelu"):
        cell(torch.randn(2, 3))


@pytest.mark.parametrize("bias", [True, False])
def test_peephole_module(bias):
    torch.manual_seed(0)
    cell = fastseq.nn.PeepholeLSTMCell(7, 33, bias=bias)
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else []) + ["weight_peephole"]
    assert [n for n, _ in cell.named_parameters()] == names
    assert cell.weight_peephole.shape == (3, 33) and cell.weight_ih.shape == (132, 7)
    bound = 1 / math.sqrt(33)
    for name, p in cell.named_parameters():
        assert p.abs().max() <= bound and p.std() > bound / 3, name
    x, h, c = torch.randn(4, 7), torch.randn(4, 33), torch.randn(4, 33)
    p = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, cell.weight_peephole]
    for got, want in zip(cell(x, (h, c)), reference.lstm_cell(x, (h, c), *p), strict=True):
        assert_close(got, want, 2e-5, 2e-5)
    zeros = torch.zeros(4, 33)
    for got, want in zip(cell(x), reference.lstm_cell(x, (zeros, zeros), *p), strict=True):
        assert_close(got, want, 2e-5, 2e-5)
    assert cell(x[0])[0].shape == (33,)
    double = fastseq.nn.PeepholeLSTMCell(7, 33, bias=bias, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in double.parameters())


def test_torch_compile_fullgraph():
    """Compiled, a model on fastseq's cells gives torch's results: the same model on torch's cells."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.gru, self.out = torch.nn.LSTMCell(8, 16), torch.nn.GRUCell(16, 16), \
                torch.nn.Linear(16, 3)

        def forward(self, x):
            h, c = self.cell(x)
            h, c = self.cell(x, (h, c))
            return self.out(self.gru(h))

    torch.manual_seed(0)
    theirs = Model()
    ours = copy.deepcopy(theirs)
    fastseq.replace_modules(ours)
    assert isinstance(ours.cell, fastseq.nn.LSTMCell) and isinstance(ours.gru, fastseq.nn.GRUCell)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8, requires_grad=True)
    y, y2 = compiled(x), theirs(x)
    assert_close(y, y2, 2e-6, 2e-6)
    for o, t in zip(torch.autograd.grad(y.sum(), (x, *ours.parameters())),
                    torch.autograd.grad(y2.sum(), (x, *theirs.parameters())), strict=True):
        assert_close(o, t, 2e-6, 2e-6)


def _w(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("call,match", [
    (lambda: F.lstm_cell(_w(2, 5), (_w(2, 4), _w(2, 4)), _w(16, 3), _w(16, 4)),
     r"input has inconsistent input_size: got 5, expected 3"),
    (lambda: F.gru_cell(_w(2, 3), _w(3, 4), _w(12, 3), _w(12, 4)), r"hx must have shape \[2, 4\].*got \[3, 4\]"),
    (lambda: F.lstm_cell(_w(2, 3), (_w(2, 4), _w(2, 5)), _w(16, 3), _w(16, 4)),
     r"hx\[1\] must have shape \[2, 4\].*got \[2, 5\]"),
    (lambda: F.rnn_tanh_cell(_w(3), _w(1, 4), _w(4, 3), _w(4, 4)), r"hx must have shape \[4\].*1-D input"),
    (lambda: F.gru_cell(_w(2, 3), _w(2, 4), _w(12, 3), _w(12, 5)), r"w_hh must have shape \[3\*hidden_size"),
    (lambda: F.gru_cell(_w(2, 3), _w(2, 4), _w(9, 3), _w(12, 4)), r"w_ih must have shape \[12, input_size\]"),
    (lambda: F.gru_cell(_w(2, 3), _w(2, 4), _w(12, 3), _w(12, 4), _w(11)), r"b_ih must have shape \[12\]"),
    (lambda: F.rnn_relu_cell(_w(2, 3), _w(2, 4, dtype=torch.float64), _w(4, 3), _w(4, 4)),
     r"hx has dtype torch.float64 but input has dtype torch.float32"),
    (lambda: F.rnn_relu_cell(_w(2, 3), _w(2, 4), _w(4, 3), _w(4, 4), None, _w(4, dtype=torch.float64)),
     r"b_hh has dtype torch.float64"),
    (lambda: F.lstm_cell(_w(2, 3), (_w(2, 4), _w(2, 4)), _w(16, 3, device="meta"), _w(16, 4)),
     r"w_ih is on meta but input is on cpu"),
    (lambda: F.gru_cell(_w(2, 3), _w(2, 4, device="meta"), _w(12, 3), _w(12, 4)), r"hx is on meta"),
    (lambda: F.gru_cell(_w(2, 2, 3), _w(2, 4), _w(12, 3), _w(12, 4)), r"input must be 1-D .* or 2-D"),
    (lambda: F.gru_cell(torch.ones(2, 3, dtype=torch.long), _w(2, 4), _w(12, 3), _w(12, 4)),
     r"input must be a floating-point"),
    (lambda: F.peephole_lstm_cell(_w(2, 3), (_w(2, 4), _w(2, 4)), _w(16, 3), _w(16, 4), None, None, _w(4, 3)),
     r"w_peephole must have shape \[3, 4\], got \[4, 3\]"),
    (lambda: fastseq.nn.LSTMCell(3, 4)(_w(2, 5)), r"input has inconsistent input_size: got 5, expected 3"),
    (lambda: fastseq.nn.GRUCell(3, 4)(_w(2, 3), _w(2, 5)), r"hx must have shape \[2, 4\]"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.parametrize("call,match", [
    (lambda: F.gru_cell(_w(2, 3), (_w(2, 4), _w(2, 4)), _w(12, 3), _w(12, 4)), r"gru_cell: hx must be a Tensor"),
    (lambda: F.lstm_cell(_w(2, 3), _w(2, 4), _w(16, 3), _w(16, 4)), r"lstm_cell: hx must be a tuple \(h, c\).*Tensor"),
    (lambda: F.lstm_cell(_w(2, 3), (_w(2, 4),), _w(16, 3), _w(16, 4)), r"tuple of length 1"),
    (lambda: fastseq.nn.GRUCell(3, 4)(_w(2, 3), (_w(2, 4), _w(2, 4))), r"hx must be a Tensor"),
])
def test_wrong_kind_of_hx_is_a_type_error_like_torch(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_unsupported_dtype_falls_back_with_a_warning():
    data = _inputs("lstm", 3, 4, 5)
    with pytest.warns(UserWarning, match=r"lstm_cell runs on the reference backend \(cpu: .*float16"):
        ours = _fwd_bwd("lstm", "ours", *data, torch.float16, "cpu")
    ref = _fwd_bwd("lstm", "ref", *data, torch.float64, "cpu")
    for name, o, r in zip(_names("lstm"), ours, ref, strict=True):
        assert_close(o, r, 2e-2 * max(1.0, r.abs().max().item()), 2e-2, name)


def test_fast_argument_check_agrees():
    """fastseq._C's cell_args_ok (the happy path of the functional cells' checks) accepts well-formed steps and refuses
    each kind of argument the Python checks reject, so that every rejection still raises their error."""
    ext = backends.extension()
    x, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    w_ih, w_hh, b = torch.randn(16, 3), torch.randn(16, 4), torch.randn(16)
    assert ext.cell_args_ok(x, [h, c], w_ih, w_hh, b, b, None, 4)
    assert ext.cell_args_ok(x[0], [h[0], c[0]], w_ih, w_hh, None, None, torch.randn(3, 4), 4)
    bad = [(x, [h, c], w_ih, w_hh, b, b, None, 3), (x, [h, c[:1]], w_ih, w_hh, b, b, None, 4),
           (x, [h, c.double()], w_ih, w_hh, b, b, None, 4), (x, [h, c], w_ih[:, :2], w_hh, b, b, None, 4),
           (x, [h, c], w_ih, w_hh, b[:8], b, None, 4), (x, [h, c], w_ih, w_hh, b, b, torch.randn(4, 4), 4),
           (x.int(), [h, c], w_ih, w_hh, b, b, None, 4), (x[None], [h, c], w_ih, w_hh, b, b, None, 4),
           (x, [h[0], c[0]], w_ih, w_hh, b, b, None, 4)]
    for args in bad:
        assert not ext.cell_args_ok(*args)
