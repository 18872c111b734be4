"""Layer norm: every backend against the float64 reference and against torch.nn.LayerNorm, forward and backward."""
from __future__ import annotations

import copy
import pytest
import torch
from conftest import assert_close, assert_within_torch_error, dtype_cases, on_backend

import fastseq
from fastseq import backends, reference
from fastseq import functional as F

WIDTHS = [1, 3, 7, 33, 1023, 4096, 16385]
TOL = {torch.float32: (2e-5, 1e-5), torch.float64: (1e-10, 1e-10)}  # (atol, rtol) against float64
DTYPES = {"cpu": [torch.float32, torch.float64, torch.bfloat16], "cuda": [torch.float32, torch.float16, torch.bfloat16]}


def _dtypes(backend: str, device: str) -> list[torch.dtype]:
    return [d for d in DTYPES[device] if not (backend == "triton" and d == torch.float64)]


def _inputs(shape, n_shape, dtype, device, affine=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.randn(n_shape, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(n_shape, generator=g, dtype=torch.float64) if affine and bias else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(device, dtype).requires_grad_()
    return cast(x), cast(w), cast(b), dy.to(device, dtype)


def _fwd_bwd(fn, x, w, b, dy):
    y = fn(x, w, b)
    leaves = [t for t in (x, w, b) if t is not None]
    return [y, *torch.autograd.grad(y, leaves, dy)]


def _check(backend, device, dtype, shape, n_shape, affine=True, bias=True):
    """fastseq's layer norm on `backend` against the float64 reference (TOL[dtype]; half types: at most 2x the
    error of torch's own), output and every gradient (the weight's and bias's, sums over the rows, at rows x atol)."""
    x, w, b, dy = _inputs(shape, n_shape, dtype, device, affine, bias)
    with on_backend(backend):
        ours = _fwd_bwd(lambda x, w, b: F.layer_norm(x, n_shape, w, b), x, w, b, dy)
    as64 = lambda t: None if t is None else t.detach().double().requires_grad_()
    ref = _fwd_bwd(lambda x, w, b: reference.layer_norm(x, list(n_shape), w, b), as64(x), as64(w), as64(b),
                   dy.double())
    names = ["y", "dx", "dweight", "dbias"]
    if dtype in TOL:
        atol, rtol = TOL[dtype]
        for name, o, r in zip(names, ours, ref):
            assert o.dtype == dtype
            assert_close(o, r, atol * (shape[0] if name in ("dweight", "dbias") else 1), rtol, name)
    else:
        theirs = _fwd_bwd(lambda x, w, b: torch.nn.functional.layer_norm(x, n_shape, w, b), x, w, b, dy)
        for name, o, t, r in zip(names, ours, theirs, ref):
            assert o.dtype == dtype
            assert_within_torch_error(o, t, r, name)


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("backend, device, dtype", dtype_cases(_dtypes))
def test_against_reference(backend, device, dtype, n):
    rows = 3 if n >= 4096 and device == "cpu" and backend == "triton" else 17
    _check(backend, device, dtype, (rows, n), (n,))


@pytest.mark.parametrize("affine,bias", [(False, False), (True, False)])
def test_without_affine_or_bias(backend_device, affine, bias):
    backend, device = backend_device
    _check(backend, device, torch.float32, (9, 257), (257,), affine, bias)


def test_two_normalized_dims_and_leading_dims(backend_device):
    backend, device = backend_device
    _check(backend, device, torch.float32, (2, 3, 5, 33), (5, 33))


def test_wide_rows_in_half_precision(backend_device):
    backend, device = backend_device
    if device != "cuda":
        pytest.skip("float16 runs on the GPU backends")
    _check(backend, device, torch.float16, (64, 16385), (16385,))


@pytest.mark.sanitize
def test_non_contiguous_input(backend_device):
    backend, device = backend_device
    x = torch.randn(40, 66, device=device)[::2, ::2].requires_grad_()  # (20, 33), strided
    w, b = torch.randn(33, device=device, requires_grad=True), torch.randn(33, device=device, requires_grad=True)
    with on_backend(backend):
        y = F.layer_norm(x, (33,), w, b)
        grads = torch.autograd.grad(y.sum(), (x, w, b))
    y2 = torch.nn.functional.layer_norm(x, (33,), w, b)
    for o, t in zip((y, *grads), (y2, *torch.autograd.grad(y2.sum(), (x, w, b)))):
        assert_close(o, t, 2e-5, 1e-5)


@pytest.mark.sanitize
def test_empty_batch(backend_device):
    backend, device = backend_device
    x = torch.randn(0, 5, 33, device=device, requires_grad=True)
    w = torch.randn(33, device=device, requires_grad=True)
    with on_backend(backend):
        y = F.layer_norm(x, (33,), w)
        dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert y.shape == x.shape and dx.shape == x.shape
    assert_close(dw, torch.zeros(33), 0, 0, "dweight")


def test_module_matches_torch_and_shares_state_dict():
    torch.manual_seed(0)
    theirs = torch.nn.LayerNorm((4, 33), eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_(), theirs.bias.normal_()
    ours = fastseq.nn.LayerNorm((4, 33), eps=1e-6)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 4, 33, requires_grad=True)
    y, y2 = ours(x), theirs(x)
    assert_close(y, y2, 2e-5, 1e-5, "y")
    g = torch.randn_like(y)
    for o, t in zip(torch.autograd.grad(y, (x, *ours.parameters()), g),
                    torch.autograd.grad(y2, (x, *theirs.parameters()), g)):
        assert_close(o, t, 1e-4, 1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False},
                                    {"dtype": torch.float64}])
