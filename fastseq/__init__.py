"""fastseq: fused CPU and GPU kernels for sequence models, as drop-in torch modules.

    import fastseq
    ln = fastseq.nn.LayerNorm(512)                 # same arguments, parameters and state_dict as torch.nn.LayerNorm
    y = fastseq.functional.layer_norm(x, (512,))
    with fastseq.backend("triton"): ...            # pick a backend (or FASTSEQ_BACKEND=cpu|cuda|triton|reference)
    fastseq.replace_modules(model)                 # torch.nn.LSTM, LayerNorm, ... inside a model become fastseq's
"""
from . import functional, nn, ops  # noqa: F401  (ops registers the fastseq:: custom ops)
from .backends import available as available_backends
from .backends import backend
from .info import info
from .replace import replace_modules

__version__ = "0.1.0"
__all__ = ["functional", "nn", "ops", "backend", "available_backends", "info", "replace_modules", "__version__"]
