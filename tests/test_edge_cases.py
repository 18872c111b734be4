"""Torch's behaviour on hostile inputs, as regression tests: a swap to fastseq never changes a result silently.
Each test runs torch.nn and fastseq (same weights) on the same input and asserts the same outcome: both raise, or
the same outputs and gradients. On every backend that runs here (the C++ CPU kernels, Triton in the interpreter)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import BACKEND_PARAMS, assert_close, on_backend

import fastseq

CPU_BACKENDS = [p for p in BACKEND_PARAMS if p.values[0][1] == "cpu"]


def _outcome(fn):
    """("ok", grads) or ("error", the exception's type)."""
    try:
        return "ok", fn()
    except RuntimeError as e:
        return "error", type(e)


def _module_pair(name: str, *args, **kwargs):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(*args, **kwargs)
    ours = getattr(fastseq.nn, name)(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


# ------------------------------------------------------------------------------------- in-place use of outputs
def _changed_outputs_grads(module, make_input, pick, backend=None, inplace=True):
    """Gradients of the input and every parameter of a loss over `pick(outputs)` after each is changed by +1, in
    place (`t.add_(1)`) or not."""
    def run():
        torch.manual_seed(1)
        x = make_input().requires_grad_()
        with on_backend(backend) if backend else contextlib.nullcontext():
            outs = module(x)
        changed = [t.add_(1) if inplace else t + 1 for t in pick(outs)]
        loss = sum((t * torch.linspace(0.5, 1.5, t.numel()).view(t.shape)).sum() for t in changed)
        return torch.autograd.grad(loss, [x, *module.parameters()])
    return run


INPLACE_CASES = {
    "LayerNorm": (("LayerNorm", 8), lambda: torch.randn(3, 4, 8), lambda y: [y]),
    "LSTM-output": (("LSTM", 8, 5), lambda: torch.randn(4, 2, 8), lambda r: [r[0]]),
    "LSTM-batch_first-c_n": (("LSTM", 8, 5, 1, True, True), lambda: torch.randn(2, 4, 8), lambda r: [r[0], r[1][1]]),
    "GRU-output-h_n": (("GRU", 8, 5), lambda: torch.randn(4, 2, 8), lambda r: [r[0], r[1]]),
    "RNN-output": (("RNN", 8, 5), lambda: torch.randn(4, 2, 8), lambda r: [r[0]]),
    "LSTMCell-h-c": (("LSTMCell", 8, 5), lambda: torch.randn(2, 8), lambda r: list(r)),
    "LSTMCell-unbatched": (("LSTMCell", 8, 5), lambda: torch.randn(8), lambda r: list(r)),
    "GRUCell": (("GRUCell", 8, 5), lambda: torch.randn(2, 8), lambda r: [r]),
    "RNNCell": (("RNNCell", 8, 5), lambda: torch.randn(2, 8), lambda r: [r]),
}


@pytest.mark.parametrize("case", list(INPLACE_CASES))
@pytest.mark.parametrize("backend_device", CPU_BACKENDS)
def test_outputs_changed_in_place_like_torch(backend_device, case):
    """Residual code changes outputs in place (`y += x`). Where torch allows it fastseq does, with torch's
    gradients; where torch refuses (its LSTM and RNNCell save their outputs) fastseq refuses too or gives the
    gradients of the same change made out of place."""
    backend, _ = backend_device
    (name, *args), make_input, pick = INPLACE_CASES[case]
    ours, theirs = _module_pair(name, *args)
    kind, got = _outcome(_changed_outputs_grads(ours, make_input, pick, backend))
    torch_kind, _ = _outcome(_changed_outputs_grads(theirs, make_input, pick))
    if torch_kind == "ok":
        assert kind == "ok", f"torch allows changing the outputs in place, fastseq raised {got}"
    if kind == "ok":
        want = _changed_outputs_grads(theirs, make_input, pick, inplace=False)()
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, 1e-5, 1e-5, f"gradient {i}")


# ------------------------------------------------------------------------------------------- NaN and inf, attention
def _same_nan_and_values(name, got, want, atol, rtol):
    assert torch.equal(got.isnan().cpu(), want.isnan().cpu()), \
        f"{name}: NaN at {int(got.isnan().sum())} places, torch at {int(want.isnan().sum())}"
    assert_close(got.nan_to_num(), want.nan_to_num(), atol, rtol, name)


def _math_sdpa(q, k, v, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


SPECIALS = {  # where a special value goes: (tensor, index); S = the key length
    "nan-q": ("q", (0, 0, 1, 2), float("nan")), "nan-k0": ("k", (0, 0, 0, 1), float("nan")),
    "nan-k2": ("k", (0, 1, 2, 1), float("nan")), "nan-k-last": ("k", (1, 0, -1, 0), float("nan")),
    "nan-v": ("v", (0, 1, 3, 0), float("nan")), "nan-mask": ("mask", (1, 3), float("nan")),
    "inf-k": ("k", (0, 0, 1, 1), float("inf")), "-inf-k": ("k", (1, 1, -2, 3), float("-inf")),
}


@pytest.mark.parametrize("special", list(SPECIALS))
@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_attention_nan_and_inf_propagate_like_torch(backend_device, special):
    """A NaN or inf anywhere in q, k, v or a float mask reaches the same outputs and gradients as in torch's math
    attention (float64), whichever key block it falls in; the rest stays finite and right."""
    backend, device = backend_device
    interp = backend == "triton" and device == "cpu"
    S = 40 if interp else 200  # several key blocks on every backend
    dtype = torch.float16 if backend == "cuda" else torch.float32
    E = 64 if backend == "cuda" else 8
    g = torch.Generator().manual_seed(0)
    t = {"q": torch.randn(2, 2, 5, E, generator=g), "k": torch.randn(2, 2, S, E, generator=g),
         "v": torch.randn(2, 2, S, E, generator=g), "mask": torch.zeros(5, S)}
    where, index, value = SPECIALS[special]
    t[where][index] = value
    mask = t["mask"] if where == "mask" else None
    leaves = [t[n].to(device, dtype).requires_grad_() for n in ("q", "k", "v")]
    with on_backend(backend):
        out = fastseq.functional.scaled_dot_product_attention(*leaves, attn_mask=None if mask is None else
                                                              mask.to(device, dtype))
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))  # cuda: the backward is Triton's
    ref_leaves = [t[n].double().requires_grad_() for n in ("q", "k", "v")]
    ref = _math_sdpa(*ref_leaves, attn_mask=None if mask is None else mask.double())
    ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    _same_nan_and_values("out", out, ref, tol, tol)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        _same_nan_and_values(name, got, want, tol, tol)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("case", ["nan-key", "fully-masked-batch", "fully-masked-rows"])
