"""Quantization methods: one module per method, registered by name.

A new method is one new module that subclasses :class:`Method`, decorates it with ``@register``,
plus its import line below.
"""

from . import (  # noqa: F401  (registration)
    adapt,
    apot,
    binary_ste,
    dynamic,
    float16,
    full_integer,
    lsq,
    lsq_plus,
    static,
    ubq,
    w46,
    weight_only,
)
from .adapt import AdaptConfig
from .api import available_methods, quantize
from .apot import APoTConfig
from .base import CONFIGS, METHODS, LayerSettings, Method, QuantConfig, TrainingData, get_method, register
from .binary import BinaryConfig, BinaryMethod
from .binary_ste import BinarySTEConfig
from .dynamic import DynamicConfig
from .float16 import Float16Config
from .full_integer import FullIntegerConfig
from .lsq import LSQConfig
from .lsq_plus import LSQPlusConfig
from .qat import QATConfig, QATMethod
from .static import StaticConfig
from .ubq import UBQConfig
from .w46 import W4Config, W8Config, W46Config
from .weight_only import WeightOnlyConfig

__all__ = [
    "AdaptConfig",
    "APoTConfig",
    "BinaryConfig",
    "BinaryMethod",
    "BinarySTEConfig",
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
    "UBQConfig",
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
