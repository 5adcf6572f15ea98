"""lowbit's inference modules as single operations of a ``torch.export`` graph ("leaves").

lowbit's layers call native kernels that tracing cannot see through. While a model is captured
(:func:`leaves`), each lowbit module that can say the shapes of its outputs (a ``meta_forward`` method)
is called through one custom op, ``lowbit::leaf(path, spec, tensors)``: ``path`` names the module,
``spec`` (JSON) holds the call's non-tensor arguments and where its tensors and outputs go. The export
then records one node per call; :func:`lowbit.graph.exported.convert_exported` turns each back into a
call of the module at ``path``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

__all__ = ["LEAF_OP", "decode_call", "leaves"]

_ACTIVE: dict[str, nn.Module] = {}


def _encode(v: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return {"t": len(tensors) - 1}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tuple):
        return {"tuple": [_encode(x, tensors) for x in v]}
    if isinstance(v, list):
        return [_encode(x, tensors) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _encode(x, tensors) for k, x in v.items()}}
    raise TypeError(f"a lowbit module was called with a {type(v).__name__} argument, which graph capture "
                    "cannot record")


def _decode(v: Any, tensors: list[Any]) -> Any:
    if isinstance(v, dict):
        if "t" in v:
            return tensors[v["t"]]
        if "tuple" in v:
            return tuple(_decode(x, tensors) for x in v["tuple"])
        return {k: _decode(x, tensors) for k, x in v["dict"].items()}
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    return v


def _out_paths(out: Any, prefix: tuple[Any, ...] = ()) -> list[list[Any]]:
    """Where each tensor of a module's result sits (indices into nested tuples/lists)."""
    if isinstance(out, torch.Tensor):
        return [list(prefix)]
    if out is None:
        return []
    if isinstance(out, (tuple, list)):
        return [p for i, x in enumerate(out) for p in _out_paths(x, (*prefix, i))]
    raise TypeError(f"a lowbit module returned a {type(out).__name__}, which graph capture cannot record")


def _pick(out: Any, path: list[Any]) -> Any:
    for k in path:
        out = out[k]
    return out


def _replace(out: Any, values: Iterator[torch.Tensor]) -> Any:
    if isinstance(out, torch.Tensor):
        return next(values)
    if isinstance(out, (tuple, list)):
        return type(out)(_replace(x, values) for x in out)
    return out


def decode_call(spec: str, tensors: list[Any]) -> tuple[list[Any], dict[str, Any], list[list[Any]]]:
    """(args, kwargs, output paths) of a recorded call, with ``tensors`` put back in their places."""
    d = json.loads(spec)
    return _decode(d["args"], tensors), _decode(d["kwargs"], tensors), d["out"]


@torch.library.custom_op("lowbit::leaf", mutates_args=())
def _leaf(path: str, spec: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    m = _ACTIVE[path]
    args, kwargs, paths = decode_call(spec, list(tensors))
    out = type(m).forward(m, *args, **kwargs)
    return [_pick(out, p).clone() for p in paths]


@_leaf.register_fake
def _leaf_fake(path: str, spec: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    m = _ACTIVE[path]
    args, kwargs, paths = decode_call(spec, list(tensors))
    out = m.meta_forward(*args, **kwargs)
    return [_pick(out, p) for p in paths]


#: The op a captured graph calls for a lowbit module.
LEAF_OP = torch.ops.lowbit.leaf.default


def _wrapper(m: nn.Module, path: str) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        tensors: list[torch.Tensor] = []
        enc = {"args": _encode(list(args), tensors), "kwargs": _encode(dict(kwargs), tensors)}
        with disable_proxy_modes_tracing():  # the result's structure and shapes, not recorded in the graph
            shape = m.meta_forward(*args, **kwargs)
        enc["out"] = _out_paths(shape)
        res = LEAF_OP(path, json.dumps(enc), tensors)
        return _replace(shape, iter(res))

    return forward


@contextlib.contextmanager
def leaves(model: nn.Module) -> Iterator[dict[str, nn.Module]]:
    """While active, every module of ``model`` with a ``meta_forward`` runs as one leaf op; yields them by
    path (a module reachable at several paths is one leaf under its first path)."""
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for path, m in model.named_modules():
        if callable(getattr(type(m), "meta_forward", None)) and path and id(m) not in seen:
            if any(path.startswith(p + ".") for p in found):
                continue
            seen.add(id(m))
            found[path] = m
    if _ACTIVE:
        raise RuntimeError("graph capture is already running (lowbit.graph.leaf.leaves is not re-entrant)")
    try:
        for path, m in found.items():
            _ACTIVE[path] = m
            m.forward = _wrapper(m, path)  # instance attribute: shadows the class's forward
        yield found
    finally:
        for m in found.values():
            m.__dict__.pop("forward", None)
        _ACTIVE.clear()
