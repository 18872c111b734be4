"""fastseq inside real models: replace_modules on a model holding every replaceable kind (nested, in a ModuleList,
the model itself, subclasses, include/exclude, hooks, training mode, optimizer, TransformerEncoder);
torch.compile(fullgraph=True) of a model on every fastseq module (aot_eager, and inductor on a small one);
torch.autocast on the CPU (torch's output dtypes, errors within torch's); DistributedDataParallel and FSDP
(fully_shard) over two gloo processes against one process on the full batch; torch.save / torch.load of a whole
model and its state_dict into the plain torch model and back."""
from __future__ import annotations

import copy
import io
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close, assert_within_torch_error, on_backend
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastseq
from fastseq import nn as fnn
from fastseq.nn.activation import keep_torch_fast_path_off

f64 = torch.float64


class Cells(torch.nn.Module):
    """A nested block: the three torch cells in a ModuleList, stepped over the sequence, then a LayerNorm."""

    def __init__(self, size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.cells = torch.nn.ModuleList([torch.nn.LSTMCell(size, size, dtype=dtype),
                                          torch.nn.GRUCell(size, size, dtype=dtype),
                                          torch.nn.RNNCell(size, size, nonlinearity="relu", dtype=dtype)])
        self.norm = torch.nn.LayerNorm(size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lstm, gru, rnn = self.cells
        hc = h = r = None
        for t in range(x.shape[1]):
            hc = lstm(x[:, t], hc)
            h = gru(hc[0], h)
            r = rnn(h, r)
        return self.norm(r)


class DoubledLayerNorm(torch.nn.LayerNorm):
    """A subclass of a replaceable class, which replace_modules leaves alone unless included."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class Net(torch.nn.Module):
    """Every kind replace_modules replaces, plus a subclass and a Linear it leaves alone."""

    def __init__(self, dtype: torch.dtype = f64) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(3, 6, num_layers=2, bidirectional=True, batch_first=True, dtype=dtype)
        self.gru = torch.nn.GRU(12, 6, batch_first=True, dtype=dtype)
        self.rnn = torch.nn.RNN(6, 6, nonlinearity="relu", batch_first=True, dtype=dtype)
        self.attn = torch.nn.MultiheadAttention(6, 2, batch_first=True, dtype=dtype)
        self.block = Cells(6, dtype)
        self.doubled = DoubledLayerNorm(6, dtype=dtype)
        self.head = torch.nn.Linear(6, 2, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        y, _ = self.rnn(y)
        y = y + self.attn(y, y, y, need_weights=False)[0]
        return self.head(self.doubled(self.block(y)))


NET_REPLACED = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN,
                "attn": torch.nn.MultiheadAttention, "block.cells.0": torch.nn.LSTMCell,
                "block.cells.1": torch.nn.GRUCell, "block.cells.2": torch.nn.RNNCell, "block.norm": torch.nn.LayerNorm}


def _net_and_copy(dtype: torch.dtype = f64) -> tuple[Net, Net]:
    torch.manual_seed(0)
    net = Net(dtype)
    return net, copy.deepcopy(net)


def _input(dtype: torch.dtype = f64, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1), dtype=dtype,
                       requires_grad=requires_grad)


# ------------------------------------------------------------------------------------------------ replace_modules
def test_replace_modules_every_kind():
    """Every kind, nested and in a ModuleList, becomes fastseq's with the same Parameter objects, dtype, device,
    training mode and hooks; outputs equal torch's, and an optimizer built before the swap trains the same."""
    net, theirs = _net_and_copy()
    net.block.eval()
    theirs.block.eval()
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    calls = []
    net.lstm.register_forward_hook(lambda module, args, out: calls.append("lstm"))
    net.block.cells[0].register_forward_pre_hook(lambda module, args: calls.append("cell"))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    optimizer_t = torch.optim.Adam(theirs.parameters(), lr=0.01)

    assert fastseq.replace_modules(net) == NET_REPLACED
    for name, cls in NET_REPLACED.items():
        assert type(net.get_submodule(name)) is getattr(fnn, cls.__name__), name
    assert type(net.doubled) is DoubledLayerNorm and type(net.head) is torch.nn.Linear
    assert all(a is b for a, b in zip(net.parameters(), params, strict=True))
    assert [n for n, _ in net.named_parameters()] == names
    assert [m.training for m in net.modules()] == [m.training for m in theirs.modules()]
    assert all(p.dtype == f64 and p.device.type == "cpu" for p in net.parameters())

    x = _input()
    for _ in range(2):  # the optimizer built before the swap steps the same parameters
        y, yt = net(x), theirs(x)
        assert_close(y, yt, 1e-10, 1e-9, "output")
        for opt, out in ((optimizer, y), (optimizer_t, yt)):
            opt.zero_grad()
            out.square().sum().backward()
            opt.step()
        for (name, p), pt in zip(net.named_parameters(), theirs.parameters(), strict=True):
            assert_close(p, pt, 1e-10, 1e-9, name)
    assert calls == (["lstm"] + ["cell"] * x.shape[1]) * 2
    assert fastseq.replace_modules(net) == {}  # already fastseq's


def test_replace_modules_model_itself_subclasses_include_exclude():
    """The model itself is replaced; a subclass only when included; exclude wins; clear errors for classes fastseq
    has no replacement for."""
    class MyLSTM(torch.nn.LSTM):
        pass

    def model():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"mine": MyLSTM(3, 4), "lstm": torch.nn.LSTM(3, 4),
                                    "norm": torch.nn.LayerNorm(4), "cell": torch.nn.GRUCell(3, 4)})

    lstm = torch.nn.LSTM(3, 4)
    assert fastseq.replace_modules(lstm) == {"": torch.nn.LSTM} and type(lstm) is fnn.LSTM
    assert fastseq.replace_modules(model()) == {"lstm": torch.nn.LSTM, "norm": torch.nn.LayerNorm,
                                                "cell": torch.nn.GRUCell}
    assert fastseq.replace_modules(model(), exclude=[torch.nn.LayerNorm]) == {"lstm": torch.nn.LSTM,
                                                                              "cell": torch.nn.GRUCell}
    m = model()
    x = torch.randn(5, 2, 3)
    before = m["mine"](x)[0]
    assert fastseq.replace_modules(m, include=[torch.nn.LSTM, MyLSTM], exclude=[torch.nn.LSTM]) == {"mine": MyLSTM}
    assert type(m["mine"]) is fnn.LSTM and type(m["lstm"]) is torch.nn.LSTM
    assert_close(m["mine"](x)[0], before, 2e-6, 2e-5, "included subclass")

    with pytest.raises(ValueError, match="no replacement for torch.nn.modules.linear.Linear"):
        fastseq.replace_modules(model(), include=[torch.nn.Linear])
    with pytest.raises(ValueError, match="exclude: fastseq has no replacement"):
        fastseq.replace_modules(model(), exclude=[torch.nn.Conv1d])
    with pytest.raises(ValueError, match="PeepholeLSTMCell"):
        fastseq.replace_modules(model(), include=[fnn.PeepholeLSTMCell])
    with pytest.raises(TypeError, match="include must hold torch module classes"):
        fastseq.replace_modules(model(), include=["LSTM"])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # torch's encoder, before the swap
