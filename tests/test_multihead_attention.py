"""fastseq.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same state_dict (loaded both ways):
outputs, returned weights and the gradients of the inputs, float masks and every parameter over a sweep of
configurations; dropout; inside torch's Transformer layers (whose eval fast path must not bypass it); bad input."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import assert_close, on_backend

import fastseq
from fastseq.nn.activation import disable_torch_fast_path, keep_torch_fast_path_off

E, H, N, L, S = 12, 3, 2, 5, 7  # embed dim, heads, batch, target and source lengths
KDIM, VDIM = 6, 10
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}  # atol relative to the largest element


@dataclass(frozen=True)
class Case:
    kind: str = "self"  # "self" (query is key is value), "kv" (key is value), "cross", "dims" (kdim, vdim)
    kpm: str | None = None  # key_padding_mask: "bool" or "float"
    attn: str | None = None  # attn_mask: "bool2", "float2" (L, S), "bool3", "float3" (N*H, L, S), "causal"
    need_weights: bool = False
    average: bool = True
    batch_first: bool = False
    batched: bool = True
    bias: bool = True
    bias_kv: bool = False
    zero_attn: bool = False
    transposed: bool = False  # inputs are non-contiguous views

    def __str__(self) -> str:
        flags = [self.kind, f"kpm-{self.kpm}" if self.kpm else "", f"attn-{self.attn}" if self.attn else "",
                 ("weights" if self.average else "weights-per-head") if self.need_weights else "",
                 "batch_first" if self.batch_first else "", "" if self.batched else "unbatched",
                 "" if self.bias else "nobias", "bias_kv" if self.bias_kv else "",
                 "zero_attn" if self.zero_attn else "", "transposed" if self.transposed else ""]
        return "-".join(f for f in flags if f)


CASES = [
    Case(need_weights=True), Case(), Case(batch_first=True, kpm="bool"),
    Case(batch_first=True, kpm="float", need_weights=True, average=False), Case(attn="bool2"),
    Case(attn="float2", kpm="float", need_weights=True), Case(attn="bool3", kpm="bool", batch_first=True),
    Case(attn="float3", need_weights=True, average=False), Case(attn="causal"), Case(attn="causal", kpm="bool"),
    Case(attn="causal", need_weights=True, batch_first=True), Case(bias=False, kpm="bool", need_weights=True),
    Case(bias_kv=True, kpm="bool", attn="bool2"), Case(zero_attn=True, attn="bool3", need_weights=True),
    Case(bias_kv=True, zero_attn=True, kpm="float", attn="float3", batch_first=True),
    Case(bias_kv=True, attn="causal"), Case(transposed=True, kpm="bool", need_weights=True),
    Case("kv"), Case("kv", kpm="bool", need_weights=True, batch_first=True),
    Case("kv", attn="float3", kpm="float", bias_kv=True), Case("kv", transposed=True, attn="bool2"),
    Case("cross", kpm="bool", attn="bool2", need_weights=True, average=False),
    Case("cross", bias=False, zero_attn=True), Case("dims"),
    Case("dims", kpm="float", attn="float3", need_weights=True, batch_first=True, bias_kv=True),
    Case("dims", attn="bool2", bias=False, zero_attn=True),
    Case(batched=False, kpm="bool", need_weights=True), Case(batched=False, attn="causal"),
    Case("kv", batched=False, attn="float3", kpm="float", batch_first=True),
    Case("dims", batched=False, attn="bool2", need_weights=True, average=False),
    Case("cross", batched=False, zero_attn=True, bias_kv=True, kpm="float", attn="bool3"),
]


def _kwargs(case: Case, dtype: torch.dtype) -> dict:
    dims = dict(kdim=KDIM, vdim=VDIM) if case.kind == "dims" else {}
    return dict(embed_dim=E, num_heads=H, bias=case.bias, add_bias_kv=case.bias_kv, add_zero_attn=case.zero_attn,
                batch_first=case.batch_first, dtype=dtype, **dims)


def _pair(case: Case, dtype: torch.dtype, torch_first: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(torch's module, ours) with one state_dict: made (random, biases included) by the first, loaded into the
    other."""
    classes = [torch.nn.MultiheadAttention, fastseq.nn.MultiheadAttention]
    src, dst = (classes[0], classes[1]) if torch_first else (classes[1], classes[0])
    torch.manual_seed(0)
    src = src(**_kwargs(case, dtype))
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn(p.shape, dtype=dtype) * 0.5)
    dst = dst(**_kwargs(case, dtype))
    assert list(dst.state_dict()) == list(src.state_dict())
    dst.load_state_dict(src.state_dict())
    return (src, dst) if torch_first else (dst, src)