def test_multihead_attention_nan_and_masked_rows_like_torch(case, need_weights, mode):
    """torch gives NaN for a NaN key, and for fully masked rows when it computes the weights (need_weights=True;
    its fused path gives 0 otherwise): the same outputs and weights here."""
    ours, theirs = _module_pair("MultiheadAttention", 8, 2, batch_first=True)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    kw = {}
    if case == "nan-key":
        k[0, 3, 1] = float("nan")
    elif case == "fully-masked-batch":
        kw["key_padding_mask"] = torch.tensor([[True] * 6, [False] * 6])
    else:
        kw["attn_mask"] = torch.tensor([[True] * 6] + [[False] * 6] * 4)
    for m in (ours, theirs):
        m.train(mode == "train")
    with torch.no_grad():
        got, got_w = ours(q, k, k, need_weights=need_weights, **kw)
        want, want_w = theirs(q, k, k, need_weights=need_weights, **kw)
    _same_nan_and_values("out", got, want, 1e-5, 1e-5)
    if need_weights:
        _same_nan_and_values("weights", got_w, want_w, 1e-5, 1e-5)


# ------------------------------------------------------------------------------------------ overflow, layer norm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("scale", [1e20, 1e30])
@pytest.mark.parametrize("n", [8, 1000, 5000])
@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_layer_norm_of_huge_inputs_is_never_finite_and_wrong(backend_device, n, scale, dtype):
    """x * 1e20 or 1e30 overflows the sum of squares in float32 (torch gives NaN, fastseq gave 0 before). The C++,
    Triton and reference backends give the right answer (the statistics of the row scaled by a power of two); the
    CUDA C++ kernels give NaN. Never a finite wrong answer; the gradient of x stays finite where the output is."""
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates float32 to bfloat16")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    w, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    exact = torch.nn.functional.layer_norm(x, (n,), w, b)  # layer norm does not change when x is scaled
    xs = (x * scale).to(device, dtype).requires_grad_()
    with on_backend(backend):
        y = fastseq.functional.layer_norm(xs, (n,), w.to(device, dtype), b.to(device, dtype))
        dx, = torch.autograd.grad(y, xs, torch.ones_like(y))
    tol = 1e-4 if dtype == torch.float32 else 8e-2
    if backend == "cuda":
        ok = y.isnan().cpu() | ((y.double().cpu() - exact).abs() <= tol * (1 + exact.abs()))
        assert ok.all(), "a finite wrong answer"
    else:
        assert_close(y, exact, tol, tol, "y")
        assert torch.isfinite(dx).all()


