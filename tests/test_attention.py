"""Scaled dot-product attention: every backend against the float64 reference and against torch's SDPA, forward and
backward (q, k, v and a float mask that requires grad), dropout, gradcheck, opcheck, torch.compile, bad input."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from conftest import BACKEND_PARAMS, assert_close, assert_within_torch_error, on_backend

import fastseq
from fastseq import backends, reference
from fastseq import functional as F

TOL = {torch.float32: (5e-5, 5e-5), torch.float64: (1e-10, 1e-10)}  # (atol, rtol) against float64
# bfloat16 is left out of Triton's interpreter, whose tl.dot gives wrong results on bfloat16 operands.
DTYPES = {("cpu", "cpu"): [torch.float32, torch.float64, torch.bfloat16],
          ("triton", "cpu"): [torch.float32, torch.float16],
          ("reference", "cpu"): [torch.float32],
          ("cuda", "cuda"): [torch.float16, torch.bfloat16],
          ("triton", "cuda"): [torch.float32, torch.float16, torch.bfloat16]}


@dataclass
class Case:
    q: tuple[int, ...]
    k: tuple[int, ...]
    v: tuple[int, ...]
    mask: str | None = None  # "bool" or "float" (a float mask requires grad)
    mask_shape: tuple[int, ...] | None = None
    is_causal: bool = False
    scale: float | None = None
    gqa: bool = False
    masked_rows: bool = False  # some query rows see no key

    def __str__(self) -> str:
        s = f"q{list(self.q)}-k{list(self.k)}-v{list(self.v)}"
        if self.mask:
            s += f"-{self.mask}{list(self.mask_shape)}{'-rows' if self.masked_rows else ''}"
        return s + ("-causal" if self.is_causal else "") + (f"-scale{self.scale}" if self.scale else "") + \
            ("-gqa" if self.gqa else "")

    @property
    def length(self) -> int:
        return max(self.q[-2], self.k[-2])


def _cases() -> list[Case]:
    B, H = 2, 3
    cases = [Case((B, H, n, 16), (B, H, n, 16), (B, H, n, 16)) for n in (1, 7, 33, 129)]
    cases += [Case((B, H, 33, 16), (B, H, 7, 16), (B, H, 7, 24)),  # L != S, E != Ev
              Case((B, H, 7, 40), (B, H, 33, 40), (B, H, 33, 8)),
              Case((1, 2, 129, 64), (1, 2, 129, 64), (1, 2, 129, 64)),
              Case((B, H, 33, 16), (B, H, 33, 16), (B, H, 33, 16), is_causal=True),
              Case((B, H, 33, 16), (B, H, 7, 16), (B, H, 7, 8), is_causal=True),  # L > S: top-left triangle
              Case((B, H, 7, 16), (B, H, 129, 16), (B, H, 129, 16), is_causal=True),
              Case((B, H, 33, 16), (B, H, 33, 16), (B, H, 33, 16), scale=0.37),
              Case((B, 6, 33, 16), (B, 2, 40, 16), (B, 2, 40, 8), gqa=True),
              Case((B, 4, 33, 16), (B, 1, 33, 16), (B, 1, 33, 16), is_causal=True, gqa=True),
              Case((33, 16), (40, 16), (40, 8)),  # no leading dim
              Case((H, 33, 16), (H, 7, 16), (H, 7, 16), is_causal=True),  # heads only
              Case((2, B, H, 7, 16), (2, B, H, 33, 16), (2, B, H, 33, 24))]  # two extra leading dims
    L, S = 33, 40
    for kind in ("bool", "float"):
        for shape in ((L, S), (1, S), (L, 1), (H, 1, S), (B, 1, L, S), (B, H, L, S), (B, 1, 1, 1), (1, H, L, S)):
            cases.append(Case((B, H, L, 16), (B, H, S, 16), (B, H, S, 8), kind, shape))
        cases.append(Case((B, H, L, 16), (B, H, S, 16), (B, H, S, 16), kind, (B, 1, L, S), masked_rows=True))
        cases.append(Case((B, 6, L, 16), (B, 2, S, 16), (B, 2, S, 16), kind, (6, L, S), gqa=True))
        cases.append(Case((2, B, H, 7, 16), (2, B, H, 33, 16), (2, B, H, 33, 16), kind, (B, 1, 7, 33)))
    return cases


CASES = _cases()


def _for_backend(backend: str, device: str, dtype: torch.dtype, case: Case) -> Case:
    """The case as run on this backend: on the CUDA C++ kernel (head dims E == Ev in 64 or 128) with both head dims
    64, the rest of the case kept; in the interpreter only the small ones (it runs every program one by one), and
    masks in float32 only (the interpreter is slow in float16), else the test is skipped with the reason."""
    if backend == "cuda" and not (case.q[-1] == case.v[-1] and case.q[-1] in (64, 128)):
        case = dataclasses.replace(case, q=case.q[:-1] + (64,), k=case.k[:-1] + (64,), v=case.v[:-1] + (64,))
    if backend == "triton" and device == "cpu":
        if case.length > 40:
            pytest.skip("the interpreter runs sequences of at most 40 here")
        if dtype != torch.float32 and case.mask is not None:
            pytest.skip("the interpreter runs masked cases in float32 only")
    return case


def _tensors(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = rn(*case.q), rn(*case.k), rn(*case.v)
    mask = None
    if case.mask == "bool":
        mask = torch.rand(case.mask_shape, generator=g) > 0.3
        if case.masked_rows:
            mask[..., 3, :] = False
    elif case.mask == "float":
        mask = rn(*case.mask_shape)
        if case.masked_rows:
            mask[..., 3, :] = float("-inf")
    q, k, v = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
    if mask is not None:
        mask = mask.to(device) if mask.dtype == torch.bool else mask.to(device, dtype).requires_grad_()
    return q, k, v, mask


def _fwd_bwd(fn, q, k, v, mask, dout=None, **kw):
    """[out, dq, dk, dv(, dmask)] with dout random (seeded) unless given."""
    out = fn(q, k, v, attn_mask=mask, **kw)
    if dout is None:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    return [out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))], dout


def _as64(t):
    if t is None or t.dtype == torch.bool:
        return t
    return t.detach().double().requires_grad_(t.requires_grad)


def _check(backend: str, device: str, dtype: torch.dtype, case: Case) -> None:
    q, k, v, mask = _tensors(case, dtype, device)
    kw = dict(is_causal=case.is_causal, scale=case.scale, enable_gqa=case.gqa)
    with on_backend(backend):
        ours, dout = _fwd_bwd(F.scaled_dot_product_attention, q, k, v, mask, **kw)
    ref, _ = _fwd_bwd(reference.scaled_dot_product_attention, *map(_as64, (q, k, v, mask)), dout=dout.double(), **kw)
    theirs, _ = _fwd_bwd(torch.nn.functional.scaled_dot_product_attention, q, k, v, mask, dout=dout, **kw)
    names = ["out", "dq", "dk", "dv", "dmask"]
    for name, o, t, r in zip(names, ours, theirs, ref):
        assert o.dtype == dtype and o.shape == t.shape, f"{name}: {o.dtype} {tuple(o.shape)}"
        if dtype in TOL:
            atol, rtol = TOL[dtype]
            assert_close(o, r, atol, rtol, f"{name} vs reference")
            assert_close(o, t, 2 * atol, 2 * rtol, f"{name} vs torch")
        elif name == "dmask" and case.mask_shape[-1] == 1:
            # Constant along the keys, whose true gradient is 0 (softmax ignores a per-row shift): what remains is
            # the rounding of D_i = dout_i . out_i with out in the working dtype (as in flash-attention).
            bound = 4 * torch.finfo(dtype).eps * (dout.double().abs() * ours[0].double().abs()).sum().item()
            assert_close(o, r, bound, 0, name)
        else:
            assert_within_torch_error(o, t, r, name)
    if case.masked_rows:  # what torch gives: zero output and zero gradients on rows that see no key
        assert ours[0][..., 3, :].abs().max() == 0 and ours[1][..., 3, :].abs().max() == 0


# (backend, device, dtype) params with ids that name them; each GPU one carries its backend's gpu and skip marks.
DTYPE_PARAMS = [pytest.param(*p.values[0], dtype, marks=p.marks, id=f"{p.id}-{str(dtype)[6:]}")
                for p in BACKEND_PARAMS for dtype in DTYPES[p.values[0]]]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend,device,dtype", DTYPE_PARAMS)
def test_against_reference_and_torch(backend, device, dtype, case):
    _check(backend, device, dtype, _for_backend(backend, device, dtype, case))


@pytest.mark.skipif(not (backends.extension() and backends.extension().sdpa_cpu_bf16_dot()),
                    reason="a CPU with bf16 dot products (AVX512_BF16)")
@pytest.mark.parametrize("dot", ["1", "0"])
def test_cpu_bfloat16_on_bf16_dot_products_or_widened(monkeypatch, dot):
    """Where the CPU has bf16 dot products the forward and backward of bfloat16 inputs run on them
    (FASTSEQ_CPU_BF16_DOT=0 keeps the float32 path): either way every output and gradient is within 2x torch's error
    of the float64 reference (odd head dims and lengths, a mask and its gradient, causal, GQA)."""
    monkeypatch.setenv("FASTSEQ_CPU_BF16_DOT", dot)
    assert backends.extension().sdpa_cpu_bf16_dot() == (dot == "1")
    for case in (CASES[5], CASES[6], CASES[7], CASES[11], CASES[18], CASES[-3]):
        _check("cpu", "cpu", torch.bfloat16, dataclasses.replace(case, q=case.q[:-1] + (case.q[-1] + 1,),
                                                                  k=case.k[:-1] + (case.k[-1] + 1,))
               if case.q[-1] % 2 == 0 and case.mask is None else case)


@pytest.mark.skipif(not (backends.extension() and backends.extension().sdpa_cpu_bf16_dot()),
                    reason="a CPU with bf16 dot products (AVX512_BF16)")
@pytest.mark.parametrize("is_causal", [False, True])
def test_cpu_bfloat16_dropout_same_on_both_paths(monkeypatch, is_causal):
    """With dropout (same seed) the bf16 dot products and the widened path drop the same elements forward and
    backward: outputs and gradients agree to bf16 rounding (a gradient of a differently dropped element differs by
    its whole size)."""
    case = Case((2, 4, 67, 33), (2, 2, 131, 33), (2, 2, 131, 17), gqa=True, is_causal=is_causal)
    results = []
    for dot in ("1", "0"):
        monkeypatch.setenv("FASTSEQ_CPU_BF16_DOT", dot)
        q, k, v, _ = _tensors(case, torch.bfloat16, "cpu")
        torch.manual_seed(3)
        with on_backend("cpu"):
            results.append(_fwd_bwd(F.scaled_dot_product_attention, q, k, v, None, dropout_p=0.3,
                                    is_causal=is_causal, enable_gqa=True)[0])
    for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err < 2e-2, f"{name}: max difference {err:.3g} of the largest value"


def test_long_sequence_cpu():
    """L = S = 1000 on the C++ CPU kernel, causal and with a float mask, against torch and the reference."""
    _check("cpu", "cpu", torch.float32, Case((1, 2, 1000, 64), (1, 2, 1000, 64), (1, 2, 1000, 64), is_causal=True))
    _check("cpu", "cpu", torch.float32, Case((1, 2, 1000, 32), (1, 2, 1000, 32), (1, 2, 1000, 32), "float",
                                             (1000, 1000)))


@pytest.mark.sanitize
def test_non_contiguous_inputs(backend_device):
    """(B, L, H, E) tensors transposed to (B, H, L, E), as attention layers produce them."""
    backend, device = backend_device
    dtype = DTYPES[backend_device][0]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 64, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()
               for n in (17, 33, 33))
    mask = torch.randn(2, 3, 17, 34, generator=g).to(device, dtype)[..., :33].requires_grad_()  # strided rows
    with on_backend(backend):
        ours, dout = _fwd_bwd(F.scaled_dot_product_attention, q, k, v, mask)
    theirs, _ = _fwd_bwd(torch.nn.functional.scaled_dot_product_attention, q, k, v, mask, dout=dout)
    for o, t in zip(ours, theirs):
        assert_close(o, t, *(TOL[dtype] if dtype in TOL else (2e-2, 2e-2)))


def test_empty(backend_device):
    backend, device = backend_device
    dtype = DTYPES[backend_device][0]
    for qs, ks in (((2, 3, 0, 64), (2, 3, 5, 64)), ((0, 3, 4, 64), (0, 3, 5, 64)), ((2, 3, 4, 64), (2, 3, 0, 64))):
        q = torch.randn(qs, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(ks, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(ks, device=device, dtype=dtype, requires_grad=True)
        with on_backend(backend):
            out = F.scaled_dot_product_attention(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert out.shape == qs and out.abs().sum() == 0
        for g, t in zip(grads, (q, k, v)):
            assert g.shape == t.shape and g.abs().sum() == 0


# ------------------------------------------------------------------------------------------------------- dropout
def _dropout_backends() -> list:
    return [p for p in BACKEND_PARAMS if p.values[0][0] != "cuda"]


def _keep_mask(backend, device, dtype, shape_q, s, p, seed, is_causal=False):
    """The keep decisions of a call with this seed: with v the identity (S x S), out = p * keep / (1 - p)."""
    B, H, L, E = shape_q
    g = torch.Generator().manual_seed(5)
    q = torch.randn(shape_q, generator=g).to(device, dtype)
    k = torch.randn(B, H, s, E, generator=g).to(device, dtype)
    eye = torch.eye(s, dtype=dtype, device=device).expand(B, H, s, s)
    torch.manual_seed(seed)
    with on_backend(backend):
        out = F.scaled_dot_product_attention(q, k, eye, dropout_p=p)
    return out != 0


@pytest.mark.parametrize("backend_device", _dropout_backends())
def test_dropout_same_seed_same_result(backend_device):
    backend, device = backend_device
    dtype = DTYPES[backend_device][0]
    case = Case((2, 3, 33, 16), (2, 3, 40, 16), (2, 3, 40, 8), "float", (33, 40))
    q, k, v, mask = _tensors(case, dtype, device)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        with on_backend(backend):
            runs.append(_fwd_bwd(F.scaled_dot_product_attention, q, k, v, mask, dropout_p=0.25)[0])
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.mark.parametrize("backend_device", _dropout_backends())
def test_dropout_against_reference_with_the_same_keep_mask(backend_device):
    """The keep mask recovered from a call with v = I; then output and gradients (causal, float mask, GQA) against
    the float64 reference with that keep mask; the kept fraction within 5 standard deviations of 1 - p."""
    backend, device = backend_device
    dtype = DTYPES[backend_device][0]
    p, seed = 0.3, 11
    for case in (Case((2, 4, 33, 16), (2, 4, 40, 16), (2, 4, 40, 8), "float", (2, 1, 33, 40)),
                 Case((2, 4, 33, 16), (2, 4, 40, 16), (2, 4, 40, 24), is_causal=True),
                 Case((2, 4, 33, 16), (2, 2, 40, 16), (2, 2, 40, 24), gqa=True)):
        keep = _keep_mask(backend, device, dtype, case.q, case.k[-2], p, seed)
        n = keep.numel()
        assert abs(keep.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        q, k, v, mask = _tensors(case, dtype, device)
        kw = dict(dropout_p=p, is_causal=case.is_causal, enable_gqa=case.gqa)
        torch.manual_seed(seed)
        with on_backend(backend):
            ours, dout = _fwd_bwd(F.scaled_dot_product_attention, q, k, v, mask, **kw)
        ref, _ = _fwd_bwd(reference.scaled_dot_product_attention, *map(_as64, (q, k, v, mask)),
                          dout=dout.double(), keep=keep, **kw)
        for name, o, r in zip(["out", "dq", "dk", "dv", "dmask"], ours, ref):
            assert_close(o, r, *TOL[dtype], name)


def test_dropout_keep_decisions_agree_between_cpu_and_triton():
    """The C++ CPU kernel and Triton draw the same Philox keep decisions for the same seed."""
    if not backends.triton_interpreting() or backends.unavailable_reason("cpu") is not None:
        pytest.skip("needs the CPU extension and Triton's interpreter")
    keeps = [_keep_mask(b, "cpu", torch.float32, (2, 3, 20, 16), 24, 0.5, 3) for b in ("cpu", "triton")]
    assert torch.equal(keeps[0], keeps[1])


def test_dropout_p_one_as_torch(backend_device):
    backend, device = backend_device
    if backend == "cuda":
        pytest.skip("the CUDA C++ kernel has no dropout")
    dtype = DTYPES[backend_device][0]
    q, k, v, mask = _tensors(Case((2, 3, 7, 16), (2, 3, 9, 16), (2, 3, 9, 8), "float", (7, 9)), dtype, device)
    with on_backend(backend):
        ours, dout = _fwd_bwd(F.scaled_dot_product_attention, q, k, v, mask, dropout_p=1.0)
    theirs, _ = _fwd_bwd(torch.nn.functional.scaled_dot_product_attention, q, k, v, mask, dout=dout, dropout_p=1.0)
    for o, t in zip(ours, theirs):
        assert_close(o, t, 0, 0)


def test_dropout_zero_draws_nothing():
    q = torch.randn(1, 1, 4, 8)
    torch.manual_seed(0)
    F.scaled_dot_product_attention(q, q, q)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


# ------------------------------------------------------------------------------------- autograd, custom op, compile
def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v, m = rn(1, 2, 3, 4), rn(1, 1, 5, 4), rn(1, 1, 5, 3), rn(2, 1, 5)
    assert torch.autograd.gradcheck(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, enable_gqa=True),
                                    (q, k, v, m))
    assert torch.autograd.gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                   scale=0.7, enable_gqa=True),
                                    (q, k, v))
    seed = torch.randint(0, 2**31, ()).item()

    def dropped(q, k, v):
        torch.manual_seed(seed)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.4, enable_gqa=True)

    assert torch.autograd.gradcheck(dropped, (q, k, v))


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g), \
        torch.randn(2, 2, 7, 8, generator=g)
    mask = torch.randn(2, 1, 5, 7, generator=g).expand(2, 4, 5, 7)
    rng = torch.tensor([3, 5], dtype=torch.int64)
    for args in ((q, k, v, None, False, 0.25, 0.0, None), (q, k, v, None, True, 0.25, 0.2, rng),
                 (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask.requires_grad_(), False, 0.25,
                  0.0, None)):
        torch.library.opcheck(torch.ops.fastseq.sdpa.default, args)
    q, k, v, mask = (t.detach() for t in (q, k, v, mask))
    out, lse = torch.ops.fastseq.sdpa(q, k, v, mask, False, 0.25, 0.0, None)
    torch.library.opcheck(torch.ops.fastseq.sdpa_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, mask, False, 0.25, 0.0, None, True, "cpu"))


class _Block(torch.nn.Module):
    def __init__(self, dropout_p: float, sdpa=F.scaled_dot_product_attention):
        super().__init__()
        self.qkv, self.dropout_p, self.sdpa = torch.nn.Linear(32, 96), dropout_p, sdpa

    def forward(self, x, mask):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = self.sdpa(q, k, v, mask, dropout_p=self.dropout_p)
        return y.transpose(1, 2).reshape(x.shape)


def test_torch_compile_fullgraph():
    """Compiled, a block on fastseq's attention gives torch's results (without dropout), and with dropout the
    results of the same block in eager mode (the keep mask is fastseq's own, drawn from the same seed)."""
    torch.manual_seed(0)
    x, mask = torch.randn(2, 9, 32, requires_grad=True), torch.rand(9, 9) > 0.2
    for p in (0.0, 0.3):
        model = _Block(p)
        baseline = _Block(p, torch.nn.functional.scaled_dot_product_attention) if p == 0.0 else model
        baseline.qkv.load_state_dict(model.qkv.state_dict())
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.manual_seed(1)
        y = compiled(x, mask)
        gy = torch.autograd.grad(y.sum(), (x, *model.parameters()))
        torch.manual_seed(1)
        y2 = baseline(x, mask)
        assert_close(y, y2, 1e-6, 1e-6)
        for o, t in zip(gy, torch.autograd.grad(y2.sum(), (x, *baseline.parameters())), strict=True):
            assert_close(o, t, 1e-5, 1e-5)


# ------------------------------------------------------------------------------------------------------ bad input
def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


@pytest.mark.parametrize("call,match", [
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(4, 3, 6, 8), _t(4, 3, 6, 8)), r"batch dims"),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 2, 6, 8), _t(2, 2, 6, 8)),
     r"key must have query's number of heads .* 3.*enable_gqa"),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 2, 6, 8), _t(2, 2, 6, 8), enable_gqa=True),
     r"key/value's number of heads \(dim -3\) 2 must divide query's 3"),
    (lambda: F.scaled_dot_product_attention(_t(2, 4, 5, 8), _t(2, 2, 6, 8), _t(2, 1, 6, 8), enable_gqa=True),
     r"value must have key's number of heads"),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 3, 6, 7), _t(2, 3, 6, 8)),
     r"key's last dim \(embedding\) must equal query's 8"),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 3, 6, 8), _t(2, 3, 7, 8)),
     r"value's length \(dim -2\) must equal key's 6"),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 3, 6, 8), _t(2, 3, 6, 8), _t(5, 7)),
     r"attn_mask of shape \[5, 7\] is not broadcastable to .*\[2, 3, 5, 6\]"),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 3, 6, 8), _t(2, 3, 6, 8), _t(2, 2, 3, 5, 6)),
     r"attn_mask of shape \[2, 2, 3, 5, 6\] is not broadcastable"),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 3, 6, 8), _t(2, 3, 6, 8),
                                            torch.zeros(5, 6, dtype=torch.int32)),
     r"attn_mask must be bool, float32 or query's dtype torch.float32, got torch.int32"),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 3, 6, 8), _t(2, 3, 6, 8),
                                            _t(5, 6, dtype=torch.float64)), r"attn_mask must be bool, float32"),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 3, 6, 8), _t(2, 3, 6, 8), _t(5, 6),
                                            is_causal=True), r"attn_mask and is_causal"),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 3, 6, 8, dtype=torch.float64), _t(2, 3, 6, 8)),
     r"key has dtype torch.float64 but query has dtype torch.float32"),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 5, 8), _t(2, 3, 6, 8), _t(2, 3, 6, 8, device="meta")),
     r"value is on meta"),
    (lambda: F.scaled_dot_product_attention(torch.ones(2, 3, 5, 8, dtype=torch.long), _t(2, 3, 6, 8),
                                            _t(2, 3, 6, 8)), r"query must be a floating-point"),
    (lambda: F.scaled_dot_product_attention(_t(8), _t(6, 8), _t(6, 8)), r"query must have at least 2 dims"),
    (lambda: F.scaled_dot_product_attention(_t(5, 8), _t(6, 8), _t(6, 8), dropout_p=1.5), r"dropout_p must be"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_unsupported_head_dim_falls_back_with_a_warning():
    if not torch.cuda.is_available():
        pytest.skip("the CUDA C++ kernel's head dims are checked on the GPU")
    q = torch.randn(1, 2, 33, 48, device="cuda", dtype=torch.float16)
    with fastseq.backend("cuda"), pytest.warns(UserWarning, match=r"runs on the triton backend \(cuda: .*E=48"):
        F.scaled_dot_product_attention(q, q, q)