def _inputs(case: Case, dtype: torch.dtype) -> dict:
    """query, key, value (the same tensor objects where the case shares them) and the masks, torch's convention
    (bool True = not allowed); no query row is fully masked."""
    g = torch.Generator().manual_seed(1)
    s = L if case.kind == "self" else S

    def seq(length: int, dim: int) -> torch.Tensor:
        shape = (N, length, dim) if case.batch_first else (length, N, dim)
        t = torch.randn(shape if case.batched else (length, dim), generator=g, dtype=dtype)
        if case.transposed:  # the same values, as a non-contiguous view
            t = t.transpose(0, -1).contiguous().transpose(0, -1)
        return t

    query = seq(L, E)
    if case.kind == "self":
        key = value = query
    elif case.kind == "kv":
        key = value = seq(s, E)
    else:
        key, value = seq(s, KDIM if case.kind == "dims" else E), seq(s, VDIM if case.kind == "dims" else E)
    kpm = attn = None
    if case.kpm:
        kpm = torch.rand(N, s, generator=g) < 0.3
        kpm[:, 0] = False
        if case.kpm == "float":
            kpm = torch.randn(N, s, generator=g, dtype=dtype).masked_fill(kpm, float("-inf"))
        kpm = kpm if case.batched else kpm[0]
    if case.attn == "causal":
        attn = torch.ones(L, s, dtype=torch.bool).triu(1)
    elif case.attn:
        shape = (L, s) if case.attn.endswith("2") else ((N if case.batched else 1) * H, L, s)
        attn = torch.rand(shape, generator=g) < 0.3
        attn[..., 0] = False
        if case.attn.startswith("float"):
            attn = torch.randn(shape, generator=g, dtype=dtype).masked_fill(attn, float("-inf"))
    return dict(query=query, key=key, value=value, key_padding_mask=kpm, attn_mask=attn)


def _leaves(inputs: dict) -> dict:
    """Fresh leaves requiring grad (floating ones), keeping which arguments are the same tensor."""
    fresh = {}
    out = {}
    for name, t in inputs.items():
        if t is not None and id(t) not in fresh:
            fresh[id(t)] = t.detach().clone().requires_grad_(t.is_floating_point())
        out[name] = None if t is None else fresh[id(t)]
    return out


def _run(module: torch.nn.Module, case: Case, inputs: dict) -> dict:
    """Output, weights and the gradients of a fixed random loss on both w.r.t. the inputs and the parameters."""
    args = _leaves(inputs)
    out, weights = module(**args, need_weights=case.need_weights, average_attn_weights=case.average,
                          is_causal=case.attn == "causal")
    g = torch.Generator().manual_seed(2)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    result = {"out": out, "weights": weights}
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=g, dtype=weights.dtype)).sum()
    leaves = {f"d{k}": t for k, t in args.items() if t is not None and t.requires_grad}
    leaves.update((f"d{k}", p) for k, p in module.named_parameters())
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    result.update(zip(leaves, grads))
    return result


