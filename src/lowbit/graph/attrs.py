"""Attributes of a GraphModule that survive ``copy.deepcopy`` and pickling.

``torch.fx.GraphModule`` keeps plain attributes when pickled but drops them in ``copy.deepcopy``, which
restores only those listed in ``gm.meta`` under its user-preserved key. lowbit's model descriptions
(``lowbit_meta``, ``lowbit_qat``) are set through :func:`set_preserved` so both kinds of copy keep them.
"""

from __future__ import annotations

from typing import Any

from torch import fx

try:  # the key torch.fx reads in GraphModule.__deepcopy__
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY as _KEY
except ImportError:  # pragma: no cover - older torch
    _KEY = "_user_preserved_attributes"

__all__ = ["set_preserved", "get_preserved"]


def set_preserved(gm: fx.GraphModule, name: str, value: Any) -> None:
    """``setattr(gm, name, value)``, also restored after ``copy.deepcopy(gm)``."""
    setattr(gm, name, value)
    gm.meta.setdefault(_KEY, {})[name] = value


def get_preserved(gm: Any, name: str, default: Any = None) -> Any:
    """The attribute set by :func:`set_preserved` (or a plain attribute), else ``default``."""
    v = getattr(gm, name, None)
    if v is None:
        v = getattr(gm, "meta", {}).get(_KEY, {}).get(name) if isinstance(getattr(gm, "meta", None), dict) else None
    return default if v is None else v
