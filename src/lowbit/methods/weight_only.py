"""Weight-only int8 quantization: int8 weights, float activations and arithmetic.

Every weight matrix or kernel of the model (Linear, Conv1d/Conv2d, Embedding, LSTM/GRU/RNN,
MultiheadAttention, Hugging Face's GPT-style Conv1D) is stored as int8 codes with one float32 scale per
output row; biases and every other tensor stay float32. When a layer runs, its weights are dequantized
to float32 and the float computation runs on them, so activations are never rounded: the accuracy is
that of the float model with int8-rounded weights, the file about a quarter of the float file. No
calibration data is needed; the model needs no graph (any ``nn.Module``).

The compute choice, measured (see README): dequantize-then-float-GEMM keeps the float model's speed
up to the cost of one pass over the weights per call, while holding 1 byte per weight in memory; the
int8 GEMM with a float epilogue is the ``dynamic`` method (activations rounded too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.nn import WeightOnly

from .base import LayerSettings, Method, QuantConfig, register
from .module_swap import Builder, Unsupported, WeightCache, class_key, swap_modules, type_key

#: Hugging Face's GPT-2 style Conv1D (a linear layer with transposed weights), named by type.
HF_CONV1D = "transformers.pytorch_utils.Conv1D"

_STORED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention)


def linear_args(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(weight [out, in], bias, transposed) of an nn.Linear or a Hugging Face Conv1D."""
    if type_key(mod) == HF_CONV1D:
        return mod.weight, mod.bias, True
    return mod.weight, mod.bias, False


def stored_module(mod: nn.Module, settings: LayerSettings, cache: WeightCache, storage: str) -> WeightOnly:
    """``mod`` as a :class:`~lowbit.nn.WeightOnly` module with int8 (per output row) or float16 weights."""
    from lowbit.modelfile.errors import ModelFileError
    from lowbit.modelfile.torch_modules import torch_module_args

    transposed = type_key(mod) == HF_CONV1D
    if transposed:
        w = mod.weight
        cls, args = "Linear", {"in_features": w.shape[0], "out_features": w.shape[1], "bias": mod.bias is not None}
        params = {"weight": w, "bias": mod.bias}
    else:
        if isinstance(mod, nn.Embedding) and mod.max_norm is not None:
            raise Unsupported("Embedding with max_norm rewrites its table when it runs")
        try:
            cls, args = torch_module_args("", mod)
        except ModelFileError as e:
            raise Unsupported(str(e)) from None
        params = dict(mod.named_parameters())
    if any(True for _ in mod.buffers()):
        raise Unsupported(f"{type(mod).__name__} has buffers")
    tensors: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        if p is None:
            continue
        t = name == "weight" and transposed
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} contains NaN or Inf")
        if storage == "int8" and p.dim() >= 2:
            tensors[f"{name}_q"], tensors[f"{name}_scale"] = cache.int8(p, settings, transpose=t)
        elif storage == "float16":
            if (p.abs() > 65504).any():
                raise ValueError("weights beyond the float16 range (65504)")
            tensors[name] = cache.float16(p, transpose=t)
        else:
            tensors[name] = cache.get(p, "f32", lambda p=p: p.detach().to(torch.float32).contiguous())
    return WeightOnly(cls, args, storage, tensors)


def stored_builders(storage: str) -> dict[str, Builder]:
    def build(mod: nn.Module, path: str, settings: LayerSettings, cache: WeightCache) -> nn.Module:
        return stored_module(mod, settings, cache, storage)

    keys = [class_key(c) for c in _STORED] + [HF_CONV1D]
    return dict.fromkeys(keys, build)


def swap_meta(result: Any) -> dict[str, Any]:
    return {"input": {"dtype": "float32"}, "output": {"dtype": "float32"}, "graph": "module_swap",
            "quantized_layers": list(result.swapped), "float_layers": list(result.kept),
            "float_reasons": dict(result.kept), "swapped": dict(result.info),
            "folded_batchnorm": list(result.folded)}


@dataclass
class WeightOnlyConfig(QuantConfig):
    """Options of the weight_only method (those of :class:`QuantConfig`)."""


@register
class WeightOnlyInt8(Method):
    name = "weight_only"
    order = 35
    summary = "int8 weights (per output row), float activations; any nn.Module, no calibration"
    config_cls = WeightOnlyConfig
    needs_calibration = False
    needs_graph = False

    def convert_module(self, model: nn.Module, calib: list[Any]) -> tuple[nn.Module, dict[str, Any]]:
        res = swap_modules(model, self.config, stored_builders("int8"), self.name)
        return res.model, swap_meta(res)
