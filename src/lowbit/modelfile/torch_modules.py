"""The torch.nn modules a model file may hold (float layers left in a quantized model), by allow-list.

Each allowed class has its constructor arguments with their types. Saving reads the arguments from
the module (and refuses any other class); loading checks them by type, builds the module on the
``meta`` device, checks that its parameters and buffers match the file's tensors exactly (names,
shapes, dtypes) and only then allocates it and copies the tensors in.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.typed import TypeMismatch, convert

from .errors import ModelFileError

Ints = int | tuple[int, ...]
OptInts = int | None | tuple[int | None, ...]


@dataclass(frozen=True)
class Rule:
    """An allowed class: constructor argument -> type hint; ``read`` gives the arguments of an instance
    (default: the attributes of the same names)."""

    cls: type[nn.Module]
    args: dict[str, Any] = field(default_factory=dict)
    read: Callable[[nn.Module], dict[str, Any]] | None = None


def _with(**derived: Callable[[Any], Any]) -> Callable[[nn.Module], dict[str, Any]]:
    """Reader: attributes named like the arguments, except ``derived`` ones computed from the module."""

    def read(m: nn.Module) -> dict[str, Any]:
        rule = RULES[type(m).__name__]
        return {a: derived[a](m) if a in derived else getattr(m, a) for a in rule.args}

    return read


def _has(attr: str) -> Callable[[Any], bool]:
    return lambda m: getattr(m, attr) is not None


def _activation_name(m: nn.TransformerEncoderLayer) -> str:
    act = m.activation
    if act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is F.gelu or isinstance(act, nn.GELU):
        return "gelu"
    raise ModelFileError(f"cannot save a TransformerEncoderLayer with activation {act!r} (only relu or gelu)")


def _encoder_layer_args(m: nn.TransformerEncoderLayer) -> dict[str, Any]:
    return {"d_model": m.self_attn.embed_dim, "nhead": m.self_attn.num_heads,
            "dim_feedforward": m.linear1.out_features, "dropout": m.dropout.p, "activation": _activation_name(m),
            "layer_norm_eps": m.norm1.eps, "batch_first": m.self_attn.batch_first, "norm_first": m.norm_first,
            "bias": m.linear1.bias is not None}


def _encoder_args(m: nn.TransformerEncoder) -> dict[str, Any]:
    norm = m.norm
    if norm is not None and type(norm) is not nn.LayerNorm:
        raise ModelFileError(f"cannot save a TransformerEncoder whose norm is a {type(norm).__name__}")
    first = m.layers[0]
    if type(first) is not nn.TransformerEncoderLayer:
        raise ModelFileError(f"cannot save a TransformerEncoder of {type(first).__name__} layers")
    return {"encoder_layer": _encoder_layer_args(first), "num_layers": len(m.layers),
            "norm": None if norm is None else RULES["LayerNorm"].read(norm),  # type: ignore[misc]
            "enable_nested_tensor": m.enable_nested_tensor, "mask_check": m.mask_check}


_CONV = {"in_channels": int, "out_channels": int, "kernel_size": tuple[int, ...], "stride": tuple[int, ...],
         "padding": tuple[int, ...] | Literal["same", "valid"], "dilation": tuple[int, ...], "groups": int,
         "bias": bool, "padding_mode": Literal["zeros", "reflect", "replicate", "circular"]}
_CONVT = {**_CONV, "output_padding": tuple[int, ...], "padding": tuple[int, ...]}
_BN = {"num_features": int, "eps": float, "momentum": float | None, "affine": bool, "track_running_stats": bool}
_RNN = {"input_size": int, "hidden_size": int, "num_layers": int, "bias": bool, "batch_first": bool,
        "dropout": float, "bidirectional": bool}
_POOL = {"kernel_size": Ints, "stride": Ints | None, "padding": Ints, "dilation": Ints, "return_indices": bool,
         "ceil_mode": bool}
_INPLACE = {"inplace": bool}
_ENCODER_LAYER = {"d_model": int, "nhead": int, "dim_feedforward": int, "dropout": float,
                  "activation": Literal["relu", "gelu"], "layer_norm_eps": float, "batch_first": bool,
                  "norm_first": bool, "bias": bool}

_bias = _with(bias=_has("bias"))
RULES: dict[str, Rule] = {r.cls.__name__: r for r in (
    Rule(nn.Conv1d, _CONV, _bias), Rule(nn.Conv2d, _CONV, _bias),
    Rule(nn.ConvTranspose1d, _CONVT, _bias), Rule(nn.ConvTranspose2d, _CONVT, _bias),
    Rule(nn.Linear, {"in_features": int, "out_features": int, "bias": bool}, _bias),
    Rule(nn.BatchNorm1d, _BN), Rule(nn.BatchNorm2d, _BN),
    Rule(nn.LayerNorm, {"normalized_shape": tuple[int, ...], "eps": float, "elementwise_affine": bool,
                        "bias": bool}, _bias),
    Rule(nn.GroupNorm, {"num_groups": int, "num_channels": int, "eps": float, "affine": bool}),
    Rule(nn.Embedding, {"num_embeddings": int, "embedding_dim": int, "padding_idx": int | None,
                        "max_norm": float | None, "norm_type": float, "scale_grad_by_freq": bool, "sparse": bool}),
    Rule(nn.MultiheadAttention, {"embed_dim": int, "num_heads": int, "dropout": float, "bias": bool,
                                 "add_bias_kv": bool, "add_zero_attn": bool, "kdim": int, "vdim": int,
                                 "batch_first": bool},
         _with(bias=_has("in_proj_bias"), add_bias_kv=_has("bias_k"))),
    Rule(nn.LSTM, {**_RNN, "proj_size": int}), Rule(nn.GRU, _RNN),
    Rule(nn.RNN, {**_RNN, "nonlinearity": Literal["tanh", "relu"]}),
    Rule(nn.TransformerEncoderLayer, _ENCODER_LAYER, _encoder_layer_args),  # type: ignore[arg-type]
    Rule(nn.TransformerEncoder, {"encoder_layer": dict[str, Any], "num_layers": int, "norm": dict[str, Any] | None,
                                 "enable_nested_tensor": bool, "mask_check": bool}, _encoder_args),  # type: ignore[arg-type]
    Rule(nn.Identity), Rule(nn.Flatten, {"start_dim": int, "end_dim": int}),
    Rule(nn.Unflatten, {"dim": int, "unflattened_size": tuple[int, ...]}),
    Rule(nn.ReLU, _INPLACE), Rule(nn.ReLU6, _INPLACE), Rule(nn.SiLU, _INPLACE), Rule(nn.Mish, _INPLACE),
    Rule(nn.Hardswish, _INPLACE), Rule(nn.Hardsigmoid, _INPLACE), Rule(nn.Sigmoid), Rule(nn.Tanh),
    Rule(nn.GELU, {"approximate": Literal["none", "tanh"]}),
    Rule(nn.Hardtanh, {"min_val": float, "max_val": float, "inplace": bool}),
    Rule(nn.LeakyReLU, {"negative_slope": float, "inplace": bool}), Rule(nn.ELU, {"alpha": float, "inplace": bool}),
    Rule(nn.Softplus, {"beta": float, "threshold": float}),
    Rule(nn.Softmax, {"dim": int | None}), Rule(nn.LogSoftmax, {"dim": int | None}),
    Rule(nn.Dropout, {"p": float, "inplace": bool}), Rule(nn.Dropout1d, {"p": float, "inplace": bool}),
    Rule(nn.Dropout2d, {"p": float, "inplace": bool}),
    Rule(nn.MaxPool1d, _POOL), Rule(nn.MaxPool2d, _POOL),
    Rule(nn.AvgPool1d, {"kernel_size": Ints, "stride": Ints | None, "padding": Ints, "ceil_mode": bool,
                        "count_include_pad": bool}),
    Rule(nn.AvgPool2d, {"kernel_size": Ints, "stride": Ints | None, "padding": Ints, "ceil_mode": bool,
                        "count_include_pad": bool, "divisor_override": int | None}),
    Rule(nn.AdaptiveAvgPool1d, {"output_size": OptInts}), Rule(nn.AdaptiveAvgPool2d, {"output_size": OptInts}),
    Rule(nn.AdaptiveMaxPool1d, {"output_size": OptInts, "return_indices": bool}),
    Rule(nn.AdaptiveMaxPool2d, {"output_size": OptInts, "return_indices": bool}),
    Rule(nn.PixelShuffle, {"upscale_factor": int}),
    Rule(nn.Upsample, {"size": OptInts, "scale_factor": float | tuple[float, ...] | None,
                       "mode": Literal["nearest", "linear", "bilinear", "bicubic", "trilinear"],
                       "align_corners": bool | None, "recompute_scale_factor": bool | None}),
    Rule(nn.PReLU, {"num_parameters": int}),
)}


def torch_module_args(name: str, m: nn.Module) -> tuple[str, dict[str, Any]]:
    """(class name, constructor arguments) of an allowed torch.nn module; ModelFileError otherwise."""
    rule = RULES.get(type(m).__name__)
    if rule is None or type(m) is not rule.cls:
        raise ModelFileError(
            f"cannot save module '{name}' of type {type(m).__module__}.{type(m).__qualname__}: not a lowbit module "
            f"and not one of the torch.nn modules a file may hold ({', '.join(sorted(RULES))})"
        )
    args = rule.read(m) if rule.read else {a: getattr(m, a) for a in rule.args}
    return rule.cls.__name__, _checked(rule, args, name)


def _checked(rule: Rule, args: Any, where: str) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise ModelFileError(f"module '{where}': constructor arguments must be an object")
    missing, unknown = set(rule.args) - set(args), set(args) - set(rule.args)
    if missing or unknown:
        raise ModelFileError(f"module '{where}' ({rule.cls.__name__}): missing arguments {sorted(missing)}, "
                             f"unknown arguments {sorted(str(u)[:40] for u in unknown)}")
    out = {}
    for a, hint in rule.args.items():
        try:
            out[a] = convert(args[a], hint)
        except TypeMismatch as e:
            raise ModelFileError(f"module '{where}' ({rule.cls.__name__}) argument {a}: {e}") from None
    return out


def _construct(rule: Rule, args: dict[str, Any], where: str) -> nn.Module:
    if rule.cls is nn.TransformerEncoder:
        layer = _construct(RULES["TransformerEncoderLayer"],
                           _checked(RULES["TransformerEncoderLayer"], args["encoder_layer"], where), where)
        norm = None if args["norm"] is None else _construct(RULES["LayerNorm"],
                                                            _checked(RULES["LayerNorm"], args["norm"], where), where)
        return nn.TransformerEncoder(layer, args["num_layers"], norm, args["enable_nested_tensor"], args["mask_check"])
    return rule.cls(**args)


def skeleton(cls_name: Any, args: Any, where: str) -> nn.Module:
    """An allowed torch.nn module built on the ``meta`` device (no memory) from its class name and
    constructor arguments, both checked: the shapes and names of its tensors, without the tensors."""
    rule = RULES.get(cls_name) if isinstance(cls_name, str) else None
    if rule is None:
        raise ModelFileError(f"module '{where}': torch module type {str(cls_name)[:60]!r} is not allowed in a "
                             "lowbit file")
    args = _checked(rule, args, where)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _construct(rule, args, where)
    except ModelFileError:
        raise
    except Exception as e:  # the constructor's own checks (negative sizes, bad combinations ...)
        raise ModelFileError(f"module '{where}' ({rule.cls.__name__}): {type(e).__name__}: {e}") from None


def build_torch_module(cls_name: Any, args: Any, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """An allowed torch.nn module from its class name, arguments and tensors (all checked)."""
    m = skeleton(cls_name, args, where)
    rule = RULES[cls_name]
    want = m.state_dict()
    persistent = set(want)
    if any(k not in persistent for k, _ in m.named_buffers()):  # pragma: no cover - no allowed class has one
        raise ModelFileError(f"module '{where}' ({rule.cls.__name__}) has non-persistent buffers")
    if set(tensors) != set(want):
        raise ModelFileError(f"module '{where}' ({rule.cls.__name__}): tensors {sorted(tensors)[:6]} in the file, "
                             f"the module has {sorted(want)[:6]}")
    for k, t in want.items():
        if tensors[k].shape != t.shape or tensors[k].dtype != t.dtype:
            raise ModelFileError(f"module '{where}' tensor {k}: {tensors[k].dtype} {tuple(tensors[k].shape)} in the "
                                 f"file, the module needs {t.dtype} {tuple(t.shape)}")
        if t.is_floating_point() and not torch.isfinite(tensors[k]).all():
            raise ModelFileError(f"module '{where}' tensor {k} holds NaN or Inf")
    m = m.to_empty(device="cpu")
    m.load_state_dict(tensors, strict=True)
    return m.eval()
