"""fastseq.nn.LayerNorm."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from .. import ops


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm (same arguments, parameters, initialisation and state_dict) on fastseq's fused kernels:
    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias over the trailing `normalized_shape` dims."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch._C._is_any_autocast_enabled():  # straight to the one C++ call where it can run (at a few rows
            # the call is the cost); F.layer_norm otherwise, and for its checks' errors
            y = ops.layer_norm.eager_cxx(input, self.normalized_shape, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
