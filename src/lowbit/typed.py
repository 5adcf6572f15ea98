"""Values checked (and, from strings, converted) against type hints.

One routine serves two readers that must not guess: command-line options (``--option
per_channel=false``, parsed by :mod:`lowbit.methods.options` against a config dataclass) and the
fields of a model file's header (:mod:`lowbit.modelfile`). :func:`convert` accepts exactly what the
hint allows and raises :class:`TypeMismatch` (a ``ValueError``) saying what was expected otherwise.

Supported hints: ``bool``, ``int``, ``float``, ``str``, ``None``, ``Any``, ``Literal[...]``,
unions (``X | None``), ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]``, Enum
classes and ``Annotated[X, Range(...)]`` for bounds. Floats must be finite.

From strings (``strings=True``): booleans are ``true/false/1/0/yes/no`` in any case; ``none`` or
``null`` is None; tuples and lists are comma-separated (or a JSON list); dicts are JSON objects.
Typed values (``strings=False``) must already have the type: ``"false"`` is not a bool, ``True`` is not
an int; a list is accepted for a tuple (JSON has no tuples).
"""

from __future__ import annotations

import enum
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

__all__ = ["Range", "TypeMismatch", "convert", "describe"]

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
_INT = re.compile(r"[+-]?[0-9]+\Z")


class TypeMismatch(ValueError):
    """A value does not have the type (or range) its hint asks for."""


@dataclass(frozen=True)
class Range:
    """Bounds for ``Annotated[int | float, Range(...)]``: ``lo <= v <= hi`` (``gt``: strictly above lo)."""

    lo: float | None = None
    hi: float | None = None
    gt: bool = False

    def holds(self, v: Any) -> bool:
        if self.lo is not None and (v <= self.lo if self.gt else v < self.lo):
            return False
        return self.hi is None or v <= self.hi

    def __str__(self) -> str:
        lo = "" if self.lo is None else f"{'>' if self.gt else '>='} {self.lo}"
        hi = "" if self.hi is None else f"<= {self.hi}"
        return " and ".join(p for p in (lo, hi) if p)


def describe(hint: Any) -> str:
    """Plain words for what ``hint`` accepts (used in error messages)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "true/false (also 1/0, yes/no)"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if hint is None or hint is type(None):
        return "none"
    if hint is Any:
        return "any value"
    if origin is Annotated:
        return f"{describe(args[0])} {' '.join(str(a) for a in args[1:] if isinstance(a, Range))}".strip()
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a comma-separated list of {describe(args[0])}"
        return f"{len(args)} comma-separated values ({', '.join(describe(a) for a in args)})"
    if origin is list:
        return f"a list of {describe(args[0])}"
    if origin is dict:
        return "a JSON object"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


def convert(value: Any, hint: Any, *, strings: bool = False) -> Any:
    """``value`` as ``hint`` describes it; raises :class:`TypeMismatch` naming what was expected."""
    try:
        return _convert(value, hint, strings)
    except TypeMismatch:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise TypeMismatch(f"expected {describe(hint)}, got {_show(value)}") from None


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _fail(value: Any, hint: Any) -> typing.NoReturn:
    raise TypeMismatch(f"expected {describe(hint)}, got {_show(value)}")


def _convert(value: Any, hint: Any, strings: bool) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        if strings and isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if origin is Annotated:
        v = _convert(value, args[0], strings)
        for meta in args[1:]:
            if isinstance(meta, Range) and not meta.holds(v):
                _fail(value, hint)
        return v
    if origin in (Union, types.UnionType):
        return _union(value, args, hint, strings)
    if hint is None or hint is type(None):
        if value is None or (strings and isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        _fail(value, hint)
    if strings and isinstance(value, str):
        return _from_string(value.strip(), hint, origin, args)
    return _typed(value, hint, origin, args, strings)


def _union(value: Any, args: tuple[Any, ...], hint: Any, strings: bool) -> Any:
    # None first (so "none" is None, not the string "none"), then the others in order
    for a in sorted(args, key=lambda a: a is not type(None)):
        try:
            return _convert(value, a, strings)
        except (TypeMismatch, ValueError, TypeError):
            continue
    _fail(value, hint)


def _literal(value: Any, args: tuple[Any, ...], hint: Any) -> Any:
    for a in args:
        if type(a) is type(value) and a == value:
            return a
    _fail(value, hint)


def _from_string(s: str, hint: Any, origin: Any, args: tuple[Any, ...]) -> Any:
    if hint is bool:
        low = s.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        _fail(s, hint)
    if hint is int:
        if not _INT.match(s):
            _fail(s, hint)
        return int(s)
    if hint is float:
        v = float(s)
        if not math.isfinite(v):
            _fail(s, hint)
        return v
    if hint is str:
        return s
    if origin is Literal:
        for a in args:
            try:
                if a == _from_string(s, type(a), None, ()):
                    return a
            except (TypeMismatch, ValueError):
                continue
        _fail(s, hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        for m in hint:
            if str(m.value) == s or m.name == s:
                return m
        _fail(s, hint)
    if origin in (tuple, list):
        if s.startswith("["):
            return _typed(json.loads(s), hint, origin, args, False)
        items = [p.strip() for p in s.split(",")] if s else []
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis) and len(items) != len(args):
            _fail(s, hint)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [p for p in items if p]
        return _seq(items, hint, origin, args, True)
    if origin is dict:
        return _typed(json.loads(s), hint, origin, args, False)
    _fail(s, hint)


def _seq(items: list[Any], hint: Any, origin: Any, args: tuple[Any, ...], strings: bool) -> Any:
    if origin is list:
        return [_convert(v, args[0], strings) for v in items]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(v, args[0], strings) for v in items)
    if len(items) != len(args):
        _fail(items, hint)
    return tuple(_convert(v, a, strings) for v, a in zip(items, args, strict=True))


def _typed(value: Any, hint: Any, origin: Any, args: tuple[Any, ...], strings: bool) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        _fail(value, hint)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(value, hint)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        _fail(value, hint)
    if hint is str:
        if isinstance(value, str):
            return value
        _fail(value, hint)
    if origin is Literal:
        return _literal(value, args, hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        for m in hint:
            if type(m.value) is type(value) and m.value == value:
                return m
        _fail(value, hint)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            _fail(value, hint)
        return _seq(list(value), hint, origin, args, strings)
    if origin is dict:
        if not isinstance(value, dict):
            _fail(value, hint)
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, False): _convert(v, vt, strings) for k, v in value.items()}
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        _fail(value, hint)
    raise TypeError(f"unsupported type hint {hint!r}")
