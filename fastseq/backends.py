"""Which backends exist here and which one runs an op.

Backends: ``cpu`` (C++ in fastseq._C), ``cuda`` (CUDA C++ in fastseq._C), ``triton`` (fastseq.kernels, on a GPU or
on CPU tensors in Triton's interpreter when TRITON_INTERPRET=1), ``reference`` (pure PyTorch, always there).
A backend is requested with ``FASTSEQ_BACKEND=name`` or ``with fastseq.backend("name"):``; otherwise each device has
a default order. When the first choice cannot run an op on the given inputs, the next one does, with a one-time
warning that names the reason: never silently.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")
DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastseq_backend", default=None)
_warned: set[tuple[str, str, str]] = set()
# select's choices without limits and without a fallback (a cell step at batch 1 is mostly per-call overhead)
_chosen: dict[tuple, str] = {}
# os.environ's own table, where it has one (POSIX: encoded keys and values): os.environ.get encodes the key and
# decodes the value, ~0.7 us a read, which select's cache key would pay twice a call
_ENVIRON = getattr(os.environ, "_data", None)


def raw_env(name: str, encoded: bytes) -> object:
    """The value of environment variable `name` as os.environ holds it (encoded on POSIX): for comparing, not
    reading."""
    return os.environ.get(name) if _ENVIRON is None else _ENVIRON.get(encoded)


@functools.cache
def extension():
    """The compiled extension fastseq._C, or None when it is not built."""
    try:
        from . import _C
    except ImportError:
        return None
    return _C


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())


@functools.cache
def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run fastseq's kernels with the installed packages, or None. The one place
    where a difference between versions of torch, Triton or numpy is handled: Triton before 3.7 turns a computed
    loop bound into an int with int() of a 1-element array, which numpy 2.4 refuses ("only 0-dimensional arrays
    can be converted to Python scalars"), so every kernel with such a loop fails in the interpreter."""
    import numpy
    import triton

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter needs numpy < 2.4 (numpy {numpy.__version__} is "
                "installed): pip install 'numpy<2.4', or triton>=3.7")
    return None


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run here, or None when it can."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "reference":
        return None
    if name in ("cpu", "cuda") and extension() is None:
        return "the extension fastseq._C is not built (pip install --no-build-isolation -e .)"
    if name == "cuda":
        if not extension().with_cuda:
            return "fastseq._C was built without CUDA"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    if name == "triton":
        if not _has_triton():
            return "triton is not installed"
        if not torch.cuda.is_available():
            if not triton_interpreting():
                return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
            return _interpreter_problem()
    return None


def available() -> list[str]:
    return [b for b in BACKENDS if unavailable_reason(b) is None]


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run fastseq ops on backend `name` inside the block (falling back, with a warning, where it cannot)."""
    unavailable_reason(name)  # validates the name
    token = _requested.set(name)
    try:
        yield
    finally:
        _requested.reset(token)


_CPU_OR_NOTHING = (None, "", b"", "cpu", b"cpu")


def cpu_or_nothing_requested() -> bool:
    """Whether the backend requested (a `backend` block, else FASTSEQ_BACKEND) is "cpu" or none."""
    name = _requested.get()
    return (name or raw_env("FASTSEQ_BACKEND", b"FASTSEQ_BACKEND")) in _CPU_OR_NOTHING


def runs_on_cpu(x: torch.Tensor, dtypes: Mapping[str, frozenset]) -> bool:
    """True where select would answer "cpu" for an op of `dtypes` on x without asking it: a CPU tensor of a dtype
    the cpu backend runs, the extension built, the cpu backend or none requested (~0.2 us against select's ~0.6, for
    the ops whose per-call cost matters). False says nothing: ask select."""
    return x.is_cpu and x.dtype in dtypes["cpu"] and extension() is not None and cpu_or_nothing_requested()


def requested() -> str | None:
    name = _requested.get() or os.environ.get("FASTSEQ_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"FASTSEQ_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def rejects(name: str, device: torch.device, dtype: torch.dtype, dtypes: Mapping[str, frozenset],
            limits: Callable[[str], str | None] | None = None) -> str | None:
    """Why backend `name` cannot run an op (see select) on these tensors, or None when it can."""
    if name == "reference":
        return None
    if name not in dtypes:
        return f"the {name} backend does not implement this op"
    reason = unavailable_reason(name)
    if reason:
        return reason
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend needs CPU tensors, got {device}"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device}"
    if name == "triton" and not (device.type == "cuda" or (device.type == "cpu" and triton_interpreting())):
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
    if dtype not in dtypes[name]:
        return f"the {name} backend does not support {dtype}"
    return None if limits is None else limits(name)


def select(op: str, device: torch.device, dtype: torch.dtype, dtypes: Mapping[str, frozenset],
           limits: Callable[[str], str | None] | None = None) -> str:
    """The backend that runs `op` on tensors of `device` and `dtype`: the one place that picks a backend and warns.
    `dtypes` maps each backend that implements the op to the dtypes it supports ("reference" supports every
    floating dtype); limits(name), where given, says why backend `name` (available, device and dtype fine) cannot
    run this call's shapes (the kernel's own statement of its limits), or None."""
    key = (op, device, dtype, id(dtypes), _requested.get(), raw_env("FASTSEQ_BACKEND", b"FASTSEQ_BACKEND"),
           raw_env("TRITON_INTERPRET", b"TRITON_INTERPRET"))
    if limits is None and key in _chosen:
        return _chosen[key]
    first = requested()
    order = DEFAULT_ORDER.get(device.type, ("reference",))
    candidates = ([first] if first else []) + [b for b in order if b != first]
    rejected: list[str] = []
    chosen = "reference"
    for name in candidates:
        reason = rejects(name, device, dtype, dtypes, limits)
        if reason is None:
            chosen = name
            break
        rejected.append(f"{name}: {reason}")
    if rejected:
        warned = (op, chosen, rejected[0])
        if warned not in _warned:
            _warned.add(warned)
            warnings.warn(f"fastseq: {op} runs on the {chosen} backend ({'; '.join(rejected)})", stacklevel=4)
    elif limits is None:
        _chosen[key] = chosen  # a first choice that runs: the same for every later call with this key
    return chosen
