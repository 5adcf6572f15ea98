"""lowbit: quantize trained PyTorch networks and run them fast on ordinary CPUs.

Main entry points::

    qmodel = lowbit.quantize(model, "static", calib=calib_tensor)      # or StaticConfig(...) as the method
    qat_model = lowbit.qat.prepare(model, "lsq", calib=calib_tensor)   # train it with any loop, then
    qmodel = lowbit.qat.convert(qat_model)
    lowbit.save(qmodel, "model.lowbit"); qmodel = lowbit.load("model.lowbit")
    result = lowbit.compare(model, calib, eval_fn, methods=["dynamic", "static", "full_integer", "float16"])
    qbert = lowbit.quantize(hf_model, "dynamic", example_input=(ids, mask))  # any nn.Module, no graph needed
    lowbit.export_onnx("model.lowbit", "model.onnx")                     # ONNX QDQ with lowbit's scales
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "compare": "lowbit.compare",
    "CompareResult": "lowbit.compare",
    "load": "lowbit.io",
    "save": "lowbit.io",
    "quantize": "lowbit.methods",
    "available_methods": "lowbit.methods",
    "export_onnx": "lowbit.export",
}

__all__ = ["CompareResult", "__version__", "available_methods", "compare", "export_onnx", "load", "quantize", "save"]


_SUBMODULES = ("qat", "quantizers", "formats", "methods", "nn", "kernels")


def __getattr__(name: str) -> Any:  # PEP 562: import the heavy parts on first use
    if name in _SUBMODULES:
        return importlib.import_module(f"lowbit.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
