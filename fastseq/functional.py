"""Functional API with the signatures of torch.nn.functional (and torch's cell functions), on fastseq's kernels.
Arguments are checked here, with errors that name the argument, the expected and the actual value.

Under torch.autocast every function takes the dtypes autocast gives and returns the dtype that torch's own op
returns in the same place (see _autocast for the rule of each op on the CPU and on CUDA)."""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import backends, modes, ops  # noqa: F401  (ops registers torch.ops.fastseq)
from .errors import DeviceError, DTypeError, ShapeError
from .ops._dispatch import needs_grad


def _check_floating(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise DTypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_like(t: Tensor | None, ref: Tensor, name: str, ref_name: str, shape: Sequence[int] | None = None) -> None:
    """`t` (if given) must be a tensor with ref's dtype and device, and shape `shape` if given."""
    if t is None:
        return
    _check_floating(t, name)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ShapeError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != ref.device:
        raise DeviceError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise DTypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def _fast_checks_pass(check: str, *args) -> bool:
    """Whether fastseq._C's `check` (cell_args_ok, layer_norm_args_ok: the happy path of the Python checks in one
    call, as a cell step or a layer norm of few rows is mostly per-call overhead) accepts the arguments. Where not
    (or without the extension, or while torch.compile traces) the Python checks run and raise the precise error."""
    ext = backends.extension()
    if ext is None or torch.compiler.is_compiling():
        return False
    try:
        return getattr(ext, check)(*args)
    except TypeError:  # an argument of a type the check does not take: the Python checks name it
        return False


# ------------------------------------------------------------------------------------------------------ autocast
def _map_tensors(fn: Callable[[Tensor], Tensor], x):
    """fn applied to x if it is a tensor, to each element if it is a list or tuple; anything else as it is."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, list):
        return [_map_tensors(fn, v) for v in x]
    if isinstance(x, tuple):
        return tuple(_map_tensors(fn, v) for v in x)
    return x


def _autocast(cpu: str, cuda: str) -> Callable[[Callable], Callable]:
    """Makes a public function follow torch.autocast as torch's counterpart does. Outside autocast (for the input's
    device type), for float64 input and on devices other than the CPU and CUDA, the function runs unchanged.
    Inside, with d = torch.get_autocast_dtype(device), the rule for the input's device (`cpu` or `cuda`) picks the
    dtype the function runs in (every floating tensor argument on that device, float64 ones aside, is cast to it)
    and the dtype of the tensors it returns:

    - "lower": runs in and returns d. Autocast's lower-precision list (the cells on CUDA,
      scaled_dot_product_attention on both), what torch composes of matrix products and activations only (Elman
      cells and layers on the CPU) and what it runs on oneDNN (the LSTM layer on the CPU). CUDA's recurrent
      layers: torch runs them on cuDNN through autocast's wrapper of _cudnn_rnn, which casts to float16 whatever d
      is (in the sources read, aten/src/ATen/cudnn/AutocastRNN.cpp); here they run in d.
    - "fp32": runs in and returns float32. Autocast's fp32 list (layer_norm on CUDA).
    - "input": runs in the promoted dtype of the tensors and returns the input's. An op autocast leaves alone whose
      kernel takes float32 parameters with lower-precision input (layer_norm on the CPU).
    - "state": runs in and returns promote_types(d, the state's dtype), the state being hx (an LSTM's cell state
      c), the input when hx is None. What torch composes of matrix products (run in d) and pointwise math on the
      state, whose dtype the result takes (LSTM and GRU cells, the GRU layer on the CPU). With a float32 state the
      op runs in float32: the state keeps torch's precision, the matrix products (d in torch) have more.
    - "packed_state": "state" for packed input (batch_sizes given), else "lower" (the LSTM layer on the CPU, which
      torch runs on oneDNN, except packed input).

    The function runs with autocast off, so that its matrix products stay in the dtype chosen."""
    rules = {"cpu": cpu, "cuda": cuda}

    def decorate(fn: Callable) -> Callable:
        names = list(inspect.signature(fn).parameters)

        def argument(args: tuple, kwargs: dict, name: str):
            i = names.index(name)
            return args[i] if i < len(args) else kwargs.get(name)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not torch._C._is_any_autocast_enabled():  # ~0.1 us, where reading the input's device type is ~0.3
                return fn(*args, **kwargs)
            input = args[0] if args else kwargs.get(names[0])
            device = input.device.type if isinstance(input, Tensor) else None
            if (device not in rules or not torch.is_autocast_enabled(device) or not input.is_floating_point()
                    or input.dtype == torch.float64):
                return fn(*args, **kwargs)

            def eligible(t: Tensor) -> bool:
                return t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device

            lower, rule = torch.get_autocast_dtype(device), rules[device]
            if rule == "packed_state":
                rule = "lower" if argument(args, kwargs, "batch_sizes") is None else "state"
            if rule == "lower":
                dtype = out_dtype = lower
            elif rule == "fp32":
                dtype = out_dtype = torch.float32
            elif rule == "input":
                dtype = out_dtype = input.dtype
                for t in (*args, *kwargs.values()):
                    if isinstance(t, Tensor) and eligible(t):
                        dtype = torch.promote_types(dtype, t.dtype)
            else:  # "state"
                hx = argument(args, kwargs, "hx")
                state = hx[-1] if isinstance(hx, (list, tuple)) and hx else hx
                dtype = out_dtype = torch.promote_types(lower, state.dtype if isinstance(state, Tensor) else
                                                        input.dtype)

            def cast(t: Tensor) -> Tensor:
                if not eligible(t) or t.dtype == dtype:
                    return t
                # eager: through torch's autocast cache, so that a weight is cast once per autocast region, not
                # once per call (a cell stepped over a sequence)
                ext = None if torch.compiler.is_compiling() else backends.extension()
                return t.to(dtype) if ext is None else ext.autocast_cast(t, dtype)

            args, kwargs = _map_tensors(cast, args), {k: _map_tensors(cast, v) for k, v in kwargs.items()}
            with torch.autocast(device, enabled=False):
                out = fn(*args, **kwargs)
            return _map_tensors(lambda t: t.to(out_dtype), out)

        return run

    return decorate


@_autocast(cpu="input", cuda="fp32")
def layer_norm(input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias over the last len(normalized_shape) dims
    (biased variance), as torch.nn.functional.layer_norm."""
    shape = [normalized_shape] if type(normalized_shape) is int else normalized_shape
    if type(shape) not in (list, tuple):  # the common forms are taken as they are
        shape = [normalized_shape] if isinstance(normalized_shape, numbers.Integral) else list(normalized_shape)
    y = ops.layer_norm.eager_cxx(input, shape, weight, bias, eps)  # one C++ call where it can run
    if y is not None:
        return y
    shape = list(shape)
    if _fast_checks_pass("layer_norm_args_ok", input, shape, weight, bias):
        return ops.layer_norm.apply(input, shape, weight, bias, float(eps))
    _check_floating(input, "input")
    if not shape or any(not isinstance(s, numbers.Integral) or s < 0 for s in shape):
        raise ShapeError(f"normalized_shape must be a non-empty sequence of ints >= 0, got {normalized_shape}")
    if list(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ShapeError(f"Given normalized_shape={shape}, expected input with shape [*, "
                         f"{', '.join(map(str, shape))}], but got input of size {list(input.shape)}")
    # torch's mixed-dtype rule: float32 weight and bias with bfloat16 / float16 input (output in input's dtype)
    mixed = input.dtype in (torch.bfloat16, torch.float16)
    for name, p in (("weight", weight), ("bias", bias)):
        _check_like(p, input if not (mixed and p is not None and p.dtype == torch.float32) else p, name, "input",
                    shape)
    if math.prod(shape) == 0:  # nothing to normalize: an empty output, as torch gives
        y = input.clone()
        y = y if weight is None else y * weight.to(input.dtype)
        return y if bias is None else y + bias.to(input.dtype)
    return ops.layer_norm.apply(input, [int(s) for s in shape], weight, bias, float(eps))


# ---------------------------------------------------------------------------------------------------- cell steps
def _cell_weights(input: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                  gates: int) -> int:
    """Checks input (1-D or 2-D) and the cell parameters (w_ih (G*H, C), w_hh (G*H, H), b_ih, b_hh (G*H,));
    returns the hidden size H."""
    _check_floating(input, "input")
    if input.dim() not in (1, 2):
        raise ShapeError(f"input must be 1-D (input_size,) or 2-D (batch, input_size), got shape {list(input.shape)}")
    _check_floating(w_hh, "w_hh")
    if w_hh.dim() != 2 or w_hh.shape[0] != gates * w_hh.shape[1]:
        raise ShapeError(f"w_hh must have shape [{gates}*hidden_size, hidden_size], got {list(w_hh.shape)}")
    hidden = w_hh.shape[1]
    _check_floating(w_ih, "w_ih")
    if w_ih.dim() != 2 or w_ih.shape[0] != gates * hidden:
        raise ShapeError(f"w_ih must have shape [{gates * hidden}, input_size] ({gates}*hidden_size rows, "
                         f"hidden_size {hidden} from w_hh), got {list(w_ih.shape)}")
    if input.shape[-1] != w_ih.shape[1]:
        raise ShapeError(f"input has inconsistent input_size: got {input.shape[-1]}, expected {w_ih.shape[1]} "
                         f"(w_ih has shape {list(w_ih.shape)})")
    _check_like(w_ih, input, "w_ih", "input")
    _check_like(w_hh, input, "w_hh", "input")
    _check_like(b_ih, input, "b_ih", "input", (gates * hidden,))
    _check_like(b_hh, input, "b_hh", "input", (gates * hidden,))
    return hidden


def _cell_state(t: Tensor, name: str, input: Tensor, hidden: int) -> None:
    """A state tensor must be (batch, hidden_size) for 2-D input, (hidden_size,) for 1-D input."""
    _check_floating(t, name)
    shape = [*input.shape[:-1], hidden]
    if list(t.shape) != shape:
        kind = "(batch, hidden_size)" if input.dim() == 2 else "(hidden_size,) for 1-D input"
        raise ShapeError(f"{name} must have shape {shape} {kind}, got {list(t.shape)}")
    _check_like(t, input, name, "input")


def _lstm_state(hx: Sequence[Tensor], input: Tensor, hidden: int, fn: str) -> tuple[Tensor, Tensor]:
    if isinstance(hx, Tensor) or not isinstance(hx, Sequence) or len(hx) != 2:
        if isinstance(hx, Tensor):
            got = "a Tensor"
        else:
            got = f"{type(hx).__name__} of length {len(hx)}" if isinstance(hx, Sequence) else type(hx).__name__
        raise TypeError(f"{fn}: hx must be a tuple (h, c) of two tensors, got {got}")
    _cell_state(hx[0], "hx[0]", input, hidden)
    _cell_state(hx[1], "hx[1]", input, hidden)
    return hx[0], hx[1]


def _single_state(hx: Tensor, input: Tensor, hidden: int, fn: str) -> Tensor:
    if not isinstance(hx, Tensor):
        raise TypeError(f"{fn}: hx must be a Tensor (batch, hidden_size), got {type(hx).__name__}")
    _cell_state(hx, "hx", input, hidden)
    return hx


def _batched(*ts: Tensor) -> list[Tensor]:
    return [t.unsqueeze(0) for t in ts]


def _lstm(input, hx, w_ih, w_hh, b_ih, b_hh, w_peephole, fn):
    if type(hx) in (tuple, list) and len(hx) == 2 and _fast_checks_pass("cell_args_ok", input, hx, w_ih, w_hh,
                                                                         b_ih, b_hh, w_peephole, 4):
        h, c = hx
    else:
        hidden = _cell_weights(input, w_ih, w_hh, b_ih, b_hh, 4)
        h, c = _lstm_state(hx, input, hidden, fn)
        _check_like(w_peephole, input, "w_peephole", "input", (3, hidden))
    x = input
    if input.dim() == 1:
        x, h, c = _batched(x, h, c)
    hy, cy = ops.rnn_cell.lstm_cell_apply(x, h, c, w_ih, w_hh, b_ih, b_hh, w_peephole)
    return (hy, cy) if input.dim() == 2 else (hy.squeeze(0), cy.squeeze(0))


@_autocast(cpu="state", cuda="lower")
def lstm_cell(input: Tensor, hx: Sequence[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One LSTM step, as torch's lstm_cell: gates = input W_ih^T + b_ih + h W_hh^T + b_hh in the order i, f, g, o;
    i, f, o = sigmoid, g = tanh; c' = f*c + i*g; h' = o*tanh(c'). hx = (h, c); input (N, C) with h, c (N, H), or
    unbatched input (C,) with h, c (H,). Returns (h', c')."""
    return _lstm(input, hx, w_ih, w_hh, b_ih, b_hh, None, "lstm_cell")


@_autocast(cpu="state", cuda="lower")
def peephole_lstm_cell(input: Tensor, hx: Sequence[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                       b_hh: Tensor | None, w_peephole: Tensor) -> tuple[Tensor, Tensor]:
    """One peephole LSTM step (Gers, Schraudolph & Schmidhuber 2002): lstm_cell with w_peephole (3, H) =
    [p_i; p_f; p_o] and i = sigmoid(.. + p_i*c), f = sigmoid(.. + p_f*c), o = sigmoid(.. + p_o*c')."""
    if w_peephole is None:
        raise TypeError("peephole_lstm_cell: w_peephole must be a Tensor (3, hidden_size), got None")
    return _lstm(input, hx, w_ih, w_hh, b_ih, b_hh, w_peephole, "peephole_lstm_cell")


@_autocast(cpu="state", cuda="lower")
def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
             b_hh: Tensor | None = None) -> Tensor:
    """One GRU step, as torch's gru_cell: r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z likewise,
    n = tanh(W_in x + b_in + r*(W_hn h + b_hn)), h' = (1-z)*n + z*h (gate order r, z, n). input (N, C) with
    hx (N, H), or (C,) with (H,)."""
    h = hx
    if not _fast_checks_pass("cell_args_ok", input, [hx], w_ih, w_hh, b_ih, b_hh, None, 3):
        _single_state(hx, input, _cell_weights(input, w_ih, w_hh, b_ih, b_hh, 3), "gru_cell")
    if input.dim() == 1:
        return ops.rnn_cell.gru_cell_apply(*_batched(input, h), w_ih, w_hh, b_ih, b_hh).squeeze(0)
    return ops.rnn_cell.gru_cell_apply(input, h, w_ih, w_hh, b_ih, b_hh)


def _rnn(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    fn = f"rnn_{nonlinearity}_cell"
    h = hx
    if not _fast_checks_pass("cell_args_ok", input, [hx], w_ih, w_hh, b_ih, b_hh, None, 1):
        _single_state(hx, input, _cell_weights(input, w_ih, w_hh, b_ih, b_hh, 1), fn)
    if input.dim() == 1:
        return ops.rnn_cell.rnn_cell_apply(*_batched(input, h), w_ih, w_hh, b_ih, b_hh, nonlinearity).squeeze(0)
    return ops.rnn_cell.rnn_cell_apply(input, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)


@_autocast(cpu="lower", cuda="lower")
def rnn_tanh_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
                  b_hh: Tensor | None = None) -> Tensor:
    """One Elman RNN step, as torch's rnn_tanh_cell: h' = tanh(input W_ih^T + b_ih + h W_hh^T + b_hh)."""
    return _rnn(input, hx, w_ih, w_hh, b_ih, b_hh, "tanh")


@_autocast(cpu="lower", cuda="lower")
def rnn_relu_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
                  b_hh: Tensor | None = None) -> Tensor:
    """One Elman RNN step, as torch's rnn_relu_cell: h' = relu(input W_ih^T + b_ih + h W_hh^T + b_hh)."""
    return _rnn(input, hx, w_ih, w_hh, b_ih, b_hh, "relu")


# ------------------------------------------------------------------------------------------------------ attention
def _sdpa_mask(attn_mask: Tensor, query: Tensor, target: tuple[int, ...]) -> Tensor:
    """The mask as an additive float tensor broadcastable to `target` = (*batch, Hq, L, S), made 4-D with the batch
    dims flattened: (B or 1, Hq or 1, L or 1, S or 1) (a bool mask is converted at its own size; nothing is
    broadcast over L x S here)."""
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=attn_mask.device).masked_fill_(
            ~attn_mask, float("-inf"))
    elif attn_mask.dtype not in (torch.float32, query.dtype):
        raise DTypeError(f"attn_mask must be bool, float32 or query's dtype {query.dtype}, got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise DeviceError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    try:
        ok = attn_mask.dim() <= len(target) and torch.broadcast_shapes(attn_mask.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ShapeError(f"attn_mask of shape {list(attn_mask.shape)} is not broadcastable to the attention "
                         f"weights' shape {list(target)} (batch..., heads, L, S)")
    m = attn_mask.view(*[1] * (len(target) - attn_mask.dim()), *attn_mask.shape)
    if all(d == 1 for d in m.shape[:-3]):
        return m.view(1, *m.shape[-3:])
    return m.expand(*target[:-3], *m.shape[-3:]).reshape(math.prod(target[:-3]), *m.shape[-3:])


@_autocast(cpu="lower", cuda="lower")
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """softmax(query key^T * scale + attn_mask) value, as torch.nn.functional.scaled_dot_product_attention:
    query (..., L, E), key (..., S, E), value (..., S, Ev), heads at dim -3, leading dims broadcast; attn_mask bool
    (True = take part) or additive float, broadcastable to (..., L, S); is_causal = the top-left triangle (not with
    attn_mask); scale defaults to 1/sqrt(E); dropout_p on the probabilities (seed drawn from torch's default
    generator); enable_gqa: Hq a multiple of key/value's heads. Rows with no visible key give 0."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_floating(t, name)
        if t.dim() < 2:
            raise ShapeError(f"{name} must have at least 2 dims (..., len, dim), got shape {list(t.shape)}")
    _check_like(key, query, "key", "query")
    _check_like(value, query, "value", "query")
    if key.shape[-1] != query.shape[-1]:
        raise ShapeError(f"key's last dim (embedding) must equal query's {query.shape[-1]}, got key of shape "
                         f"{list(key.shape)} for query of shape {list(query.shape)}")
    if value.shape[-2] != key.shape[-2]:
        raise ShapeError(f"value's length (dim -2) must equal key's {key.shape[-2]}, got value of shape "
                         f"{list(value.shape)} for key of shape {list(key.shape)}")
    nd = max(query.dim(), key.dim(), value.dim(), 4)
    q, k, v = (t.view(*[1] * (nd - t.dim()), *t.shape) for t in (query, key, value))
    try:
        batch = tuple(torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3]))
    except RuntimeError:
        raise ShapeError(f"the batch dims of query {list(query.shape)}, key {list(key.shape)} and value "
                         f"{list(value.shape)} (all but the last 3) do not broadcast") from None
    hq, hk = q.shape[-3], k.shape[-3]
    if v.shape[-3] != hk:
        raise ShapeError(f"value must have key's number of heads (dim -3) {hk}, got value of shape "
                         f"{list(value.shape)}")
    if hq != hk and not ((enable_gqa or hk == 1) and hq % hk == 0):
        if enable_gqa:
            raise ShapeError(f"with enable_gqa, key/value's number of heads (dim -3) {hk} must divide query's "
                             f"{hq}, got query {list(query.shape)}, key {list(key.shape)}")
        raise ShapeError(f"key must have query's number of heads (dim -3) {hq} (or set enable_gqa=True for "
                         f"grouped-query attention), got query {list(query.shape)}, key {list(key.shape)}")
    if attn_mask is not None and is_causal:
        raise RuntimeError("scaled_dot_product_attention: attn_mask and is_causal=True cannot both be given "
                           "(as torch: explicit attn_mask should not be set when is_causal=True)")
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout_p must be in [0, 1], got {dropout_p}")
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    q4, k4, v4 = (t.expand(*batch, *t.shape[-3:]).reshape(math.prod(batch), *t.shape[-3:]) for t in (q, k, v))
    # the kernels read rows of unit stride (any other strides they take as they are)
    q4, k4, v4 = (t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in (q4, k4, v4))
    mask = None if attn_mask is None else _sdpa_mask(attn_mask, query, (*batch, hq, L, S))
    rng = torch.randint(0, 2**62, (2,), dtype=torch.int64) if dropout_p > 0.0 else None
    scale = float(E ** -0.5 if scale is None else scale) if E > 0 or scale is not None else 1.0
    out = ops.attention.apply(q4, k4, v4, mask, bool(is_causal), scale, float(dropout_p), rng)
    return out.view(*batch, hq, L, Ev)[(0,) * (nd - max(query.dim(), key.dim(), value.dim()))]


# ----------------------------------------------------------------------------------------------- sequence layers
def _layer_params(mode: str, input: Tensor, params: Sequence[Tensor], has_biases: bool, num_layers: int,
                  bidirectional: bool) -> list[tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None,
                                                     Tensor | None]]:
    """Checks the flat parameter list (torch's order: per layer, per direction w_ih, w_hh, [b_ih, b_hh], [w_hr],
    then [w_peephole] for peephole_lstm) and returns (w_ih, w_hh, b_ih, b_hh, w_hr, peephole) per layer
    direction."""
    m = modes.mode(mode)
    gates, dirs = m.gates, 2 if bidirectional else 1
    if not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    per = 2 + 2 * bool(has_biases) + m.peephole
    count = len(params)
    proj = m.projection and count == num_layers * dirs * (per + 1)
    if count != num_layers * dirs * (per + proj):
        raise ShapeError(f"params must hold {num_layers * dirs * per} tensors ({num_layers} layers x {dirs} "
                         f"directions x [w_ih, w_hh{', b_ih, b_hh' if has_biases else ''}"
                         f"{', w_peephole' if m.peephole else ''}]"
                         f"{', + w_hr each for an LSTM with projections' if m.projection else ''}), got {count}")
    per += proj
    dtype, device = input.dtype, input.device
    # one pass over the common case (every parameter a tensor of input's dtype and device), else each is named
    alike = all(isinstance(t, Tensor) and t.dtype == dtype and t.device == device for t in params)
    out = []
    hidden = hout = None
    for i in range(num_layers * dirs):
        layer = i // dirs
        w = params[i * per:(i + 1) * per]
        if not alike:
            for j, t in enumerate(w):
                _check_like(t, input, f"params[{i * per + j}] (of {_layer_name(i, dirs)})", "input")
        w_ih, w_hh = w[0], w[1]
        b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
        w_hr = w[2 + 2 * bool(has_biases)] if proj else None
        peephole = w[-1] if m.peephole else None
        if hidden is None:
            if w_hh.dim() != 2 or w_hh.shape[0] % gates:
                raise ShapeError(f"weight_hh_{_layer_name(i, dirs)} must have shape [{gates}*hidden_size, "
                                 f"hidden_size], got {list(w_hh.shape)}")
            hidden = w_hh.shape[0] // gates
            hout = w_hr.shape[0] if proj else hidden
        in_size = input.shape[-1] if layer == 0 else dirs * hout
        if layer == 0 and (w_ih.dim() != 2 or w_ih.shape[1] != in_size):
            raise ShapeError(f"input.size(-1) must be equal to input_size. Expected "
                             f"{w_ih.shape[1] if w_ih.dim() == 2 else '?'}, got {in_size}")
        gh = gates * hidden
        if (w_ih.shape != (gh, in_size) or w_hh.shape != (gh, hout) or (b_ih is not None and b_ih.shape != (gh,))
                or (b_hh is not None and b_hh.shape != (gh,)) or (w_hr is not None and w_hr.shape != (hout, hidden))
                or (peephole is not None and peephole.shape != (3, hidden))):
            for t, pname, shape in ((w_ih, "weight_ih", (gh, in_size)), (w_hh, "weight_hh", (gh, hout)),
                                    (b_ih, "bias_ih", (gh,)), (b_hh, "bias_hh", (gh,)),
                                    (w_hr, "weight_hr", (hout, hidden)), (peephole, "weight_peephole", (3, hidden))):
                if t is not None and tuple(t.shape) != shape:
                    raise ShapeError(f"{pname}_{_layer_name(i, dirs)} must have shape {list(shape)}, got "
                                     f"{list(t.shape)}")
        out.append((w_ih, w_hh, b_ih, b_hh, w_hr, peephole))
    return out


def _layer_name(i: int, dirs: int) -> str:
    """The suffix of torch's parameter names of layer direction i: l{layer}[_reverse]."""
    layer, suffix = divmod(i, dirs)
    return f"l{layer}{'_reverse' if suffix else ''}"


def _check_state(t: Tensor, name: str, input: Tensor, shape: tuple[int, ...]) -> None:
    _check_floating(t, name)
    if tuple(t.shape) != shape:
        raise ShapeError(f"Expected {name} of size {shape} (num_layers * num_directions, batch, size), "
                         f"got {list(t.shape)}")
    _check_like(t, input, name, "input")


# Without grad a layer direction runs in chunks of steps whose gate buffers stay under this many bytes, the state
# carried from chunk to chunk: what the op keeps for a backward (the gates and states of every step) then stays
# bounded instead of growing with the sequence.
_CHUNK_BYTES = 32 * 2**20


def _direction(mode: str, x: Tensor, h0: Tensor, c0: Tensor | None, weights: tuple, reverse: bool,
               batch_sizes: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer direction: y, h_n, c_n of fastseq::rnn_layer over x (T, N, C) or packed data with batch_sizes.
    On oneDNN's LSTM primitive where ops.rnn_layer.onednn_rejects finds no reason against it; else, when nothing
    needs grad, in chunks of steps (ops.rnn_layer.apply per chunk, the state carried over)."""
    if ops.rnn_layer.onednn_rejects(mode, x, h0, c0, *weights, batch_sizes) is None:
        return ops.rnn_layer.onednn_forward(x, h0, c0, *weights[:4], reverse)
    if needs_grad(x, h0, c0, *weights) or torch.compiler.is_compiling():
        return ops.rnn_layer.apply(mode, x, h0, c0, *weights, reverse, batch_sizes)
    steps = len(batch_sizes) if batch_sizes is not None else x.shape[0]
    m = modes.mode(mode)
    hidden = weights[1].shape[0] // m.gates
    step_bytes = h0.shape[0] * max(m.saved, 1) * hidden * x.element_size()  # its gates
    chunk = max(1, _CHUNK_BYTES // max(1, step_bytes))
    if chunk >= steps:
        return ops.rnn_layer.apply(mode, x, h0, c0, *weights, reverse, batch_sizes)
    # rows of each time step in x (packed: the offsets of the steps in the data)
    first = [0, *torch.cumsum(batch_sizes, 0).tolist()] if batch_sizes is not None else None
    y = None
    h, c = h0, c0
    starts = list(range(0, steps, chunk))
    for s in reversed(starts) if reverse else starts:
        e = min(s + chunk, steps)
        if batch_sizes is None:
            part, sizes, rows = x[s:e], None, h.shape[0]
        else:
            part, sizes, rows = x[first[s]:first[e]], batch_sizes[s:e], int(batch_sizes[s])
        # rows [0, rows) run in this chunk; in a packed sequence the others ended (forward) or have not started
        # (reverse) and keep their state
        y_part, h_part, c_part = ops.rnn_layer.apply(mode, part, h[:rows], None if c is None else c[:rows],
                                                     *weights, reverse, sizes)
        if y is None:
            y = y_part.new_empty((x.shape[0], *y_part.shape[1:]))
        if batch_sizes is None:
            y[s:e] = y_part
        else:
            y[first[s]:first[e]] = y_part
        h = h_part if rows == h.shape[0] else torch.cat([h_part, h[rows:]])
        if c is not None:
            c = c_part if rows == c.shape[0] else torch.cat([c_part, c[rows:]])
    return y, h, c


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _concurrently(runs: list[Callable[[], tuple]], device: torch.device, side_inputs: list[Tensor | None]
                  ) -> list[tuple]:
    """The results of `runs` (the directions of a layer). On a CUDA device, in eager mode, the last run goes on a
    side stream, so that its kernels (and, as autograd runs each backward on its forward's stream, its backward's)
    overlap those of the first on the current stream: the side stream first waits for the work queued so far, the
    current stream waits for the side stream's after; record_stream keeps the caching allocator from reusing the
    memory of `side_inputs` (the last run's tensor arguments) or of the last run's results while the other stream
    may still use it. Elsewhere one after the other."""
    if len(runs) == 1 or device.type != "cuda" or torch.compiler.is_compiling() \
            or torch.cuda.is_current_stream_capturing():
        return [run() for run in runs]
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(main.device_index)
    if side is None:
        side = _SIDE_STREAMS[main.device_index] = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        last = runs[-1]()
    results = [run() for run in runs[:-1]]
    main.wait_stream(side)
    for t in side_inputs:
        if t is not None:
            t.record_stream(side)
    for t in last:
        if t is not None:
            t.record_stream(main)
    return [*results, last]


def _sequence(mode: str, input: Tensor, hx, params: Sequence[Tensor], has_biases: bool, num_layers: int,
              dropout: float, train: bool, bidirectional: bool, batch_first: bool, batch_sizes: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The multi-layer recurrence: checks, then per layer and direction one fastseq::rnn_layer call (the time loop
    runs in the backend; on CUDA the two directions on two streams), directions concatenated along the features,
    dropout between layers in training."""
    _check_floating(input, "input")
    if batch_sizes is not None:
        if not isinstance(batch_sizes, Tensor) or batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64 \
                or batch_sizes.device.type != "cpu":
            got = (f"{batch_sizes.dtype} tensor of shape {list(batch_sizes.shape)} on {batch_sizes.device}"
                   if isinstance(batch_sizes, Tensor) else type(batch_sizes).__name__)
            raise TypeError(f"batch_sizes must be a 1-D int64 CPU tensor (PackedSequence.batch_sizes), got {got}")
        if input.dim() != 2:
            raise ShapeError(f"packed input must have 2 dimensions (sum(batch_sizes), input_size), got shape "
                             f"{list(input.shape)}")
        if len(batch_sizes) > 1 and batch_sizes[-1] == 0:  # trailing steps of no rows (torch accepts them): none
            batch_sizes = batch_sizes[: int(torch.count_nonzero(batch_sizes))]
    elif input.dim() != 3:
        raise ShapeError(f"input must have 3 dimensions ({'batch, seq' if batch_first else 'seq, batch'}, "
                         f"input_size), got shape {list(input.shape)}")
    if not 0 <= dropout <= 1:
        raise ValueError(f"dropout must be a number in [0, 1], got {dropout}")
    layers = _layer_params(mode, input, params, has_biases, num_layers, bidirectional)
    dirs = 2 if bidirectional else 1
    x = input if batch_sizes is not None or not batch_first else input.transpose(0, 1)
    if x.shape[0] == 0:
        raise ShapeError(f"Expected sequence length to be larger than 0, got input of shape {list(input.shape)}")
    n = int(batch_sizes[0]) if batch_sizes is not None else x.shape[1]
    w_hh, w_hr = layers[0][1], layers[0][4]
    hidden = w_hh.shape[0] // modes.mode(mode).gates
    hout = hidden if w_hr is None else w_hr.shape[0]
    lstm = modes.mode(mode).cell
    if hx is None:
        h0 = x.new_zeros(num_layers * dirs, n, hout)
        c0 = x.new_zeros(num_layers * dirs, n, hidden) if lstm else None
    elif lstm:
        if isinstance(hx, Tensor) or not isinstance(hx, Sequence) or len(hx) != 2:
            raise TypeError(f"lstm: hx must be a tuple (h0, c0) of two tensors, got {type(hx).__name__}")
        h0, c0 = hx
        _check_state(h0, "hx[0]", input, (num_layers * dirs, n, hout))
        _check_state(c0, "hx[1]", input, (num_layers * dirs, n, hidden))
    else:
        if not isinstance(hx, Tensor):
            raise TypeError(f"{mode}: hx must be a Tensor, got {type(hx).__name__}")
        h0, c0 = hx, None
        _check_state(h0, "hx", input, (num_layers * dirs, n, hout))
    x = x.contiguous()
    hs, cs = [], []
    for layer in range(num_layers):
        if dirs == 1:
            y, h_n, c_n = _direction(mode, x, h0[layer], None if c0 is None else c0[layer], layers[layer], False,
                                     batch_sizes)
            hs.append(h_n)
            cs.append(c_n)
            x = y
        else:
            runs = [functools.partial(_direction, mode, x, h0[i], None if c0 is None else c0[i], layers[i],
                                      i % dirs == 1, batch_sizes)
                    for i in range(layer * dirs, (layer + 1) * dirs)]
            ys = []
            for y, h_n, c_n in _concurrently(runs, x.device, [x, h0, c0, *layers[layer * dirs + dirs - 1]]):
                ys.append(y)
                hs.append(h_n)
                cs.append(c_n)
            x = torch.cat(ys, -1)
        if dropout > 0 and train and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, True)
    output = x.transpose(0, 1) if batch_sizes is None and batch_first else x
    return output, torch.stack(hs), torch.stack(cs) if lstm else None


@_autocast(cpu="packed_state", cuda="lower")
def lstm(input: Tensor, hx: Sequence[Tensor] | None, params: Sequence[Tensor], has_biases: bool = True,
         num_layers: int = 1, dropout: float = 0.0, train: bool = False, bidirectional: bool = False,
         batch_first: bool = False, batch_sizes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A multi-layer LSTM over a sequence, as torch._VF.lstm (what torch.nn.LSTM runs): per step
    gates = x W_ih^T + b_ih + h W_hh^T + b_hh (i, f, g, o), c' = f*c + i*g, h' = o*tanh(c') (times W_hr^T with
    projections). input (T, N, C) ((N, T, C) with batch_first), or packed data (sum(batch_sizes), C) with
    `batch_sizes` (PackedSequence's, sorted order); hx = (h0 (L*D, N, Hout), c0 (L*D, N, H)) or None (zeros);
    params in torch's _flat_weights order (per layer and direction w_ih, w_hh, [b_ih, b_hh], [w_hr]); dropout on the
    outputs of every layer but the last when `train`. Returns output (T, N, D*Hout) (or packed data), h_n, c_n."""
    return _sequence("lstm", input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                     batch_sizes)


@_autocast(cpu="packed_state", cuda="lower")
def peephole_lstm(input: Tensor, hx: Sequence[Tensor] | None, params: Sequence[Tensor], has_biases: bool = True,
                  num_layers: int = 1, dropout: float = 0.0, train: bool = False, bidirectional: bool = False,
                  batch_first: bool = False, batch_sizes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A multi-layer peephole LSTM over a sequence: as lstm, with the gates seeing the cell state through the
    peephole weights p = [p_i; p_f; p_o] (3, H) of each layer direction: i = sigmoid(.. + p_i*c),
    f = sigmoid(.. + p_f*c), o = sigmoid(.. + p_o*c'). params as lstm's with w_peephole last per layer direction
    (after w_hr). Returns output, h_n, c_n."""
    return _sequence("peephole_lstm", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                     batch_first, batch_sizes)


@_autocast(cpu="state", cuda="lower")
def gru(input: Tensor, hx: Tensor | None, params: Sequence[Tensor], has_biases: bool = True, num_layers: int = 1,
        dropout: float = 0.0, train: bool = False, bidirectional: bool = False, batch_first: bool = False,
        batch_sizes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A multi-layer GRU over a sequence, as torch._VF.gru: per step r, z = sigmoid(..),
    n = tanh(W_in x + b_in + r*(W_hn h + b_hn)), h' = (1-z)*n + z*h. Arguments as lstm, hx = h0 (L*D, N, H).
    Returns output, h_n."""
    output, h_n, _ = _sequence("gru", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                               batch_first, batch_sizes)
    return output, h_n


@_autocast(cpu="lower", cuda="lower")
def rnn_tanh(input: Tensor, hx: Tensor | None, params: Sequence[Tensor], has_biases: bool = True,
             num_layers: int = 1, dropout: float = 0.0, train: bool = False, bidirectional: bool = False,
             batch_first: bool = False, batch_sizes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A multi-layer Elman RNN, as torch._VF.rnn_tanh: h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh). Arguments as
    gru. Returns output, h_n."""
    output, h_n, _ = _sequence("rnn_tanh", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                               batch_first, batch_sizes)
    return output, h_n


@_autocast(cpu="lower", cuda="lower")
def rnn_relu(input: Tensor, hx: Tensor | None, params: Sequence[Tensor], has_biases: bool = True,
             num_layers: int = 1, dropout: float = 0.0, train: bool = False, bidirectional: bool = False,
             batch_first: bool = False, batch_sizes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A multi-layer Elman RNN with relu, as torch._VF.rnn_relu: h' = relu(x W_ih^T + b_ih + h W_hh^T + b_hh).
    Arguments as gru. Returns output, h_n."""
    output, h_n, _ = _sequence("rnn_relu", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                               batch_first, batch_sizes)
    return output, h_n
