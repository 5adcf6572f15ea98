"""Full-integer quantization (TFLite "full integer"): integer-only arithmetic from input to output.

The model takes int8 or uint8 input codes and returns int8 or uint8 output codes; their scale and zero
point are in ``model.lowbit_meta["input"]`` / ``["output"]``. Every operation must have an integer
implementation: a layer without one is an error naming it (use 'static' to leave it float).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .static import Static, StaticConfig


@dataclass
class FullIntegerConfig(StaticConfig):
    io_dtype: str = "uint8"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.io_dtype not in ("uint8", "int8"):
            raise ValueError(f"io_dtype must be 'uint8' or 'int8', got {self.io_dtype!r}")


@register
class FullInteger(Static):
    name = "full_integer"
    order = 30
    summary = "integer-only end to end; int8 or uint8 model input and output"
    config_cls = FullIntegerConfig
    needs_calibration = True
    full_integer = True
