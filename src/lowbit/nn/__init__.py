"""Inference modules holding packed integer (or float16) weights, and binary ones passing packed signs;
they call lowbit.kernels."""

from .attention import DynamicQMultiheadAttention
from .base import MODULES, LowbitModule
from .binary import QBinaryConv, QBinaryLinear, QBitMaxPool2d, QSignBits, QUnpackBits
from .bm import QBMConv2d, QBMLinear
from .layers import DynamicQConv, DynamicQLinear, F16Layer, QConv, QLinear
from .ops import CheckInput, Dequantize, IOConvert, QAdd, QAvgPool2d, QClamp, QLookup, QMaxPool2d, Quantize
from .recurrent import DynamicQRNN
from .shape_check import CheckShape
from .weight_only import WeightOnly

__all__ = [
    "MODULES",
    "CheckInput",
    "CheckShape",
    "Dequantize",
    "DynamicQConv",
    "DynamicQLinear",
    "DynamicQMultiheadAttention",
    "DynamicQRNN",
    "F16Layer",
    "IOConvert",
    "LowbitModule",
    "QAdd",
    "QAvgPool2d",
    "QBinaryConv",
    "QBinaryLinear",
    "QBitMaxPool2d",
    "QBMConv2d",
    "QBMLinear",
    "QClamp",
    "QMaxPool2d",
    "QConv",
    "QLinear",
    "QLookup",
    "QSignBits",
    "QUnpackBits",
    "Quantize",
    "WeightOnly",
]

# The float BM layers are LowbitModules too (saved and loaded by lowbit.io): register them.
from lowbit.bm import layers as _bm_layers  # noqa: E402, F401