def test_replace_modules_transformer_encoder(monkeypatch):
    """The attention of every layer becomes fastseq's and runs in eval mode without grad, where torch's layers take
    their fast path and the encoder makes nested tensors from src_key_padding_mask unless told not to."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=f64)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    theirs = copy.deepcopy(encoder)
    assert encoder.use_nested_tensor
    replaced = fastseq.replace_modules(encoder)
    assert replaced == {f"layers.{i}.{name}": cls for i in range(2) for name, cls in
                        (("self_attn", torch.nn.MultiheadAttention), ("norm1", torch.nn.LayerNorm),
                         ("norm2", torch.nn.LayerNorm))}
    assert not encoder.use_nested_tensor
    assert all(keep_torch_fast_path_off in encoder.layers[i].self_attn._forward_pre_hooks.values() for i in range(2))

    calls = []
    sdpa = fastseq.functional.scaled_dot_product_attention
    monkeypatch.setattr(fastseq.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs))
    x = torch.randn(2, 5, 8, dtype=f64)
    padding = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    with torch.no_grad():
        y, yt = encoder(x, src_key_padding_mask=padding), theirs(x, src_key_padding_mask=padding)
    assert len(calls) == 2
    assert_close(y[~padding], yt[~padding], 1e-10, 1e-9, "encoder output (positions not padded)")


# ---------------------------------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_every_module():
    """A model made by replace_modules from torch's (LSTM, GRU, RNN, the three cells, LayerNorm,
    MultiheadAttention), followed by a PeepholeLSTMCell, compiles into one graph; the output and the gradients of
    the input and of every parameter equal torch's (eager PeepholeLSTMCell's for the last). Under autocast the
    compiled model returns what the eager one returns."""
    net, theirs = _net_and_copy(torch.float32)
    fastseq.replace_modules(net)
    peephole = fnn.PeepholeLSTMCell(2, 3)

    def model(x):
        y = net(x)
        return y, peephole(y)[0]

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, xt = _input(torch.float32, True), _input(torch.float32, True)
    (y, h), yt = compiled(x), theirs(xt)
    ht = peephole(yt)[0]
    assert_close(y, yt, 1e-5, 1e-4, "output")
    assert_close(h, ht, 1e-5, 1e-4, "peephole output")
    names = ["input", *(f"net.{n}" for n, _ in net.named_parameters()),
             *(f"peephole.{n}" for n, _ in peephole.named_parameters())]
    grads = torch.autograd.grad(y.square().sum() + h.sum(), [x, *net.parameters(), *peephole.parameters()])
    grads_t = torch.autograd.grad(yt.square().sum() + ht.sum(), [xt, *theirs.parameters(), *peephole.parameters()])
    for name, g, gt in zip(names, grads, grads_t, strict=True):
        assert_close(g, gt, 1e-5, 1e-4, f"gradient of {name}")

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(x), model(x)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert_close(g, w, 1e-2, 1e-2, "compiled under autocast")


class LSTMNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.norm = torch.nn.LSTM(3, 8, batch_first=True), torch.nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lstm(x)[0])


def test_compile_inductor():
    """LSTM (batch_first) into LayerNorm, compiled with the default backend (inductor), forward."""
    torch.manual_seed(0)
    model = LSTMNorm()
    theirs = copy.deepcopy(model)
    fastseq.replace_modules(model)
    x = torch.randn(2, 5, 3)
    assert_close(torch.compile(model, fullgraph=True)(x), theirs(x), 1e-5, 1e-4, "inductor output")


# --------------------------------------------------------------------------------------------------------- autocast
def _leaves(out) -> list[torch.Tensor]:
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out if o is not None for t in _leaves(o)]


def _to64(arg):
    if isinstance(arg, PackedSequence):
        return arg._replace(data=arg.data.double())
    if isinstance(arg, tuple):
        return tuple(_to64(a) for a in arg)
    return arg.double() if isinstance(arg, torch.Tensor) else arg


bf16 = torch.bfloat16
N, T, C, H = 3, 6, 5, 8
# name: (torch's module or function, fastseq's function or None for torch's module after replace_modules, input)
AUTOCAST = {
    "lstm": (lambda: torch.nn.LSTM(C, H, num_layers=2), None, lambda: (torch.randn(T, N, C),)),
    "lstm_packed": (lambda: torch.nn.LSTM(C, H), None,
                    lambda: (pack_padded_sequence(torch.randn(T, N, C), [6, 4, 2]),)),
    "gru_float32_state": (lambda: torch.nn.GRU(C, H), None, lambda: (torch.randn(T, N, C), torch.randn(1, N, H))),
    "gru_bf16_input": (lambda: torch.nn.GRU(C, H), None, lambda: (torch.randn(T, N, C).to(bf16),)),
    "rnn": (lambda: torch.nn.RNN(C, H, nonlinearity="relu"), None, lambda: (torch.randn(T, N, C),)),
    "lstm_cell": (lambda: torch.nn.LSTMCell(C, H), None,
                  lambda: (torch.randn(N, C), (torch.randn(N, H), torch.randn(N, H)))),
    "lstm_cell_bf16_state": (lambda: torch.nn.LSTMCell(C, H), None,
                             lambda: (torch.randn(N, C), (torch.randn(N, H).to(bf16), torch.randn(N, H).to(bf16)))),
    "gru_cell": (lambda: torch.nn.GRUCell(C, H), None, lambda: (torch.randn(N, C), torch.randn(N, H))),
    "rnn_cell": (lambda: torch.nn.RNNCell(C, H), None, lambda: (torch.randn(N, C), torch.randn(N, H))),
    "layer_norm_bf16_input": (lambda: torch.nn.LayerNorm(H), None, lambda: (torch.randn(N, H).to(bf16),)),
    "layer_norm": (lambda: torch.nn.LayerNorm(H), None, lambda: (torch.randn(N, H),)),
    "multihead_attention": (lambda: torch.nn.MultiheadAttention(H, 2, batch_first=True), None,
                            lambda: (torch.randn(N, T, H),) * 3),
    "sdpa_float_mask": (lambda: torch.nn.functional.scaled_dot_product_attention,
                        lambda: fastseq.functional.scaled_dot_product_attention,
                        lambda: (*(torch.randn(N, 2, T, H) for _ in range(3)), torch.randn(T, T))),
}


@pytest.mark.parametrize("case", list(AUTOCAST))
def test_autocast_cpu_bfloat16(case):
    """Under torch.autocast("cpu", bfloat16) each fastseq module or function returns the dtypes torch's returns
    (float32 models; float32 or bfloat16 input and state), with an error against the float64 reference within
    twice torch's own; the parameters' gradients keep the parameters' dtype."""
    make_torch, make_ours, make_args = AUTOCAST[case]
    torch.manual_seed(0)
    theirs = make_torch()
    if make_ours is None:
        ours, reference = copy.deepcopy(theirs), copy.deepcopy(theirs).double()
        fastseq.replace_modules(ours)
    else:
        ours, reference = make_ours(), theirs
    torch.manual_seed(1)
    args = make_args()
    with torch.autocast("cpu", dtype=bf16):
        got, want = _leaves(ours(*args)), _leaves(theirs(*args))
    ref = _leaves(reference(*_to64(args)))
    assert [t.dtype for t in got] == [t.dtype for t in want]
    for i, (g, w, r) in enumerate(zip(got, want, ref, strict=True)):
        assert_within_torch_error(g, w, r, f"{case} output {i}", factor=2.0)
    if isinstance(ours, torch.nn.Module):
        sum(t.float().sum() for t in got).backward()
        assert all(p.grad is not None and p.grad.dtype == p.dtype for p in ours.parameters())


