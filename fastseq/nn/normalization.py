"""fastseq.nn.LayerNorm."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm (same arguments, parameters, initialisation and state_dict) on fastseq's fused kernels:
    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias over the trailing `normalized_shape` dims."""

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
