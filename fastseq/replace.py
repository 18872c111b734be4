"""fastseq.replace_modules: puts fastseq's modules in place of torch's inside an existing model."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from . import nn as fnn

# The torch.nn classes fastseq has a drop-in for, each replaced by the fastseq.nn class of the same name.
REPLACEABLE: tuple[type[torch.nn.Module], ...] = (
    torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN, torch.nn.LSTMCell, torch.nn.GRUCell, torch.nn.RNNCell,
    torch.nn.MultiheadAttention, torch.nn.LayerNorm,
)


def _torch_base(cls: object, argument: str) -> type[torch.nn.Module]:
    """The torch class in REPLACEABLE that `cls` is or derives from; a clear error if there is none."""
    if not isinstance(cls, type):
        raise TypeError(f"{argument} must hold torch module classes, got {cls!r}")
    for base in cls.__mro__:
        if base in REPLACEABLE:
            return base
    names = ", ".join(f"torch.nn.{c.__name__}" for c in REPLACEABLE)
    raise ValueError(f"{argument}: fastseq has no replacement for {cls.__module__}.{cls.__qualname__}; it replaces "
                     f"{names} (and, when included explicitly, their subclasses)")


def replace_modules(model: torch.nn.Module, include: Iterable[type] | None = None,
                    exclude: Iterable[type] | None = None) -> dict[str, type[torch.nn.Module]]:
    """Puts fastseq's modules in place of torch's inside `model` (`model` itself included), in place, and returns
    {qualified name ("" for model itself): the torch class replaced}.

    Each torch.nn.LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell, MultiheadAttention and LayerNorm whose type is exactly
    that class becomes an instance of the fastseq.nn class of the same name by assignment of its __class__: the
    module keeps its Parameter objects (an optimizer built on them stays valid), devices, dtypes, buffers,
    training mode and hooks, and from then on runs fastseq's forward (every configuration of these modules runs on
    fastseq's). fastseq's LSTM, GRU and RNN derive from torch.nn.RNNBase, so that torch.compile traces them:
    isinstance(module, torch.nn.LSTM) is False after the swap. Subclasses of those torch classes are left alone
    (their own methods would be lost) unless `include` names them; modules already fastseq's are skipped.

    include: the classes to replace (default: the eight above), each one of them or a subclass of one, which then
    becomes the fastseq class of the torch class it derives from. exclude: classes not to replace; exclude wins.

    A replaced MultiheadAttention gets fastseq.nn.activation.disable_torch_fast_path (else
    torch.nn.TransformerEncoderLayer's eval-mode fast path would call torch's kernel with its weights instead of
    its forward), and every torch.nn.TransformerEncoder holding a fastseq MultiheadAttention gets
    use_nested_tensor = False (its nested-tensor fast path would hand the layers NestedTensors)."""
    chosen = {cls: _torch_base(cls, "include") for cls in (REPLACEABLE if include is None else include)}
    for cls in exclude or ():
        _torch_base(cls, "exclude")
        chosen.pop(cls, None)
    already = {getattr(fnn, name) for name in fnn.__all__}
    swaps = [(name, module, getattr(fnn, chosen[type(module)].__name__)) for name, module in model.named_modules()
             if type(module) in chosen and type(module) not in already]
    replaced: dict[str, type[torch.nn.Module]] = {}
    attention = set()  # the MultiheadAttention modules replaced
    for name, module, cls in swaps:
        replaced[name] = type(module)
        module.__class__ = cls
        if chosen[replaced[name]] is torch.nn.MultiheadAttention:
            fnn.activation.disable_torch_fast_path(module)
            attention.add(module)
    for module in model.modules():
        if isinstance(module, torch.nn.TransformerEncoder) and any(m in attention for m in module.modules()):
            module.use_nested_tensor = False
    return replaced