def test_autocast_casts_a_weight_once_per_region():
    """Under autocast a weight is cast once per autocast region (torch's autocast cache), as torch's ops do: an
    RNNCell stepped over a sequence reuses one bfloat16 copy of its weights, and its gradients (through the
    steps) stay within twice torch's error against the float64 reference."""
    ext = fastseq.backends.extension()
    w = torch.nn.Parameter(torch.randn(4, 4))
    with torch.autocast("cpu", dtype=bf16):
        first, again = ext.autocast_cast(w, bf16), ext.autocast_cast(w, bf16)
        assert first.dtype == bf16 and first.data_ptr() == again.data_ptr()
        assert ext.autocast_cast(w.detach(), bf16).data_ptr() != first.data_ptr()  # not a leaf that needs grad
    with torch.autocast("cpu", dtype=bf16):  # a new region casts anew (first is alive: its memory is not reused)
        assert ext.autocast_cast(w, bf16).data_ptr() != first.data_ptr()

    torch.manual_seed(0)
    theirs = torch.nn.RNNCell(C, H)
    ours, reference = copy.deepcopy(theirs), copy.deepcopy(theirs).double()
    fastseq.replace_modules(ours)
    xs = torch.randn(T, N, C)
    grads = []
    for model, cast in ((ours, True), (theirs, True), (reference, False)):
        h = torch.zeros(N, H, dtype=torch.float64 if not cast else torch.float32)
        with torch.autocast("cpu", dtype=bf16, enabled=cast):
            for t in range(T):
                h = model(xs[t] if cast else xs[t].double(), h)
        h.float().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for i, (got, want, ref) in enumerate(zip(*grads, strict=True)):
        assert_within_torch_error(got, want, ref, f"parameter {i}", factor=2.0)


