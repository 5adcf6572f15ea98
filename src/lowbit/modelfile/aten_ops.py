"""The ATen operations a model file's graph may call (graphs captured with ``torch.export``).

A file names one as ``aten:NAME.OVERLOAD`` (``aten:layer_norm.default``). Allowed: the functional
(non-mutating, non-``out``) overloads of the operator packets listed here — arithmetic, activations,
reductions, shape and indexing ops, normalization, attention, pooling, recurrent layers. Not allowed:
anything that mutates its arguments, reads or writes files, draws random numbers, returns
uninitialized memory (``empty``) or reinterprets storage (``as_strided``, ``set_``). The ops that create a
tensor from sizes alone (``arange``, ``zeros``, ``full`` ...) are wrapped: a call asking for more than
:data:`MAX_CREATED` elements is an error, so a file cannot make the loader allocate without bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ATEN_FUNCTIONS", "MAX_CREATED", "aten_name"]

MAX_CREATED = 1 << 28

_PACKETS = (
    # arithmetic and elementwise math
    "abs", "neg", "add", "sub", "rsub", "mul", "div", "remainder", "fmod", "floor_divide", "pow", "exp", "exp2",
    "expm1", "log", "log2", "log1p", "sqrt", "rsqrt", "reciprocal", "square", "sign", "floor", "ceil", "round",
    "trunc", "frac", "sin", "cos", "tan", "atan", "tanh", "sigmoid", "erf", "erfc", "clamp", "clamp_min",
    "clamp_max", "clip", "where", "minimum", "maximum", "lerp", "addcmul", "addcdiv", "isnan", "isinf",
    "isfinite", "nan_to_num", "logical_not", "logical_and", "logical_or", "logical_xor", "bitwise_not",
    "bitwise_and", "bitwise_or", "bitwise_xor", "__and__", "__or__", "__xor__", "__invert__", "eq", "ne", "lt",
    "le", "gt", "ge", "masked_fill", "tril", "triu", "cumsum", "cumprod",
    # activations
    "relu", "relu6", "gelu", "silu", "mish", "elu", "selu", "celu", "leaky_relu", "hardtanh", "hardswish",
    "hardsigmoid", "softplus", "glu", "prelu", "_prelu_kernel", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "logsumexp",
    # reductions
    "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "var", "std", "var_mean", "std_mean", "norm",
    "linalg_vector_norm", "prod", "all", "any",
    # shapes, views, indexing
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "squeeze", "unsqueeze", "expand", "expand_as",
    "flatten", "unflatten", "slice", "select", "narrow", "split", "split_with_sizes", "chunk", "unbind", "cat",
    "stack", "contiguous", "clone", "alias", "detach", "lift_fresh_copy", "repeat", "repeat_interleave", "flip",
    "roll", "movedim", "index", "index_select", "gather", "scatter", "scatter_add", "index_put", "embedding",
    "constant_pad_nd", "pad", "_to_copy", "to", "type_as", "zeros_like", "ones_like", "full_like",
    "sym_size", "sym_numel", "_local_scalar_dense", "item", "copy", "fill",
    # tensors from sizes (bounded, see MAX_CREATED)
    "arange", "zeros", "ones", "full", "new_zeros", "new_ones", "new_full", "scalar_tensor",
    # layers
    "linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "einsum", "conv1d", "conv2d", "convolution",
    "batch_norm", "_native_batch_norm_legit_no_training", "layer_norm", "native_layer_norm", "group_norm",
    "native_group_norm", "scaled_dot_product_attention", "dropout", "native_dropout", "max_pool1d", "max_pool2d",
    "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "_adaptive_avg_pool2d", "adaptive_max_pool2d", "upsample_nearest2d", "upsample_bilinear2d", "pixel_shuffle",
    "lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell",
)
_CREATING = frozenset({"arange", "zeros", "ones", "full", "new_zeros", "new_ones", "new_full"})


def _plain(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _created(packet: str, args: tuple[Any, ...]) -> int | None:
    """Elements a creating call asks for (None: sizes not plain numbers, e.g. symbolic while tracing)."""
    if packet == "arange":
        nums = list(args[:3])
        if not nums or not all(_plain(a) for a in nums):
            return None
        start, end, step = (0, nums[0], 1) if len(nums) == 1 else (nums[0], nums[1], nums[2] if len(nums) > 2 else 1)
        return max(0, math.ceil((end - start) / step)) if step else 0
    size = args[1] if packet.startswith("new_") and len(args) > 1 else (args[0] if args else None)
    dims = list(size) if isinstance(size, (list, tuple)) else [size]
    if not all(_plain(d) for d in dims):
        return None
    return math.prod(int(d) for d in dims)


def _bounded(op: Any, packet: str) -> Callable[..., Any]:
    """``op`` refusing to create more than MAX_CREATED elements."""

    def call(*args: Any, **kwargs: Any) -> Any:
        n = _created(packet, args)
        if n is not None and n > MAX_CREATED:
            raise ValueError(f"aten.{packet} would create {n} elements (more than {MAX_CREATED})")
        return op(*args, **kwargs)

    return call


def _allowed(overload: Any) -> bool:
    schema = overload._schema
    return not schema.is_mutable and "out" not in schema.overload_name.split("_") and not any(
        a.is_out for a in schema.arguments)


def _build() -> tuple[dict[str, Callable[..., Any]], dict[int, str]]:
    funcs: dict[str, Callable[..., Any]] = {}
    names: dict[int, str] = {}
    for packet_name in _PACKETS:
        packet = getattr(torch.ops.aten, packet_name, None)
        if packet is None:
            continue
        for ov in packet.overloads():
            op = getattr(packet, ov)
            if not _allowed(op):
                continue
            key = f"aten:{packet_name}.{ov}"
            funcs[key] = _bounded(op, packet_name) if packet_name in _CREATING else op
            names[id(op)] = key
    return funcs, names


#: ``aten:NAME.OVERLOAD`` -> the callable a loaded graph runs for it.
ATEN_FUNCTIONS, _NAME_OF = _build()


def aten_name(op: Any) -> str | None:
    """The file name of an allowed ATen overload, else None."""
    return _NAME_OF.get(id(op)) if isinstance(op, torch._ops.OpOverload) else None
