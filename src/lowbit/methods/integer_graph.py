"""Rewrite a prepared float graph into an integer one (static, full-integer and training-aware methods).

Every value in the new graph lives in one of two domains: float32, or codes described by a
:class:`~lowbit.formats.QSpec` (any level set of at most 256 levels, as unsigned 8-bit codes, per-tensor
scale and zero point). Quantizable layers, residual adds, ReLU/ReLU6, pooling and flatten run on codes;
anything else runs in float with Quantize/Dequantize inserted at the borders (static mode), or is an
error (full-integer mode, which must be integer end to end).

What the builder needs from a method: the spec of every value that becomes codes (``act_specs``, by
node name; a layer whose output has no spec writes float32, dequantized exactly from its int32
accumulator) and, through a :class:`LayerSource`, which layers run integer and their integer weights.
Post-training methods use :class:`PTQLayers` (weights quantized by an observer); training-aware methods
supply their quantizers' weights, and choose the integer layers for a partial conversion.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lowbit.formats.affine import INT8_WEIGHT, UINT8_ACT, quantize_bias
from lowbit.formats.levels import Format
from lowbit.formats.qspec import QSpec, as_spec
from lowbit.kernels.packed import PackedWeights
from lowbit.nn import (
    CheckInput,
    Dequantize,
    IOConvert,
    QAdd,
    QAvgPool2d,
    QClamp,
    QConv,
    QLinear,
    QLookup,
    QMaxPool2d,
    Quantize,
)
from lowbit.nn.layers import snap_table

from .base import QuantConfig, is_layer, layer_of
from .common import layer_error, quantize_weight

QParams = tuple[float, int]


class UnsupportedForIntegerError(ValueError):
    """A layer cannot run integer-only (raised in full-integer mode)."""


@dataclass
class LayerQuant:
    """The integer form of one layer: weights (int8 codes of ``weight_format``, or packed), per-channel
    scales, the float bias (quantized by the builder at ``s_in * s_w``), the fused activation, and the
    float layer for its geometry."""

    layer: nn.Module
    act: str | None
    weight: torch.Tensor | PackedWeights
    weight_scale: torch.Tensor
    weight_format: Format | None
    bias: torch.Tensor | None


class LayerSource:
    """Which graph modules are layers, which of them run integer, and their integer weights."""

    def is_layer(self, module: nn.Module | None) -> bool:
        return is_layer(module)

    def integer(self, name: str) -> bool:
        return True

    def weights(self, name: str, module: nn.Module) -> LayerQuant:
        raise NotImplementedError


class PTQLayers(LayerSource):
    """Post-training: every layer not kept float by the config, weights from its weight observer."""

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def integer(self, name: str) -> bool:
        return not self.config.layer(name).keep_float

    def weights(self, name: str, module: nn.Module) -> LayerQuant:
        layer, act = layer_of(module)
        wq, ws = quantize_weight(layer.weight.detach(), self.config.layer(name))
        bias = None if layer.bias is None else layer.bias.detach()
        return LayerQuant(layer, act, wq, ws, INT8_WEIGHT, bias)


def _pool_ok(m: nn.Module) -> bool:
    if isinstance(m, nn.AvgPool2d):
        return not m.ceil_mode and m.count_include_pad and m.divisor_override is None
    return isinstance(m, nn.AdaptiveAvgPool2d)


def _kernel_specs(act_qparams: Mapping[str, QSpec | QParams]) -> dict[str, QSpec]:
    out = {}
    for name, v in act_qparams.items():
        spec = as_spec(v, UINT8_ACT)
        assert spec is not None
        out[name] = spec.unsigned()
    return out


def _integer_layer(lq: LayerQuant, in_spec: QSpec, out_spec: QSpec | None) -> nn.Module:
    layer = lq.layer
    ws = lq.weight_scale.to(torch.float32).reshape(-1)
    bq = None if lq.bias is None else quantize_bias(lq.bias, in_spec.per_tensor_params[0], ws)
    if isinstance(layer, nn.Linear):
        return QLinear(lq.weight, ws, bq, in_spec, out_spec, lq.act, lq.weight_format)
    return QConv(lq.weight, ws, bq, in_spec, out_spec, lq.act, lq.weight_format, stride=layer.stride,
                 padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


def _uint8_params(spec: QSpec, layer: str) -> QParams:
    """(scale, zero point) of a per-tensor uniform uint8 spec (what a layer's own integer form takes)."""
    f = spec.format
    if len(spec.scale) != 1 or not f.uniform or f.qmin != 0 or f.qmax != 255:
        raise ValueError(f"layer '{layer}' runs on per-tensor uniform uint8 codes, not {f} ({spec.granularity})")
    return spec.per_tensor_params


def build_integer_graph(
    gm: fx.GraphModule,
    act_qparams: Mapping[str, QSpec | QParams],
    config: QuantConfig,
    full_integer: bool = False,
    io_dtype: str = "uint8",
    layers: LayerSource | None = None,
) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Returns the integer graph module and a meta dict (input/output formats, layers kept float).

    ``act_qparams``: node name -> spec of its codes (or a legacy uint8 ``(scale, zero_point)``).
    ``layers``: the layers and their weights (default :class:`PTQLayers` of ``config``). A module with
    ``lowbit_fake_quant = True`` (a quantizer of a training-aware model) passes codes through unchanged
    when its input is already codes of its spec, and runs as a float op otherwise.
    """
    src = layers if layers is not None else PTQLayers(config)
    specs = _kernel_specs(act_qparams)
    g = fx.Graph()
    root = nn.Module()
    env: dict[str, tuple[fx.Node, QSpec | None]] = {}
    casts: dict[tuple[str, str], fx.Node] = {}
    meta: dict[str, Any] = {"float_layers": [], "float_ops": []}
    inputs: list[dict[str, Any]] = []
    counter = [0]

    def add_module(base: str, mod: nn.Module) -> str:
        name = base.replace(".", "_") if base else "m"
        while hasattr(root, name):
            counter[0] += 1
            name = f"{base.replace('.', '_')}_{counter[0]}"
        root.add_module(name, mod)
        return name

    refused: list[str] = []

    def refuse(node: fx.Node, why: str) -> None:
        refused.append(f"'{node.name}' ({why})")

    def qp(name: str) -> QSpec:
        if name not in specs:
            raise ValueError(f"no calibration statistics for '{name}' (was it reached by the calibration data?)")
        return specs[name]

    def as_q(arg: Any) -> tuple[fx.Node, QSpec]:
        node, dom = env[arg.name]
        if dom is not None:
            return node, dom
        key = (arg.name, "q")
        if key not in casts:
            casts[key] = g.call_module(add_module(f"quant_{arg.name}", Quantize(qp(arg.name))), (node,))
        return casts[key], qp(arg.name)

    def snapped(node: fx.Node, spec: QSpec, base: str) -> fx.Node:
        table = snap_table(spec.format)
        if table is None:
            return node
        return g.call_module(add_module(f"{base}_snap", QLookup(table)), (node,))

    def as_f(arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return arg
        node, dom = env[arg.name]
        if dom is None:
            return node
        key = (arg.name, "f")
        if key not in casts:
            casts[key] = g.call_module(add_module(f"dequant_{arg.name}", Dequantize(dom)), (node,))
        return casts[key]

    def float_node(node: fx.Node) -> fx.Node:
        args = fx.node.map_arg(node.args, as_f)
        kwargs = fx.node.map_arg(node.kwargs, as_f)
        if node.op == "call_module":
            target = add_module(node.target, gm.get_submodule(node.target))
            return g.create_node("call_module", target, args, kwargs, node.name)
        if node.op == "get_attr":
            val = getattr(gm, node.target) if "." not in node.target else gm.get_parameter(node.target)
            name = add_module(node.target, nn.Module())
            delattr(root, name)
            root.register_buffer(name, val.detach().clone())
            return g.get_attr(name)
        return g.create_node(node.op, node.target, args, kwargs, node.name)

    for node in gm.graph.nodes:
        op = node.op
        mod = gm.get_submodule(node.target) if op == "call_module" else None

        if op == "placeholder":
            ph = g.placeholder(node.name)
            if full_integer and node.name not in specs:
                refuse(node, "input that is not float (token ids?) or that calibration did not reach")
                inputs.append({"dtype": "float32"})
                env[node.name] = (ph, None)
            elif full_integer:
                x = g.call_module(add_module("input_check", CheckInput(io_dtype)), (ph,))
                if io_dtype == "int8":
                    x = g.call_module(add_module("input_to_uint8", IOConvert("uint8")), (x,))
                spec = qp(node.name)
                s, z = spec.per_tensor_params
                inputs.append({"dtype": io_dtype, "scale": s, "zero_point": z - (128 if io_dtype == "int8" else 0)})
                env[node.name] = (x, spec)
            else:
                inputs.append({"dtype": "float32"})
                env[node.name] = (ph, None)

        elif op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                if full_integer:
                    refuse(node, "the model returns several outputs")
                g.output(fx.node.map_arg(out, as_f))
                meta["output"] = {"dtype": "float32"}
                continue
            if full_integer:
                y, ospec = as_q(out)
                s, z = ospec.per_tensor_params
                if io_dtype == "int8":
                    y = g.call_module(add_module("output_to_int8", IOConvert("int8")), (y,))
                meta["output"] = {"dtype": io_dtype, "scale": s, "zero_point": z - (128 if io_dtype == "int8" else 0)}
                g.output(y)
            else:
                g.output(as_f(out))
                meta["output"] = {"dtype": "float32"}

        elif hasattr(mod, "to_integer") and src.integer(node.target):  # a layer with its own integer form (BM)
            x, in_spec = as_q(node.args[0])
            out_spec = qp(node.name)
            imod = mod.to_integer(_uint8_params(in_spec, node.target),  # type: ignore[union-attr, operator]
                                  _uint8_params(out_spec, node.target), node.target)
            env[node.name] = (g.call_module(add_module(node.target, imod), (x,)), out_spec)

        elif mod is not None and getattr(mod, "lowbit_fake_quant", False) and (
                env[node.args[0].name][1] is not None or node.name in specs):
            # a quantizer of a training-aware model: codes of its own spec pass through; a float input
            # enters the integer region here (Quantize gives exactly the quantizer's codes)
            val, dom = env[node.args[0].name]
            if dom is None:
                val, dom = g.call_module(add_module(node.name, Quantize(qp(node.name))), (val,)), qp(node.name)
            env[node.name] = (val, dom)

        elif src.is_layer(mod) and src.integer(node.target):
            x, in_spec = as_q(node.args[0])
            try:
                qmod = _integer_layer(src.weights(node.target, mod), in_spec, specs.get(node.name))
            except ValueError as e:
                raise layer_error(e, node.target) from None
            env[node.name] = (g.call_module(add_module(node.target, qmod), (x,)), specs.get(node.name))

        elif isinstance(mod, (nn.ReLU, nn.ReLU6)) and env[node.args[0].name][1] is not None:
            x, spec = as_q(node.args[0])
            (s, z), top = spec.per_tensor_params, spec.format.qmax
            hi = top if isinstance(mod, nn.ReLU) else min(top, z + round(6.0 / s))
            env[node.name] = (g.call_module(add_module(node.target, QClamp(max(spec.format.qmin, z), hi)), (x,)), spec)

        elif isinstance(mod, nn.MaxPool2d) and not mod.return_indices and env[node.args[0].name][1] is not None:
            x, dom = as_q(node.args[0])
            try:
                qmax = QMaxPool2d(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
            except ValueError as e:
                raise ValueError(f"max-pool '{node.target}': {e}") from None
            env[node.name] = (g.call_module(add_module(node.target, qmax), (x,)), dom)

        elif mod is not None and _pool_ok(mod) and env[node.args[0].name][1] is not None:
            x, spec = as_q(node.args[0])
            z = spec.per_tensor_params[1]
            if isinstance(mod, nn.AdaptiveAvgPool2d):
                qpool = QAvgPool2d(z, output_size=mod.output_size)
            else:
                qpool = QAvgPool2d(z, mod.kernel_size, mod.stride, mod.padding)
            y = g.call_module(add_module(node.target, qpool), (x,))
            env[node.name] = (snapped(y, spec, node.target), spec)

        elif (op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
              and all(isinstance(a, fx.Node) and (env[a.name][1] is not None or a.name in specs)
                      for a in node.args) and not node.kwargs and node.name in specs):
            a, qa = as_q(node.args[0])
            b, qb = as_q(node.args[1])
            out_spec = qp(node.name)
            try:
                qadd = QAdd(qa.per_tensor_params, qb.per_tensor_params, out_spec.per_tensor_params,
                            out_spec.format.qmin, out_spec.format.qmax)
            except ValueError as e:
                raise ValueError(f"residual add '{node.name}': {e}") from None
            y = g.call_module(add_module(node.name, qadd), (a, b))
            env[node.name] = (snapped(y, out_spec, node.name), out_spec)

        elif op == "call_function" and node.target is torch.flatten:
            val, dom = env[node.args[0].name]
            env[node.name] = (g.call_function(torch.flatten, (val, *node.args[1:]), dict(node.kwargs)), dom)

        else:
            why = f"{op} {getattr(node.target, '__name__', node.target)}"
            if src.is_layer(mod):
                if full_integer:
                    refuse(node, "layer kept float by the configuration")
                meta["float_layers"].append(node.target)
            elif op == "get_attr":
                pass  # a constant, not an operation: the op reading it is listed
            elif full_integer:
                refuse(node, f"unsupported operation {type(mod).__name__ if mod is not None else why}")
            else:
                meta["float_ops"].append(f"{node.name}: {type(mod).__name__ if mod is not None else why}")
            env[node.name] = (float_node(node), None)

    if refused:
        shown = ", ".join(refused[:12]) + (f" and {len(refused) - 12} more" if len(refused) > 12 else "")
        raise UnsupportedForIntegerError(
            f"full_integer cannot run {'this node' if len(refused) == 1 else f'these {len(refused)} nodes'} in "
            f"integer arithmetic: {shown}; use the 'static' method (which leaves them float, with quantize/"
            "dequantize around them) or change the model")
    float_io = all(i["dtype"] == "float32" for i in inputs)
    meta["input"] = inputs[0] if len(inputs) == 1 or float_io else inputs
    new = fx.GraphModule(root, g)
    new.graph.eliminate_dead_code()
    new.recompile()
    return new, meta
