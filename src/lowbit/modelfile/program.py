"""The graph of a model file as a checked node list, and the module that runs it (no code generation).

:func:`program_from_fx` turns a ``torch.fx.GraphModule`` into :class:`Node` objects (refusing calls
outside :mod:`lowbit.modelfile.vocab`); :func:`parse_nodes` reads them back from a header, checking
every node: operation kind, target from the allow-lists, identifier names, argument types and nesting,
references to earlier nodes only (so no cycles). :class:`LoadedModel` interprets the list node by
node, calling lowbit's modules, allow-listed torch.nn modules, functions and tensor methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .errors import ModelFileError
from .names import check_identifier, check_path
from .values import Ref, decode, encode, has_refs, resolve
from .vocab import ATTRIBUTE_AS_METHOD, FUNCTIONS, METHODS, function_name

MAX_NODES = 200_000
OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")
#: Attribute names of a LoadedModel (and of any nn.Module): no module path atom may take one.
RESERVED = frozenset(dir(nn.Module())) | {"lowbit_meta", "lowbit_nodes", "lowbit_constants", "constants",
                                          "called_modules", "_const", "_free", "_dynamic", "_input_index",
                                          "_n_inputs", "_run", "graph_forward", "_lowbit_executor"}


@dataclass(frozen=True)
class Node:
    """One step: ``op`` on ``target`` with ``args``/``kwargs`` (graph values as :class:`Ref`)."""

    name: str
    op: str
    target: str | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def to_json(self, names: list[str]) -> dict[str, Any]:
        def ref_name(v: Any) -> str | None:
            return names[v.index] if isinstance(v, Ref) else None

        return {"name": self.name, "op": self.op, "target": self.target,
                "args": [encode(a, ref_name) for a in self.args],
                "kwargs": {k: encode(v, ref_name) for k, v in self.kwargs.items()}}


# ---------------------------------------------------------------------------------- from torch.fx

def program_from_fx(gm: fx.GraphModule) -> tuple[list[Node], dict[str, nn.Module], dict[str, torch.Tensor]]:
    """(nodes, called modules by path, constant tensors by get_attr target) of a traced graph."""
    index: dict[fx.Node, int] = {}
    nodes: list[Node] = []
    modules: dict[str, nn.Module] = {}
    constants: dict[str, torch.Tensor] = {}

    def conv(v: Any) -> Any:
        return fx.node.map_arg(v, lambda n: Ref(index[n]))

    for n in gm.graph.nodes:
        where = f"node '{n.name}'"
        check_identifier(n.name, "node name")
        op, target, args, kwargs = n.op, n.target, conv(tuple(n.args)), conv(dict(n.kwargs))
        if op in ("placeholder", "output"):
            target = None
        elif op == "get_attr":
            check_path(target, f"{where}: attribute", RESERVED)
            val = _attr(gm, target)
            if not isinstance(val, torch.Tensor):
                raise ModelFileError(f"cannot save {where}: it reads {target!r}, a {type(val).__name__}, not a tensor")
            constants[target] = val
        elif op == "call_module":
            check_path(target, f"{where}: module", RESERVED)
            modules[target] = gm.get_submodule(target)
        elif op == "call_function":
            if target is getattr and len(args) == 2 and args[1] in ATTRIBUTE_AS_METHOD and not kwargs:
                op, target, args = "call_method", ATTRIBUTE_AS_METHOD[args[1]], (args[0],)
            else:
                name = function_name(target)
                if name is None:
                    raise ModelFileError(f"cannot save {where}: it calls {getattr(target, '__name__', target)!r}, "
                                         "which is not in the functions a lowbit file may call")
                target = name
        elif op == "call_method" and target not in METHODS:
            raise ModelFileError(f"cannot save {where}: tensor method {target!r} is not allowed in a lowbit file")
        index[n] = len(nodes)
        nodes.append(Node(n.name, op, target, args, kwargs))
    return nodes, modules, constants


def _attr(root: nn.Module, path: str) -> Any:
    val: Any = root
    for atom in path.split("."):
        val = getattr(val, atom)
    return val


# ---------------------------------------------------------------------------------- from a header

def parse_nodes(raw: Any, modules: Mapping[str, Any], constants: Mapping[str, Any]) -> list[Node]:
    """Check and decode the header's node list against the file's module paths and constant names."""
    if not isinstance(raw, list) or not raw:
        raise ModelFileError("header 'nodes' must be a non-empty list")
    if len(raw) > MAX_NODES:
        raise ModelFileError(f"header has {len(raw)} nodes, more than {MAX_NODES}")
    refs: dict[str, int] = {}
    nodes: list[Node] = []
    for i, spec in enumerate(raw):
        if not isinstance(spec, dict) or set(spec) != {"name", "op", "target", "args", "kwargs"}:
            raise ModelFileError(f"node {i}: must be an object with keys name, op, target, args, kwargs")
        name = check_identifier(spec["name"], f"node {i} name")
        if name in refs:
            raise ModelFileError(f"node {i}: name {name!r} is used twice")
        node = _parse_node(name, spec, refs, modules, constants, i)
        if node.op == "output" and i != len(raw) - 1:
            raise ModelFileError(f"node '{name}': the output must be the last node")
        refs[name] = i
        nodes.append(node)
    if nodes[-1].op != "output":
        raise ModelFileError("the graph has no output node")
    return nodes


def _parse_node(name: str, spec: dict[str, Any], refs: dict[str, int], modules: Mapping[str, Any],
                constants: Mapping[str, Any], i: int) -> Node:
    where = f"node '{name}'"
    op, target = spec["op"], spec["target"]
    if op not in OPS:
        raise ModelFileError(f"{where}: unknown operation {str(op)[:40]!r}")
    if not isinstance(spec["args"], list) or not isinstance(spec["kwargs"], dict):
        raise ModelFileError(f"{where}: args must be a list and kwargs an object")
    args = tuple(decode(a, refs, where) for a in spec["args"])
    kwargs = decode({"__dict__": spec["kwargs"]}, refs, where)
    if op == "placeholder":
        if target is not None or kwargs or len(args) > 1 or has_refs(args):
            raise ModelFileError(f"{where}: an input takes no target and at most a constant default")
    elif op == "get_attr":
        if not isinstance(target, str) or target not in constants or args or kwargs:
            raise ModelFileError(f"{where}: reads {str(target)[:60]!r}, which is not a tensor of the file")
    elif op == "call_module":
        if not isinstance(target, str) or target not in modules:
            raise ModelFileError(f"{where}: calls module {str(target)[:60]!r}, which the file does not define")
    elif op == "call_function":
        if not isinstance(target, str) or target not in FUNCTIONS:
            raise ModelFileError(f"{where}: function {str(target)[:60]!r} is not allowed in a lowbit file")
    elif op == "call_method":
        if not isinstance(target, str) or target not in METHODS:
            raise ModelFileError(f"{where}: tensor method {str(target)[:60]!r} is not allowed in a lowbit file")
        if not args or not isinstance(args[0], Ref):
            raise ModelFileError(f"{where}: a method call needs a graph value as its first argument")
    elif target is not None or len(args) != 1 or kwargs:  # output
        raise ModelFileError(f"{where}: the output node takes exactly one argument")
    return Node(name, op, target, args, kwargs)


# ---------------------------------------------------------------------------------- the executor

def _last_uses(nodes: list[Node]) -> list[list[int]]:
    """After node i runs, the values in ``free[i]`` are not needed any more."""
    last: dict[int, int] = {}

    def visit(v: Any, i: int) -> None:
        if isinstance(v, Ref):
            last[v.index] = i
        elif isinstance(v, (tuple, list)):
            for x in v:
                visit(x, i)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x, i)
        elif isinstance(v, slice):
            for x in (v.start, v.stop, v.step):
                visit(x, i)

    for i, n in enumerate(nodes):
        visit(n.args, i)
        visit(n.kwargs, i)
    free: list[list[int]] = [[] for _ in nodes]
    for v, i in last.items():
        free[i].append(v)
    return free


class LoadedModel(nn.Module):
    """A model read from a lowbit file: an ``nn.Module`` that runs the file's checked node list.

    Called as ``model(x)`` (or ``model(x, y)`` for several inputs); ``lowbit_meta`` holds the file's
    meta; ``lowbit.save`` writes it again. Submodules sit at their original paths (``model.features[0]``).
    """

    def __init__(self, nodes: list[Node], modules: Mapping[str, nn.Module], constants: Mapping[str, torch.Tensor],
                 meta: dict[str, Any]) -> None:
        super().__init__()
        from lowbit.graph._names import set_submodule

        for path, m in modules.items():
            set_submodule(self, path, m)
        self.lowbit_constants = nn.Module()
        self._const = {}
        for k, (target, t) in enumerate(constants.items()):
            self.lowbit_constants.register_buffer(f"c{k}", t)
            self._const[target] = f"c{k}"
        self.lowbit_nodes = list(nodes)
        self._free = _last_uses(self.lowbit_nodes)
        self._dynamic = [(has_refs(n.args), has_refs(n.kwargs)) for n in self.lowbit_nodes]
        self._input_index = {i: k for k, i in enumerate(i for i, n in enumerate(nodes) if n.op == "placeholder")}
        self._n_inputs = len(self._input_index)
        self.lowbit_meta = meta

    def constants(self) -> dict[str, torch.Tensor]:
        """get_attr target -> tensor (the graph's constants)."""
        return {t: getattr(self.lowbit_constants, b) for t, b in self._const.items()}

    def called_modules(self) -> dict[str, nn.Module]:
        return {n.target: self.get_submodule(n.target) for n in self.lowbit_nodes if n.op == "call_module"}

    def forward(self, *inputs: Any) -> Any:
        ex = self.__dict__.get("_lowbit_executor")  # a native plan per input shape (lowbit.runtime)
        if ex is not None:
            return ex(*inputs)
        return self.graph_forward(*inputs)

    def graph_forward(self, *inputs: Any) -> Any:
        """The node-by-node forward."""
        if len(inputs) > self._n_inputs:
            raise TypeError(f"this model takes {self._n_inputs} input(s), got {len(inputs)}")
        env: list[Any] = [None] * len(self.lowbit_nodes)
        for i, node in enumerate(self.lowbit_nodes):
            env[i] = self._run(i, node, inputs, env)
            if node.op == "output":
                return env[i]
            for j in self._free[i]:
                env[j] = None
        raise RuntimeError("graph without output")  # pragma: no cover - parse_nodes guarantees one

    def _run(self, i: int, node: Node, inputs: tuple[Any, ...], env: list[Any]) -> Any:
        op = node.op
        if op == "placeholder":
            k = self._input_index[i]
            if k < len(inputs):
                return inputs[k]
            if node.args:
                return node.args[0]
            raise TypeError(f"this model takes {self._n_inputs} input(s), got {len(inputs)}")
        if op == "get_attr":
            return getattr(self.lowbit_constants, self._const[node.target])
        dyn_args, dyn_kwargs = self._dynamic[i]
        args = tuple(env[a.index] if type(a) is Ref else resolve(a, env) for a in node.args) if dyn_args \
            else node.args
        if op == "output":
            return args[0]
        kwargs = resolve(node.kwargs, env) if dyn_kwargs else node.kwargs
        if op == "call_module":
            return self.get_submodule(node.target)(*args, **kwargs)
        if op == "call_function":
            return FUNCTIONS[node.target](*args, **kwargs)
        if not isinstance(args[0], torch.Tensor):
            raise TypeError(f"node '{node.name}': .{node.target}() needs a tensor, got {type(args[0]).__name__}")
        return METHODS[node.target](*args, **kwargs)