@pytest.mark.parametrize("torch_first", [True, False], ids=["from-torch", "to-torch"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sweep_against_torch(case, torch_first):
    for dtype in (torch.float64, torch.float32) if torch_first else (torch.float64,):
        ref, ours = _pair(case, dtype, torch_first)
        inputs = _inputs(case, dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Support for mismatched")
            expected, actual = _run(ref, case, inputs), _run(ours, case, inputs)
        assert set(actual) == set(expected)
        for name, t in expected.items():
            a = actual[name]
            if t is None:
                assert a is None or a.abs().max() == 0, name
                continue
            assert a.dtype == t.dtype, f"{name}: {a.dtype} vs {t.dtype}"
            atol, rtol = TOL[dtype]
            scale = max(1.0, t.detach().abs().nan_to_num(0, 0, 0).max().item()) if t.numel() else 1.0
            assert_close(a, t, atol * scale, rtol, f"{case} {dtype} {name}")


def test_mismatched_mask_types_warn_like_torch():
    case = Case(kpm="bool", attn="float2", need_weights=True)
    ref, ours = _pair(case, torch.float64, True)
    inputs = _inputs(case, torch.float64)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        expected = _run(ref, case, inputs)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        actual = _run(ours, case, inputs)
    for name in ("out", "weights", "dquery", "din_proj_weight"):
        assert_close(actual[name], expected[name], *TOL[torch.float64], name)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_other_backends(backend):
    """A few cases on the Triton kernels (in the interpreter without a GPU) and on the reference backend."""
    for case in (Case(kpm="bool", attn="bool2", batch_first=True), Case("kv", kpm="float", need_weights=True)):
        ref, ours = _pair(case, torch.float32, True)
        inputs = _inputs(case, torch.float32)
        expected = _run(ref, case, inputs)
        with on_backend(backend):
            actual = _run(ours, case, inputs)
        for name, t in expected.items():
            if t is not None:
                assert_close(actual[name], t, 3e-4, 3e-4, f"{backend} {case} {name}")


def test_eval_without_grad_and_empty_batch():
    """eval + no_grad (where torch's module takes its fused fast path); a batch of 0 (which torch's module does not
    take)."""
    case = Case(batch_first=True, kpm="bool")
    ref, ours = _pair(case, torch.float32, True)
    ref.eval(), ours.eval()
    x = torch.randn(N, L, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[:, -2:] = True
    with torch.no_grad():
        expected, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)
        actual, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert_close(actual, expected, 1e-5, 1e-5)
    x = torch.randn(0, L, E, requires_grad=True)
    out, weights = ours.train()(x, x, x, key_padding_mask=kpm[:0], attn_mask=torch.zeros(L, L, dtype=torch.bool))
    out.sum().backward()
    assert out.shape == x.shape and weights.shape == (0, L, L) and x.grad.shape == x.shape


# ------------------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("batch_first", [False, True])
def test_dropout(batch_first):
    case = Case(kpm="bool", batch_first=batch_first)
    ref, ours = _pair(case, torch.float64, True)
    ref.dropout = ours.dropout = 0.5
    inputs = _inputs(case, torch.float64)
    x, kpm = inputs["query"], inputs["key_padding_mask"]
    # training: shapes, an effect, gradients
    out, weights = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert out.shape == x.shape and weights is None
    eval_out = _run(ref.eval(), case, inputs)["out"]
    assert (out - eval_out).abs().max() > 1e-3
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())
    # training with weights: the weights returned are the ones applied (out = (weights v) W_o^T + b_o)
    ours.train()
    out, weights = ours(x, x, x, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
    assert weights.shape == (N, H, L, L)
    assert (weights == 0).any() and weights.max() > 1.0  # dropped and rescaled probabilities
    v = torch.nn.functional.linear(x, ours.in_proj_weight[2 * E:], ours.in_proj_bias[2 * E:])
    v = (v if batch_first else v.transpose(0, 1)).unflatten(-1, (H, E // H)).transpose(1, 2)
    attended = (weights @ v).transpose(1, 2).flatten(2)
    expected = torch.nn.functional.linear(attended, ours.out_proj.weight, ours.out_proj.bias)
    assert_close(out, expected if batch_first else expected.transpose(0, 1), 1e-10, 1e-10, "out from weights")
    # eval: deterministic and equal to torch
    ours.eval()
    first, second = _run(ours, case, inputs)["out"], _run(ours, case, inputs)["out"]
    assert torch.equal(first, second)
    assert_close(first, eval_out, *TOL[torch.float64], "eval")


# ----------------------------------------------------------------------------------- inside torch's Transformer
def _swap(root: torch.nn.Module) -> int:
    """What replace_modules does to a model: each torch MultiheadAttention becomes ours in place."""
    count = 0
    for m in root.modules():
        if type(m) is torch.nn.MultiheadAttention:
            m.__class__ = fastseq.nn.MultiheadAttention
            disable_torch_fast_path(m)
            count += 1
    return count


@pytest.fixture
def calls(monkeypatch) -> list:
    """Counts calls of fastseq.nn.MultiheadAttention.forward."""
    seen = []
    forward = fastseq.nn.MultiheadAttention.forward

    def counted(self, *args, **kwargs):
        seen.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(fastseq.nn.MultiheadAttention, "forward", counted)
    return seen


def _transformer_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, L, E, generator=g)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, -2:] = True
    return x, kpm, torch.nn.Transformer.generate_square_subsequent_mask(L)


@pytest.mark.parametrize("train", [True, False])
def test_inside_transformer_encoder(calls, train):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, 4, dim_feedforward=24, dropout=0.0, batch_first=True)
    ref = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train(train)
    ours = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train(train)
    ours.load_state_dict(ref.state_dict())
    assert _swap(ours) == 2
    x, kpm, causal = _transformer_inputs()
    for kw in (dict(src_key_padding_mask=kpm), dict(mask=causal, is_causal=True), {}):
        calls.clear()
        with torch.set_grad_enabled(train):
            assert_close(ours(x, **kw), ref(x, **kw), 1e-5, 1e-5, f"train={train} {list(kw)}")
        assert len(calls) == 2  # fastseq's forward ran in each layer, not torch's fused layer


def test_nested_tensors_are_refused_clearly():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, 4, dim_feedforward=24, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 1).eval()  # enable_nested_tensor defaults to True
    _swap(encoder)
    x, kpm, _ = _transformer_inputs()
    with torch.no_grad(), warnings.catch_warnings(), pytest.raises(NotImplementedError, match="nested_tensor=False"):
        warnings.filterwarnings("ignore", "The PyTorch API of nested tensors is in prototype stage")
        encoder(x, src_key_padding_mask=kpm)


@pytest.mark.parametrize("train", [True, False])
def test_inside_transformer_decoder_layer(calls, train):
    torch.manual_seed(0)
    ref = torch.nn.TransformerDecoderLayer(E, 4, dim_feedforward=24, dropout=0.0).train(train)
    ours = torch.nn.TransformerDecoderLayer(E, 4, dim_feedforward=24, dropout=0.0).train(train)
    ours.load_state_dict(ref.state_dict())
    assert _swap(ours) == 2
    x, kpm, causal = _transformer_inputs()
    tgt, memory = x.transpose(0, 1), torch.randn(S, N, E)
    memory_kpm = torch.zeros(N, S, dtype=torch.bool)
    memory_kpm[0, -3:] = True
    kw = dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=memory_kpm)
    with torch.set_grad_enabled(train):
        assert_close(ours(tgt, memory, **kw), ref(tgt, memory, **kw), 1e-5, 1e-5, f"train={train}")
    assert len(calls) == 2


