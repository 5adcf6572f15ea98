"""The closed vocabulary of a model file's graph: the functions and tensor methods a node may call.

A file names a function as ``module:name`` (``torch:flatten``, ``operator:add``,
``torch.nn.functional:relu``) and a tensor method by its name (``view``); anything not listed here is
refused, when saving and when loading. There is no attribute access (``getattr``), no
``operator.attrgetter``/``methodcaller``/``call``, nothing that creates tensors from sizes alone, and
nothing that reads or writes files. ``getattr(x, "shape")`` / ``getattr(x, "ndim")`` in a traced graph
are saved as the equivalent method calls ``x.size()`` / ``x.dim()``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .aten_ops import ATEN_FUNCTIONS, aten_name

_OPERATOR = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "matmul", "getitem",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "invert", "not_",
)
_TORCH = (
    "flatten", "unflatten", "cat", "concat", "stack", "add", "sub", "mul", "div", "true_divide", "matmul", "bmm",
    "mm", "relu", "sigmoid", "tanh", "softmax", "log_softmax", "reshape", "transpose", "permute", "squeeze",
    "unsqueeze", "mean", "sum", "amax", "amin", "max", "min", "clamp", "clip", "exp", "log", "sqrt", "rsqrt",
    "abs", "neg", "pow", "chunk", "split", "erf", "where", "masked_fill", "cumsum", "argmax", "argmin", "narrow",
    "t", "square", "sign", "floor", "ceil", "round", "maximum", "minimum", "sin", "cos", "tril", "triu", "flip",
    "roll", "gather", "index_select", "select", "unbind", "movedim", "swapaxes", "repeat_interleave", "tile",
    "zeros_like", "ones_like", "full_like", "layer_norm", "max_pool2d", "einsum", "baddbmm", "addmm", "norm",
    "std", "var", "logsumexp", "sigmoid_", "relu_", "sym_max", "sym_min", "sym_float", "sym_int", "sym_not",
)
_FUNCTIONAL = (
    "relu", "relu6", "gelu", "silu", "mish", "elu", "selu", "celu", "leaky_relu", "hardtanh", "hardswish",
    "hardsigmoid", "sigmoid", "tanh", "softmax", "log_softmax", "softplus", "softsign", "glu", "logsigmoid",
    "dropout", "dropout1d", "dropout2d", "alpha_dropout", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d", "layer_norm",
    "group_norm", "batch_norm", "instance_norm", "linear", "conv1d", "conv2d", "pad", "interpolate", "normalize",
    "scaled_dot_product_attention", "embedding", "pixel_shuffle", "pixel_unshuffle", "hardshrink", "prelu",
)
#: Tensor methods a ``call_method`` node may name.
METHOD_NAMES = (
    "size", "dim", "numel", "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "flatten",
    "unflatten", "contiguous", "mean", "sum", "amax", "amin", "max", "min", "unsqueeze", "squeeze", "chunk",
    "split", "softmax", "log_softmax", "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "pow", "abs",
    "neg", "add", "sub", "mul", "div", "matmul", "bmm", "expand", "expand_as", "repeat", "float", "to",
    "type_as", "clamp", "clip", "masked_fill", "t", "argmax", "argmin", "narrow", "unbind", "flip", "roll",
    "gather", "index_select", "select", "cumsum", "tril", "triu", "norm", "std", "var", "clone", "detach", "eq",
    "ne", "lt", "gt", "le", "ge", "floor", "ceil", "round", "sign", "square", "erf", "maximum", "minimum",
    "movedim", "swapaxes", "repeat_interleave", "long", "int", "bool", "half", "softplus",
)

_MODULES: dict[str, Any] = {"operator": operator, "torch": torch, "torch.nn.functional": F}
_LISTS = {"operator": _OPERATOR, "torch": _TORCH, "torch.nn.functional": _FUNCTIONAL}


def _functions() -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {}
    for modname, names in _LISTS.items():
        for name in names:
            f = getattr(_MODULES[modname], name, None)
            if callable(f):
                out[f"{modname}:{name}"] = f
    return out


#: ``module:name`` -> the function; the only functions a loaded graph can call (with the ATen operations
#: of :mod:`lowbit.modelfile.aten_ops`, ``aten:name.overload``, for graphs captured by torch.export).
FUNCTIONS: dict[str, Callable[..., Any]] = _functions()
_NAME_OF: dict[int, str] = {}
for _key, _f in FUNCTIONS.items():
    _NAME_OF.setdefault(id(_f), _key)
FUNCTIONS.update(ATEN_FUNCTIONS)

#: method name -> the unbound ``torch.Tensor`` method.
METHODS: dict[str, Callable[..., Any]] = {
    n: getattr(torch.Tensor, n) for n in METHOD_NAMES if callable(getattr(torch.Tensor, n, None))
}

#: ``getattr(tensor, attr)`` nodes saved as method calls with the same result.
ATTRIBUTE_AS_METHOD = {"shape": "size", "ndim": "dim"}


def function_name(f: Any) -> str | None:
    """The file name (``module:name``, ``aten:name.overload``) of an allowed function, else None."""
    if isinstance(f, torch._ops.OpOverload):
        return aten_name(f)
    key = _NAME_OF.get(id(f))
    return key if key is not None and FUNCTIONS[key] is f else None
