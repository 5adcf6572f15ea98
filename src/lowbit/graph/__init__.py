"""Graph front-end: load a float model and turn it into the canonical graph the quantizers use.

* :func:`load_model` resolves a ``.pt2`` ``torch.export`` archive or a ``package.module:function``
  factory (plus an optional state_dict file) to an ``nn.Module``.
* :func:`prepare` traces a model into a module-level ``torch.fx.GraphModule`` with BatchNorm folded,
  ReLU/ReLU6 fused into :class:`Fused`, and a list of the nodes that stay float.
"""

from .exported import CONVERTIBLE_OPS, convert_exported
from .load import ModelLoadError, load_model, load_state_dict_file
from .modules import Fused
from .prepare import (
    LAYER_MODULES,
    SUPPORTED_FUNCTIONS,
    SUPPORTED_MODULES,
    Prepared,
    describe,
    is_supported,
    layer_names,
    node_module,
    prepare,
)

__all__ = [
    "load_model",
    "load_state_dict_file",
    "ModelLoadError",
    "convert_exported",
    "CONVERTIBLE_OPS",
    "prepare",
    "Prepared",
    "Fused",
    "is_supported",
    "describe",
    "node_module",
    "layer_names",
    "SUPPORTED_MODULES",
    "SUPPORTED_FUNCTIONS",
    "LAYER_MODULES",
]