# ---------------------------------------------------------------------------------------------- double backward
def _double_backward_cases():
    """name -> (module name, constructor args, input shape); the modules' outputs feed a gradient penalty."""
    return {
        "LSTMCell": ("LSTMCell", (4, 3), (2, 4)), "GRUCell": ("GRUCell", (4, 3), (2, 4)),
        "RNNCell": ("RNNCell", (4, 3), (2, 4)), "LayerNorm": ("LayerNorm", (4,), (2, 3, 4)),
        "LSTM-proj-bi": ("LSTM", (4, 3, 2, True, False, 0.0, True, 2), (3, 2, 4)),
        "GRU": ("GRU", (4, 3), (3, 2, 4)), "RNN-relu": ("RNN", (4, 3, 1, "relu"), (3, 2, 4)),
        "MultiheadAttention": ("MultiheadAttention", (4, 2), (3, 2, 4)),
    }


def _first_output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("case", list(_double_backward_cases()))
@pytest.mark.parametrize("backend_device", CPU_BACKENDS)
def test_gradient_penalty_like_torch(backend_device, case):
    """g = d(sum(out * w))/dx with create_graph=True, then (g^2).sum().backward(): x.grad and every parameter's
    grad as torch's (second derivatives through every op)."""
    backend, _ = backend_device
    name, args, shape = _double_backward_cases()[case]
    ours, theirs = _module_pair(name, *args)
    results = []
    for module, ctx in ((ours, on_backend(backend)), (theirs, contextlib.nullcontext())):
        torch.manual_seed(3)
        x = torch.randn(*shape, requires_grad=True)
        with ctx:
            out = _first_output(module(x, x, x) if name == "MultiheadAttention" else module(x))
            w = torch.linspace(-1, 1, out.numel()).view(out.shape)
            g, = torch.autograd.grad((out * w).sum(), x, create_graph=True)
            g.pow(2).sum().backward()
        results.append([x.grad, *(p.grad for p in module.parameters())])
    for i, (got, want) in enumerate(zip(*results, strict=True)):
        if want is None:
            assert got is None or got.abs().max() == 0, f"grad {i}: torch has none"
        else:
            assert got is not None, f"grad {i} missing"
            assert_close(got, want, 2e-5, 2e-4, f"grad {i}")


