"""Quantization methods: one module per method, registered by name.

A new method is one new module that subclasses :class:`Method`, decorates it with ``@register``,
plus its import line below.
"""

from . import dynamic, float16, full_integer, static, weight_only  # noqa: F401  (registration)
from .api import available_methods, quantize
from .base import METHODS, LayerSettings, Method, QuantConfig, get_method, register

__all__ = [
    "METHODS",
    "LayerSettings",
    "Method",
    "QuantConfig",
    "available_methods",
    "get_method",
    "quantize",
    "register",
]
