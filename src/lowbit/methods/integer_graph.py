"""Rewrite a prepared float graph into an integer one (static and full-integer post-training modes).

Every value in the new graph lives in one of two domains: float32, or uint8 codes with a per-tensor
(scale, zero point) taken from calibration. Quantizable layers, residual adds, ReLU/ReLU6, pooling and
flatten run on codes; anything else runs in float with Quantize/Dequantize inserted at the borders
(static mode), or is an error (full-integer mode, which must be integer end to end).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from lowbit.formats.affine import quantize_bias
from lowbit.nn import CheckInput, Dequantize, IOConvert, QAdd, QAvgPool2d, QClamp, QConv, QLinear, QMaxPool2d, Quantize

from .base import LayerSettings, QuantConfig, is_layer, layer_of
from .common import quantize_weight

QParams = tuple[float, int]


class UnsupportedForIntegerError(ValueError):
    """A layer cannot run integer-only (raised in full-integer mode)."""


def _pool_ok(m: nn.Module) -> bool:
    if isinstance(m, nn.AvgPool2d):
        return not m.ceil_mode and m.count_include_pad and m.divisor_override is None
    return isinstance(m, nn.AdaptiveAvgPool2d)


def _int8_layer(mod: nn.Module, settings: LayerSettings, q_in: QParams, q_out: QParams) -> nn.Module:
    layer, act = layer_of(mod)
    wq, ws = quantize_weight(layer.weight.detach(), settings)
    bq = None if layer.bias is None else quantize_bias(layer.bias.detach(), q_in[0], ws)
    if isinstance(layer, nn.Linear):
        return QLinear(wq, ws, bq, q_in, q_out, act)
    return QConv(wq, ws, bq, q_in, q_out, act, stride=layer.stride, padding=layer.padding,
                 dilation=layer.dilation, groups=layer.groups)


def build_integer_graph(
    gm: fx.GraphModule,
    act_qparams: dict[str, QParams],
    config: QuantConfig,
    full_integer: bool = False,
    io_dtype: str = "uint8",
) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Returns the integer graph module and a meta dict (input/output formats, layers kept float)."""
    g = fx.Graph()
    root = nn.Module()
    env: dict[str, tuple[fx.Node, QParams | None]] = {}
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

    def qp(name: str) -> QParams:
        if name not in act_qparams:
            raise ValueError(f"no calibration statistics for '{name}' (was it reached by the calibration data?)")
        return act_qparams[name]

    def as_q(arg: Any) -> tuple[fx.Node, QParams]:
        node, dom = env[arg.name]
        if dom is not None:
            return node, dom
        key = (arg.name, "q")
        if key not in casts:
            s, z = qp(arg.name)
            casts[key] = g.call_module(add_module(f"quant_{arg.name}", Quantize(s, z)), (node,))
        return casts[key], qp(arg.name)

    def as_f(arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return arg
        node, dom = env[arg.name]
        if dom is None:
            return node
        key = (arg.name, "f")
        if key not in casts:
            casts[key] = g.call_module(add_module(f"dequant_{arg.name}", Dequantize(*dom)), (node,))
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
            if full_integer and node.name not in act_qparams:
                refuse(node, "input that is not float (token ids?) or that calibration did not reach")
                inputs.append({"dtype": "float32"})
                env[node.name] = (ph, None)
            elif full_integer:
                x = g.call_module(add_module("input_check", CheckInput(io_dtype)), (ph,))
                if io_dtype == "int8":
                    x = g.call_module(add_module("input_to_uint8", IOConvert("uint8")), (x,))
                s, z = qp(node.name)
                inputs.append({"dtype": io_dtype, "scale": s, "zero_point": z - (128 if io_dtype == "int8" else 0)})
                env[node.name] = (x, (s, z))
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
                y, (s, z) = as_q(out)
                if io_dtype == "int8":
                    y = g.call_module(add_module("output_to_int8", IOConvert("int8")), (y,))
                meta["output"] = {"dtype": io_dtype, "scale": s, "zero_point": z - (128 if io_dtype == "int8" else 0)}
                g.output(y)
            else:
                g.output(as_f(out))
                meta["output"] = {"dtype": "float32"}

        elif is_layer(mod) and not config.layer(node.target).keep_float:
            x, q_in = as_q(node.args[0])
            q_out = qp(node.name)
            try:
                qmod = _int8_layer(mod, config.layer(node.target), q_in, q_out)
            except ValueError as e:
                raise ValueError(f"layer '{node.target}': {e}") from None
            env[node.name] = (g.call_module(add_module(node.target, qmod), (x,)), q_out)

        elif isinstance(mod, (nn.ReLU, nn.ReLU6)) and env[node.args[0].name][1] is not None:
            x, (s, z) = as_q(node.args[0])
            hi = 255 if isinstance(mod, nn.ReLU) else min(255, z + round(6.0 / s))
            env[node.name] = (g.call_module(add_module(node.target, QClamp(max(0, z), hi)), (x,)), (s, z))

        elif isinstance(mod, nn.MaxPool2d) and not mod.return_indices:
            x, dom = as_q(node.args[0])
            try:
                qmax = QMaxPool2d(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
            except ValueError as e:
                raise ValueError(f"max-pool '{node.target}': {e}") from None
            env[node.name] = (g.call_module(add_module(node.target, qmax), (x,)), dom)

        elif mod is not None and _pool_ok(mod):
            x, (s, z) = as_q(node.args[0])
            if isinstance(mod, nn.AdaptiveAvgPool2d):
                qpool = QAvgPool2d(z, output_size=mod.output_size)
            else:
                qpool = QAvgPool2d(z, mod.kernel_size, mod.stride, mod.padding)
            env[node.name] = (g.call_module(add_module(node.target, qpool), (x,)), (s, z))

        elif (op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
              and all(isinstance(a, fx.Node) and (env[a.name][1] is not None or a.name in act_qparams)
                      for a in node.args) and not node.kwargs and node.name in act_qparams):
            a, qa = as_q(node.args[0])
            b, qb = as_q(node.args[1])
            out_qp = qp(node.name)
            try:
                qadd = QAdd(qa, qb, out_qp)
            except ValueError as e:
                raise ValueError(f"residual add '{node.name}': {e}") from None
            env[node.name] = (g.call_module(add_module(node.name, qadd), (a, b)), out_qp)

        elif op == "call_function" and node.target is torch.flatten:
            src, dom = env[node.args[0].name]
            env[node.name] = (g.call_function(torch.flatten, (src, *node.args[1:]), dict(node.kwargs)), dom)

        else:
            why = f"{op} {getattr(node.target, '__name__', node.target)}"
            if is_layer(mod):
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
