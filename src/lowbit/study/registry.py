"""The registry of study kinds; :func:`discover` imports every module of :mod:`lowbit.study.kinds`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from typing import ClassVar

__all__ = ["STUDIES", "StudyKind", "register_study", "get_study", "discover"]


class StudyKind:
    """One kind of study: ``lowbit study NAME``. Subclasses set ``name`` and ``help`` and implement
    :meth:`add_arguments` and :meth:`run`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


#: name -> study kind class.
STUDIES: dict[str, type[StudyKind]] = {}


def register_study(cls: type[StudyKind]) -> type[StudyKind]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a class attribute 'name'")
    if cls.name in STUDIES and STUDIES[cls.name] is not cls:
        raise ValueError(f"study {cls.name!r} is registered twice")
    STUDIES[cls.name] = cls
    return cls


def discover() -> dict[str, type[StudyKind]]:
    """Import every module of :mod:`lowbit.study.kinds` (each registers its kinds) and return the registry."""
    from . import kinds

    for info in pkgutil.iter_modules(kinds.__path__):
        importlib.import_module(f"{kinds.__name__}.{info.name}")
    return STUDIES


def get_study(name: str) -> type[StudyKind]:
    studies = discover()
    if name not in studies:
        raise ValueError(f"unknown study {name!r}; known: {', '.join(sorted(studies))}")
    return studies[name]
