"""Bipolar morphological (BM) networks (methods.md §4; docs/methods.md "BM networks").

A BM neuron replaces the multiply-accumulate by additions and maxima in the log domain::

    y = exp(max_j(ln x+_j + v+_j)) - exp(max_j(ln x+_j + v-_j))
      - exp(max_j(ln x-_j + v+_j)) + exp(max_j(ln x-_j + v-_j)) + b

- :class:`BMLinear`, :class:`BMConv2d`: trainable BM layers (gradient through max: hard, or a soft
  max with an annealed temperature; :mod:`lowbit.bm.functional`);
- :func:`convert`: conv/linear layers of a trained float model -> BM layers (``v± = ln max(±W, eps)``);
- :func:`train_layerwise`: the authors' recipe (convert layer i, train, move on; then fine-tune);
- :func:`quantize_bm`: the integer BM model (lowbit's fixed-point log-domain scheme,
  :mod:`lowbit.bm.integer`) run by the native max-plus kernels through ``lowbit.nn.QBMLinear`` /
  ``QBMConv2d``;
- ``lowbit bm MODEL --data mnist`` on the command line.
"""

from __future__ import annotations

import importlib
from typing import Any

from .convert import bm_layers, convert, convertible_layers, execution_order, layer_outputs, set_options
from .layers import BMConv2d, BMLayer, BMLinear

_LAZY = {
    "train_layerwise": "lowbit.bm.training",
    "BMTrainConfig": "lowbit.bm.training",
    "quantize_bm": "lowbit.bm.training",
    "integer_layer": "lowbit.bm.integer",
    "integer_params": "lowbit.bm.integer",
    "BMIntegerError": "lowbit.bm.integer",
}

__all__ = [
    "BMConv2d",
    "BMIntegerError",
    "BMLayer",
    "BMLinear",
    "BMTrainConfig",
    "bm_layers",
    "convert",
    "convertible_layers",
    "execution_order",
    "integer_layer",
    "integer_params",
    "layer_outputs",
    "quantize_bm",
    "set_options",
    "train_layerwise",
]


def __getattr__(name: str) -> Any:  # PEP 562: the training / integer parts load on first use
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowbit.bm' has no attribute {name!r}")