def _gradgradcheck_ops():
    F = fastseq.functional
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, h, c = r(2, 3), r(2, 4), r(2, 4)
    w4, u4, b4 = r(16, 3), r(16, 4), r(16)
    w3, u3, b3 = r(12, 3), r(12, 4), r(12)
    w1, u1, b1 = r(4, 3), r(4, 4), r(4)
    q, k, v, mask = r(1, 2, 3, 4), r(1, 2, 5, 4), r(1, 2, 5, 4), r(3, 5)
    seq = r(3, 2, 3)
    return {
        "lstm_cell": (lambda *a: torch.cat(F.lstm_cell(a[0], (a[1], a[2]), *a[3:]), 1), (x, h, c, w4, u4, b4, b4)),
        "gru_cell": (F.gru_cell, (x, h, w3, u3, b3, b3)),
        "rnn_tanh_cell": (F.rnn_tanh_cell, (x, h, w1, u1, b1, b1)),
        "layer_norm": (lambda x, w, b: F.layer_norm(x, (4,), w, b), (r(3, 4), r(4), r(4))),
        "sdpa": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), (q, k, v, mask)),
        "sdpa-causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v)),
        "lstm": (lambda x, *p: F.lstm(x, None, p, True, 1, 0.0, False, False, False)[0], (seq, w4, u4, b4, b4)),
        "gru": (lambda x, *p: F.gru(x, None, p, True, 1, 0.0, False, False, False)[0], (seq, w3, u3, b3, b3)),
    }


