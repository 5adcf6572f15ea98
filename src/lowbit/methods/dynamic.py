"""Dynamic range quantization (TFLite "dynamic range"): int8 weights, activations quantized on the fly.

Works on any ``nn.Module`` without tracing it (:mod:`lowbit.methods.module_swap`): Linear (and Hugging
Face's Conv1D), Conv1d/Conv2d, LSTM/GRU/RNN and MultiheadAttention layers are replaced where they are
by layers with int8 weights per output channel that quantize their float input to uint8 when they run,
multiply in integers on lowbit's kernels (int32 accumulation) and dequantize the result; Embedding
tables are stored int8 per row and dequantized row by row. No calibration data is needed; model input
and output stay float.

``per_token``: one activation scale per row of a linear layer's input (a token of a sequence) instead
of one per tensor (see :mod:`lowbit.nn.dynamic_act`); the default is the measured choice of the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit.nn import DynamicQConv, DynamicQLinear, DynamicQMultiheadAttention, DynamicQRNN

from .base import LayerSettings, Method, QuantConfig, register
from .common import conv_geometry
from .module_swap import Builder, Unsupported, WeightCache, class_key, swap_modules
from .weight_only import HF_CONV1D, linear_args, stored_module, swap_meta


@dataclass
class DynamicConfig(QuantConfig):
    """Options of the dynamic method: those of :class:`QuantConfig`, and

    per_token: one activation scale per row (token) of a linear layer's input instead of per tensor;
    quantize_embeddings: store Embedding tables int8 per row (else they stay float32).
    """

    per_token: bool = False
    quantize_embeddings: bool = True


def _builders(cfg: DynamicConfig) -> dict[str, Builder]:
    def linear(mod: nn.Module, path: str, s: LayerSettings, cache: WeightCache) -> nn.Module:
        w, b, transposed = linear_args(mod)
        q, scale = cache.int8(w, s, transpose=transposed)
        return DynamicQLinear(q, scale, None if b is None else b.detach(), None, cfg.per_token)

    def conv(mod: nn.Module, path: str, s: LayerSettings, cache: WeightCache) -> nn.Module:
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise Unsupported(f"padding_mode={mod.padding_mode!r}, padding={mod.padding!r}")
        q, scale = cache.int8(mod.weight, s)
        b = None if mod.bias is None else mod.bias.detach()
        return DynamicQConv(q, scale, b, None, **conv_geometry(mod))

    def rnn(mod: nn.Module, path: str, s: LayerSettings, cache: WeightCache) -> nn.Module:
        if getattr(mod, "proj_size", 0):
            raise Unsupported("LSTM with proj_size")
        return DynamicQRNN.from_float(mod, lambda w: cache.int8(w, s), cfg.per_token)

    def mha(mod: nn.Module, path: str, s: LayerSettings, cache: WeightCache) -> nn.Module:
        why = DynamicQMultiheadAttention.supports(mod)
        if why:
            raise Unsupported(f"MultiheadAttention with {why}")
        return DynamicQMultiheadAttention.from_float(mod, lambda w: cache.int8(w, s), cfg.per_token)

    def embedding(mod: nn.Module, path: str, s: LayerSettings, cache: WeightCache) -> nn.Module:
        return stored_module(mod, s, cache, "int8")

    out: dict[str, Builder] = {class_key(nn.Linear): linear, HF_CONV1D: linear,
                               class_key(nn.Conv1d): conv, class_key(nn.Conv2d): conv,
                               class_key(nn.LSTM): rnn, class_key(nn.GRU): rnn, class_key(nn.RNN): rnn,
                               class_key(nn.MultiheadAttention): mha}
    if cfg.quantize_embeddings:
        out[class_key(nn.Embedding)] = embedding
    return out


@register
class Dynamic(Method):
    name = "dynamic"
    order = 10
    summary = "int8 weights; activations quantized per call from their own range (no calibration); any nn.Module"
    config_cls = DynamicConfig
    needs_calibration = False
    needs_graph = False

    def convert_module(self, model: nn.Module, calib: list[Any]) -> tuple[nn.Module, dict[str, Any]]:
        res = swap_modules(model, self.config, _builders(self.config), self.name)
        return res.model, swap_meta(res)
