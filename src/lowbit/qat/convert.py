"""``lowbit.qat.convert``: a trained fake-quant model -> an integer model on lowbit's kernels.

Each :class:`~lowbit.qat.modules.QATLayer` becomes an integer layer (:class:`~lowbit.nn.QConv` /
:class:`~lowbit.nn.QLinear`) holding its weight quantizer's codes at their own bit width; every activation
quantizer's :class:`~lowbit.formats.QSpec` becomes the spec of the codes between layers. Because a fake
quantizer outputs exactly its codes' dequantized values, the integer model reproduces the fake-quant model
up to the float rounding of the accumulations.

Partial conversion (``upto=k``): only the first ``k`` layers in execution order become integer; the rest
stay fake-quant (``rest="fake_quant"``, sharing their modules — and so their trainable parameters — with
the fake-quant model, for gradual freezing) or plain float (``rest="float"``, quantizers dropped). The
fake-quant model itself is never modified.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from lowbit.graph._names import fresh_path
from lowbit.graph.attrs import set_preserved
from lowbit.methods.base import QuantConfig, is_layer
from lowbit.methods.integer_graph import LayerQuant, LayerSource, build_integer_graph
from lowbit.quantizers import FakeQuantizer

from .modules import PoolRequant, QATLayer
from .prepare import is_passthrough, qat_info, source_node

__all__ = ["convert", "integer_layer_count"]


class _QATLayers(LayerSource):
    def __init__(self, integer: set[str]) -> None:
        self._integer = integer

    def is_layer(self, module: nn.Module | None) -> bool:
        return isinstance(module, QATLayer) or is_layer(module)

    def integer(self, name: str) -> bool:
        return name in self._integer

    def weights(self, name: str, module: nn.Module) -> LayerQuant:
        if not isinstance(module, QATLayer):
            raise ValueError(f"layer '{name}' has no weight quantizer")
        e = module.export()
        return LayerQuant(module.layer, module.act, e["codes"], e["scale"], e["format"], e["bias"])


def integer_layer_count(model: Any, upto: int | str | None) -> int:
    """How many layers (in execution order) ``upto`` makes integer: all for None, ``k`` for an int, up to
    and including a named layer for a string."""
    info = qat_info(model)
    order = list(info["layers"]) if info else []
    if upto is None:
        return len(order)
    if isinstance(upto, str):
        if upto not in order:
            raise ValueError(f"no quantized layer named {upto!r}; layers: {', '.join(order)}")
        return order.index(upto) + 1
    if isinstance(upto, bool) or not isinstance(upto, int) or not 0 <= upto <= len(order):
        raise ValueError(f"upto must be a layer count in 0..{len(order)} or a layer name, got {upto!r}")
    return upto


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _quantizer(gm: fx.GraphModule, node: fx.Node) -> FakeQuantizer | PoolRequant | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    return mod if isinstance(mod, (FakeQuantizer, PoolRequant)) else None


def _integer_facing(gm: fx.GraphModule, integer: set[str]) -> tuple[set[fx.Node], set[fx.Node]]:
    """(quantizer nodes whose codes the integer part uses, adds that run on codes)."""
    facing: set[fx.Node] = set()
    int_adds: set[fx.Node] = set()
    codes: set[fx.Node] = set()  # nodes whose value exists as codes

    def consumers(node: fx.Node) -> list[fx.Node]:
        out, todo = [], list(node.users)
        while todo:
            u = todo.pop()
            if is_passthrough(gm, u) or _quantizer(gm, u) is not None:
                todo.extend(u.users)
            else:
                out.append(u)
        return out

    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target) in integer:
            codes.add(n)
        elif _quantizer(gm, n) is not None:
            src = source_node(gm, n.args[0])
            feeds_int = any(u.op == "call_module" and str(u.target) in integer for u in consumers(n))
            if src in codes or src in int_adds or feeds_int:
                facing.add(n)
                codes.add(n)
        elif n.op == "call_function" and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args):
            srcs = [source_node(gm, a) for a in n.args]
            if all(s in facing for s in srcs):
                int_adds.add(n)
    return facing, int_adds


def _spec_of(gm: fx.GraphModule, node: fx.Node) -> Any:
    q = _quantizer(gm, node)
    if isinstance(q, PoolRequant):
        return q.source.spec()
    assert q is not None
    return q.spec()


def _floated(gm: fx.GraphModule, integer: set[str], facing: set[fx.Node]) -> fx.GraphModule:
    """A copy of ``gm`` whose non-integer layers are plain float modules and whose quantizers outside the
    integer part are gone (``gm`` and its modules are left untouched)."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    by_name = {n.name: n for n in gm.graph.nodes}
    for n in list(new.graph.nodes):
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, QATLayer) and str(n.target) not in integer:
            name = fresh_path(new, f"float_{str(n.target).replace('.', '_')}")
            new.add_module(name, mod.float_module())
            n.target = name
        elif isinstance(mod, (FakeQuantizer, PoolRequant)) and by_name[n.name] not in facing:
            n.replace_all_uses_with(n.args[0])
            new.graph.erase_node(n)
    new.recompile()
    return new


def convert(model: nn.Module, upto: int | str | None = None, rest: str = "fake_quant") -> fx.GraphModule:
    """The integer model of a fake-quant model made by :func:`lowbit.qat.prepare` (see the module
    docstring). ``upto``: convert only the first ``upto`` layers (a count or a layer name, inclusive);
    ``rest``: ``"fake_quant"`` or ``"float"`` for the layers after them. Returns a GraphModule in eval mode
    whose ``lowbit_meta`` records the method and its configuration; a complete conversion saves with
    ``lowbit.save`` like any lowbit model."""
    gm = _unwrap(model)
    info = qat_info(gm)
    if info is None or not isinstance(gm, fx.GraphModule):
        raise ValueError("lowbit.qat.convert takes a model made by lowbit.qat.prepare (this one was not prepared "
                         "for quantization-aware training)")
    if rest not in ("fake_quant", "float"):
        raise ValueError(f"rest must be 'fake_quant' or 'float', got {rest!r}")
    k = integer_layer_count(gm, upto)
    integer = set(info["layers"][:k])
    for name, m in gm.named_modules():
        if isinstance(m, FakeQuantizer) and not bool(m.initialized) and not m.step.dynamic:
            raise ValueError(f"quantizer '{name}' was never initialized: run data through the model before convert")
    facing, _ = _integer_facing(gm, integer)
    src = _floated(gm, integer, facing) if rest == "float" else gm
    by_name = {n.name: n for n in gm.graph.nodes}
    specs: dict[str, Any] = {}
    for n in src.graph.nodes:
        orig = by_name.get(n.name)
        if orig is not None and orig in facing:
            spec = _spec_of(gm, orig)
            specs[n.name] = spec
            if _quantizer(gm, orig) is not None and not isinstance(_quantizer(gm, orig), PoolRequant):
                specs[orig.args[0].name] = spec  # the node it quantizes (a layer, an add, the input)
    was_training = gm.training
    with torch.no_grad():
        out, meta = build_integer_graph(src, specs, QuantConfig(), layers=_QATLayers(integer))
    gm.train(was_training)
    meta.update(method=info["method"], config=info["config"],
                qat={"integer_layers": k, "layers": len(info["layers"]), "rest": rest if k < len(info["layers"])
                     else None},
                unsupported=list(info.get("unsupported", [])))
    set_preserved(out, "lowbit_meta", meta)
    out.eval()
    return out