@pytest.mark.parametrize("op", list(_gradgradcheck_ops()))
def test_gradgradcheck_float64(op):
    """Second derivatives of every op against finite differences (torch.autograd.gradgradcheck, float64, the C++
    CPU backend where it is built)."""
    fn, inputs = _gradgradcheck_ops()[op]
    with fastseq.backend("cpu"):
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- inputs torch accepts
@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_attention_takes_any_strides(backend_device):
    """q, k, v whose last dim has stride 2, and k transposed in its last two dims (then copied by the caller's
    .transpose): the same output and gradients as torch."""
    backend, device = backend_device
    dtype = torch.float16 if backend == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    E = 64 if backend == "cuda" else 8
    q = torch.randn(2, 3, 5, 2 * E, generator=g).to(device, dtype)[..., ::2].requires_grad_()
    k = torch.randn(2, 3, E, 7, generator=g).to(device, dtype).transpose(-1, -2).detach().requires_grad_()
    v = torch.randn(2, 3, 7, 2 * E, generator=g).to(device, dtype)[..., 1::2].requires_grad_()
    with on_backend(backend):
        out = fastseq.functional.scaled_dot_product_attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))  # cuda: the backward is Triton's
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.detach().double() for t in (q, k, v)))
    tol = 2e-2 if dtype == torch.float16 else 1e-5
    assert_close(out, ref, tol, tol, "out")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q64, k64, v64).sum(), (q64, k64, v64))
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        assert_close(a, b, tol, tol, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_layer_norm_mixed_dtype_like_torch(backend_device, dtype):
    """bfloat16 / float16 input with float32 weight and bias (mixed-precision training keeps float32 parameters):
    output in the input's dtype, parameter gradients in float32, within twice torch's error."""
    backend, device = backend_device
    if backend == "cpu" and dtype == torch.float16:
        pytest.skip("the C++ CPU kernels take bfloat16, not float16")
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates float32 to bfloat16")
    g = torch.Generator().manual_seed(0)
    x64, w64, b64 = torch.randn(6, 33, generator=g, dtype=torch.float64), torch.randn(33, generator=g,
        dtype=torch.float64), torch.randn(33, generator=g, dtype=torch.float64)
    x = x64.to(device, dtype).requires_grad_()
    w, b = (t.to(device, torch.float32).requires_grad_() for t in (w64, b64))
    with on_backend(backend):
        y = fastseq.functional.layer_norm(x, (33,), w, b)
        got = torch.autograd.grad(y.float().square().sum(), (x, w, b))
    yt = torch.nn.functional.layer_norm(x, (33,), w, b)
    want = torch.autograd.grad(yt.float().square().sum(), (x, w, b))
    assert y.dtype == dtype and [t.dtype for t in got] == [dtype, torch.float32, torch.float32]
    ref = torch.nn.functional.layer_norm(x64, (33,), w64, b64)
    assert (y.double().cpu() - ref).abs().max() <= 2 * (yt.double().cpu() - ref).abs().max() + 1e-2
    for name, a, t in zip(("dx", "dw", "db"), got, want):
        assert_close(a.float(), t.float(), 0.1, 0.05, name)


def test_layer_norm_over_zero_size_shape_like_torch():
    x = torch.randn(3, 0, requires_grad=True)
    w, b = torch.ones(0, requires_grad=True), torch.zeros(0, requires_grad=True)
    for args in ((), (w, b)):
        y = fastseq.functional.layer_norm(x, (0,), *args)
        assert y.shape == torch.nn.functional.layer_norm(x, (0,), *args).shape == (3, 0)
        y.sum().backward()
    assert x.grad.shape == (3, 0) and w.grad.shape == (0,)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_packed_batch_sizes_ending_in_zeros_like_torch(name):
    """A PackedSequence whose batch_sizes end in zeros (built by hand; torch accepts it): torch's outputs."""
    from torch.nn.utils.rnn import PackedSequence

    ours, theirs = _module_pair(name, 4, 3)
    data = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    packed = PackedSequence(data, torch.tensor([3, 2, 0, 0]))
    (y, h), (yt, ht) = ours(packed), theirs(packed)
    assert torch.equal(y.batch_sizes, yt.batch_sizes)
    assert_close(y.data, yt.data, 1e-6, 1e-5, "output")
    for a, t in zip(h if isinstance(h, tuple) else (h,), ht if isinstance(ht, tuple) else (ht,)):
        assert_close(a, t, 1e-6, 1e-5, "state")


# ------------------------------------------------------------------------------- found by the fuzz suite
@pytest.mark.parametrize("backend_device", CPU_BACKENDS)
def test_relu_gradient_through_a_nan_output_like_torch(backend_device):
    """test_fuzz_recurrent_layers: RNN(relu) with a NaN input. torch's relu backward passes the gradient where the
    output is NaN (it zeroes only where output <= 0); fastseq zeroed it."""
    backend, _ = backend_device
    for name, make in (("RNN", lambda: torch.randn(3, 2, 4)), ("RNNCell", lambda: torch.randn(2, 4))):
        kw = {"nonlinearity": "relu"}
        ours, theirs = _module_pair(name, 4, 3, **kw)

        def run(module, ctx):
            torch.manual_seed(1)
            x = make()
            x[..., 1, 2] = float("nan")
            x.requires_grad_()
            with ctx:
                out = _first_output(module(x))
                return torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(),
                                           [x, *module.parameters()])
        got, want = run(ours, on_backend(backend)), run(theirs, contextlib.nullcontext())
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g.isnan(), w.isnan()), f"{name} gradient {i}: NaN pattern"
            assert_close(g.nan_to_num(), w.nan_to_num(), 1e-5, 1e-5, f"{name} gradient {i}")


def test_multihead_attention_weights_row_without_a_finite_score_like_torch():
    """test_fuzz_multihead_attention: an inf query (every score -inf or NaN) with need_weights=True and no mask:
    torch computes out = weights v, NaN; fastseq's attention gave 0 for the row."""
    ours, theirs = _module_pair("MultiheadAttention", 1, 1)
    q, kv = torch.tensor([[[float("inf")]]]), torch.tensor([[[1.5]]])
    got, want = ours(q, kv, kv, need_weights=True)[0], theirs(q, kv, kv, need_weights=True)[0]
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().all()
