"""torch.library custom ops (``fastseq::...``): each wraps the C++ or Triton launcher of the backend chosen by
fastseq.backends, with a fake implementation for torch.compile and an autograd formula whose backward is a fused
kernel too. One module per op family."""
from . import layer_norm  # noqa: F401
from . import rnn_cell  # noqa: F401
from . import rnn_layer  # noqa: F401
from . import attention  # noqa: F401
