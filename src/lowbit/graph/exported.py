"""Turn a ``torch.export`` ExportedProgram (ATen-level graph) into a module-level GraphModule.

The result uses the same vocabulary as a ``torch.fx.symbolic_trace`` of an ordinary CNN/MLP:
``nn.Conv1d``/``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm1d``/``nn.BatchNorm2d``/``nn.ReLU``/
``nn.ReLU6``/pooling modules, ``operator.add`` and ``torch.flatten(x, 1)``, so that
:func:`lowbit.graph.prepare` can treat both front-ends alike. Submodules are named after the
original model's parameter paths (``features.0``) where the program records them.

The ops listed in :data:`CONVERTIBLE_OPS` become modules (with ``modules=True``); any other op stays an
ATen call when a lowbit file may hold it (:mod:`lowbit.modelfile.aten_ops`: slice, softmax, layer norm,
GELU, matmul between activations, embedding look-ups ...) and is ``NotImplementedError`` naming it
otherwise. Calls of lowbit's own modules captured as leaves (:mod:`lowbit.graph.leaf`) become calls of
those modules.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from lowbit.modelfile.vocab import function_name

from ._names import fresh_path, set_submodule, valid_path
from .leaf import LEAF_OP as _LEAF_OP
from .leaf import decode_call

__all__ = ["convert_exported", "CONVERTIBLE_OPS"]

aten = torch.ops.aten


@dataclass
class _Const:
    """A graph value that is a constant tensor (parameter, buffer, or a transpose of one)."""

    tensor: torch.Tensor
    fqn: str | None


@dataclass
class _Multi:
    """A tuple-returning op of which only output 0 is meaningful (BN stats, pool indices)."""

    first: fx.Node
    what: str


class _Fallback(Exception):
    """A handler's pattern does not apply: the op is kept as it is (a float ATen call)."""


@dataclass
class _LeafOut:
    """The outputs of a lowbit leaf module call: ``paths[i]`` locates the op's output i in the module's result."""

    call: fx.Node
    paths: list[list[Any]]


_PASSTHROUGH = {
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
    aten.contiguous.default,
}
_IGNORED = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten.sym_constrain_range.default,
    aten._assert_async.msg,
}
_VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.flatten.using_ints,
    aten.permute.default,
    aten.t.default,
    aten.transpose.int,
    aten.squeeze.dim,
    aten.unsqueeze.default,
    aten.expand.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.alias.default,
}
_TRAINING_BN = {
    aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit.no_stats,
    aten._native_batch_norm_legit_functional.default,
    aten.native_batch_norm.default,
}


_HANDLERS: dict[Any, str] = {
    aten.conv1d.default: "_conv",
    aten.conv2d.default: "_conv",
    aten.conv1d.padding: "_conv",
    aten.conv2d.padding: "_conv",
    aten.convolution.default: "_conv",
    aten.linear.default: "_linear",
    aten.addmm.default: "_addmm",
    aten.mm.default: "_addmm",
    aten.batch_norm.default: "_bn",
    aten._native_batch_norm_legit_no_training.default: "_bn",
    aten.relu.default: "_relu",
    aten.relu_.default: "_relu",
    aten.relu6.default: "_relu",
    aten.hardtanh.default: "_relu",
    aten.hardtanh_.default: "_relu",
    aten.max_pool2d.default: "_maxpool",
    aten.max_pool2d_with_indices.default: "_maxpool",
    aten.avg_pool2d.default: "_avgpool",
    aten.adaptive_avg_pool2d.default: "_adaptive",
    aten._adaptive_avg_pool2d.default: "_adaptive",
    aten.mean.dim: "_mean",
    aten.add.Tensor: "_add",
    aten.add_.Tensor: "_add",
    aten.view.default: "_view",
    aten._unsafe_view.default: "_view",
    aten.reshape.default: "_view",
    aten.flatten.using_ints: "_flatten",
    aten.t.default: "_transpose",
    aten.permute.default: "_transpose",
    aten.transpose.int: "_transpose",
    aten.dropout.default: "_dropout",
    aten.sym_size.int: "_sym_size",
    operator.getitem: "_getitem",
    **{op: "_passthrough" for op in _PASSTHROUGH},
}


