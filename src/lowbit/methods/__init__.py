"""Quantization methods: one module per method, registered by name.

A new method is one new module that subclasses :class:`Method`, decorates it with ``@register``,
plus its import line below.
"""

from . import dynamic, float16, full_integer, static  # noqa: F401  (registration)
from .api import available_methods, quantize
from .base import CONFIGS, METHODS, LayerSettings, Method, QuantConfig, TrainingData, get_method, register
from .dynamic import DynamicConfig
from .float16 import Float16Config
from .full_integer import FullIntegerConfig
from .static import StaticConfig

__all__ = [
    "CONFIGS",
    "DynamicConfig",
    "Float16Config",
    "FullIntegerConfig",
    "METHODS",
    "StaticConfig",
    "TrainingData",
    "LayerSettings",
    "Method",
    "QuantConfig",
    "available_methods",
    "get_method",
    "quantize",
    "register",
]
