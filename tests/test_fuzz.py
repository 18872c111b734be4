"""Differential fuzzing against torch: random shapes (0 and 1 sizes, odd widths), strides (transposed, sliced with
steps, expanded), dtypes, special values (NaN, +-inf, huge, tiny, denormal), masks (bool, float, fully masked rows,
causal with L != S), packed sequences with unsorted lengths, for every public op and module. Each example runs
fastseq and torch on the same inputs and asserts the same outcome:
- torch raises: fastseq raises too; fastseq raises: torch does too;
- else, outputs and gradients: where the float64 answer (torch on float64 copies) is NaN, fastseq is NaN; elsewhere
  fastseq is within the tolerance of it, or NaN where torch in the same dtype is NaN too (huge inputs that
  overflow), or exactly torch's value in the same dtype (an inf whose sign differs in float64); never a finite
  wrong answer.
CI runs a fixed, bounded number of examples per test (the `ci` profile: derandomized); `make fuzz` runs the `fuzz`
profile (many more, random) for a longer search. A failing example it finds becomes a named regression test
(tests/test_edge_cases.py)."""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
from conftest import BACKEND_PARAMS, on_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastseq

settings.register_profile("ci", max_examples=int(os.environ.get("FASTSEQ_FUZZ_EXAMPLES", 25)), derandomize=True,
                          deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FASTSEQ_FUZZ_EXAMPLES", 1000)), deadline=None,
                          suppress_health_check=list(HealthCheck), print_blob=True)
settings.load_profile(os.environ.get("FASTSEQ_FUZZ_PROFILE", "ci"))

# The backends on CPU tensors (the C++ kernels; Triton in the interpreter, with fewer examples: it is slow).
CPU_BACKENDS = [p.values[0][0] for p in BACKEND_PARAMS if p.values[0][1] == "cpu"]
SPECIAL = [float("nan"), float("inf"), float("-inf"), 1e20, -1e30, 1e-30, 1e-40, 0.0]
# Attention's gradients with a huge input are rounding noise times that input in any float32 kernel (flash-style
# backward takes D = rowsum(dout * out), torch's math one rowsum(dp * p)): huge values stay out of its examples.
NOT_HUGE = [v for v in SPECIAL if not 1e10 < abs(v) < float("inf")]
# dtypes per backend: Triton's interpreter runs float32 (it truncates float32 to bfloat16, and has no float64)
DTYPES = {"cpu": [torch.float32, torch.float64, torch.bfloat16], "triton": [torch.float32],
          "reference": [torch.float32, torch.float64, torch.bfloat16]}
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}


@st.composite
def tensors(draw, shape, dtype, specials=SPECIAL):
    """A float64 tensor of `shape` (random normal, seeded by hypothesis), with at most 2 of the values `specials`
    placed; then a layout: contiguous, transposed in its last two dims, sliced with a step, or expanded from size
    1."""
    seed = draw(st.integers(0, 2**31 - 1))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if specials and t.numel() and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 2))):
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(specials))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sliced" and t.dim() >= 1:
        t = torch.stack([t, t], -1).flatten(-2)[..., ::2]
    elif layout == "expanded" and t.dim() >= 2 and t.shape[0] > 1:
        t = t[:1].expand(t.shape)
    return t.to(dtype)


def _math_attention():
    """torch's attention as written (softmax, matmul): its fused CPU kernel drops a NaN score in some block sizes
    (a NaN query row at S <= 8 gives a finite output), so the math backend is the one compared with."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _run(fn, args, backend=None, math=False):
    """("ok", outputs and gradients) or ("error", exception): fn(*args) on fresh leaves of the floating tensors,
    then the gradients of sum(outputs * fixed weights) with respect to them; on fastseq's `backend`, or in torch
    (with its math attention when `math`)."""
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
              else a for a in args]
    try:
        with on_backend(backend) if backend else _math_attention() if math else contextlib.nullcontext():
            outs = fn(*leaves)
            outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,)) if isinstance(o, torch.Tensor)]
            diff = [o for o in outs if o.requires_grad]
            inputs = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
            grads = []
            if diff and inputs:
                loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in diff)
                grads = [g if g is not None else torch.zeros_like(a)
                         for g, a in zip(torch.autograd.grad(loss, inputs, allow_unused=True), inputs)]
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as e:
        if isinstance(e, AssertionError) and "unexpected backend fallback" in str(e):
            raise
        return "error", e
    return "ok", [o.detach() for o in outs] + [g.detach() for g in grads]


def check_against_torch(ours, theirs, args, backend, dtype, atol_scale=1.0, masked_grads=False, exact=None):
    """The rule of this file (module docstring). The float64 answer is `exact` (default: `theirs` with torch's
    math attention) on float64 copies. masked_grads: attention with a mask or is_causal, where torch's gradients
    are NaN also for keys that no query sees (0 * NaN in its dense backward) and fastseq's kernels, which skip what
    is masked, give finite ones: there a gradient may be finite where torch's is NaN."""
    kind, got = _run(ours, args, backend)
    torch_kind, want = _run(theirs, args)
    assert kind == torch_kind, f"fastseq: {kind} ({got if kind == 'error' else ''}); torch: {torch_kind} " \
                               f"({want if torch_kind == 'error' else ''})"
    if kind == "error":
        return
    exact_kind, exact = _run(exact or theirs, [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                               else a for a in args], math=True)
    assert exact_kind == "ok", f"the float64 answer failed: {exact}"
    assert len(got) == len(want), f"{len(got)} results, torch {len(want)}"
    tol = TOL[dtype] * atol_scale
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"result {i}: {g.shape} {g.dtype}, torch {w.shape} {w.dtype}"
        e = exact[i].to(torch.float64)
        g64, w64 = g.to(torch.float64), w.to(torch.float64)
        scale = e.abs().nan_to_num(0, 0, 0).amax() if e.numel() else 0.0
        close = (g64 - e).abs() <= tol * (1 + scale)
        nan_ok = g64.isnan() | (masked_grads and i > 0)
        # also fine: exactly torch's value in the same dtype (an inf whose sign float64 rounds otherwise)
        ok = torch.where(e.isnan(), nan_ok, close | (g64.isnan() & w64.isnan()) | (g64 == e) | (g64 == w64))
        assert ok.all(), (f"result {i}: {int((~ok).sum())}/{ok.numel()} elements wrong; first at "
                          f"{[int(v) for v in torch.nonzero(~ok)[0]]}: fastseq {g64[~ok][0].item()}, "
                          f"float64 {e[~ok][0].item()}, torch {w64[~ok][0].item()}")