_ALWAYS = {*_PASSTHROUGH, aten.dropout.default, aten.sym_size.int, operator.getitem}


def _tuple(v: Any, n: int) -> tuple:
    if isinstance(v, (list, tuple)):
        v = tuple(int(x) for x in v)
        return v * n if len(v) == 1 else v
    return (int(v),) * n


def _args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an ATen call by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _shape(node: Any) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _dim_eq(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _module_hint(node: fx.Node, cls_names: tuple[str, ...]) -> str | None:
    """The original submodule path of ``node`` when it came from a module of one of ``cls_names``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    if cls_name.rsplit(".", 1)[-1] in cls_names and isinstance(path, str) and valid_path(path):
        return path
    return None


class _Converter:
    def __init__(self, ep: ExportedProgram, modules: bool = True, leaves: dict[str, nn.Module] | None = None) -> None:
        self.ep = ep
        self.modules = modules
        self.leaves = leaves or {}
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[fx.Node, Any] = {}
        self.taken: set[str] = set()
        self.reuse: dict[Any, str] = {}
        self.consts_emitted: dict[int, fx.Node] = {}
        self.leaf_names: set[str] = set()
        self.handlers: dict[Any, Callable[[fx.Node], Any]] = {op: getattr(self, name) for op, name in _HANDLERS.items()}

    # ---- values -------------------------------------------------------------------------------
    def value(self, x: Any) -> Any:
        """The new-graph value for an old-graph argument (constants become ``get_attr`` buffers)."""
        if isinstance(x, fx.Node):
            v = self.env[x]
            if isinstance(v, _Const):
                return self._emit_const(v)
            if isinstance(v, _Multi):
                raise NotImplementedError(f"the tuple output of {v.what} ({x.name}) is used as a whole")
            return v
        if isinstance(x, (list, tuple)):
            return type(x)(self.value(i) for i in x)
        if isinstance(x, dict):
            return {k: self.value(v) for k, v in x.items()}
        return x

    def _generic(self, node: fx.Node) -> fx.Node:
        """The op kept as it is: a call of an allow-listed ATen operation (or Python operator on sizes)."""
        if function_name(node.target) is None:
            raise NotImplementedError(
                f"cannot convert exported op {node.target} (node {node.name!r}): it is not among the operations a "
                "lowbit model may run (lowbit.modelfile.aten_ops lists them)")
        return self.graph.call_function(node.target, self.value(tuple(node.args)), self.value(dict(node.kwargs)))

    def _leaf(self, node: fx.Node) -> _LeafOut:
        """A lowbit inference module captured as one op (lowbit.graph.leaf): a call of that module."""
        path, spec, tensors = node.args
        if path not in self.leaves:
            raise NotImplementedError(f"{node.name}: the graph calls lowbit module {path!r}, which was not given")
        if path not in self.leaf_names:
            set_submodule(self.root, path, self.leaves[path])
            self.leaf_names.add(path)
            self.taken.add(path)
        args, kwargs, paths = decode_call(spec, [self.value(t) for t in tensors])
        return _LeafOut(self.graph.call_module(path, tuple(args), kwargs), paths)

    def const(self, x: Any, node: fx.Node, role: str) -> torch.Tensor | None:
        if x is None:
            return None
        v = self.env.get(x) if isinstance(x, fx.Node) else None
        if not isinstance(v, _Const):
            raise _Fallback(f"{node.name}: the {role} is computed in the graph")
        return v.tensor

    def const_fqn(self, x: Any) -> str | None:
        v = self.env.get(x) if isinstance(x, fx.Node) else None
        return v.fqn if isinstance(v, _Const) else None

    def _emit_const(self, c: _Const) -> fx.Node:
        key = id(c.tensor)
        if key not in self.consts_emitted:
            name = fresh_path(self.root, (c.fqn or "constant").replace(".", "_"), self.taken)
            self.taken.add(name)
            self.root.register_buffer(name, c.tensor.detach().clone())
            self.consts_emitted[key] = self.graph.get_attr(name)
        return self.consts_emitted[key]

    # ---- modules ------------------------------------------------------------------------------
    def add_module(self, node: fx.Node, module: nn.Module, hint: str | None, key: Any, x: Any) -> fx.Node:
        if key is not None and key in self.reuse:
            name = self.reuse[key]
        else:
            name = fresh_path(self.root, hint or node.name, self.taken)
            self.taken.add(name)
            set_submodule(self.root, name, module)
            if key is not None:
                self.reuse[key] = name
        return self.graph.call_module(name, (x,))

    @staticmethod
    def _layer_hint(fqn: str | None) -> str | None:
        if fqn and "." in fqn:
            return fqn.rpartition(".")[0]
        return None

    def _conv(self, node: fx.Node) -> fx.Node:
        a = _args(node)
        if a.get("transposed"):
            raise _Fallback("transposed convolution")
        w = self.const(a["weight"], node, "weight")
        b = self.const(a["bias"], node, "bias")
        assert w is not None
        nd = w.dim() - 2
        if nd not in (1, 2):
            raise _Fallback(f"{nd}-d convolution")
        if nd == 2 and _shape(node.args[0]) is not None and len(_shape(node.args[0]) or ()) != 4:
            raise _Fallback("unbatched convolution")
        out_padding = a.get("output_padding")
        if out_padding is not None and any(int(p) != 0 for p in _tuple(out_padding, nd)):
            raise _Fallback("output_padding")
        groups = int(a["groups"])
        padding = a["padding"]
        padding = padding if isinstance(padding, str) else _tuple(padding, nd)
        cls = nn.Conv2d if nd == 2 else nn.Conv1d
        kw = dict(
            in_channels=w.shape[1] * groups,
            out_channels=w.shape[0],
            kernel_size=tuple(w.shape[2:]),
            stride=_tuple(a["stride"], nd),
            padding=padding,
            dilation=_tuple(a["dilation"], nd),
            groups=groups,
            bias=b is not None,
        )
        mod = torch.nn.utils.skip_init(cls, **kw)
        mod.weight = nn.Parameter(w.detach().clone())
        if b is not None:
            mod.bias = nn.Parameter(b.detach().clone())
        key = ("layer", a["weight"], a["bias"], cls, repr(sorted(kw.items())))
        return self.add_module(node, mod, self._layer_hint(self.const_fqn(a["weight"])), key, self.value(a["input"]))

    def _make_linear(
        self, node: fx.Node, x: Any, w_node: Any, b_node: Any, w: torch.Tensor, b: torch.Tensor | None
    ) -> fx.Node:
        if w.dim() != 2 or (b is not None and tuple(b.shape) != (w.shape[0],)):
            raise _Fallback("not a linear layer")
        mod = torch.nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=b is not None)
        mod.weight = nn.Parameter(w.detach().clone().contiguous())
        if b is not None:
            mod.bias = nn.Parameter(b.detach().clone())
        key = ("layer", w_node, b_node, nn.Linear, tuple(w.shape))
        return self.add_module(node, mod, self._layer_hint(self.const_fqn(w_node)), key, self.value(x))

    def _linear(self, node: fx.Node) -> fx.Node:
        a = _args(node)
        w = self.const(a["weight"], node, "weight")
        assert w is not None
        return self._make_linear(node, a["input"], a["weight"], a["bias"], w, self.const(a["bias"], node, "bias"))

    def _addmm(self, node: fx.Node) -> fx.Node:
        a = _args(node)
        if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
            raise _Fallback("beta/alpha")
        w_t = self.const(a["mat2"], node, "weight")
        assert w_t is not None
        bias_node = a.get("self") if node.target == aten.addmm.default else None
        b = self.const(bias_node, node, "bias")
        # the weight's path is that of the matrix before transposing (kept on the _Const)
        return self._make_linear(node, a["mat1"], a["mat2"], bias_node, w_t.t(), b)

    def _bn(self, node: fx.Node) -> Any:
        a = _args(node)
        if node.target == aten.batch_norm.default and a["training"]:
            raise NotImplementedError(
                f"{node.name}: batch_norm in training mode; export the model in eval mode "
                "(torch.export.export(model.eval(), ...))"
            )
        w = self.const(a["weight"], node, "weight")
        b = self.const(a["bias"], node, "bias")
        mean = self.const(a["running_mean"], node, "running_mean")
        var = self.const(a["running_var"], node, "running_var")
        if mean is None or var is None:
            raise _Fallback("batch_norm without running statistics")
        if (w is None) != (b is None):
            raise _Fallback("batch_norm with one of weight/bias")
        rank = len(_shape(a["input"]) or ())
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}.get(rank)
        if cls is None:
            raise _Fallback(f"batch_norm on a rank-{rank} input")
        mod = cls(mean.numel(), eps=float(a["eps"]), momentum=float(a["momentum"]), affine=w is not None)
        with torch.no_grad():
            if w is not None and b is not None:
                mod.weight.copy_(w)
                mod.bias.copy_(b)
            mod.running_mean.copy_(mean)
            mod.running_var.copy_(var)
        mod.eval()
        src = a["weight"] if a["weight"] is not None else a["running_mean"]
        key = ("bn", a["weight"], a["running_mean"], cls, float(a["eps"]))
        out = self.add_module(node, mod, self._layer_hint(self.const_fqn(src)), key, self.value(a["input"]))
        if node.target == aten._native_batch_norm_legit_no_training.default:
            return _Multi(out, "batch_norm")
        return out

    def _inplace(self, node: fx.Node, arg: Any, new: Any) -> None:
        """After an in-place op, later reads of the mutated value see the new node."""
        if not isinstance(arg, fx.Node):
            return
        if arg.op == "call_function" and arg.target in _VIEWS:
            base = arg.args[0]
            if isinstance(base, fx.Node) and len(base.users) > 1:
                raise NotImplementedError(f"{node.name}: in-place {node.target} on a view is not supported")
        self.env[arg] = new

    def _relu(self, node: fx.Node) -> fx.Node:
        a = _args(node)
        if node.target in (aten.hardtanh.default, aten.hardtanh_.default):
            lo, hi = float(a["min_val"]), float(a["max_val"])
            if (lo, hi) != (0.0, 6.0):
                raise _Fallback(f"hardtanh({lo}, {hi})")
            mod: nn.Module = nn.ReLU6()
        elif node.target == aten.relu6.default:
            mod = nn.ReLU6()
        else:
            mod = nn.ReLU()
        names = ("ReLU6", "Hardtanh") if isinstance(mod, nn.ReLU6) else ("ReLU",)
        hint = _module_hint(node, names)
        out = self.add_module(node, mod, hint, (hint, type(mod)) if hint else None, self.value(a["self"]))
        if node.target in (aten.relu_.default, aten.hardtanh_.default):
            self._inplace(node, a["self"], out)
        return out

    def _maxpool(self, node: fx.Node) -> Any:
        a = _args(node)
        k = _tuple(a["kernel_size"], 2)
        stride = _tuple(a["stride"], 2) if a["stride"] else k
        mod = nn.MaxPool2d(k, stride, _tuple(a["padding"], 2), _tuple(a["dilation"], 2), ceil_mode=bool(a["ceil_mode"]))
        hint = _module_hint(node, ("MaxPool2d",))
        out = self.add_module(node, mod, hint, (hint, repr(mod)) if hint else None, self.value(a["self"]))
        if node.target == aten.max_pool2d_with_indices.default:
            return _Multi(out, "max_pool2d_with_indices")
        return out

    def _avgpool(self, node: fx.Node) -> fx.Node:
        a = _args(node)
        k = _tuple(a["kernel_size"], 2)
        stride = _tuple(a["stride"], 2) if a["stride"] else k
        div = a["divisor_override"]
        mod = nn.AvgPool2d(
            k,
            stride,
            _tuple(a["padding"], 2),
            ceil_mode=bool(a["ceil_mode"]),
            count_include_pad=bool(a["count_include_pad"]),
            divisor_override=int(div) if div is not None else None,
        )
        hint = _module_hint(node, ("AvgPool2d",))
        return self.add_module(node, mod, hint, (hint, repr(mod)) if hint else None, self.value(a["self"]))

    def _adaptive(self, node: fx.Node) -> fx.Node:
        a = _args(node)
        mod = nn.AdaptiveAvgPool2d(_tuple(a["output_size"], 2))
        hint = _module_hint(node, ("AdaptiveAvgPool2d",))
        return self.add_module(node, mod, hint, (hint, repr(mod)) if hint else None, self.value(a["self"]))

    def _mean(self, node: fx.Node) -> fx.Node:
        a = _args(node)
        shape = _shape(a["self"])
        dims = a["dim"]
        if shape is None or len(shape) != 4 or a["dtype"] is not None or not dims:
            raise _Fallback(f"mean over {dims}")
        if {int(d) % 4 for d in dims} != {2, 3}:
            raise _Fallback(f"mean over {dims}")
        pool = self.add_module(node, nn.AdaptiveAvgPool2d((1, 1)), None, None, self.value(a["self"]))
        if a["keepdim"]:
            return pool
        return self.graph.call_function(torch.flatten, (pool, 1))

    def _add(self, node: fx.Node) -> fx.Node:
        a = _args(node)
        if a.get("alpha", 1) != 1:
            raise _Fallback(f"add with alpha={a['alpha']}")
        out = self.graph.call_function(operator.add, (self.value(a["self"]), self.value(a["other"])))
        if node.target == aten.add_.Tensor:
            self._inplace(node, a["self"], out)
        return out

    def _flatten_or_raise(self, node: fx.Node, x: Any) -> fx.Node:
        src, dst = _shape(x), _shape(node)
        if src is not None and dst is not None and len(src) >= 2 and len(dst) == 2 and _dim_eq(src[0], dst[0]):
            rest = src[1:]
            if all(isinstance(d, int) for d in rest) and _dim_eq(dst[1], math.prod(rest)):
                return self.graph.call_function(torch.flatten, (self.value(x), 1))
        raise _Fallback(f"{node.target} from {src} to {dst} is not a flatten")

    def _view(self, node: fx.Node) -> fx.Node:
        x = node.args[0]
        if isinstance(self.env.get(x), _Const):  # reshaping a constant: keep it constant
            c = self.env[x]
            shape = _shape(node)
            if shape is not None and all(isinstance(d, int) for d in shape):
                return _Const(c.tensor.reshape(shape), c.fqn)  # type: ignore[return-value]
        return self._flatten_or_raise(node, x)

    def _flatten(self, node: fx.Node) -> fx.Node:
        a = _args(node)
        rank = len(_shape(a["self"]) or ())
        if rank >= 2 and int(a["start_dim"]) % rank == 1 and int(a["end_dim"]) % rank == rank - 1:
            return self.graph.call_function(torch.flatten, (self.value(a["self"]), 1))
        return self._flatten_or_raise(node, a["self"])

    def _transpose(self, node: fx.Node) -> Any:
        x = node.args[0]
        c = self.env.get(x) if isinstance(x, fx.Node) else None
        if not isinstance(c, _Const):
            raise _Fallback(f"{node.target} of an activation")
        t = c.tensor
        if node.target == aten.t.default:
            t = t.t()
        elif node.target == aten.permute.default:
            t = t.permute(*node.args[1])  # type: ignore[misc]
        else:
            t = t.transpose(int(node.args[1]), int(node.args[2]))  # type: ignore[arg-type]
        return _Const(t, c.fqn)

    def _dropout(self, node: fx.Node) -> Any:
        a = _args(node)
        if a["train"]:
            raise NotImplementedError(f"{node.name}: dropout in training mode; export the model in eval mode")
        return self._passthrough(node)

    def _passthrough(self, node: fx.Node) -> Any:
        x = node.args[0]
        return self.env[x] if isinstance(x, fx.Node) else x

    def _sym_size(self, node: fx.Node) -> fx.Node:
        return self.graph.call_function(aten.sym_size.int, (self.value(node.args[0]), node.args[1]))

    def _getitem(self, node: fx.Node) -> Any:
        src, idx = node.args
        v = self.env.get(src) if isinstance(src, fx.Node) else None
        if isinstance(v, _Multi):
            if idx == 0:
                return v.first
            raise NotImplementedError(f"{node.name}: output {idx} of {v.what} is used; only output 0 is supported")
        if isinstance(v, _LeafOut):
            out = v.call
            for key in v.paths[idx]:
                out = self.graph.call_function(operator.getitem, (out, key))
            return out
        raise _Fallback("getitem of a tuple")

    # ---- driver -------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        ep = self.ep
        sig = ep.graph_signature
        by_name: dict[str, Any] = {}
        for spec in sig.input_specs:
            name = getattr(spec.arg, "name", None)
            if spec.kind == InputKind.USER_INPUT:
                continue
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                target = spec.target
                if target in ep.state_dict:
                    t = ep.state_dict[target]
                elif target in ep.constants:
                    t = ep.constants[target]
                else:
                    raise ValueError(f"exported program has no value for {spec.kind.name.lower()} {target!r}")
                by_name[name] = _Const(t.detach(), target if spec.kind != InputKind.CONSTANT_TENSOR else None)
            else:
                raise NotImplementedError(f"exported program input {name} of kind {spec.kind.name} is not supported")
        for spec in sig.output_specs:
            if spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION):
                raise NotImplementedError(
                    f"the exported program mutates {spec.target!r} (was it exported in training mode? "
                    "export model.eval())"
                )
            if spec.kind not in (OutputKind.USER_OUTPUT, OutputKind.USER_INPUT_MUTATION):
                raise NotImplementedError(f"exported program output of kind {spec.kind.name} is not supported")

        out_node: fx.Node | None = None
        for node in ep.graph.nodes:
            if node.op == "placeholder":
                if node.name in by_name:
                    self.env[node] = by_name[node.name]
                else:
                    new = self.graph.placeholder(node.name)
                    self.env[node] = new
                continue
            if node.op == "output":
                out_node = node
                continue
            if node.op != "call_function":
                raise NotImplementedError(f"{node.name}: exported graph node of kind {node.op} is not supported")
            target = node.target
            if target in _IGNORED:
                continue
            mutable = isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable
            if not node.users and not mutable:
                continue  # dead code left in the program
            if target in _TRAINING_BN:
                raise NotImplementedError(
                    f"{node.name}: {target} is batch norm in training mode; export the model in eval mode "
                    "(torch.export.export(model.eval(), ...))"
                )
            if target == _LEAF_OP:
                self.env[node] = self._leaf(node)
                continue
            handler = self.handlers.get(target) if self.modules or target in _ALWAYS else None
            try:
                if handler is None:
                    raise _Fallback("no handler")
                self.env[node] = handler(node)
            except _Fallback:
                self.env[node] = self._generic(node)

        assert out_node is not None
        flat = list(out_node.args[0])
        user = [
            self.value(v) for v, spec in zip(flat, sig.output_specs, strict=True) if spec.kind == OutputKind.USER_OUTPUT
        ]
        out_spec = ep.call_spec.out_spec
        self.graph.output(_unflatten(iter(user), out_spec) if out_spec else tuple(user))
        gm = fx.GraphModule(self.root, self.graph, class_name="ExportedModel")
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
        return gm.eval()


def _unflatten(leaves: Any, spec: Any) -> Any:
    """The program's output structure with tuples, lists and dicts only (a Hugging Face ModelOutput or any
    other registered container with string keys becomes a dict)."""
    if spec.is_leaf():
        return next(leaves)
    kids = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    children = [_unflatten(leaves, c) for c in kids]
    t, ctx = spec.type, spec.context
    if t in (tuple, list):
        return t(children)
    if isinstance(ctx, (list, tuple)) and len(ctx) == len(children) and all(isinstance(k, str) for k in ctx):
        return dict(zip(ctx, children, strict=True))
    if issubclass(t, tuple):
        return tuple(children)
    raise NotImplementedError(f"the model returns a {t.__name__}; lowbit graphs return tensors in tuples, lists "
                              "and dicts")


def _example_inputs(ep: ExportedProgram) -> list[torch.Tensor] | None:
    sig = ep.graph_signature
    users = {s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT}
    out: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(0)
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in users:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
            return None
        if not all(isinstance(d, int) for d in val.shape):
            return None
        out.append(torch.randn(tuple(val.shape), generator=gen, dtype=val.dtype))
    return out


def _check(ep: ExportedProgram, gm: fx.GraphModule) -> None:
    inputs = _example_inputs(ep)
    if inputs is None:
        return
    try:
        with torch.no_grad():
            ref = ep.module()(*inputs)
    except Exception:  # the program itself rejects random inputs: nothing to compare against
        return
    with torch.no_grad():
        got = gm(*inputs)
    ref_flat, got_flat = pytree.tree_leaves(ref), pytree.tree_leaves(got)
    if len(ref_flat) != len(got_flat):
        raise RuntimeError("converted exported program returns a different number of outputs")
    for r, g in zip(ref_flat, got_flat, strict=True):
        if isinstance(r, torch.Tensor):
            scale = float(r.abs().max()) if r.numel() else 0.0
            if r.shape != g.shape or not torch.allclose(g, r, rtol=1e-4, atol=1e-4 * max(scale, 1e-6)):
                raise RuntimeError(
                    "internal error: the module-level graph converted from the exported program does not "
                    "reproduce its output; please report this model"
                )


def convert_exported(ep: ExportedProgram, *, check: bool = True, modules: bool = True,
                     leaves: dict[str, nn.Module] | None = None) -> fx.GraphModule:
    """Convert an ExportedProgram to a module-level ``torch.fx.GraphModule`` (eval mode).

    The GraphModule takes the program's user inputs positionally and returns its outputs in the same
    structure (containers with string keys, such as a Hugging Face ModelOutput, as dicts). ``modules``:
    conv/linear/batch-norm/ReLU/pooling ops with constant weights become the torch.nn modules the
    quantizers handle; every other op (``modules=False``: every op) stays an ATen call, if it is one a
    lowbit file may hold (else ``NotImplementedError`` naming it). ``leaves``: the lowbit modules a
    captured graph calls (:mod:`lowbit.graph.leaf`), by path. ``check=True`` runs both on random inputs
    (when the input shapes are static and float) and raises ``RuntimeError`` if they disagree.
    """
    gm = _Converter(ep, modules, leaves).run()
    if check:
        _check(ep, gm)
    return gm


#: The ATen ops (plus ``operator.getitem``) the converter understands.
CONVERTIBLE_OPS: frozenset = frozenset(_HANDLERS)