def test_calls_without_grad_skip_the_autograd_function(monkeypatch):
    """With grad mode off, or no tensor argument requiring grad, an op runs its implementation without the
    autograd.Function (inference pays no graph bookkeeping); the results are the same as through the Function,
    which still runs as soon as a tensor argument requires grad."""
    torch.manual_seed(0)
    lstm, cell, norm = fnn.LSTM(5, 6), fnn.GRUCell(6, 4), fnn.LayerNorm(6)
    attention = fnn.MultiheadAttention(6, 2, batch_first=True)
    x = torch.randn(3, 2, 5)

    def model():
        y = norm(lstm(x)[0])
        return cell(y[0]), attention(y, y, y, need_weights=False)[0]

    want = model()  # parameters require grad: through the Functions
    # (layer norm and the cells on the cpu backend have their autograd formulas in C++, fastseq._C.layer_norm and
    # fastseq._C.cell, which skip it alike)
    functions = [fastseq.ops.rnn_layer._RNNLayerFunction, fastseq.ops.attention._SDPAFunction]
    applied = []
    for function in functions:
        def counted(cls, *args, apply=function.apply):
            applied.append(cls)
            return apply(*args)
        monkeypatch.setattr(function, "apply", classmethod(counted))
    with torch.no_grad():
        got = model()
    for module in (lstm, cell, norm, attention):
        module.requires_grad_(False)
    got_no_leaves = model()
    assert applied == []
    for g, h, w in zip(got, got_no_leaves, want, strict=True):
        assert_close(g, w.detach(), 0.0, 0.0, "under no_grad")
        assert_close(h, w.detach(), 0.0, 0.0, "no tensor requires grad")
    x.requires_grad_(True)
    model()
    assert set(applied) == set(functions)
    assert "LayerNormFunction" in norm(torch.randn(2, 6, requires_grad=True)).grad_fn.name()
    assert "CellFunction" in cell(torch.randn(2, 6, requires_grad=True)).grad_fn.name()


