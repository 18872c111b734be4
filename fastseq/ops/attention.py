"""fastseq::sdpa and fastseq::sdpa_backward: scaled dot-product attention on 4-D (B, H, len, dim) tensors.

out = softmax(q k^T * scale + mask) v with dropout on the probabilities; lse (the log-sum-exp of each query row,
natural log) is the forward's second output, which the backward uses to recompute the probabilities. The CUDA C++
kernel is forward-only: its backward runs on Triton (both keep lse as the natural log in float32). Dropout's keep
decisions are a function of rng = (seed, offset), an int64 CPU tensor drawn by the caller, so that the backward
regenerates them."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, reference
from ._dispatch import call, differentiable_grads, eager_function

OP = "scaled_dot_product_attention"
DTYPES = {
    "cpu": frozenset({torch.float32, torch.float64, torch.bfloat16}),
    "cuda": frozenset({torch.float16, torch.bfloat16}),
    "triton": frozenset({torch.float32, torch.float16, torch.bfloat16}),
}


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _limits(q: Tensor, v: Tensor, dropout_p: float):
    """limits(name) for backends.select: why backend `name` cannot run these shapes, as its kernels state it."""

    def limits(name: str) -> str | None:
        if name == "cuda":
            return backends.extension().sdpa_cuda_unsupported(q, v, dropout_p)
        if name == "triton":
            from ..kernels import attention as tk

            return tk.unsupported(q, v)
        return None

    return limits


def _select(q: Tensor, v: Tensor, dropout_p: float) -> str:
    """The forward's backend (backends.select by device, dtype and the kernels' limits)."""
    return backends.select(OP, q.device, q.dtype, DTYPES, _limits(q, v, dropout_p))


def _backward_backend(forward: str, q: Tensor, v: Tensor) -> str:
    """The backend of the backward of a forward run on `forward`: the same one, except that the CUDA C++ kernel is
    forward-only and its backward runs on Triton (which keeps lse the same way), else on the reference."""
    if forward != "cuda":
        return forward
    return "triton" if backends.rejects("triton", q.device, q.dtype, DTYPES, _limits(q, v, 0.0)) is None \
        else "reference"


def _seed_offset(rng: Tensor | None) -> tuple[int, int]:
    return (0, 0) if rng is None else (int(rng[0]), int(rng[1]))


def _reference_keep(q: Tensor, k: Tensor, dropout_p: float, rng: Tensor | None) -> Tensor | None:
    """The reference backend's keep mask (B, Hq, L, S), regenerated from (seed, offset) by torch's generator."""
    if dropout_p == 0.0:
        return None
    seed, offset = _seed_offset(rng)
    gen = torch.Generator(q.device).manual_seed((seed * 1_000_003 + offset) % 2**63)
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.rand(shape, generator=gen, device=q.device) >= dropout_p


def _cpu_mask(attn_mask: Tensor | None, q: Tensor) -> Tensor | None:
    """The C++ CPU kernel takes a mask in q's dtype (torch also accepts float32 masks for other dtypes)."""
    return attn_mask if attn_mask is None or attn_mask.dtype == q.dtype else attn_mask.to(q.dtype)


def _expand_mask(attn_mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """The mask (4-D, size 1 on its broadcast dims) as the kernels take it: (B, Hq, L, S) with stride-0 dims."""
    return None if attn_mask is None else attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _allow_tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def _forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float,
             dropout_p: float, rng: Tensor | None) -> tuple[Tensor, Tensor]:
    """out (B, Hq, L, Ev) in q's dtype and lse (B, Hq, L) float32 (float64 for float64 inputs). q (B, Hq, L, E),
    k (B, Hk, S, E), v (B, Hk, S, Ev); attn_mask additive, 4-D, of size 1 on its broadcast dims; rng (2,) int64 =
    (seed, offset) when dropout_p > 0."""
    name = _select(q, v, dropout_p)
    seed, offset = _seed_offset(rng)
    attn_mask = _expand_mask(attn_mask, q, k)
    if name == "cpu":
        out, lse = backends.extension().sdpa_fwd(q, k, v, _cpu_mask(attn_mask, q), is_causal, scale, dropout_p,
                                                 seed, offset)
    elif name == "cuda":
        out, lse = backends.extension().sdpa_fwd(q, k, v, attn_mask, is_causal, scale, dropout_p, seed, offset)
    elif name == "triton":
        from ..kernels import attention as tk

        out, lse = tk.sdpa_fwd(q, k, v, attn_mask, is_causal, scale, dropout_p, seed, offset, _allow_tf32())
    else:
        keep = _reference_keep(q, k, dropout_p, rng)
        out, lse = reference.sdpa_forward(q, k, v, attn_mask, is_causal, scale, dropout_p, keep)
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


