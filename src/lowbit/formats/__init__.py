"""Number formats a quantized tensor can hold (pure math, no state).

* level sets (:class:`Format`: :class:`IntRange`, :class:`Codebook`, :class:`BinaryFormat`, and the
  2..8-bit :class:`QFormat` of the post-training methods);
* granularity of quantization parameters (:class:`PerTensor`, :class:`PerAxis`, :class:`PerGroup`);
* the quantized-value spec :class:`QSpec` (format, scale, zero point, granularity, layout);
* the affine integer math (quantize, requantize, bias) and sub-byte packing of codes.
"""

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
from .granularity import Granularity, PerAxis, PerGroup, PerTensor, parse_granularity
from .levels import BinaryFormat, Codebook, Format, IntRange, apot_levels, format_from_dict, odd_levels
from .packing import pack_codes, pack_codes_radix, storage_bits, storage_scheme, unpack_codes, unpack_codes_radix
from .qspec import QSpec, as_spec

__all__ = [
    "INT8_WEIGHT",
    "UINT8_ACT",
    "BinaryFormat",
    "Codebook",
    "Format",
    "Granularity",
    "IntRange",
    "PerAxis",
    "PerGroup",
    "PerTensor",
    "QFormat",
    "QSpec",
    "apot_levels",
    "as_spec",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "format_from_dict",
    "odd_levels",
    "pack_codes",
    "pack_codes_radix",
    "parse_granularity",
    "quantize",
    "quantize_bias",
    "quantize_multiplier",
    "qrange",
    "requantize",
    "unpack_codes",
    "unpack_codes_radix",
    "storage_bits",
    "storage_scheme",
]
