"""Submodule path bookkeeping shared by the graph passes (private)."""

from __future__ import annotations

import re

import torch.fx as fx
from torch import nn

_ATOM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^[0-9]+$")


def valid_path(path: str) -> bool:
    """A dotted module path whose every atom can be a submodule name of a GraphModule."""
    if not path:
        return False
    atoms = path.split(".")
    if not all(_ATOM.match(a) for a in atoms):
        return False
    return not any(hasattr(fx.GraphModule, a) for a in atoms)


def path_exists(root: nn.Module, path: str) -> bool:
    """Whether ``path`` already names an attribute (module, parameter, buffer, method) under ``root``."""
    obj: object = root
    for atom in path.split("."):
        if not hasattr(obj, atom):
            return False
        obj = getattr(obj, atom)
    return True


def fresh_path(root: nn.Module, hint: str, taken: set[str] | None = None) -> str:
    """``hint`` or ``hint_1``, ``hint_2``, ... : the first that is free under ``root``.

    A candidate is free when it names no attribute of ``root`` yet, its parent (if any) is a module
    or can be created, and it is neither a prefix nor an extension of a path in ``taken``.
    """
    if not valid_path(hint):
        hint = re.sub(r"\W", "_", hint) or "mod"
        if not valid_path(hint):
            hint = f"m_{hint}"
    taken = taken or set()
    k = 0
    while True:
        cand = hint if k == 0 else f"{hint}_{k}"
        k += 1
        if cand in taken or any(t.startswith(cand + ".") or cand.startswith(t + ".") for t in taken):
            continue
        if path_exists(root, cand):
            continue
        parent, _, _ = cand.rpartition(".")
        if parent:
            obj: object = root
            ok = True
            for atom in parent.split("."):
                if not hasattr(obj, atom):
                    break
                obj = getattr(obj, atom)
                if not isinstance(obj, nn.Module):
                    ok = False
                    break
            if not ok:
                continue
        return cand


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` under ``root``, creating plain containers on the way."""
    parent_path, _, name = path.rpartition(".")
    parent = root
    if parent_path:
        for atom in parent_path.split("."):
            child = getattr(parent, atom, None)
            if child is None:
                child = nn.Module()
                parent.add_module(atom, child)
            elif not isinstance(child, nn.Module):
                raise ValueError(f"cannot place a module at {path!r}: {atom!r} is not a module")
            parent = child
    parent.add_module(name, module)