def _backend_settings(backend):
    return settings(max_examples=max(5, settings().max_examples // 4)) if backend == "triton" else settings()


def _float_dtype(data, backend):
    """A dtype the backend runs, bfloat16 aside (its rounding swamps the recurrences' and attention's checks)."""
    return data.draw(st.sampled_from([d for d in DTYPES[backend] if d != torch.bfloat16]))


def _modules(data, name, *args, **kwargs):
    """fastseq.nn.<name> and torch.nn.<name> with the same weights (a drawn seed), and a float64 copy of torch's
    (in training mode: dropout is 0, and MultiheadAttention's eval fast path has no math backend)."""
    torch.manual_seed(data.draw(st.integers(0, 99)))
    theirs = getattr(torch.nn, name)(*args, **kwargs)
    ours = getattr(fastseq.nn, name)(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, copy.deepcopy(theirs).double()


# ------------------------------------------------------------------------------------------------------ layer norm
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fuzz_layer_norm(backend):
    @_backend_settings(backend)
    @given(data=st.data())
    def run(data):
        dtype = data.draw(st.sampled_from(DTYPES[backend]))
        lead = data.draw(st.lists(st.integers(0, 4), max_size=2))
        norm = data.draw(st.lists(st.integers(1, 67), min_size=1, max_size=2))
        x = data.draw(tensors((*lead, *norm), dtype))
        affine = data.draw(st.sampled_from(["none", "weight", "both"]))
        w = data.draw(tensors(tuple(norm), dtype, specials=())) if affine != "none" else None
        b = data.draw(tensors(tuple(norm), dtype, specials=())) if affine == "both" else None
        # exact: fastseq's float64 reference (torch's float64 kernel computes x * rstd - mean * rstd, which
        # cancels catastrophically for huge x)
        check_against_torch(lambda x, w, b: fastseq.functional.layer_norm(x, norm, w, b),
                            lambda x, w, b: torch.nn.functional.layer_norm(x, norm, w, b), [x, w, b], backend, dtype,
                            exact=lambda x, w, b: fastseq.reference.layer_norm(x, norm, w, b))
    run()


# ------------------------------------------------------------------------------------------------------ cell steps
CELLS = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn_tanh": "RNNCell", "rnn_relu": "RNNCell"}


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fuzz_cells(backend, kind):
    """The cell modules (batched and unbatched input, with and without bias and state) against torch.nn's."""
    @_backend_settings(backend)
    @given(data=st.data())
    def run(data):
        dtype = _float_dtype(data, backend)
        n, c, h = data.draw(st.integers(0, 5)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
        batched = data.draw(st.booleans()) or n == 0
        kw = {"bias": data.draw(st.booleans())}
        if kind.startswith("rnn"):
            kw["nonlinearity"] = kind[4:]
        ours, theirs, theirs64 = _modules(data, CELLS[kind], c, h, dtype=dtype, **kw)
        x = data.draw(tensors((n, c) if batched else (c,), dtype))
        hs = [data.draw(tensors((n, h) if batched else (h,), dtype)) for _ in range(2 if kind == "lstm" else 1)]
        if data.draw(st.booleans()):  # no state given: zeros
            hs = []
        state = (lambda a: (a[0], a[1]) if a else None) if kind == "lstm" else (lambda a: a[0] if a else None)
        check_against_torch(lambda x, *a: ours(x, state(a)), lambda x, *a: theirs(x, state(a)), [x, *hs], backend,
                            dtype, exact=lambda x, *a: theirs64(x, state(a)))
    run()


# ------------------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fuzz_attention(backend):
    @_backend_settings(backend)
    @given(data=st.data())
    def run(data):
        dtype = _float_dtype(data, backend)
        batch = data.draw(st.lists(st.integers(1, 2), max_size=2))
        hk = data.draw(st.integers(1, 2))
        hq = hk * data.draw(st.integers(1, 2))
        L, S = data.draw(st.integers(1, 33)), data.draw(st.integers(1, 33))
        E, Ev = data.draw(st.integers(1, 17)), data.draw(st.integers(1, 17))
        mask_kind = data.draw(st.sampled_from(["none", "causal", "bool", "float"]))
        # With a mask, special values go into q only: a NaN value of a masked key reaches the output in a dense
        # computation (0 * NaN) and in a fused kernel only when its key block is not skipped (as in torch's).
        kv_specials = NOT_HUGE if mask_kind == "none" else ()
        q = data.draw(tensors((*batch, hq, L, E), dtype, NOT_HUGE))
        k = data.draw(tensors((*batch, hk, S, E), dtype, kv_specials))
        v = data.draw(tensors((*batch, hk, S, Ev), dtype, kv_specials))
        kw = {"enable_gqa": hq != hk}
        mask = None
        if mask_kind == "causal":
            kw["is_causal"] = True
        elif mask_kind == "bool":
            mask = torch.rand(L, S, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))) > 0.4
            if data.draw(st.booleans()):
                mask[0] = False  # a fully masked row
        elif mask_kind == "float":
            mask = data.draw(tensors((L, S), dtype, kv_specials))
        if data.draw(st.booleans()):
            kw["scale"] = data.draw(st.floats(0.01, 3.0))
        check_against_torch(
            lambda q, k, v, m: fastseq.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw),
            lambda q, k, v, m: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw),
            [q, k, v, mask], backend, dtype, atol_scale=5.0, masked_grads=mask_kind != "none",
            # exact: fastseq's float64 reference, which masks scores as torch's fused kernels do (torch's math
            # attention adds -inf, so an inf score that is masked still makes its row NaN)
            exact=lambda q, k, v, m: fastseq.reference.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw))
    run()


