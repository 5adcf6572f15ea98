"""Load a float model from a ``torch.export`` archive or a ``package.module:function`` factory."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .capture import add_input_checks
from .exported import convert_exported

__all__ = ["load_model", "load_state_dict_file", "ModelLoadError"]


class ModelLoadError(ValueError):
    """A model spec or weights file could not be turned into a model (message says why)."""


def _is_pt2(spec: str) -> bool:
    return spec.lower().endswith(".pt2")


def load_model(spec: str, weights_file: str | None = None, **kw: Any) -> nn.Module:
    """Resolve ``spec`` to a float ``nn.Module`` in eval mode.

    ``spec`` is one of

    * a path ending in ``.pt2``: a ``torch.export.save`` archive. Its ATen graph is converted to a
      module-level ``torch.fx.GraphModule`` (see :func:`lowbit.graph.exported.convert_exported`);
      weights come from the archive, so ``weights_file`` must be None. Ops the converter does not
      know raise ``NotImplementedError`` naming the op. Every input is checked on entry
      (:class:`lowbit.nn.CheckShape`): its dtype and the sizes the archive fixed; the dimensions it
      exported as dynamic take any size.
    * ``package.module:function`` (or ``package.module:Class`` or ``package.module:obj.attr``): the
      module is imported and the attribute called with ``**kw`` (no arguments when ``kw`` is empty);
      it must return an ``nn.Module`` (an attribute that already is an ``nn.Module`` instance is used
      as is). ``weights_file``, if given, is a ``torch.save``-d state_dict, read with
      ``weights_only=True`` and loaded strictly.

    Problems with the spec or the weights raise :class:`ModelLoadError` (a ``ValueError``) with a
    message naming the cause; missing files raise ``FileNotFoundError``.
    """
    if not isinstance(spec, str) or not spec:
        raise ModelLoadError(f"model spec must be a non-empty string, got {spec!r}")
    if _is_pt2(spec):
        if weights_file is not None:
            raise ModelLoadError(
                f"{spec}: a .pt2 archive carries its own weights; weights_file={weights_file!r} is not used"
            )
        if kw:
            raise ModelLoadError(f"{spec}: unexpected options for a .pt2 archive: {sorted(kw)}")
        return _load_pt2(spec)
    if ":" in spec:
        model = _load_factory(spec, kw)
        if weights_file is not None:
            sd = load_state_dict_file(weights_file)
            _load_strict(model, sd, weights_file)
        return model.eval()
    raise ModelLoadError(
        f"unrecognized model spec {spec!r}: expected a path to a torch.export archive ending in .pt2, "
        "or 'package.module:function'"
    )


def _load_pt2(path: str) -> nn.Module:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torch.export archive not found: {path}")
    try:
        ep = torch.export.load(path)
    except Exception as e:
        raise ModelLoadError(f"{path}: could not load as a torch.export archive: {e}") from e
    _check_finite(ep, path)
    gm = convert_exported(ep)
    add_input_checks(gm, ep)  # the sizes the archive fixed (its dynamic ones stay free): not silently others
    return gm


def _check_finite(ep: torch.export.ExportedProgram, path: str) -> None:
    """NaN/Inf in the archive's parameters, buffers or constants: an error naming the tensor (as for a
    module's parameters in :func:`lowbit.graph.prepare`), before the conversion compares outputs."""
    for kind, items in (("parameter or buffer", ep.state_dict.items()), ("constant", ep.constants.items())):
        for name, t in items:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                if torch.isnan(t).any():
                    raise ModelLoadError(f"{path}: {kind} {name!r} contains NaN")
                if torch.isinf(t).any():
                    raise ModelLoadError(f"{path}: {kind} {name!r} contains Inf")


def _load_factory(spec: str, kw: dict[str, Any]) -> nn.Module:
    mod_name, _, attr_path = spec.partition(":")
    if not mod_name or not attr_path:
        raise ModelLoadError(f"model spec {spec!r} must look like 'package.module:function'")
    _cwd_on_path()
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:
        raise ModelLoadError(f"model spec {spec!r}: cannot import module {mod_name!r}: {e}") from e
    obj: Any = module
    for atom in attr_path.split("."):
        if not hasattr(obj, atom):
            raise ModelLoadError(f"model spec {spec!r}: module {mod_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, atom)
    if isinstance(obj, nn.Module):
        if kw:
            raise ModelLoadError(f"model spec {spec!r} names a module instance; it takes no options {sorted(kw)}")
        return obj
    if not callable(obj):
        raise ModelLoadError(f"model spec {spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    try:
        model = obj(**kw)
    except Exception as e:
        raise ModelLoadError(f"model spec {spec!r}: calling {attr_path}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"model spec {spec!r}: {attr_path}() returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _cwd_on_path() -> None:
    """Put the current folder first on the import path, as ``python -m`` does, so that
    ``package.module:function`` finds the user's own package from the installed ``lowbit`` script too."""
    cwd = os.getcwd()
    if not any(p in ("", ".", cwd) or (p and os.path.abspath(p) == cwd) for p in sys.path):
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read a ``torch.save``-d state_dict with ``weights_only=True``.

    A checkpoint dict holding the state_dict under ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: could not read as a state_dict with torch.load(weights_only=True): {e}") from e
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelLoadError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    return dict(obj)


def _preview(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _load_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {'; '.join(shapes[:5])}")
        raise ModelLoadError(f"{path}: state_dict does not match the model: {'; '.join(parts)}")
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:
        raise ModelLoadError(f"{path}: loading the state_dict failed: {e}") from e
