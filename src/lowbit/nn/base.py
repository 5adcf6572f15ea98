"""Common ground of lowbit's inference modules: a serializable spec (JSON attributes + tensors)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

#: Registry of module classes that lowbit.io can rebuild from a file, by class name.
MODULES: dict[str, type[LowbitModule]] = {}


class LowbitModule(nn.Module):
    """A module that can describe itself as (JSON attributes, named tensors) and be rebuilt from them."""

    kind: ClassVar[str] = "lowbit"

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        MODULES[cls.__name__] = cls

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LowbitModule:
        raise NotImplementedError


def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def act_clamp(act: str | None, zp: int, scale: float, qmin: int, qmax: int) -> tuple[int, int]:
    """Integer clamp of a fused activation on codes with (scale, zp) in [qmin, qmax]."""
    if act in (None, "", "none"):
        return qmin, qmax
    lo = max(qmin, zp)
    if act == "relu":
        return lo, qmax
    if act == "relu6":
        return lo, min(qmax, zp + round(6.0 / scale))
    raise ValueError(f"unsupported fused activation {act!r}")


def float_act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == "relu":
        return torch.relu(y)
    if act == "relu6":
        return torch.clamp(y, 0.0, 6.0)
    return y
