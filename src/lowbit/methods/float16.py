"""float16 quantization (TFLite "float16"): weights stored as float16, computed in float32.

Halves the file; on CPUs without fast float16 arithmetic the weights are upcast when the layer runs,
so accuracy is that of the float model to within float16 rounding of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lowbit.nn import F16Layer

from .base import LayerSettings, Method, QuantConfig, register
from .common import conv_geometry, swap_layers


@dataclass
class Float16Config(QuantConfig):
    """Options of the float16 method (those of :class:`QuantConfig`)."""


@register
class Float16(Method):
    name = "float16"
    order = 40
    summary = "float16 weights, float32 compute (half the size, float accuracy)"
    config_cls = Float16Config
    needs_calibration = False

    def convert(self, prepared: Any, calib: list[torch.Tensor]) -> fx.GraphModule:
        def make(layer: nn.Module, act: str | None, settings: LayerSettings, name: str) -> nn.Module:
            if not torch.isfinite(layer.weight).all():
                raise ValueError(f"layer '{name}' has NaN or Inf weights")
            kind = {nn.Linear: "linear", nn.Conv1d: "conv1d"}.get(type(layer), "conv2d")
            if (layer.weight.abs() > 65504).any():
                raise ValueError(f"layer '{name}' has weights beyond the float16 range (65504)")
            b = None if layer.bias is None else layer.bias.detach()
            return F16Layer(kind, layer.weight.detach(), b, act, **conv_geometry(layer))

        gm, kept = swap_layers(prepared.gm, self.config, make)
        gm.lowbit_meta = {"input": {"dtype": "float32"}, "output": {"dtype": "float32"}, "float_layers": kept}
        return gm