def test_swapped_torch_instance_and_hook():
    """A torch instance whose class is swapped to ours works (forward needs nothing that only our __init__ sets);
    disable_torch_fast_path registers its hook once; the hook survives deepcopy (TransformerEncoder's clones)."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, kdim=KDIM, vdim=VDIM)
    module = torch.nn.MultiheadAttention(E, H, kdim=KDIM, vdim=VDIM)
    module.load_state_dict(ref.state_dict())
    module.__class__ = fastseq.nn.MultiheadAttention
    disable_torch_fast_path(module)
    disable_torch_fast_path(module)
    assert list(module._forward_pre_hooks.values()) == [keep_torch_fast_path_off]
    q, k, v = torch.randn(L, N, E), torch.randn(S, N, KDIM), torch.randn(S, N, VDIM)
    for a, b in zip(module(q, k, v), ref(q, k, v)):
        assert_close(a, b, 1e-5, 1e-5)
    fresh = fastseq.nn.MultiheadAttention(E, H)
    disable_torch_fast_path(fresh)
    assert list(fresh._forward_pre_hooks.values()) == [keep_torch_fast_path_off]
    assert list(copy.deepcopy(fresh)._forward_pre_hooks.values()) == [keep_torch_fast_path_off]


# ----------------------------------------------------------------------------------------------------- bad input
def _q(n=L, e=E):
    return torch.randn(n, N, e)


BAD = {
    "query 4-D": (Case(), lambda: dict(query=torch.randn(1, L, N, E), key=_q(), value=_q())),
    "key 2-D": (Case("cross"), lambda: dict(query=_q(), key=torch.randn(S, E), value=_q(S))),
    "wrong embed dim": (Case("cross"), lambda: dict(query=_q(e=E + 3), key=_q(S, E + 3), value=_q(S, E + 3))),
    "key/value lengths": (Case("cross"), lambda: dict(query=_q(), key=_q(S), value=_q(S + 1))),
    "key/value lengths (kdim)": (Case("dims"), lambda: dict(query=_q(), key=_q(S, KDIM), value=_q(S + 1, VDIM))),
    "key dim (kdim)": (Case("dims"), lambda: dict(query=_q(), key=_q(S, E), value=_q(S, VDIM))),
    "attn_mask 2-D shape": (Case("kv"), lambda: dict(query=_q(), key=_q(S), value=_q(S),
                                                     attn_mask=torch.zeros(L, S + 1))),
    "attn_mask 3-D shape": (Case("kv"), lambda: dict(query=_q(), key=_q(S), value=_q(S),
                                                     attn_mask=torch.zeros(H, L, S))),
    "attn_mask 4-D": (Case("kv"), lambda: dict(query=_q(), key=_q(S), value=_q(S),
                                               attn_mask=torch.zeros(N, H, L, S))),
    "unbatched attn_mask 3-D": (Case("kv"), lambda: dict(query=torch.randn(L, E), key=torch.randn(S, E),
                                                         value=torch.randn(S, E), attn_mask=torch.zeros(2, L, S))),
    "key_padding_mask batch": (Case("kv"), lambda: dict(query=_q(), key=_q(S), value=_q(S),
                                                        key_padding_mask=torch.zeros(N + 1, S))),
    "key_padding_mask length": (Case("kv"), lambda: dict(query=_q(), key=_q(S), value=_q(S),
                                                         key_padding_mask=torch.zeros(N, S - 1))),
    "key_padding_mask dims": (Case("kv"), lambda: dict(query=_q(), key=_q(S), value=_q(S),
                                                       key_padding_mask=torch.zeros(S))),
    "int attn_mask": (Case("kv"), lambda: dict(query=_q(), key=_q(S), value=_q(S),
                                               attn_mask=torch.zeros(L, S, dtype=torch.int64))),
    "int key_padding_mask": (Case("kv"), lambda: dict(query=_q(), key=_q(S), value=_q(S),
                                                      key_padding_mask=torch.zeros(N, S, dtype=torch.int32))),
    "is_causal without mask": (Case("kv"), lambda: dict(query=_q(), key=_q(S), value=_q(S), is_causal=True)),
    "float64 query": (Case("kv"), lambda: dict(query=_q().double(), key=_q(S).double(), value=_q(S).double())),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_like_torch(name):
    case, make = BAD[name]
    ref, ours = _pair(case, torch.float32, True)
    torch.manual_seed(4)
    args = make()
    if case.kind == "kv":
        args["value"] = args["key"]
    with pytest.raises(Exception) as expected:
        ref(**args)
    with pytest.raises(type(expected.value)):
        ours(**args)


def test_construction_like_torch():
    with pytest.raises(AssertionError, match="divisible"):
        torch.nn.MultiheadAttention(10, 3)
    with pytest.raises(AssertionError, match="divisible"):
        fastseq.nn.MultiheadAttention(10, 3)
    with pytest.raises(ValueError):
        fastseq.nn.MultiheadAttention(0, 1)
    module = fastseq.nn.MultiheadAttention(E, H, kdim=KDIM, vdim=VDIM, bias=False, add_bias_kv=True,
                                           batch_first=True, dtype=torch.float64)
    ref = torch.nn.MultiheadAttention(E, H, kdim=KDIM, vdim=VDIM, bias=False, add_bias_kv=True, batch_first=True,
                                      dtype=torch.float64)
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert all(p.dtype == torch.float64 for p in module.parameters())
    assert isinstance(module, torch.nn.MultiheadAttention)
