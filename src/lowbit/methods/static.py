"""Static int8 quantization (TFLite "representative dataset"): int8 weights and activations.

Activation ranges are calibrated on a representative dataset (default 500 samples, min/max observer;
any lowbit observer can be chosen). Layers execute integer arithmetic end to end between a quantize
step at the model input and a dequantize step at its output; operations without an integer
implementation stay float, with quantize/dequantize around them, and are listed in the model's meta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .base import Method, QuantConfig, register
from .common import calibrate_activations
from .integer_graph import build_integer_graph


@dataclass
class StaticConfig(QuantConfig):
    progress: bool = True


@register
class Static(Method):
    name = "static"
    order = 20
    summary = "int8 weights and activations, ranges from a representative dataset; float I/O"
    config_cls = StaticConfig
    needs_calibration = True
    full_integer = False

    def convert(self, prepared: Any, calib: list[torch.Tensor]) -> fx.GraphModule:
        cfg = self.config
        act = calibrate_activations(prepared.gm, calib, cfg.activation_observer, progress=cfg.progress)
        io = getattr(cfg, "io_dtype", "uint8")
        gm, meta = build_integer_graph(prepared.gm, act, cfg, full_integer=self.full_integer, io_dtype=io)
        gm.lowbit_meta = meta
        return gm
