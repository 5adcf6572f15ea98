"""Node arguments in a model file: a closed set of JSON encodings, checked and bounded when read.

Plain JSON values (None, bool, int in int64, str up to 4096 characters, finite floats, lists) stand for
themselves; objects with one marker key encode the rest:

=========================  ===============================================================
``{"__node__": name}``     the value of an earlier node (:class:`Ref` once read)
``{"__tuple__": [...]}``   a tuple
``{"__dict__": {...}}``    a dict with identifier keys (keyword arguments)
``{"__slice__": [a,b,c]}`` a slice
``{"__dtype__": name}``    a torch dtype from :data:`DTYPES`
``{"__memory_format__": n}`` a torch memory format from :data:`MEMORY_FORMATS`
``{"__float__": "inf"}``   a non-finite float (``inf``, ``-inf``, ``nan``)
``{"__ellipsis__": true}`` ``...``
``{"__device__": "cpu"}``  the CPU device (graphs captured by torch.export name it)
``{"__layout__": name}``   a torch layout from :data:`LAYOUTS`
=========================  ===============================================================

Nesting is at most :data:`MAX_DEPTH` deep and a container holds at most :data:`MAX_ITEMS` items.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ModelFileError
from .names import check_identifier

MAX_DEPTH = 16
MAX_ITEMS = 65536
MAX_STR = 4096
_INT64 = 2**63

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool")
}
MEMORY_FORMATS: dict[str, torch.memory_format] = {
    name: getattr(torch, name) for name in ("contiguous_format", "channels_last", "preserve_format")
}
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
LAYOUTS: dict[str, torch.layout] = {"strided": torch.strided}
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Ref:
    """The value of node number ``index`` (an earlier node)."""

    index: int


def encode(v: Any, ref_name: Callable[[Any], str | None]) -> Any:
    """JSON form of an argument; ``ref_name(v)`` names a graph value (else None)."""
    name = ref_name(v)
    if name is not None:
        return {"__node__": name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"__float__": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
    if isinstance(v, tuple):
        return {"__tuple__": [encode(x, ref_name) for x in v]}
    if isinstance(v, list):
        return [encode(x, ref_name) for x in v]
    if isinstance(v, Mapping):
        return {"__dict__": {str(k): encode(x, ref_name) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"__slice__": [encode(v.start, ref_name), encode(v.stop, ref_name), encode(v.step, ref_name)]}
    if isinstance(v, torch.dtype):
        for key, dt in DTYPES.items():
            if dt == v:
                return {"__dtype__": key}
    if isinstance(v, torch.memory_format):
        for key, mf in MEMORY_FORMATS.items():
            if mf == v:
                return {"__memory_format__": key}
    if v is Ellipsis:
        return {"__ellipsis__": True}
    if isinstance(v, torch.device) and v.type == "cpu":
        return {"__device__": "cpu"}
    if isinstance(v, torch.layout):
        for key, lay in LAYOUTS.items():
            if lay == v:
                return {"__layout__": key}
    raise ModelFileError(f"cannot save a graph argument of type {type(v).__name__} ({v!r:.60})")


def decode(v: Any, refs: Mapping[str, int], where: str, depth: int = 0) -> Any:
    """Python value of an encoded argument; node names resolve through ``refs`` (earlier nodes only)."""
    if depth > MAX_DEPTH:
        raise ModelFileError(f"{where}: arguments nested deeper than {MAX_DEPTH} levels")
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        if not -_INT64 <= v < _INT64:
            raise ModelFileError(f"{where}: integer {v} outside int64")
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ModelFileError(f"{where}: non-finite float written as a plain number")
        return v
    if isinstance(v, str):
        if len(v) > MAX_STR:
            raise ModelFileError(f"{where}: string argument longer than {MAX_STR} characters")
        return v
    if isinstance(v, list):
        _check_len(v, where)
        return [decode(x, refs, where, depth + 1) for x in v]
    if isinstance(v, dict):
        if len(v) != 1:
            raise ModelFileError(f"{where}: an encoded argument has exactly one marker key, got {sorted(v)[:5]}")
        ((key, x),) = v.items()
        return _decode_marked(key, x, refs, where, depth)
    raise ModelFileError(f"{where}: unexpected argument of type {type(v).__name__}")


def _check_len(v: list[Any] | dict[str, Any], where: str) -> None:
    if len(v) > MAX_ITEMS:
        raise ModelFileError(f"{where}: more than {MAX_ITEMS} items in one argument")


def _decode_marked(key: str, x: Any, refs: Mapping[str, int], where: str, depth: int) -> Any:
    if key == "__node__":
        if not isinstance(x, str) or x not in refs:
            raise ModelFileError(f"{where}: refers to {str(x)[:40]!r}, which is not an earlier node")
        return Ref(refs[x])
    if key == "__tuple__" and isinstance(x, list):
        _check_len(x, where)
        return tuple(decode(i, refs, where, depth + 1) for i in x)
    if key == "__dict__" and isinstance(x, dict):
        _check_len(x, where)
        return {check_identifier(k, f"{where}: keyword", builtins_ok=True): decode(i, refs, where, depth + 1)
                for k, i in x.items()}
    if key == "__slice__" and isinstance(x, list) and len(x) == 3:
        parts = [decode(i, refs, where, depth + 1) for i in x]
        if not all(p is None or isinstance(p, (int, Ref)) and not isinstance(p, bool) for p in parts):
            raise ModelFileError(f"{where}: slice bounds must be integers, None or node values")
        return slice(*parts)
    if key == "__dtype__" and x in DTYPES:
        return DTYPES[x]
    if key == "__memory_format__" and x in MEMORY_FORMATS:
        return MEMORY_FORMATS[x]
    if key == "__float__" and x in _FLOATS:
        return _FLOATS[x]
    if key == "__ellipsis__" and x is True:
        return Ellipsis
    if key == "__device__" and x == "cpu":
        return _CPU
    if key == "__layout__" and x in LAYOUTS:
        return LAYOUTS[x]
    raise ModelFileError(f"{where}: unknown or malformed encoded argument {key[:40]!r}")


def resolve(v: Any, env: list[Any]) -> Any:
    """``v`` with every :class:`Ref` replaced by the node value it names."""
    if isinstance(v, Ref):
        return env[v.index]
    if isinstance(v, tuple):
        return tuple(resolve(x, env) for x in v)
    if isinstance(v, list):
        return [resolve(x, env) for x in v]
    if isinstance(v, dict):
        return {k: resolve(x, env) for k, x in v.items()}
    if isinstance(v, slice):
        return slice(resolve(v.start, env), resolve(v.stop, env), resolve(v.step, env))
    return v


def has_refs(v: Any) -> bool:
    if isinstance(v, Ref):
        return True
    if isinstance(v, (tuple, list)):
        return any(has_refs(x) for x in v)
    if isinstance(v, dict):
        return any(has_refs(x) for x in v.values())
    if isinstance(v, slice):
        return any(has_refs(x) for x in (v.start, v.stop, v.step))
    return False