sdpa = torch.library.custom_op("fastseq::sdpa", _forward, mutates_args=())


@sdpa.register_fake
def _(q, k, v, attn_mask, is_causal, scale, dropout_p, rng):
    B, Hq, L, _ = q.shape
    return q.new_empty(B, Hq, L, v.shape[-1]), q.new_empty(B, Hq, L, dtype=_lse_dtype(q))


def _backward_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   attn_mask: Tensor | None, is_causal: bool, scale: float, dropout_p: float, rng: Tensor | None,
                   need_dmask: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (shaped like q, k, v) and, when need_dmask, the gradient of the additive mask, shaped and typed
    like it (empty otherwise), run on `backend` (_backward_backend of the forward's)."""
    name = backend
    seed, offset = _seed_offset(rng)
    mask_shape = None if attn_mask is None else attn_mask.shape
    attn_mask = _expand_mask(attn_mask, q, k)
    dout = dout if dout.stride(-1) == 1 or dout.shape[-1] <= 1 else dout.contiguous()  # kernels need unit last stride
    if name == "cpu":
        dq, dk, dv, ds = backends.extension().sdpa_bwd(dout, q, k, v, out, lse, _cpu_mask(attn_mask, q), is_causal,
                                                       scale, dropout_p, seed, offset, need_dmask)
    elif name == "triton":
        from ..kernels import attention as tk

        dq, dk, dv, ds = tk.sdpa_bwd(dout, q, k, v, out, lse, attn_mask, is_causal, scale, dropout_p, seed, offset,
                                     need_dmask, _allow_tf32())
    else:
        keep = _reference_keep(q, k, dropout_p, rng)
        dq, dk, dv, ds = reference.sdpa_backward(dout, q, k, v, out, attn_mask, is_causal, scale, dropout_p, keep)
    if need_dmask:  # summed over the mask's broadcast dims in float32 (float64), then rounded once
        dims = [d for d in range(4) if mask_shape[d] == 1 and ds.shape[d] != 1]
        ds = (ds.sum(dims, keepdim=True) if dims else ds).to(attn_mask.dtype).contiguous()
    else:
        ds = q.new_empty(0)
    return dq.to(q.dtype).contiguous(), dk.to(q.dtype).contiguous(), dv.to(q.dtype).contiguous(), ds


sdpa_backward = torch.library.custom_op("fastseq::sdpa_backward", _backward_impl, mutates_args=())


@sdpa_backward.register_fake
def _(dout, q, k, v, out, lse, attn_mask, is_causal, scale, dropout_p, rng, need_dmask, backend):
    ds = attn_mask.new_empty(attn_mask.shape) if need_dmask else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, dropout_p, rng = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, rng)
    ctx.is_causal, ctx.scale, ctx.dropout_p = is_causal, scale, dropout_p
    ctx.backend = _backward_backend(_select(q, v, dropout_p), q, v)  # recorded here, where the forward ran


def _backward_with(backward_op):
    """The autograd formula, running the fused backward through `backward_op` (the custom op, or in eager mode its
    implementation directly)."""

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, attn_mask, rng = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward that can itself be differentiated
            if ctx.dropout_p > 0.0:
                raise NotImplementedError("fastseq: the double backward (create_graph=True) of attention with "
                                          f"dropout_p > 0 is not implemented (dropout_p={ctx.dropout_p})")
            fn = lambda q, k, v, m: reference.sdpa_forward(q, k, v, m, ctx.is_causal, ctx.scale)[0]  # noqa: E731
            return (*differentiable_grads(fn, [q, k, v, attn_mask], ctx.needs_input_grad[:4], [dout]),
                    None, None, None, None)
        need_dmask = attn_mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, ds = backward_op(dout, q, k, v, out, lse, attn_mask, ctx.is_causal, ctx.scale, ctx.dropout_p,
                                     rng, need_dmask, ctx.backend)
        return dq, dk, dv, ds if need_dmask else None, None, None, None, None

    return backward


sdpa.register_autograd(_backward_with(sdpa_backward), setup_context=_setup_context)
_SDPAFunction = eager_function("SDPAFunction", _forward, _setup_context, _backward_with(_backward_impl),
                               non_differentiable=(1,))


def apply(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float,
          dropout_p: float, rng: Tensor | None) -> Tensor:
    """The attention output (the op's first result), through the fastest path for the current mode."""
    return call(sdpa, _SDPAFunction, q, k, v, attn_mask, is_causal, scale, dropout_p, rng)[0]