def test_module_construction_like_torch(kwargs):
    ours, theirs = fastseq.nn.LayerNorm(8, **kwargs), torch.nn.LayerNorm(8, **kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v) and ours.state_dict()[k].dtype == v.dtype
    assert repr(ours).replace("fastseq.nn.", "") == repr(theirs)
    x = torch.randn(3, 8, dtype=kwargs.get("dtype", torch.float32))
    assert_close(ours(x), theirs(x), 1e-5, 1e-5)


def test_gradcheck_float64():
    x = torch.randn(4, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: F.layer_norm(x, (3, 7), w, b, 1e-3), (x, w, b))


def test_opcheck():
    x, w, b = torch.randn(5, 33), torch.randn(33), torch.randn(33)
    for args in ((x, [33], w, b, 1e-5), (x.requires_grad_(), [33], w.requires_grad_(), None, 1e-5)):
        torch.library.opcheck(torch.ops.fastseq.layer_norm.default, args)


def test_torch_compile_fullgraph():
    """Compiled with fastseq's LayerNorm, a model gives torch's results (the same model with torch.nn.LayerNorm)."""
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.LayerNorm(33), torch.nn.GELU())
    with torch.no_grad():
        theirs[1].weight.normal_(), theirs[1].bias.normal_()
    ours = copy.deepcopy(theirs)
    fastseq.replace_modules(ours)
    assert isinstance(ours[1], fastseq.nn.LayerNorm)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 16, requires_grad=True)
    y, y2 = compiled(x), theirs(x)
    assert_close(y, y2, 1e-5, 1e-5)
    for o, t in zip(torch.autograd.grad(y.sum(), (x, *ours.parameters())),
                    torch.autograd.grad(y2.sum(), (x, *theirs.parameters())), strict=True):
        assert_close(o, t, 1e-5, 1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: F.layer_norm(torch.randn(2, 3), (4,)), r"normalized_shape=\[4\].*size \[2, 3\]"),
    (lambda: F.layer_norm(torch.randn(2, 3), (2, 3, 3)), r"normalized_shape"),
    (lambda: F.layer_norm(torch.randn(2, 3), (3,), torch.randn(4)), r"weight must have shape \[3\], got \[4\]"),
    (lambda: F.layer_norm(torch.randn(2, 3), (3,), None, torch.randn(2, 3)), r"bias must have shape \[3\]"),
    (lambda: F.layer_norm(torch.randn(2, 3), (3,), torch.randn(3, dtype=torch.float64)), r"weight has dtype"),
    (lambda: F.layer_norm(torch.randn(2, 3), (3,), torch.randn(3, device="meta")), r"weight is on meta"),
    (lambda: F.layer_norm(torch.ones(2, 3, dtype=torch.long), (3,)), r"input must be a floating-point"),
    (lambda: F.layer_norm(torch.randn(2, 3), (-1,)), r"ints >= 0"),
    (lambda: F.layer_norm(torch.randn(2, 3), (0,)), r"expected input with shape \[\*, 0\]"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_unsupported_dtype_falls_back_with_a_warning():
    x = torch.randn(3, 8, dtype=torch.float16)
    with pytest.warns(UserWarning, match=r"layer_norm runs on the reference backend \(cpu: .*float16"):
        y = F.layer_norm(x, (8,))
    assert_close(y, torch.nn.functional.layer_norm(x.float(), (8,)), 2e-3, 2e-3)


def test_backend_selection():
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastseq.backend("nope"):
            pass
    assert "reference" in fastseq.available_backends()


def test_backend_environment_read_at_each_call(monkeypatch):
    """FASTSEQ_BACKEND is read at every call, though backends.select caches its choices (and a float32 CPU tensor
    with the cpu backend or none requested skips it): set, changed or removed between two calls, the next call
    follows it (a bad value is an error)."""
    x = torch.randn(3, 8)
    seen = []
    original, original_cpu = backends.select, backends.cpu_or_nothing_requested
    monkeypatch.setattr(backends, "select", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])

    def cpu_or_nothing_requested() -> bool:  # True: the cpu backend's fast path runs
        return original_cpu() and not seen.append("cpu")

    monkeypatch.setattr(backends, "cpu_or_nothing_requested", cpu_or_nothing_requested)

    def chosen() -> set[str]:
        seen.clear()
        F.layer_norm(x, (8,))
        return set(seen)

    assert chosen() == {"cpu"}
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    assert chosen() == {"reference"}
    monkeypatch.setenv("FASTSEQ_BACKEND", "cpu")
    assert chosen() == {"cpu"}
    monkeypatch.delenv("FASTSEQ_BACKEND")
    assert chosen() == {"cpu"}
    monkeypatch.setenv("FASTSEQ_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTSEQ_BACKEND must be one of"):
        F.layer_norm(x, (8,))


def test_fast_argument_check_agrees():
    """fastseq._C's layer_norm_args_ok (the happy path of functional.layer_norm's checks) accepts what the Python
    checks accept and refuses each kind of argument they reject, so that every rejection still raises their error."""
    ext = backends.extension()
    x = torch.randn(3, 4, 5)
    good = [(x, [5], torch.ones(5), torch.zeros(5)), (x, [4, 5], None, None),
            (x.bfloat16(), [5], torch.ones(5), torch.zeros(5)), (x.double(), [5], torch.ones(5).double(), None)]
    for args in good:
        assert ext.layer_norm_args_ok(*args)
        F.layer_norm(*args)
    bad = [(x, [4], None, None), (x, [], None, None), (x, [0], None, None), (x[..., :0], [0], None, None),
           (x, [5], torch.ones(4), None), (x, [5], None, torch.ones(5).double()), (x.int(), [5], None, None),
           (x, [2, 3, 4, 5], None, None), (x, [5], torch.ones(5).bfloat16(), None)]
    for args in bad:
        assert not ext.layer_norm_args_ok(*args), args
