"""One-file model format: safetensors tensors plus a JSON header describing the graph.

The header (safetensors metadata key ``lowbit``) holds the format version, the method and its
configuration, input/output formats, and the graph: every node (op, target, arguments) and every
module as (type, JSON attributes). Tensors are stored as ``<module>::<name>``. Loading rebuilds the
``torch.fx.GraphModule`` without the original model's code, so the file size is the real deployable
size. Writes go to a temporary file in the same folder, then rename: a crash never leaves half a file.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx, nn

import lowbit
from lowbit.nn import MODULES, LowbitModule

FORMAT_VERSION = 1
_META_KEY = "lowbit"
_FUNCTION_MODULES = ("operator", "_operator", "torch", "torch.nn.functional", "math")
_PARAM_FREE_OK = ("torch.nn.modules",)


class ModelFileError(ValueError):
    """The file is not a lowbit model this version can read."""


# ---------------------------------------------------------------- modules

def _module_spec(name: str, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from lowbit.graph import Fused

    if isinstance(m, LowbitModule):
        attrs, tensors = m.to_spec()
        return {"type": type(m).__name__, "attrs": attrs}, tensors
    if isinstance(m, Fused):
        inner, tensors = _module_spec(name, m.layer)
        return {"type": "Fused", "act": m.act, "layer": inner}, tensors
    t = type(m)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        attrs = {k: getattr(m, k) for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                                             "dilation", "groups", "padding_mode")}
        attrs["bias"] = m.bias is not None
    elif isinstance(m, nn.Linear):
        attrs = {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        attrs = {k: getattr(m, k) for k in ("num_features", "eps", "momentum", "affine", "track_running_stats")}
    elif t.__module__.startswith(_PARAM_FREE_OK) and not list(m.parameters()) and not list(m.buffers()):
        attrs = {k: getattr(m, k) for k in getattr(t, "__constants__", []) if hasattr(m, k)}
    else:
        raise ModelFileError(f"cannot save module '{name}' of type {t.__module__}.{t.__name__}")
    tensors = {k: v for k, v in m.state_dict().items() if v is not None}
    return {"type": "torch", "class": f"{t.__module__}.{t.__qualname__}", "attrs": attrs}, tensors


def _module_from_spec(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    from lowbit.graph import Fused

    typ = spec["type"]
    if typ == "Fused":
        return Fused(_module_from_spec(spec["layer"], tensors), spec["act"])
    if typ == "torch":
        modname, _, clsname = spec["class"].rpartition(".")
        if not modname.startswith(_PARAM_FREE_OK):
            raise ModelFileError(f"refusing to load module class {spec['class']}")
        cls = getattr(importlib.import_module(modname), clsname)
        attrs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["attrs"].items()}
        m = cls(**attrs)
        if tensors:
            m.load_state_dict(tensors, strict=True)
        return m
    if typ not in MODULES:
        raise ModelFileError(f"unknown module type {typ!r} (written by a newer lowbit?)")
    return MODULES[typ].from_spec(spec["attrs"], tensors)


# ---------------------------------------------------------------- graph arguments

def _enc(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return {"__node__": v.name}
    if isinstance(v, tuple):
        return {"__tuple__": [_enc(x) for x in v]}
    if isinstance(v, list):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {"__dict__": {k: _enc(x) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"__slice__": [_enc(v.start), _enc(v.stop), _enc(v.step)]}
    if isinstance(v, torch.dtype):
        return {"__dtype__": str(v).removeprefix("torch.")}
    if v is Ellipsis:
        return {"__ellipsis__": True}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ModelFileError(f"cannot save graph argument of type {type(v).__name__}")


def _dec(v: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(v, list):
        return [_dec(x, nodes) for x in v]
    if isinstance(v, dict):
        if "__node__" in v:
            return nodes[v["__node__"]]
        if "__tuple__" in v:
            return tuple(_dec(x, nodes) for x in v["__tuple__"])
        if "__dict__" in v:
            return {k: _dec(x, nodes) for k, x in v["__dict__"].items()}
        if "__slice__" in v:
            return slice(*(_dec(x, nodes) for x in v["__slice__"]))
        if "__dtype__" in v:
            return getattr(torch, v["__dtype__"])
        if "__ellipsis__" in v:
            return Ellipsis
    return v


def _fn_name(f: Any) -> str:
    mod = getattr(f, "__module__", None) or ""
    name = getattr(f, "__name__", None)
    if mod == "torch._C._VariableFunctions" or mod.startswith("torch._C"):
        mod = "torch"
    for cand in (mod, "torch", "torch.nn.functional", "operator"):
        if cand in _FUNCTION_MODULES and name and getattr(importlib.import_module(cand), name, None) is f:
            return f"{cand}:{name}"
    raise ModelFileError(f"cannot save a call to {f!r}: only torch, torch.nn.functional and operator functions")


def _fn_from_name(s: str) -> Any:
    mod, _, name = s.partition(":")
    if mod not in _FUNCTION_MODULES:
        raise ModelFileError(f"refusing to load a call to {s}")
    return getattr(importlib.import_module(mod), name)


# ---------------------------------------------------------------- save / load

def _graph_spec(gm: fx.GraphModule) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, torch.Tensor]]:
    nodes, modules, tensors = [], {}, {}
    for n in gm.graph.nodes:
        target: Any = n.target
        if n.op == "call_function":
            target = _fn_name(n.target)
        elif n.op == "call_module" and n.target not in modules:
            spec, ts = _module_spec(n.target, gm.get_submodule(n.target))
            modules[n.target] = spec
            tensors.update({f"{n.target}::{k}": v for k, v in ts.items()})
        elif n.op == "get_attr":
            val: Any = gm
            for part in n.target.split("."):
                val = getattr(val, part)
            tensors[f"::{n.target}"] = val
        nodes.append({"name": n.name, "op": n.op, "target": target,
                      "args": _enc(n.args), "kwargs": _enc(dict(n.kwargs))})
    return nodes, modules, tensors


def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write a model made by lowbit (any method, or the prepared float model) to one file."""
    if not isinstance(model, fx.GraphModule):
        raise TypeError("lowbit.save takes a model returned by lowbit.quantize (a torch.fx GraphModule)")
    nodes, modules, tensors = _graph_spec(model)
    header = {
        "format_version": FORMAT_VERSION,
        "lowbit_version": lowbit.__version__,
        "meta": getattr(model, "lowbit_meta", {}),
        "modules": modules,
        "nodes": nodes,
    }
    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(header, default=_json_default)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a lowbit file (format version, method, meta), checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types on bad headers
        raise ModelFileError(f"{path} is not a valid lowbit model file (corrupt or truncated): {e}") from None
    if _META_KEY not in meta:
        raise ModelFileError(f"{path} is a safetensors file but not a lowbit model (no '{_META_KEY}' header)")
    try:
        header = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: corrupt lowbit header: {e}") from None
    version = header.get("format_version")
    if not isinstance(version, int):
        raise ModelFileError(f"{path}: lowbit header has no format version")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written in lowbit format version {version} (lowbit {header.get('lowbit_version')}); "
            f"this lowbit {lowbit.__version__} reads versions up to {FORMAT_VERSION}: upgrade lowbit"
        )
    return header