# ------------------------------------------------------------------------------------------- DDP and FSDP (gloo)
class Small(torch.nn.Module):
    """LSTM, LayerNorm and a GRU cell stepped over the sequence, in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = fnn.LSTM(3, 5, batch_first=True, dtype=f64)
        self.norm = fnn.LayerNorm(5, dtype=f64)
        self.cell = fnn.GRUCell(5, 4, dtype=f64)
        self.head = torch.nn.Linear(4, 1, dtype=f64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.lstm(x)[0])
        h = None
        for t in range(y.shape[1]):
            h = self.cell(y[:, t], h)
        return self.head(h).squeeze(-1)


STEPS, BATCH, WORLD = 3, 4, 2


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _train(model: torch.nn.Module, module: Small, rank: int = 0, world: int = 1):
    """STEPS of SGD on this rank's share of each batch; the first step's gradients and the final weights, whole."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH, 5, 3, generator=gen, dtype=f64), torch.randn(BATCH, generator=gen, dtype=f64))
            for _ in range(STEPS)]
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = None
    for x, y in data:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x[share]), y[share]).backward()
        if grads is None:
            grads = {n: _full(p.grad) for n, p in module.named_parameters()}
        optimizer.step()
    return grads, {n: _full(p) for n, p in module.named_parameters()}


