"""Rules for the names a model file holds: node names, module paths, tensor names, argument names."""

from __future__ import annotations

import builtins
import keyword
import re
from collections.abc import Iterable

from .errors import ModelFileError

MAX_NAME = 128
MAX_PATH = 512
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ATOM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z|[0-9]{1,9}\Z")
_BUILTINS = frozenset(dir(builtins))


def _is_keyword(s: str) -> bool:
    return keyword.iskeyword(s) or keyword.issoftkeyword(s)


def check_identifier(s: object, what: str, *, builtins_ok: bool = False) -> str:
    """A Python identifier of at most 128 characters: not a keyword, not a dunder name, and (unless
    ``builtins_ok``) not the name of a builtin."""
    if not isinstance(s, str):
        raise ModelFileError(f"{what} must be a string, got {type(s).__name__}")
    shown = repr(s[:40]) + ("..." if len(s) > 40 else "")
    if not 0 < len(s) <= MAX_NAME or not _IDENT.match(s):
        raise ModelFileError(f"{what} {shown} is not an identifier of at most {MAX_NAME} characters")
    if _is_keyword(s) or (s.startswith("__") and s.endswith("__")) or (not builtins_ok and s in _BUILTINS):
        raise ModelFileError(f"{what} {shown} is a reserved name (keyword, builtin or dunder)")
    return s


def check_path(s: object, what: str, reserved: Iterable[str] = ()) -> str:
    """A dotted path of identifiers or decimal indices (``features.0.conv``), at most 512 characters;
    no atom is a keyword, a dunder name or in ``reserved`` (attribute names of the module holding it)."""
    if not isinstance(s, str):
        raise ModelFileError(f"{what} must be a string, got {type(s).__name__}")
    shown = repr(s[:40]) + ("..." if len(s) > 40 else "")
    if not 0 < len(s) <= MAX_PATH:
        raise ModelFileError(f"{what} {shown} must have 1 to {MAX_PATH} characters")
    bad = set(reserved)
    for atom in s.split("."):
        if not _ATOM.match(atom) or len(atom) > MAX_NAME:
            raise ModelFileError(f"{what} {shown}: {atom[:40]!r} is not an identifier or index")
        if _is_keyword(atom) or atom.startswith("__") or atom in bad:
            raise ModelFileError(f"{what} {shown}: {atom!r} is a reserved name")
    return s
