"""Functional API with the signatures of torch.nn.functional (and torch's cell functions), on fastseq's kernels.
Arguments are checked here, with errors that name the argument, the expected and the actual value."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.fastseq)
from .errors import DeviceError, DTypeError, ShapeError


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


def layer_norm(input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias over the last len(normalized_shape) dims
    (biased variance), as torch.nn.functional.layer_norm."""
    _check_floating(input, "input")
    shape = [normalized_shape] if isinstance(normalized_shape, numbers.Integral) else list(normalized_shape)
    if not shape or any(not isinstance(s, numbers.Integral) or s <= 0 for s in shape):
        raise ShapeError(f"normalized_shape must be a non-empty sequence of positive ints, got {normalized_shape}")
    if list(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ShapeError(f"Given normalized_shape={shape}, expected input with shape [*, "
                         f"{', '.join(map(str, shape))}], but got input of size {list(input.shape)}")
    _check_like(weight, input, "weight", "input", shape)
    _check_like(bias, input, "bias", "input", shape)
    return torch.ops.fastseq.layer_norm(input, [int(s) for s in shape], weight, bias, float(eps))[0]
