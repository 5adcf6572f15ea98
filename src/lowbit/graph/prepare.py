"""Canonical module-level graph of a float model, ready for the quantizers.

:func:`prepare` traces the model with ``torch.fx``, rewrites the many spellings of the same
computation into one (functional ReLU -> ``nn.ReLU`` module, ``x.view(x.size(0), -1)`` ->
``torch.flatten(x, 1)``, ...), folds BatchNorm into the preceding conv/linear and fuses a following
ReLU/ReLU6 into :class:`~lowbit.graph.modules.Fused`. What remains is either *supported*
(:func:`is_supported`; the quantizers can replace it) or listed in ``Prepared.unsupported`` and left
float.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram
from torch.fx.node import _get_qualified_name
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils import _pytree as pytree

from ._names import fresh_path, set_submodule
from .exported import convert_exported
from .modules import Fused

__all__ = [
    "Prepared",
    "prepare",
    "is_supported",
    "describe",
    "node_module",
    "layer_names",
    "SUPPORTED_MODULES",
    "SUPPORTED_FUNCTIONS",
    "LAYER_MODULES",
]

#: Module types (exact types, not subclasses) the quantizers handle after :func:`prepare`.
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Linear,
    Fused,
    nn.ReLU,
    nn.ReLU6,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)
#: Functions the quantizers handle: ``operator.add(a, b)`` of two tensors, ``torch.flatten(x, 1)``.
SUPPORTED_FUNCTIONS: tuple[Callable[..., Any], ...] = (operator.add, torch.flatten)
#: Module types that carry weights (what per-layer override patterns address).
LAYER_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear, Fused)

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BN_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}


@dataclass
class Prepared:
    """Result of :func:`prepare`.

    gm: the canonical graph (eval mode), numerically equal to the float model.
    unsupported: one ``"node_name: kind target"`` line for every node the quantizers must leave float.
    """

    gm: fx.GraphModule
    unsupported: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# queries
# ---------------------------------------------------------------------------------------------
def _extension_layer(mod: nn.Module | None) -> bool:
    """A layer class from outside torch that declares ``lowbit_layer = True`` (e.g. lowbit.bm's BM layers):
    traced as a leaf, supported, BatchNorm folded by its ``fold_batchnorm(bn)``, a following ReLU/ReLU6
    fused by its ``with_activation(act)`` (when its ``act`` is None)."""
    return bool(getattr(mod, "lowbit_layer", False))


def node_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def _conv_ok(mod: nn.Module) -> bool:
    return not isinstance(mod, (nn.Conv1d, nn.Conv2d)) or mod.padding_mode == "zeros"


def is_supported(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the quantizers can handle ``node`` of a prepared graph.

    Placeholders and the output; ``call_module`` of an exact :data:`SUPPORTED_MODULES` type (convs
    with ``padding_mode="zeros"``, max pools without ``return_indices``); ``operator.add`` of two
    graph values; ``torch.flatten(x, 1)``.
    """
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        mod = node_module(gm, node)
        if _extension_layer(mod) and len(node.args) == 1 and not node.kwargs:
            return True
        if type(mod) not in SUPPORTED_MODULES or len(node.args) != 1 or node.kwargs:
            return False
        if isinstance(mod, Fused):
            return _conv_ok(mod.layer)
        if isinstance(mod, nn.MaxPool2d) and mod.return_indices:
            return False
        return _conv_ok(mod)
    if node.op == "call_function":
        if node.target is operator.add:
            return len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
        if node.target is torch.flatten:
            a = _bind(node, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
            return a is not None and isinstance(a["input"], fx.Node) and a["start_dim"] == 1 and a["end_dim"] == -1
    return False


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """``"node_name: kind target"``, e.g. ``"sigmoid: call_function torch.sigmoid"``."""
    if node.op == "call_module":
        mod = node_module(gm, node)
        return f"{node.name}: call_module {node.target} ({type(mod).__name__})"
    if node.op == "call_function":
        try:
            name = _get_qualified_name(node.target)  # type: ignore[arg-type]
        except Exception:
            name = repr(node.target)
        if name.startswith("_operator."):
            name = name[1:]
        return f"{node.name}: call_function {name}"
    return f"{node.name}: {node.op} {node.target}"


def layer_names(gm: fx.GraphModule) -> list[str]:
    """Submodule names of the Conv1d/Conv2d/Linear/Fused layers, in execution order, each once."""
    out: list[str] = []
    for node in gm.graph.nodes:
        mod = node_module(gm, node)
        if node.op == "call_module" and (type(mod) in LAYER_MODULES or _extension_layer(mod)):
            if node.target not in out:
                out.append(str(node.target))
    return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _bind(node: fx.Node, params: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """Arguments of ``node`` by name (positional first), or None if they do not fit ``params``."""
    if len(node.args) > len(params):
        return None
    out = dict(defaults)
    out.update(zip(params, node.args, strict=False))
    for k, v in node.kwargs.items():
        if k not in params or (k in dict(zip(params, node.args, strict=False))):
            return None
        out[k] = v
    if any(p not in out for p in params):
        return None
    return out


def _tmeta(x: Any) -> TensorMetadata | None:
    if isinstance(x, fx.Node):
        tm = x.meta.get("tensor_meta")
        if isinstance(tm, TensorMetadata):
            return tm
    return None


def _shape(x: Any) -> tuple[int, ...] | None:
    tm = _tmeta(x)
    return tuple(tm.shape) if tm is not None else None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _mod(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return node_module(gm, node)


# ---- recognizers ----------------------------------------------------------------------------
_FN_RELU = {F.relu: ("input", "inplace"), torch.relu: ("input",), torch.relu_: ("input",)}
_INPLACE_FNS = {torch.relu_, F.hardtanh_, torch.clamp_, torch.clip_}


def _relu_kind(node: fx.Node, gm: fx.GraphModule) -> tuple[str, fx.Node, bool] | None:
    """(act, input, inplace) if ``node`` computes relu or relu6 of a graph value."""
    act: str | None = None
    x: Any = None
    inplace = False
    if node.op == "call_module":
        mod = _mod(gm, node)
        if len(node.args) != 1 or node.kwargs:
            return None
        x = node.args[0]
        if type(mod) is nn.ReLU:
            act, inplace = "relu", mod.inplace
        elif type(mod) is nn.ReLU6:
            act, inplace = "relu6", mod.inplace
        elif type(mod) is nn.Hardtanh and (mod.min_val, mod.max_val) == (0.0, 6.0):
            act, inplace = "relu6", mod.inplace
    elif node.op == "call_function":
        t = node.target
        a: dict[str, Any] | None = None
        if t in _FN_RELU:
            a = _bind(node, _FN_RELU[t], {"inplace": False})
            if a is not None:
                act, x, inplace = "relu", a["input"], bool(a.get("inplace")) or t is torch.relu_
        elif t is F.relu6:
            a = _bind(node, ("input", "inplace"), {"inplace": False})
            if a is not None:
                act, x, inplace = "relu6", a["input"], bool(a["inplace"])
        elif t in (F.hardtanh, F.hardtanh_):
            a = _bind(
                node, ("input", "min_val", "max_val", "inplace"), {"min_val": -1.0, "max_val": 1.0, "inplace": False}
            )
            if a is not None and (_num(a["min_val"]), _num(a["max_val"])) == (0.0, 6.0):
                act, x, inplace = "relu6", a["input"], bool(a["inplace"]) or t is F.hardtanh_
        elif t in (torch.clamp, torch.clip, torch.clamp_, torch.clip_):
            a = _bind(node, ("input", "min", "max"), {"min": None, "max": None})
            act, x = _clamp_act(a)
            inplace = t in _INPLACE_FNS
    elif node.op == "call_method":
        t = node.target
        if t in ("relu", "relu_"):
            if len(node.args) == 1 and not node.kwargs:
                act, x, inplace = "relu", node.args[0], t == "relu_"
        elif t in ("clamp", "clip", "clamp_", "clip_"):
            a = _bind(node, ("self", "min", "max"), {"min": None, "max": None})
            if a is not None:
                a["input"] = a["self"]
            act, x = _clamp_act(a)
            inplace = str(t).endswith("_")
    if act is None or _tmeta(x) is None:
        return None
    return act, x, inplace


def _clamp_act(a: dict[str, Any] | None) -> tuple[str | None, Any]:
    if a is None:
        return None, None
    lo, hi = a["min"], a["max"]
    if _num(lo) == 0.0 and hi is None:
        return "relu", a["input"]
    if _num(lo) == 0.0 and _num(hi) == 6.0:
        return "relu6", a["input"]
    return None, None


_DROPOUT_FNS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


def _identity_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input when ``node`` is a no-op at inference (dropout, identity, contiguous, an input check)."""
    x: Any = None
    if node.op == "call_module":
        mod = _mod(gm, node)
        if isinstance(mod, nn.modules.dropout._DropoutNd) and len(node.args) == 1 and not node.kwargs:
            x = node.args[0]
        elif (type(mod) is nn.Identity or type(mod).__name__ == "CheckShape") and node.args:
            x = node.args[0]  # an entry check of a loaded .pt2: lowbit.quantize puts it back after quantizing
    elif node.op == "call_function" and node.target in _DROPOUT_FNS:
        a = _bind(node, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
        if a is not None and a["training"] is False:
            x = a["input"]
    elif node.op == "call_method" and node.target == "contiguous" and len(node.args) == 1 and not node.kwargs:
        x = node.args[0]
    return x if isinstance(x, fx.Node) else None


def _add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """(a, b, inplace) when ``node`` adds two tensors."""
    a: dict[str, Any] | None = None
    inplace = False
    if node.op == "call_function" and node.target in (operator.add, operator.iadd):
        if len(node.args) == 2 and not node.kwargs:
            a = {"input": node.args[0], "other": node.args[1], "alpha": 1}
    elif node.op == "call_function" and node.target is torch.add:
        a = _bind(node, ("input", "other", "alpha"), {"alpha": 1})
    elif node.op == "call_method" and node.target in ("add", "add_"):
        a = _bind(node, ("input", "other", "alpha"), {"alpha": 1})
        inplace = node.target == "add_"
    if a is None or _num(a["alpha"]) != 1.0:
        return None
    if _tmeta(a["input"]) is None or _tmeta(a["other"]) is None:
        return None
    return a["input"], a["other"], inplace


_VIEW_METHODS = {
    "view",
    "reshape",
    "flatten",
    "transpose",
    "permute",
    "squeeze",
    "unsqueeze",
    "expand",
    "narrow",
    "select",
    "t",
    "view_as",
    "unflatten",
    "chunk",
    "split",
    "unbind",
    "__getitem__",
    "detach",
    "as_strided",
}
_VIEW_FUNCTIONS = {
    operator.getitem,
    torch.flatten,
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.squeeze,
    torch.unsqueeze,
    torch.narrow,
    torch.select,
    torch.t,
    torch.chunk,
    torch.split,
    torch.unbind,
    torch.detach,
}


def _is_view(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def _is_batch_size(x: Any, batch: int) -> bool:
    """Whether ``x`` is ``t.size(0)`` / ``t.shape[0]`` / ``t.size()[0]`` of a tensor with that batch."""
    if not isinstance(x, fx.Node):
        return False
    t: Any = None
    if x.op == "call_method" and x.target == "size":
        a = _bind(x, ("self", "dim"), {"dim": None})
        if a is not None and a["dim"] == 0:
            t = a["self"]
    elif x.op == "call_function" and x.target is operator.getitem and x.args[1] == 0:
        s = x.args[0]
        if isinstance(s, fx.Node):
            if s.op == "call_method" and s.target == "size" and len(s.args) == 1 and not s.kwargs:
                t = s.args[0]
            elif s.op == "call_function" and s.target is getattr and s.args[1] == "shape":
                t = s.args[0]
    shape = _shape(t)
    return shape is not None and len(shape) >= 1 and shape[0] == batch


def _flatten_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input when ``node`` is (equivalent to) ``torch.flatten(x, 1)``."""
    x: Any = None
    start: Any = None
    end: Any = None
    if node.op == "call_function" and node.target is torch.flatten:
        a = _bind(node, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
        if a is not None:
            x, start, end = a["input"], a["start_dim"], a["end_dim"]
    elif node.op == "call_method" and node.target == "flatten":
        a = _bind(node, ("self", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
        if a is not None:
            x, start, end = a["self"], a["start_dim"], a["end_dim"]
    elif node.op == "call_module" and type(_mod(gm, node)) is nn.Flatten:
        mod = _mod(gm, node)
        if len(node.args) == 1 and not node.kwargs:
            x, start, end = node.args[0], mod.start_dim, mod.end_dim  # type: ignore[union-attr]
    elif (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target is torch.reshape
    ):
        return _reshape_flatten_input(node)
    shape = _shape(x)
    if shape is None or len(shape) < 2 or not isinstance(start, int) or not isinstance(end, int):
        return None
    if start % len(shape) == 1 and end % len(shape) == len(shape) - 1:
        return x
    return None


def _reshape_flatten_input(node: fx.Node) -> fx.Node | None:
    x = node.args[0] if node.args else None
    rest = list(node.args[1:])
    if node.kwargs:
        if set(node.kwargs) != {"shape"} or rest:
            return None
        rest = [node.kwargs["shape"]]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    src, dst = _shape(x), _shape(node)
    if len(rest) != 2 or src is None or dst is None or len(src) < 2:
        return None
    per_sample = math.prod(src[1:])
    if dst != (src[0], per_sample):
        return None
    d0, d1 = rest
    if d0 == -1 and d1 == per_sample and not isinstance(d1, bool):
        return x  # type: ignore[return-value]
    if _is_batch_size(d0, src[0]) and (d1 == -1 or (d1 == per_sample and not isinstance(d1, bool))):
        return x  # type: ignore[return-value]
    return None


def _mean_hw(node: fx.Node) -> tuple[fx.Node, bool] | None:
    """(input, keepdim) when ``node`` is a mean over H and W of a 4-d tensor."""
    a: dict[str, Any] | None = None
    if node.op == "call_method" and node.target == "mean":
        a = _bind(node, ("input", "dim", "keepdim", "dtype"), {"keepdim": False, "dtype": None})
    elif node.op == "call_function" and node.target is torch.mean:
        a = _bind(node, ("input", "dim", "keepdim", "dtype"), {"keepdim": False, "dtype": None})
    if a is None or a["dtype"] is not None or not isinstance(a["keepdim"], bool):
        return None
    shape = _shape(a["input"])
    dims = a["dim"]
    if shape is None or len(shape) != 4 or not isinstance(dims, (list, tuple)):
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims) or len(dims) != 2:
        return None
    if {d % 4 for d in dims} != {2, 3}:
        return None
    return a["input"], a["keepdim"]


def _consts(vals: Sequence[Any]) -> bool:
    return not any(isinstance(v, fx.Node) for v in pytree.tree_leaves(list(vals)))


def _pool_module(node: fx.Node) -> tuple[fx.Node, nn.Module] | None:
    """(input, module) when ``node`` is a functional 2-d pooling call."""
    if node.op != "call_function":
        return None
    t = node.target
    if t is F.adaptive_avg_pool2d:
        a = _bind(node, ("input", "output_size"), {})
        if a is not None and _consts([a["output_size"]]):
            return a["input"], nn.AdaptiveAvgPool2d(a["output_size"])
    elif t in (F.max_pool2d, torch.max_pool2d):
        a = _bind(
            node,
            ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
            {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False},
        )
        if a is not None and not a["return_indices"] and _consts([v for k, v in a.items() if k != "input"]):
            stride = a["stride"] if a["stride"] not in ((), []) else None
            return a["input"], nn.MaxPool2d(
                a["kernel_size"], stride, a["padding"], a["dilation"], ceil_mode=a["ceil_mode"]
            )
    elif t is F.avg_pool2d:
        a = _bind(
            node,
            ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
            {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None},
        )
        if a is not None and _consts([v for k, v in a.items() if k != "input"]):
            stride = a["stride"] if a["stride"] not in ((), []) else None
            return a["input"], nn.AvgPool2d(
                a["kernel_size"], stride, a["padding"], a["ceil_mode"], a["count_include_pad"], a["divisor_override"]
            )
    return None


# ---- purity (for dead-code elimination) ------------------------------------------------------
_PURE_METHODS = {
    "size",
    "dim",
    "numel",
    "view",
    "reshape",
    "flatten",
    "mean",
    "relu",
    "add",
    "clamp",
    "clip",
    "contiguous",
}
_PURE_FUNCTIONS = {
    operator.getitem,
    getattr,
    operator.add,
    torch.flatten,
    torch.reshape,
    torch.add,
    torch.relu,
    torch.mean,
    torch.clamp,
    torch.clip,
    F.relu,
    F.relu6,
    F.hardtanh,
    F.adaptive_avg_pool2d,
    F.max_pool2d,
    torch.max_pool2d,
    F.avg_pool2d,
    *_DROPOUT_FNS,
}
_PURE_MODULES = (
    *SUPPORTED_MODULES,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Identity,
    nn.Flatten,
    nn.Hardtanh,
    nn.modules.dropout._DropoutNd,
)


def _is_impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    if node.kwargs.get("inplace"):
        return True
    if node.op == "get_attr":
        return False
    if node.op == "call_method":
        return node.target not in _PURE_METHODS
    if node.op == "call_function":
        return node.target not in _PURE_FUNCTIONS
    if node.op == "call_module":
        gm = node.graph.owning_module
        mod = gm.get_submodule(str(node.target)) if gm is not None else None
        return not isinstance(mod, _PURE_MODULES) or bool(getattr(mod, "inplace", False))
    return True


# ---------------------------------------------------------------------------------------------
# passes
# ---------------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Fused) or _extension_layer(m) or super().is_leaf_module(m, module_qualified_name)


def _check_finite(model: nn.Module) -> None:
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t is None or not t.is_floating_point():
                continue
            if torch.isnan(t).any():
                raise ValueError(f"{kind} {name!r} contains NaN")
            if torch.isinf(t).any():
                raise ValueError(f"{kind} {name!r} contains Inf")


def _trace(model: nn.Module, inputs: tuple[Any, ...]) -> fx.GraphModule:
    """The model's graph: torch.fx symbolic tracing, else torch.export (Hugging Face models and other code
    symbolic tracing cannot follow), whose ops without a module form stay ATen calls (float islands)."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        fx_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    else:
        for node in graph.nodes:  # string annotations (PEP 563) would make the module unpicklable
            if isinstance(node.type, str):
                node.type = None
        return fx.GraphModule(model, graph, type(model).__name__)
    from .capture import export_graph

    try:
        return export_graph(model, inputs)
    except Exception as e:
        raise ValueError(
            f"could not trace {type(model).__name__} with torch.fx.symbolic_trace ({fx_error}) nor capture it with "
            f"torch.export ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}). The "
            "model probably has control flow on tensor values (Python if/while on them); methods that need no "
            "graph (dynamic, weight_only, float16) work on it as it is"
        ) from e


def _new_module_node(
    gm: fx.GraphModule, node: fx.Node, module: nn.Module, x: fx.Node, hint: str | None = None
) -> fx.Node:
    name = fresh_path(gm, hint or node.name)
    set_submodule(gm, name, module.eval())
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (x,))
    return new


def _replace(node: fx.Node, new: fx.Node) -> None:
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _functionalize_inplace(gm: fx.GraphModule) -> set[fx.Node]:
    """Rewire readers of values that in-place relu/add nodes mutate; return the nodes left in-place.

    After ``y = relu_(x)``, later readers of ``x`` see the mutated tensor, i.e. ``y``; pointing them
    at ``y`` makes the node safe to replace by its out-of-place form. In-place ops on a view whose
    base is read elsewhere cannot be rewritten this way and are kept as they are.
    """
    keep: set[fx.Node] = set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        kind = _relu_kind(node, gm)
        src: Any = None
        if kind is not None and kind[2]:
            src = kind[1]
        else:
            add = _add_operands(node)
            if add is not None and add[2]:
                src = add[0]
        if not isinstance(src, fx.Node):
            continue
        base = src
        aliased = False
        while _is_view(base):
            parent = base.args[0]
            if isinstance(parent, fx.Node) and any(u is not base for u in parent.users):
                aliased = True
                break
            base = parent
        if aliased:
            keep.add(node)
            continue
        for user in list(src.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(src, node)
    return keep


def _normalize(gm: fx.GraphModule, keep: set[fx.Node]) -> None:
    graph = gm.graph
    keep_targets = {n.target for n in keep if n.op == "call_module"}
    for node in list(graph.nodes):
        if node in keep:
            # an in-place activation on an aliased view stays in-place, as a (float) function call
            kind = _relu_kind(node, gm) if node.op == "call_module" else None
            if kind is not None:
                act, x, _ = kind
                with graph.inserting_before(node):
                    if act == "relu":
                        new = graph.call_function(F.relu, (x,), {"inplace": True})
                    else:
                        new = graph.call_function(F.hardtanh, (x, 0.0, 6.0), {"inplace": True})
                _replace(node, new)
            continue
        # dropout / identity
        x = _identity_input(node, gm)
        if x is not None:
            node.replace_all_uses_with(x)
            graph.erase_node(node)
            continue
        # relu / relu6
        kind = _relu_kind(node, gm)
        if kind is not None:
            act, x, _ = kind
            cls = nn.ReLU if act == "relu" else nn.ReLU6
            if node.op == "call_module":
                mod = _mod(gm, node)
                if type(mod) is cls and not mod.inplace:  # type: ignore[union-attr]
                    continue
                if node.target not in keep_targets:  # every call site is out-of-place now
                    set_submodule(gm, str(node.target), cls())
                    continue
            _replace(node, _new_module_node(gm, node, cls(), x))
            continue
        # add
        add = _add_operands(node)
        if add is not None:
            if node.target is operator.add and node.op == "call_function":
                continue
            with graph.inserting_before(node):
                new = graph.call_function(operator.add, (add[0], add[1]))
            _replace(node, new)
            continue
        # flatten
        x = _flatten_input(node, gm)
        if x is not None:
            if node.op == "call_function" and node.target is torch.flatten and node.args == (x, 1) and not node.kwargs:
                continue
            with graph.inserting_before(node):
                new = graph.call_function(torch.flatten, (x, 1))
            _replace(node, new)
            continue
        # global average pool written as a mean
        mean = _mean_hw(node)
        if mean is not None:
            x, keepdim = mean
            pool = _new_module_node(gm, node, nn.AdaptiveAvgPool2d(1), x)
            if keepdim:
                _replace(node, pool)
            else:
                with graph.inserting_before(node):
                    new = graph.call_function(torch.flatten, (pool, 1))
                _replace(node, new)
            continue
        # functional pooling
        pool_mod = _pool_module(node)
        if pool_mod is not None:
            x, mod = pool_mod
            _replace(node, _new_module_node(gm, node, mod, x))
            continue


def _shared(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s submodule is also reached by other nodes (or its attributes by get_attr)."""
    for other in gm.graph.nodes:
        if other is node:
            continue
        if other.op == "call_module" and other.target == node.target:
            return True
        if other.op == "get_attr" and str(other.target).startswith(f"{node.target}."):
            return True
    return False


def _put_layer(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> None:
    """Make ``node`` call ``module``: in place of its old module, or under a fresh name if shared."""
    target = str(node.target)
    if _shared(gm, node):
        target = fresh_path(gm, target)
    set_submodule(gm, target, module)
    node.target = target


def _fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    w = layer.weight.detach()  # type: ignore[union-attr]
    dtype = w.dtype
    mean = bn.running_mean.detach().double()  # type: ignore[union-attr]
    var = bn.running_var.detach().double()  # type: ignore[union-attr]
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)  # type: ignore
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)  # type: ignore
    scale = gamma / torch.sqrt(var + bn.eps)  # type: ignore[operator]
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)  # type: ignore
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter((w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(dtype))
    new.bias = nn.Parameter(((bias - mean) * scale + beta).to(dtype))
    return new


def _fold_batchnorm(gm: fx.GraphModule) -> None:
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        bn = _mod(gm, bn_node)
        if type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d) or bn.running_mean is None:  # type: ignore
            continue
        prev = bn_node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer = _mod(gm, prev)
        if _extension_layer(layer) and type(bn) is layer.batchnorm_type and layer.act is None:  # type: ignore
            _put_layer(gm, prev, layer.fold_batchnorm(bn))  # type: ignore[union-attr, operator]
            bn_node.replace_all_uses_with(prev)
            gm.graph.erase_node(bn_node)
            continue
        if type(layer) not in _LAYERS or _BN_FOR[type(layer)] is not type(bn):  # type: ignore[index]
            continue
        out_ch = layer.out_channels if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else layer.out_features
        if bn.num_features != out_ch:  # type: ignore[union-attr]
            continue
        _put_layer(gm, prev, _fold_bn(layer, bn))  # type: ignore[arg-type]
        bn_node.replace_all_uses_with(prev)
        gm.graph.erase_node(bn_node)


def _fuse_activations(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.users) != 1:
            continue
        layer = _mod(gm, node)
        ext = _extension_layer(layer) and layer.act is None  # type: ignore[union-attr]
        if type(layer) not in _LAYERS and not ext:
            continue
        act_node = next(iter(node.users))
        if act_node.op != "call_module" or act_node.args != (node,) or act_node.kwargs:
            continue
        act_mod = _mod(gm, act_node)
        if type(act_mod) is nn.ReLU:
            act = "relu"
        elif type(act_mod) is nn.ReLU6:
            act = "relu6"
        else:
            continue
        _put_layer(gm, node, layer.with_activation(act) if ext else Fused(layer, act))  # type: ignore
        act_node.replace_all_uses_with(node)
        gm.graph.erase_node(act_node)


def _close(a: Any, b: Any) -> tuple[bool, float]:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return False, math.inf
    worst = 0.0
    ok = True
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                return False, math.inf
            if not x.is_floating_point():
                ok = ok and bool(torch.equal(x, y))
                continue
            diff = float((x - y).abs().max()) if x.numel() else 0.0
            scale = float(y.abs().max()) if y.numel() else 0.0
            worst = max(worst, diff)
            ok = ok and diff <= 1e-4 * max(scale, 1.0)
    return ok, worst


def prepare(model: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...]) -> Prepared:
    """Trace, normalize, fold BatchNorm and fuse activations; see the module docstring.

    ``model`` is not modified (a deep copy in eval mode is used). ``example_input`` is one input
    batch (a tensor, or a tuple of positional inputs) used to learn shapes and to check that the
    prepared graph reproduces the model. Raises ``ValueError`` for NaN/Inf weights or a model
    torch.fx cannot trace.
    """
    if isinstance(model, ExportedProgram):
        model = convert_exported(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare expects an nn.Module, got {type(model).__name__}")
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)

    def fresh() -> tuple[Any, ...]:  # the model may modify its input in place
        return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)

    model = copy.deepcopy(model).eval()
    _check_finite(model)
    gm = _trace(model, inputs).eval()
    try:
        with torch.no_grad():
            reference = model(*fresh())
            ShapeProp(gm).propagate(*fresh())
    except Exception as e:
        raise ValueError(f"the model fails on the example input: {type(e).__name__}: {e}") from e

    keep = _functionalize_inplace(gm)
    _normalize(gm, keep)
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    _fold_batchnorm(gm)
    _fuse_activations(gm)
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    gm.eval()

    with torch.no_grad():
        got = gm(*fresh())
    ok, worst = _close(got, reference)
    if not ok:
        warnings.warn(
            f"lowbit.graph.prepare: the prepared graph differs from the model on the example input "
            f"(max abs difference {worst:.3g}); the model may rely on in-place aliasing or randomness",
            RuntimeWarning,
            stacklevel=2,
        )
    unsupported = [describe(n, gm) for n in gm.graph.nodes if not is_supported(n, gm)]
    return Prepared(gm=gm, unsupported=unsupported)