def load(path: str | os.PathLike[str]) -> fx.GraphModule:
    """Rebuild a model written by :func:`save` (no original model code needed)."""
    header = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise ModelFileError(f"{path} is not a valid lowbit model file (corrupt or truncated): {e}") from None
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        mod, _, tname = k.partition("::")
        per_module.setdefault(mod, {})[tname] = v
    root = nn.Module()
    try:
        for name, spec in header["modules"].items():
            m = _module_from_spec(spec, per_module.get(name, {}))
            parent = root
            *parents, leaf = name.split(".")
            for p in parents:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            parent.add_module(leaf, m)
        for tname, t in per_module.get("", {}).items():
            root.register_buffer(tname, t)
        g = fx.Graph()
        nodes: dict[str, fx.Node] = {}
        for spec in header["nodes"]:
            op, target = spec["op"], spec["target"]
            args, kwargs = _dec(spec["args"], nodes), _dec(spec["kwargs"], nodes)
            if op == "call_function":
                target = _fn_from_name(target)
            if op == "output":
                nodes[spec["name"]] = g.output(args[0])
            else:
                nodes[spec["name"]] = g.create_node(op, target, tuple(args), kwargs, spec["name"])
        gm = fx.GraphModule(root, g)
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ModelFileError(f"{path}: inconsistent lowbit model file: {e}") from None
    gm.lowbit_meta = header.get("meta", {})
    gm.eval()
    return gm


def file_size(model: nn.Module) -> int:
    """Bytes of the model as lowbit.save writes it."""
    with tempfile.TemporaryDirectory() as d:
        return save(model, Path(d) / "m.lowbit").stat().st_size
