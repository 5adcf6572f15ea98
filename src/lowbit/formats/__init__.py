"""Number formats a quantized tensor can hold (pure math, no state)."""

from .affine import (
    INT8_WEIGHT,
    UINT8_ACT,
    QFormat,
    choose_qparams,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
    quantize_bias,
    quantize_multiplier,
    requantize,
)

__all__ = [
    "INT8_WEIGHT",
    "UINT8_ACT",
    "QFormat",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "quantize",
    "quantize_bias",
    "quantize_multiplier",
    "qrange",
    "requantize",
]
