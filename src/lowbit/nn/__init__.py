"""Inference modules holding packed integer (or float16) weights; they call lowbit.kernels."""

from .base import MODULES, LowbitModule
from .layers import DynamicQConv, DynamicQLinear, F16Layer, QConv, QLinear
from .ops import CheckInput, Dequantize, IOConvert, QAdd, QAvgPool2d, QClamp, QLookup, QMaxPool2d, Quantize

__all__ = [
    "MODULES",
    "CheckInput",
    "Dequantize",
    "DynamicQConv",
    "DynamicQLinear",
    "F16Layer",
    "IOConvert",
    "LowbitModule",
    "QAdd",
    "QAvgPool2d",
    "QClamp",
    "QMaxPool2d",
    "QConv",
    "QLinear",
    "QLookup",
    "Quantize",
]
