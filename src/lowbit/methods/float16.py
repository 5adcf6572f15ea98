"""float16 quantization (TFLite "float16"): weights stored as float16, computed in float32.

Halves the file; on CPUs without fast float16 arithmetic the weights are upcast when the layer runs,
so accuracy is that of the float model to within float16 rounding of the weights. Works on any
``nn.Module`` without tracing it: Linear, Conv1d/Conv2d, Embedding, LSTM/GRU/RNN and
MultiheadAttention layers are replaced where they are (:mod:`lowbit.methods.module_swap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.nn import F16Layer

from .base import LayerSettings, Method, QuantConfig, register
from .common import conv_geometry
from .module_swap import Builder, WeightCache, class_key, swap_modules
from .weight_only import HF_CONV1D, linear_args, stored_builders, swap_meta


def _layer(mod: nn.Module, path: str, settings: LayerSettings, cache: WeightCache) -> nn.Module:
    """Linear (or Hugging Face Conv1D) / Conv1d / Conv2d as an F16Layer."""
    w, b, transposed = linear_args(mod) if not isinstance(mod, (nn.Conv1d, nn.Conv2d)) else (mod.weight, mod.bias,
                                                                                             False)
    for name, t in (("weights", w), ("bias", b)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"NaN or Inf {name}")
        if t is not None and (t.abs() > 65504).any():
            raise ValueError(f"{name} beyond the float16 range (65504)")
    kind = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d"}.get(type(mod), "linear")
    if kind != "linear" and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
        return stored_builders("float16")[class_key(type(mod))](mod, path, settings, cache)
    fb = None if b is None else cache.float16(b)
    geo = conv_geometry(mod) if kind != "linear" else {}
    return F16Layer(kind, cache.float16(w, transpose=transposed), fb, None, **geo)


def _builders() -> dict[str, Builder]:
    out = stored_builders("float16")
    out.update({class_key(nn.Linear): _layer, HF_CONV1D: _layer, class_key(nn.Conv1d): _layer,
                class_key(nn.Conv2d): _layer})
    return out


@dataclass
class Float16Config(QuantConfig):
    """Options of the float16 method (those of :class:`QuantConfig`)."""


@register
class Float16(Method):
    name = "float16"
    order = 40
    summary = "float16 weights, float32 compute (half the size, float accuracy); any nn.Module"
    config_cls = Float16Config
    needs_calibration = False
    needs_graph = False

    def convert_module(self, model: nn.Module, calib: list[Any]) -> tuple[nn.Module, dict[str, Any]]:
        res = swap_modules(model, self.config, _builders(), self.name)
        return res.model, swap_meta(res)
