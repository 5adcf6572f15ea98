"""Modules that :func:`lowbit.graph.prepare` puts into the canonical graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Fused", "ACTIVATIONS"]

#: Activation names a :class:`Fused` module accepts.
ACTIVATIONS = ("relu", "relu6")


class Fused(nn.Module):
    """A Conv1d/Conv2d/Linear layer followed by a ReLU or ReLU6, as one module.

    ``forward(x) == act(layer(x))``. ``layer`` keeps the float weights (with any BatchNorm already
    folded in); ``act`` is ``"relu"`` or ``"relu6"``. The quantizers treat it as one layer whose
    output range is clipped by the activation.
    """

    layer: nn.Conv1d | nn.Conv2d | nn.Linear
    act: str

    def __init__(self, layer: nn.Conv1d | nn.Conv2d | nn.Linear, act: str) -> None:
        super().__init__()
        if type(layer) not in (nn.Conv1d, nn.Conv2d, nn.Linear):
            raise TypeError(f"Fused layer must be nn.Conv1d, nn.Conv2d or nn.Linear, not {type(layer).__name__}")
        if act not in ACTIVATIONS:
            raise ValueError(f"Fused act must be one of {ACTIVATIONS}, not {act!r}")
        self.layer = layer
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if self.act == "relu":
            return F.relu(y)
        return F.hardtanh(y, 0.0, 6.0)

    def extra_repr(self) -> str:
        return f"act={self.act!r}"
