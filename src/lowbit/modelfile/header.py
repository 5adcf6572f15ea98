"""Every field of a model file's header, checked by type and range before anything is built from it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch

from lowbit.typed import Range, TypeMismatch, convert

from .errors import ModelFileError
from .names import check_path
from .program import RESERVED

HEADER_KEYS = {"format_version", "lowbit_version", "meta", "modules", "nodes"}
#: Keys a header may add: ``kind`` ("graph", the default, or "weights": the quantized layers and float
#: tensors of a model that could not be captured as a graph, loaded into the user's module) and
#: ``tensor_aliases`` (tensors stored once for several names, :mod:`lowbit.modelfile.aliases`).
OPTIONAL_KEYS = {"kind", "tensor_aliases"}
KINDS = ("graph", "weights")
MAX_MODULES = 100_000
MAX_META_DEPTH = 32

_Scale = Annotated[float, Range(0.0, gt=True)]
_IO_TYPES = {
    "float32": {"dtype": Literal["float32"]},
    "uint8": {"dtype": Literal["uint8"], "scale": _Scale, "zero_point": Annotated[int, Range(0, 255)]},
    "int8": {"dtype": Literal["int8"], "scale": _Scale, "zero_point": Annotated[int, Range(-128, 127)]},
}
_META_TYPES: dict[str, Any] = {
    "method": str,
    "float_layers": list[str],
    "float_ops": list[str],
    "unsupported": list[str],
    "config": dict[str, Any],
}


def _depth(v: Any, limit: int, where: str, d: int = 0) -> None:
    if d > limit:
        raise ModelFileError(f"header {where} is nested deeper than {limit} levels")
    if isinstance(v, dict):
        for x in v.values():
            _depth(x, limit, where, d + 1)
    elif isinstance(v, list):
        for x in v:
            _depth(x, limit, where, d + 1)


def _io_spec(v: Any, where: str) -> dict[str, Any]:
    types = _IO_TYPES.get(v.get("dtype")) if isinstance(v, dict) else None
    if types is None or set(v) != set(types):
        raise ModelFileError(f"meta {where} must be {{'dtype': 'float32'}} or {{'dtype': 'uint8'|'int8', 'scale', "
                             f"'zero_point'}}, got {str(v)[:80]}")
    try:
        return {k: convert(v[k], hint) for k, hint in types.items()}
    except TypeMismatch as e:
        raise ModelFileError(f"meta {where}: {e}") from None


def check_meta(meta: Any) -> dict[str, Any]:
    """The header's ``meta``: method, input/output formats (scale > 0, zero point in range), lists of
    names; other keys may hold any JSON."""
    if not isinstance(meta, dict):
        raise ModelFileError("header field meta must be an object")
    _depth(meta, MAX_META_DEPTH, "meta")
    out = dict(meta)
    for key, hint in _META_TYPES.items():
        if key in meta:
            try:
                out[key] = convert(meta[key], hint)
            except TypeMismatch as e:
                raise ModelFileError(f"meta {key}: {e}") from None
    if "input" in meta:
        inp = meta["input"]
        out["input"] = [_io_spec(v, f"input {i}") for i, v in enumerate(inp)] if isinstance(inp, list) \
            else _io_spec(inp, "input")
        if isinstance(inp, list) and not inp:
            raise ModelFileError("meta input is an empty list")
    if "output" in meta:
        out["output"] = _io_spec(meta["output"], "output")
    return out


def check_fields(header: dict[str, Any]) -> None:
    """The header holds exactly the known fields, each of the right type."""
    keys = set(header)
    if not HEADER_KEYS <= keys <= HEADER_KEYS | OPTIONAL_KEYS:
        raise ModelFileError(f"header fields: missing {sorted(HEADER_KEYS - keys)}, unknown "
                             f"{sorted(str(k)[:30] for k in keys - HEADER_KEYS - OPTIONAL_KEYS)}")
    if header.get("kind", "graph") not in KINDS:
        raise ModelFileError(f"header field kind must be one of {KINDS}, got {str(header['kind'])[:30]!r}")
    v = header["lowbit_version"]
    if not isinstance(v, str) or not 0 < len(v) <= 64:
        raise ModelFileError(f"header field lowbit_version must be a short string, got {str(v)[:40]!r}")
    if not isinstance(header["modules"], dict):
        raise ModelFileError("header field modules must be an object")


def module_paths(modules: dict[str, Any]) -> list[str]:
    """Module paths checked: identifiers/indices, no reserved atom, none inside another."""
    if len(modules) > MAX_MODULES:
        raise ModelFileError(f"header has {len(modules)} modules, more than {MAX_MODULES}")
    paths = sorted(check_path(p, "module path", RESERVED) for p in modules)
    for a, b in zip(paths, paths[1:], strict=False):
        if b.startswith(a + "."):
            raise ModelFileError(f"module path {b!r} lies inside module {a!r}")
    return paths


def split_tensors(tensors: dict[str, torch.Tensor], modules: dict[str, Any]
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """File tensors ``path::name`` by module path, and the graph constants (``::target``)."""
    per_module: dict[str, dict[str, torch.Tensor]] = {p: {} for p in modules}
    constants: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        path, sep, name = key.partition("::")
        if not sep:
            raise ModelFileError(f"tensor {key[:60]!r}: name must be MODULE::TENSOR")
        check_path(name, f"tensor {key[:60]!r} name")
        if path == "":
            constants[check_path(name, "constant", RESERVED)] = t
        elif path in per_module:
            per_module[path][name] = t
        else:
            raise ModelFileError(f"tensor {key[:60]!r} belongs to no module of the file")
    return per_module, constants
