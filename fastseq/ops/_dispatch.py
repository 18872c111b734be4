"""Calling a fastseq op: the torch.library custom op while torch.compile traces, and in eager mode a plain
torch.autograd.Function with the same forward, setup_context and backward (a custom op's Python dispatch costs
~70 us a call, which would dominate small ops such as a cell step at batch 1), or, when there is nothing to
differentiate, the implementation itself (the Function's bookkeeping costs another ~15 us a call)."""
from __future__ import annotations

from collections.abc import Callable

import torch


def eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable,
                   non_differentiable: tuple[int, ...] = (), inference: Callable | None = None
                   ) -> type[torch.autograd.Function]:
    """An autograd.Function running `forward` (the custom op's implementation) with the custom op's autograd
    formula; outputs at the indices `non_differentiable` (saved statistics, workspaces) are marked so. `inference`
    (default: `forward`) is what `call` runs when nothing needs grad: forward's outputs, of which those only a
    backward reads may be left empty."""

    def fwd(ctx, *args):
        ctx.fastseq_eager = True
        output = forward(*args)
        setup_context(ctx, args, output)
        ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(backward),
                                                   "implementation": staticmethod(inference or forward)})


def needs_grad(*args) -> bool:
    """Whether autograd records a graph through an op taking `args`: grad mode is on and a tensor among them (at
    the top level) requires grad."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def call(op, eager: type[torch.autograd.Function], *args):
    """op(*args) under torch.compile; otherwise eager.apply(*args), or the implementation directly when grad mode
    is off or no tensor argument requires grad (positional arguments only, tensors at the top level)."""
    if torch.compiler.is_compiling():
        return op(*args)
    if needs_grad(*args):
        return eager.apply(*args)
    return eager.implementation(*args)


def backward_op(ctx, op, impl: Callable) -> Callable:
    """What an autograd formula calls for its fused backward: the backward custom op `op` when the custom op's own
    autograd runs (torch.compile, opcheck), its implementation `impl` directly in the eager fast path."""
    return impl if getattr(ctx, "fastseq_eager", False) else op


def differentiable_grads(fn: Callable, inputs: list, needs, grads: list, create_graph: bool = True) -> list:
    """The gradients of fn(*inputs), the reference in differentiable torch operations, with respect to the inputs
    whose `needs` entry is true (None elsewhere); `grads` are the gradients of fn's outputs (None counts as zeros).
    With create_graph (the backward under create_graph=True: a double backward follows, e.g. a gradient penalty)
    they are a graph of their own reaching back to `inputs` (the forward's own tensors) and to `grads`, so that
    second derivatives are right; without it, plain tensors (the reference backend's backward)."""
    if not create_graph:
        inputs = [t.detach().requires_grad_(n) if isinstance(t, torch.Tensor) else t for t, n in zip(inputs, needs)]
    with torch.enable_grad():
        outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None and o.requires_grad]
    wanted = [i for i, (t, n) in enumerate(zip(inputs, needs)) if n and isinstance(t, torch.Tensor)
              and t.requires_grad]
    result: list = [None] * len(inputs)
    if not pairs or not wanted:
        return result
    got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                              create_graph=create_graph, allow_unused=True)
    for i, g in zip(wanted, got):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return result
