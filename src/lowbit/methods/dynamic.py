"""Dynamic range quantization (TFLite "dynamic range"): int8 weights, activations quantized on the fly.

Weights are stored int8 per output channel; at run time each layer quantizes its float input to
uint8 from that input's own min/max, multiplies in integers (int32 accumulation) and dequantizes
its output. No calibration data is needed; model input and output stay float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lowbit.nn import DynamicQConv, DynamicQLinear

from .base import LayerSettings, Method, QuantConfig, register
from .common import conv_geometry, quantize_weight, swap_layers


@dataclass
class DynamicConfig(QuantConfig):
    """Options of the dynamic method (those of :class:`QuantConfig`)."""


@register
class Dynamic(Method):
    name = "dynamic"
    order = 10
    summary = "int8 weights; activations quantized per call from their own range (no calibration)"
    config_cls = DynamicConfig
    needs_calibration = False

    def convert(self, prepared: Any, calib: list[torch.Tensor]) -> fx.GraphModule:
        def make(layer: nn.Module, act: str | None, settings: LayerSettings, name: str) -> nn.Module:
            wq, ws = quantize_weight(layer.weight.detach(), settings)
            b = None if layer.bias is None else layer.bias.detach()
            if isinstance(layer, nn.Linear):
                return DynamicQLinear(wq, ws, b, act)
            return DynamicQConv(wq, ws, b, act, **conv_geometry(layer))

        gm, kept = swap_layers(prepared.gm, self.config, make)
        gm.lowbit_meta = {"input": {"dtype": "float32"}, "output": {"dtype": "float32"}, "float_layers": kept}
        return gm