def _distributed_worker(rank: int, port: int, kind: str, out: str) -> None:
    warnings.filterwarnings("ignore", message=".*returned a view tensor")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        module = Small()
        if kind == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(module)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            fully_shard(module.lstm, mesh=mesh)
            model = fully_shard(module, mesh=mesh)
        torch.save(_train(model, module, rank, WORLD), f"{out}/{rank}.pt")
        dist.barrier()  # both ranks done before the teardown (gloo aborted a rank once when one left early)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(fastseq.backends.unavailable_reason("cpu") is not None, reason="needs the C++ CPU backend")
def test_cpu_large_outputs_reuse_freed_blocks():
    """Outputs of at least 4 MiB on the CPU backend come from an allocator that keeps freed blocks for the next
    output of the same size: a second output takes the first one's memory once that is freed, the values are right
    both times, torch's profiler sees the allocation as one of torch's own, and the tensor resizes like any other."""
    torch.manual_seed(0)
    w, b = torch.randn(1024), torch.randn(1024)
    x1, x2 = torch.randn(1024, 1024), torch.randn(1024, 1024)  # outputs of 4 MiB
    with on_backend("cpu"):
        y = fastseq.functional.layer_norm(x1, (1024,), w, b)
        assert_close(y, torch.nn.functional.layer_norm(x1, (1024,), w, b), 1e-5, 1e-5, "first output")
        first = y.data_ptr()
        del y
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            y = fastseq.functional.layer_norm(x2, (1024,), w, b)
    assert y.data_ptr() == first
    assert_close(y, torch.nn.functional.layer_norm(x2, (1024,), w, b), 1e-5, 1e-5, "second output")
    assert max(e.self_cpu_memory_usage for e in prof.events()) >= y.nbytes
    y.resize_(2048, 1024).fill_(2.0)
    assert y.sum().item() == 2.0 * 2048 * 1024


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_distributed_two_processes_match_one(kind, tmp_path):
    """DistributedDataParallel, and FSDP's fully_shard (the LSTM and the whole model sharded), on two CPU
    processes with gloo, each on half of every batch: the gradients of the first step and the weights after
    STEPS steps equal one process's on the whole batch."""
    mp.spawn(_distributed_worker, (_free_port(), kind, str(tmp_path)), nprocs=WORLD)
    torch.manual_seed(0)
    module = Small()
    grads, weights = _train(module, module)
    for rank in range(WORLD):
        got_grads, got_weights = torch.load(tmp_path / f"{rank}.pt")
        for name in weights:
            assert_close(got_grads[name], grads[name], 1e-12, 1e-10, f"rank {rank} gradient of {name}")
            assert_close(got_weights[name], weights[name], 1e-12, 1e-10, f"rank {rank} trained {name}")


# ---------------------------------------------------------------------------------------------- saving, loading
def test_save_load_whole_model_and_state_dict_both_ways():
    """torch.save / torch.load(weights_only=False) of a whole model holding fastseq modules gives the same modules
    and outputs; its state_dict loads into the plain torch model, and the torch model's into it."""
    net, theirs = _net_and_copy()
    fastseq.replace_modules(net)
    x = _input()
    y = net(x)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in net.modules()]
    assert torch.equal(loaded(x), y)

    torch.manual_seed(1)
    plain = Net()  # torch's modules, other weights
    assert plain.state_dict().keys() == net.state_dict().keys()
    plain.load_state_dict(net.state_dict())
    assert_close(plain(x), y, 1e-10, 1e-9, "torch model with fastseq's state_dict")
    torch.manual_seed(2)
    back = Net()
    fastseq.replace_modules(back)
    back.load_state_dict(theirs.state_dict())
    assert_close(back(x), theirs(x), 1e-10, 1e-9, "fastseq model with torch's state_dict")
