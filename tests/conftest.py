"""Shared test helpers. Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET
is set here, before anything imports triton."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

import fastseq  # noqa: E402
from fastseq import backends  # noqa: E402

# (backend, device) pairs. GPU pairs carry the `gpu` mark and are skipped, with the reason, where they cannot run, so
# that every GPU case is counted (`pytest --co -m gpu`) and none passes without running. The interpreter pair runs
# wherever Triton is installed and TRITON_INTERPRET=1: where the interpreter cannot run it fails with the reason.
_PAIRS = [("cpu", "cpu"), ("cuda", "cuda"), ("triton", "cuda"), ("triton", "cpu"), ("reference", "cpu")]


def _skip_reason(backend: str, device: str) -> str | None:
    if device == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        return backends.unavailable_reason(backend)
    if backend == "triton":
        return None if backends._has_triton() and backends.triton_interpreting() else "Triton's interpreter is off"
    return backends.unavailable_reason(backend)


def _param(backend: str, device: str):
    reason = _skip_reason(backend, device)
    marks = [pytest.mark.gpu] if device == "cuda" else []
    if reason is not None:
        marks.append(pytest.mark.skip(reason=f"{backend}-{device}: {reason}"))
    return pytest.param((backend, device), id=f"{backend}-{device}", marks=marks)


# The CPU backend is always a case: without fastseq._C its tests fail (with the reason) instead of vanishing.
BACKEND_PARAMS = [_param(b, d) for b, d in _PAIRS if d == "cuda" or b == "cpu" or _skip_reason(b, d) is None]


def dtype_cases(dtypes, tol=None) -> list:
    """(backend, device, dtype) params, or (backend, device, dtype, atol, rtol) with `tol`: every (backend, device)
    pair of BACKEND_PARAMS (with its marks) and each dtype in dtypes(backend, device); (atol, rtol) = tol[dtype], or
    (None, None) where the dtype is checked by another rule (half types: at most 2x the error of torch's own op).
    Ids name the pair and the dtype, so that a failing dtype never hides the others."""
    cases = []
    for p in BACKEND_PARAMS:
        backend, device = p.values[0]
        for dtype in dtypes(backend, device):
            values = (backend, device, dtype) if tol is None else (backend, device, dtype, *tol.get(dtype, (None, None)))
            cases.append(pytest.param(*values, marks=p.marks, id=f"{p.id}-{str(dtype).removeprefix('torch.')}"))
    return cases


@pytest.fixture(params=BACKEND_PARAMS)
def backend_device(request) -> tuple[str, str]:
    """Each backend that runs here, with the device of its tensors."""
    return request.param


@contextlib.contextmanager
def on_backend(name: str):
    """Runs the block on backend `name` and fails if any op falls back to another backend."""
    with fastseq.backend(name), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallbacks = [str(w.message) for w in caught if "fastseq:" in str(w.message)]
    assert not fallbacks, f"unexpected backend fallback: {fallbacks}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> None:
    """allclose, and on failure the worst element, its index and how many elements fail."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any() or not torch.isfinite(a).all():
        i = int(torch.argmax(torch.where(torch.isnan(err), torch.inf, err)))
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
        raise AssertionError(f"{name}: {int(bad.sum())}/{a.numel()} elements differ; worst at {idx}: "
                             f"{a.flatten()[i].item()} vs {e.flatten()[i].item()} (atol={atol}, rtol={rtol})")


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item() \
        if actual.numel() else 0.0


def assert_within_torch_error(ours: torch.Tensor, torchs: torch.Tensor, ref: torch.Tensor, name: str,
                              factor: float = 2.0) -> None:
    """The rule for half types: our error against the float64 reference is at most `factor` times torch's own
    error for the same op in the same dtype, with a floor of one rounding step of the output dtype."""
    ulp = torch.finfo(ours.dtype).eps * max(ref.detach().abs().max().item(), 1e-3) if ref.numel() else 0.0
    ours_err, torch_err = max_err(ours, ref), max_err(torchs, ref)
    assert ours_err <= factor * torch_err + ulp, (
        f"{name}: error {ours_err:.3e} vs float64 reference exceeds {factor}x torch's {torch_err:.3e} "
        f"(+ {ulp:.1e} floor)")
