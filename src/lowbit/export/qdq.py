"""Quantize / dequantize as torch custom ops that export to ONNX's QuantizeLinear / DequantizeLinear.

Three ops (namespace ``lowbit_qdq``), each with a plain-PyTorch implementation (ONNX semantics: round half
to even, saturation to the type of the zero point) and an ONNX translation for ``torch.onnx.export``:

* ``quantize(x, scale, zero_point, axis)`` -> QuantizeLinear (per tensor, or per ``axis`` with 1-D scales);
* ``dequantize(q, scale, zero_point, axis)`` -> DequantizeLinear (int8, uint8 or int32 codes);
* ``dynamic_quantize(x)`` -> DynamicQuantizeLinear (uint8 codes, scale, zero point from x's range).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["dequantize", "dynamic_quantize", "quantize", "translations"]

_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int32: (-(2**31), 2**31 - 1)}


def _shape(x: torch.Tensor, p: torch.Tensor, axis: int) -> torch.Tensor:
    if p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


@torch.library.custom_op("lowbit_qdq::quantize", mutates_args=())
def _quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    lo, hi = _RANGE[zero_point.dtype]
    q = torch.round(x.to(torch.float32) / _shape(x, scale, axis)) + _shape(x, zero_point, axis).to(torch.float32)
    return q.clamp(lo, hi).to(zero_point.dtype)


@_quantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=zero_point.dtype)


@torch.library.custom_op("lowbit_qdq::dequantize", mutates_args=())
def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    z = _shape(q, zero_point, axis).to(torch.int64)
    return ((q.to(torch.int64) - z).to(torch.float32) * _shape(q, scale, axis)).to(torch.float32)


@_dequantize.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.custom_op("lowbit_qdq::dynamic_quantize", mutates_args=())
def _dynamic_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-lo / safe), 0, 255).to(torch.uint8)
    q = torch.clamp(torch.round(x / safe) + zp.to(torch.float32), 0, 255).to(torch.uint8)
    return q, scale.to(torch.float32), zp


@_dynamic_quantize.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((), dtype=torch.float32), \
        x.new_empty((), dtype=torch.uint8)


quantize = torch.ops.lowbit_qdq.quantize.default
dequantize = torch.ops.lowbit_qdq.dequantize.default
dynamic_quantize = torch.ops.lowbit_qdq.dynamic_quantize.default


def translations() -> dict[Any, Any]:
    """The ``custom_translation_table`` of these ops for ``torch.onnx.export`` (needs onnxscript)."""
    from onnxscript import opset18 as op

    def q_onnx(x: Any, scale: Any, zero_point: Any, axis: int) -> Any:
        return op.QuantizeLinear(x, scale, zero_point, axis=axis)

    def dq_onnx(q: Any, scale: Any, zero_point: Any, axis: int) -> Any:
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    def dyn_onnx(x: Any) -> Any:
        return op.DynamicQuantizeLinear(x)

    return {quantize: q_onnx, dequantize: dq_onnx, dynamic_quantize: dyn_onnx}

