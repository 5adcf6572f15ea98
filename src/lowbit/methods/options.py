"""Method options checked against a config dataclass's fields and type hints.

:func:`parse_fields` works for any dataclass: each value is converted (from a command-line string) or
checked (a Python value) by its field's type hint with :func:`lowbit.typed.convert`; an unknown name
or a value of the wrong type is a ``ValueError`` naming the field and the method. Booleans from the
command line accept ``true/false/1/0/yes/no`` in any case and nothing else.

:func:`split_scoped` reads the command line's ``--option [METHOD.]KEY=VALUE`` items and checks every
scope names a known method.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from lowbit.typed import TypeMismatch, convert, describe

__all__ = ["field_hints", "parse_fields", "split_scoped"]


def field_hints(cls: type) -> dict[str, Any]:
    """Field name -> type hint (with ``Annotated`` extras) of a dataclass, in field order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def parse_fields(cls: type, values: Mapping[str, Any], *, method: str | None = None,
                 strings: bool = False) -> dict[str, Any]:
    """``values`` (field name -> value) converted to the types of dataclass ``cls``'s fields.

    ``strings``: values are command-line strings to convert (``"false"`` -> False); otherwise they
    must already have the field's type (``"false"`` for a bool field is an error).
    """
    hints = field_hints(cls)
    who = f"method {method!r}" if method else cls.__name__
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {who}; known: {', '.join(hints)}")
    out: dict[str, Any] = {}
    for name, value in values.items():
        try:
            out[name] = convert(value, hints[name], strings=strings and isinstance(value, str))
        except TypeMismatch:
            raise ValueError(
                f"option {name}={value!r} for {who}: expected {describe(hints[name])}"
            ) from None
    return out


def split_scoped(items: Iterable[str], methods: Iterable[str]) -> dict[str, dict[str, str]]:
    """``["static.per_channel=false", "calib_samples=300"]`` -> ``{"static": {...}, "*": {...}}``.

    The scope before the last dot must be one of ``methods`` (the registered method names); a typo is
    an error listing them. Values stay strings (see :func:`parse_fields` with ``strings=True``).
    """
    known = list(methods)
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--option takes KEY=VALUE or METHOD.KEY=VALUE, got {item!r}")
        scope, _, key = key.strip().rpartition(".")
        if scope and scope not in known:
            raise ValueError(f"--option {item!r}: unknown method {scope!r}; known methods: {', '.join(known)}")
        if not key:
            raise ValueError(f"--option {item!r} names no option")
        out.setdefault(scope or "*", {})[key] = value
    return out
