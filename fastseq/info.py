"""`python -m fastseq info`: versions, build flags, CUDA architectures compiled in, backends, GPU."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import backends


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> dict[str, object]:
    ext = backends.extension()
    out: dict[str, object] = {
        "fastseq": _version("fastseq"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda,
        "triton": _version("triton"),
        "extension": "built" if ext else "not built",
        "extension cuda": bool(ext and ext.with_cuda),
        "extension cpu capability": ext.cpu_capability if ext else None,
        "cuda archs compiled in": ext.cuda_archs if ext and ext.with_cuda else None,
        "backends": {b: backends.unavailable_reason(b) or "available" for b in backends.BACKENDS},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }
    return out
