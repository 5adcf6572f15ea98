"""Module specs in a model file: lowbit's own modules, the Fused float layers, allowed torch.nn modules.

A spec is one of

* ``{"kind": "lowbit", "class": NAME, "attrs": {...}}``: a registered :class:`lowbit.nn.LowbitModule`,
  its attributes checked against the class's ``spec_attrs`` and its tensors against ``spec_tensors``
  before :meth:`from_spec` runs;
* ``{"kind": "torch", "class": NAME, "args": {...}}``: an allowed torch.nn module
  (:mod:`lowbit.modelfile.torch_modules`);
* ``{"kind": "fused", "act": "relu"|"relu6", "layer": {torch spec}}``: :class:`lowbit.graph.Fused`.

The tensors of the module at path ``p`` are stored as ``p::name`` (``name`` as in its state_dict).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.nn import MODULES, LowbitModule
from lowbit.typed import TypeMismatch, convert, describe

from .errors import ModelFileError
from .torch_modules import build_torch_module, torch_module_args


def module_spec(name: str, m: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON spec, tensors by state-dict name) of a module to save; ModelFileError if it cannot be saved."""
    from lowbit.graph import Fused

    if isinstance(m, LowbitModule):
        attrs, tensors = m.to_spec()
        return {"kind": "lowbit", "class": type(m).__name__, "attrs": attrs}, dict(tensors)
    if type(m) is Fused:
        inner, _ = module_spec(name, m.layer)
        return {"kind": "fused", "act": m.act, "layer": inner}, dict(m.state_dict())
    cls, args = torch_module_args(name, m)
    return {"kind": "torch", "class": cls, "args": args}, dict(m.state_dict())


def _keys(spec: Any, want: set[str], where: str) -> dict[str, Any]:
    if not isinstance(spec, dict) or set(spec) != want:
        got = sorted(str(k)[:30] for k in spec) if isinstance(spec, dict) else type(spec).__name__
        raise ModelFileError(f"module '{where}': spec must have exactly the keys {sorted(want)}, got {got}")
    return spec


def build_module(spec: Any, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """The module a spec describes, every field and tensor checked first."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "lowbit":
        spec = _keys(spec, {"kind", "class", "attrs"}, where)
        return _build_lowbit(spec["class"], spec["attrs"], tensors, where)
    if kind == "torch":
        spec = _keys(spec, {"kind", "class", "args"}, where)
        return build_torch_module(spec["class"], spec["args"], tensors, where)
    if kind == "fused":
        from lowbit.graph import Fused

        spec = _keys(spec, {"kind", "act", "layer"}, where)
        if spec["act"] not in ("relu", "relu6"):
            raise ModelFileError(f"module '{where}': fused activation must be 'relu' or 'relu6'")
        inner = spec["layer"]
        if not isinstance(inner, dict) or inner.get("kind") != "torch" or inner.get("class") not in (
                "Conv1d", "Conv2d", "Linear"):
            raise ModelFileError(f"module '{where}': a fused layer is a torch Conv1d, Conv2d or Linear")
        if not all(k.startswith("layer.") for k in tensors):
            raise ModelFileError(f"module '{where}': fused tensors must be named layer.*")
        layer = build_module(inner, {k.removeprefix("layer."): v for k, v in tensors.items()}, f"{where}.layer")
        return Fused(layer, spec["act"])
    raise ModelFileError(f"module '{where}': unknown module kind {str(kind)[:40]!r} (written by a newer lowbit?)")


def _lowbit_class(name: Any, where: str) -> type[LowbitModule]:
    cls = MODULES.get(name) if isinstance(name, str) and not name.startswith("_") else None
    if cls is None or cls.from_spec.__func__ is LowbitModule.from_spec.__func__:  # type: ignore[attr-defined]
        raise ModelFileError(f"module '{where}': unknown lowbit module type {str(name)[:60]!r} "
                             "(written by a newer lowbit?)")
    return cls


def _check_attrs(cls: type[LowbitModule], attrs: Any, where: str) -> dict[str, Any]:
    if not isinstance(attrs, dict):
        raise ModelFileError(f"module '{where}' ({cls.__name__}): attributes must be an object")
    if not cls.spec_attrs:
        return attrs
    unknown = sorted(str(k)[:30] for k in set(attrs) - set(cls.spec_attrs))
    if unknown:
        raise ModelFileError(f"module '{where}' ({cls.__name__}): unknown attributes {unknown}")
    out = {}
    for key, hint in cls.spec_attrs.items():
        if key not in attrs:
            try:
                convert(None, hint)
            except TypeMismatch:
                raise ModelFileError(f"module '{where}' ({cls.__name__}): attribute {key} is missing") from None
            continue
        try:
            out[key] = convert(attrs[key], hint)
        except TypeMismatch:
            raise ModelFileError(f"module '{where}' ({cls.__name__}) attribute {key}={str(attrs[key])[:40]}: "
                                 f"expected {describe(hint)}") from None
    return out


def _check_tensors(cls: type[LowbitModule], attrs: dict[str, Any], tensors: dict[str, torch.Tensor],
                   where: str) -> None:
    try:
        spec = cls.tensor_spec(attrs)
    except Exception as e:  # the attributes describe a module that cannot exist
        raise ModelFileError(f"module '{where}' ({cls.__name__}): {type(e).__name__}: {e}") from None
    if not spec and not tensors:
        return
    declared = {k.rstrip("?"): dt for k, dt in spec.items()}
    unknown = sorted(set(tensors) - set(declared))
    missing = sorted(k for k in spec if not k.endswith("?") and k not in tensors)
    if unknown or missing:
        raise ModelFileError(f"module '{where}' ({cls.__name__}): tensors missing {missing}, unexpected {unknown}")
    for k, t in tensors.items():
        if t.dtype != declared[k]:
            raise ModelFileError(f"module '{where}' ({cls.__name__}) tensor {k}: {t.dtype}, expected {declared[k]}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelFileError(f"module '{where}' ({cls.__name__}) tensor {k} holds NaN or Inf")


def _build_lowbit(name: Any, attrs: Any, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    cls = _lowbit_class(name, where)
    attrs = _check_attrs(cls, attrs, where)
    _check_tensors(cls, attrs, tensors, where)
    try:
        m = cls.from_spec(attrs, tensors)
    except Exception as e:  # the constructor's own checks: shapes, scales, geometry
        raise ModelFileError(f"module '{where}' ({cls.__name__}): {type(e).__name__}: {e}") from None
    return m

