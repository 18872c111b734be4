"""fastseq::layer_norm and fastseq::layer_norm_backward."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends, reference
from ._dispatch import backward_op, call, differentiable_grads, eager_function

DTYPES = {
    "cpu": frozenset({torch.float32, torch.float64, torch.bfloat16}),
    "cuda": frozenset({torch.float32, torch.float16, torch.bfloat16}),
    "triton": frozenset({torch.float32, torch.float16, torch.bfloat16}),
}


def _flat(x: Tensor, normalized_shape: list[int]) -> tuple[Tensor, int]:
    n = normalized_shape[0] if len(normalized_shape) == 1 else math.prod(normalized_shape)
    x2 = x if x.dim() == 2 and x.shape[1] == n else x.reshape(-1, n)
    return x2.contiguous(), n


def _flat_param(p: Tensor | None, n: int, dtype: torch.dtype) -> Tensor | None:
    """p as (n,) contiguous in the kernels' dtype (x's; a float32 weight of bfloat16 / float16 x is cast)."""
    return None if p is None else (p if p.dim() == 1 else p.reshape(n)).to(dtype).contiguous()


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _select(x: Tensor) -> str:
    return backends.select("layer_norm", x.device, x.dtype, DTYPES)


def _forward(x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float
             ) -> tuple[Tensor, Tensor, Tensor]:
    """y, mean, rstd: layer norm over the trailing dims `normalized_shape`; mean and rstd have one entry per row."""
    name = _select(x)
    if name in ("cpu", "cuda"):  # flattening, casts and the kernel in one call
        return backends.extension().layer_norm_forward(x, math.prod(normalized_shape), weight, bias, eps)
    x2, n = _flat(x, normalized_shape)
    w, b = _flat_param(weight, n, x.dtype), _flat_param(bias, n, x.dtype)
    if name == "triton":
        from ..kernels import layer_norm as tk

        y, mean, rstd = tk.layer_norm_fwd(x2, w, b, eps)
    else:
        y, mean, rstd = reference.layer_norm_forward(x2, w, b, eps)
    return y.resize_(x.shape), mean, rstd  # in place: a view of y would refuse in-place use of the output


layer_norm = torch.library.custom_op("fastseq::layer_norm", _forward, mutates_args=())


@layer_norm.register_fake
def _(x, normalized_shape, weight, bias, eps):
    m = math.prod(x.shape[: x.dim() - len(normalized_shape)])
    return x.new_empty(x.shape), x.new_empty(m, dtype=_stat_dtype(x)), x.new_empty(m, dtype=_stat_dtype(x))


def _backward_impl(dy: Tensor, x: Tensor, normalized_shape: list[int], weight: Tensor | None, mean: Tensor,
                   rstd: Tensor, need_dweight: bool, need_dbias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dweight, dbias (dweight/dbias shaped like normalized_shape; empty where not needed) on `backend` (the
    forward's)."""
    x2, n = _flat(x, normalized_shape)
    dy2 = dy.reshape(-1, n).contiguous()
    w = _flat_param(weight, n, x.dtype)
    name = backend
    if name in ("cpu", "cuda"):
        dx, dw, db = backends.extension().layer_norm_bwd(dy2, x2, w, mean, rstd, need_dweight, need_dbias)
    elif name == "triton":
        from ..kernels import layer_norm as tk

        dx, dw, db = tk.layer_norm_bwd(dy2, x2, w, mean, rstd, need_dweight, need_dbias)
    else:
        dx, dw, db = reference.layer_norm_backward(dy2, x2, w, mean, rstd)
    # in the parameters' dtype (float32 for float32 parameters of bfloat16 / float16 x), bias's as weight's
    pdtype = x.dtype if weight is None else weight.dtype
    dw = dw.reshape(normalized_shape).to(pdtype) if need_dweight else x.new_empty(0)
    db = db.reshape(normalized_shape).to(pdtype) if need_dbias else x.new_empty(0)
    return dx.reshape(x.shape), dw, db


layer_norm_backward = torch.library.custom_op("fastseq::layer_norm_backward", _backward_impl, mutates_args=())


@layer_norm_backward.register_fake
def _(dy, x, normalized_shape, weight, mean, rstd, need_dweight, need_dbias, backend):
    p = x if weight is None else weight
    dw = p.new_empty(normalized_shape) if need_dweight else x.new_empty(0)
    db = p.new_empty(normalized_shape) if need_dbias else x.new_empty(0)
    return x.new_empty(x.shape), dw, db


def _setup_context(ctx, inputs, output):
    x, normalized_shape, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.normalized_shape, ctx.eps = normalized_shape, eps
    ctx.has_bias = bias is not None
    ctx.backend = _select(x)  # recorded here, where the forward ran: the backward runs there too


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that can itself be differentiated
        fn = lambda x, w, b: reference.layer_norm(x, ctx.normalized_shape, w, b, ctx.eps)  # noqa: E731
        n = ctx.needs_input_grad
        dx, dw, db = differentiable_grads(fn, [x, weight, bias], [n[0], n[2], n[3]], [dy])
        return dx, None, dw, db, None
    need_dw = weight is not None and ctx.needs_input_grad[2]
    need_db = ctx.has_bias and ctx.needs_input_grad[3]
    bwd = backward_op(ctx, layer_norm_backward, _backward_impl)
    dx, dw, db = bwd(dy, x, ctx.normalized_shape, weight, mean, rstd, need_dw, need_db, ctx.backend)
    return dx, None, dw if need_dw else None, db if need_db else None, None


layer_norm.register_autograd(_backward, setup_context=_setup_context)
_LayerNormFunction = eager_function("LayerNormFunction", _forward, _setup_context, _backward, non_differentiable=(1, 2))


def eager_cxx(x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float
              ) -> Tensor | None:
    """The normalised output through fastseq._C's layer_norm where the call can take it: in eager mode, on the cpu
    and cuda backends, with arguments that pass fastseq.functional's checks (the checks, kernels and autograd
    formula in one C++ call: the same kernels as the custom op's, without a Python autograd.Function's ~10 us a
    call, at one row the op's whole cost); None elsewhere."""
    if torch.compiler.is_compiling() or not isinstance(x, Tensor):
        return None
    if not backends.runs_on_cpu(x, DTYPES) and not (x.is_floating_point() and _select(x) in ("cpu", "cuda")):
        return None
    try:
        return backends.extension().layer_norm(x, normalized_shape, weight, bias, eps)
    except TypeError:  # an argument of a type the C++ checks do not take: fastseq.functional's checks name it
        return None


def apply(x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """The normalised output (the op's first result) of checked arguments where eager_cxx does not take the call:
    the custom op under torch.compile, else its eager autograd.Function."""
    return call(layer_norm, _LayerNormFunction, x, normalized_shape, weight, bias, eps)[0]