# ------------------------------------------------------------------------------------------- layers and modules
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fuzz_recurrent_layers(backend, name):
    from torch.nn.utils.rnn import pack_padded_sequence

    @_backend_settings(backend)
    @given(data=st.data())
    def run(data):
        dtype = _float_dtype(data, backend)
        c, h = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7))
        kw = {"num_layers": data.draw(st.integers(1, 2)), "bidirectional": data.draw(st.booleans()),
              "batch_first": data.draw(st.booleans()), "bias": data.draw(st.booleans())}
        if name == "LSTM" and h > 1 and data.draw(st.booleans()):
            kw["proj_size"] = data.draw(st.integers(1, h - 1))
        if name == "RNN":
            kw["nonlinearity"] = data.draw(st.sampled_from(["tanh", "relu"]))
        ours, theirs, theirs64 = _modules(data, name, c, h, dtype=dtype, **kw)
        t, n = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
        x = data.draw(tensors((n, t, c) if kw["batch_first"] else (t, n, c), dtype))
        packed = data.draw(st.booleans())
        lengths = torch.tensor([data.draw(st.integers(1, t)) for _ in range(n)])


        def call(module):
            def go(x, *params):
                inp = pack_padded_sequence(x, lengths, batch_first=kw["batch_first"], enforce_sorted=False) \
                    if packed else x
                out, state = module(inp)
                out = out.data if packed else out
                return (out, *(state if isinstance(state, tuple) else (state,)))
            return go
        check_against_torch(call(ours), call(theirs), [x], backend, dtype, atol_scale=5.0, exact=call(theirs64))
    run()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fuzz_multihead_attention(backend):
    @_backend_settings(backend)
    @given(data=st.data())
    def run(data):
        dtype = _float_dtype(data, backend)
        heads = data.draw(st.integers(1, 3))
        embed = heads * data.draw(st.integers(1, 4))
        batch_first = data.draw(st.booleans())
        ours, theirs, theirs64 = _modules(data, "MultiheadAttention", embed, heads, batch_first=batch_first,
                                          dtype=dtype)
        n, L, S = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
        kw = {"need_weights": data.draw(st.booleans())}
        if data.draw(st.booleans()):
            pad = torch.rand(n, S, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))) > 0.6
            kw["key_padding_mask"] = pad
        q = data.draw(tensors((n, L, embed) if batch_first else (L, n, embed), dtype, NOT_HUGE))
        kv = data.draw(tensors((n, S, embed) if batch_first else (S, n, embed), dtype,
                               () if "key_padding_mask" in kw else NOT_HUGE))  # as in test_fuzz_attention
        if data.draw(st.booleans()):
            ours.eval(), theirs.eval()
        check_against_torch(lambda q, kv: ours(q, kv, kv, **kw), lambda q, kv: theirs(q, kv, kv, **kw), [q, kv],
                            backend, dtype, atol_scale=5.0, exact=lambda q, kv: theirs64(q, kv, kv, **kw))
    run()
