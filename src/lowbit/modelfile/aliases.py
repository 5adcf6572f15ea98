"""Tensors shared between modules (tied weights) stored once: the header's ``tensor_aliases``.

When two file tensors are the same tensor in memory (a weight tied between an embedding and an output
layer, quantized once), the file stores it under one name and the header maps every other name to it.
Reading puts the same tensor object back under each name, so the rebuilt modules share it again.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ModelFileError

MAX_ALIASES = 100_000


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors stored once, alias name -> stored name) of a file's tensors."""
    first: dict[tuple[Any, ...], str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name in sorted(tensors):
        t = tensors[name]
        key = _identity(t) if t.numel() else None
        if key is not None and key in first:
            aliases[name] = first[key]
            continue
        if key is not None:
            first[key] = name
        out[name] = t
    return out, aliases


def resolve(tensors: dict[str, torch.Tensor], aliases: Any) -> dict[str, torch.Tensor]:
    """The file's tensors with every alias name added (the same tensor object as its target); checked."""
    if not isinstance(aliases, dict):
        raise ModelFileError("header field tensor_aliases must be an object")
    if len(aliases) > MAX_ALIASES:
        raise ModelFileError(f"header has {len(aliases)} tensor aliases, more than {MAX_ALIASES}")
    out = dict(tensors)
    for alias, target in aliases.items():
        if not isinstance(target, str) or not isinstance(alias, str):
            raise ModelFileError("tensor_aliases must map tensor names to tensor names")
        if alias in tensors:
            raise ModelFileError(f"tensor alias {alias[:60]!r} is also a stored tensor")
        if target not in tensors:
            raise ModelFileError(f"tensor alias {alias[:60]!r} points to {target[:60]!r}, which the file does not hold")
        out[alias] = tensors[target]
    return out
