"""Weights-only model files: a model's quantized layers and float tensors, loaded into the user's module.

A model quantized without a graph (``dynamic``, ``weight_only``, ``float16``) whose ``forward`` cannot be
captured as a graph (control flow on tensor values, outputs export cannot describe ...) is saved as a
file of ``kind: "weights"``: the lowbit modules that replaced its layers (checked specs, as in a graph
file), the model's remaining float tensors under their state-dict names, and in the meta which float
module each replaced layer was (``swapped``: class and parameter shapes) and where a module shared
between paths appears again (``module_aliases``). :func:`load_into` checks all of it against the
user's own model, built from its code, then swaps the layers in and copies the tensors. No code comes
from the file: the model's code is the user's. A lowbit module the quantization method did not swap in
(a float BM layer from ``lowbit.bm.convert``) is recorded by its own ``float_origin()``: the float layer
it replaced, so the file loads into the float model as well.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ModelFileError
from .modules import build_module, module_spec
from .names import check_path


def _lowbit_paths(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(first path -> lowbit module, other path -> first path) of the outermost lowbit modules."""
    from lowbit.nn import LowbitModule

    first: dict[int, str] = {}
    found: dict[str, nn.Module] = {}
    aliases: dict[str, str] = {}

    def walk(m: nn.Module, prefix: str) -> None:
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, LowbitModule):
                if id(child) in first:
                    aliases[path] = first[id(child)]
                else:
                    first[id(child)] = path
                    found[path] = child
            else:
                walk(child, path)

    walk(model, "")
    return found, aliases


def _under(key: str, paths: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in paths)


def weights_parts(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(module specs, tensors, meta additions) of a weights-only file of ``model``."""
    found, aliases = _lowbit_paths(model)
    specs: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for path, m in found.items():
        spec, ts = module_spec(path, m)
        specs[path] = spec
        tensors.update({f"{path}::{k}": v for k, v in ts.items() if v is not None})
    swapped = [*found, *aliases]
    for key, t in model.state_dict(keep_vars=True).items():
        if not _under(key, swapped):
            tensors[f"::{key}"] = t.detach()
    extra: dict[str, Any] = {"module_aliases": aliases}
    info = dict((getattr(model, "lowbit_meta", None) or {}).get("swapped") or {})
    origin = {p: found[aliases.get(p, p)].float_origin() for p in swapped
              if p not in info and hasattr(found[aliases.get(p, p)], "float_origin")}
    if origin:
        extra["swapped"] = {**info, **origin}
    return specs, tensors, extra


def _meta_paths(meta: dict[str, Any], specs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    swapped, aliases = meta.get("swapped"), meta.get("module_aliases", {})
    if not isinstance(swapped, dict) or not isinstance(aliases, dict):
        raise ModelFileError("a weights-only file's meta must hold 'swapped' and 'module_aliases' objects")
    for a, target in aliases.items():
        check_path(a, "module alias")
        if target not in specs:
            raise ModelFileError(f"module alias {a!r} points to {str(target)[:60]!r}, which the file does not define")
    for p in [*specs, *aliases]:
        info = swapped.get(p)
        if not (isinstance(info, dict) and isinstance(info.get("class"), str) and isinstance(info.get("params"), dict)
                and all(isinstance(s, list) and all(isinstance(d, int) for d in s) for s in info["params"].values())):
            raise ModelFileError(f"meta swapped[{p!r}] must give the float module's class and parameter shapes")
    return swapped, aliases


def _check_target(model: nn.Module, path: str, info: dict[str, Any]) -> None:
    try:
        m = model.get_submodule(path)
    except AttributeError:
        raise ModelFileError(f"the file replaces layer '{path}', which the given model does not have") from None
    if hasattr(m, "float_origin") and m.float_origin() == info:
        return  # the model already holds the converted layer (a float BM layer of the same shapes)
    cls = f"{type(m).__module__}.{type(m).__qualname__}"
    if cls != info["class"]:
        raise ModelFileError(f"layer '{path}' is a {cls} in the given model, a {info['class']} in the file's model")
    shapes = {n: list(t.shape) for n, t in m.named_parameters()}
    if shapes != info["params"]:
        raise ModelFileError(f"layer '{path}' has parameters {shapes} in the given model, {info['params']} in the "
                             "file's model")


def load_into(model: nn.Module, header: dict[str, Any], tensors: dict[str, torch.Tensor],
              meta: dict[str, Any]) -> nn.Module:
    """Load a weights-only file into ``model`` (modified in place and returned), everything checked first."""
    from lowbit.methods.module_swap import finish_swap
    from lowbit.modelfile.header import module_paths, split_tensors

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (the float model the file was made from), got "
                        f"{type(model).__name__}")
    specs = header["modules"]
    module_paths(specs)
    if header["nodes"] != []:
        raise ModelFileError("a weights-only file has no graph nodes")
    swapped, aliases = _meta_paths(meta, specs)
    per_module, floats = split_tensors(tensors, specs)
    for p in [*specs, *aliases]:
        _check_target(model, p, swapped[p])
    paths = [*specs, *aliases]
    own = {k: t for k, t in model.state_dict().items() if not _under(k, paths)}
    if set(own) != set(floats):
        missing, extra = sorted(set(own) - set(floats)), sorted(set(floats) - set(own))
        raise ModelFileError(f"the file's float tensors do not match the given model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
    for k, t in own.items():
        f = floats[k]
        if f.shape != t.shape or f.dtype != t.dtype:
            raise ModelFileError(f"tensor {k}: {f.dtype} {tuple(f.shape)} in the file, {t.dtype} {tuple(t.shape)} "
                                 "in the model")
        if f.is_floating_point() and not torch.isfinite(f).all():
            raise ModelFileError(f"tensor {k} holds NaN or Inf")
    built = {p: build_module(spec, per_module[p], p) for p, spec in specs.items()}
    model.load_state_dict(floats, strict=False)
    for p, m in built.items():
        _set(model, p, m)
    for a, target in aliases.items():
        _set(model, a, built[target])
    finish_swap(model)
    model.lowbit_meta = meta
    return model


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module.eval())
