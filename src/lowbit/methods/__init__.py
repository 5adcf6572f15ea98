"""Quantization methods: one module per method, registered by name.

A new method is one new module that subclasses :class:`Method`, decorates it with ``@register``,
plus its import line below.
"""

from . import adapt, apot, dynamic, float16, full_integer, lsq, lsq_plus, static, w46, weight_only  # noqa: F401  (registration)
from .adapt import AdaptConfig
from .api import available_methods, quantize
from .apot import APoTConfig
from .base import CONFIGS, METHODS, LayerSettings, Method, QuantConfig, TrainingData, get_method, register
from .dynamic import DynamicConfig
from .float16 import Float16Config
from .full_integer import FullIntegerConfig
from .lsq import LSQConfig
from .lsq_plus import LSQPlusConfig
from .qat import QATConfig, QATMethod
from .static import StaticConfig
from .w46 import W4Config, W8Config, W46Config
from .weight_only import WeightOnlyConfig

__all__ = [
    "AdaptConfig",
    "APoTConfig",
    "CONFIGS",
    "LSQConfig",
    "LSQPlusConfig",
    "QATConfig",
    "QATMethod",
    "DynamicConfig",
    "Float16Config",
    "FullIntegerConfig",
    "METHODS",
    "StaticConfig",
    "WeightOnlyConfig",
    "W4Config",
    "W8Config",
    "W46Config",
    "TrainingData",
    "LayerSettings",
    "Method",
    "QuantConfig",
    "available_methods",
    "get_method",
    "quantize",
    "register",
]

# BM networks keep their method in lowbit.bm (with the rest of BM); importing it registers "bm".
from lowbit.bm import method as _bm_method  # noqa: E402, F401
