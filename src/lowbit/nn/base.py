"""Common ground of lowbit's inference modules: a serializable spec (JSON attributes + tensors)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import nn

from lowbit.kernels.threads import guard_forward
from lowbit.typed import Range

#: Registry of module classes that lowbit.io can rebuild from a file, by class name.
MODULES: dict[str, type[LowbitModule]] = {}


#: Types for :attr:`LowbitModule.spec_attrs`.
Code = Annotated[int, Range(0, 255)]
Scale = Annotated[float, Range(0.0, gt=True)]
QParams = tuple[Scale, Code]
Act = Literal["relu", "relu6"] | None
Count = Annotated[int, Range(1)]
Pair = tuple[Count, Count]
Geometry = {"stride": Count | Pair, "padding": Annotated[int, Range(0)] | tuple[int, int],
            "dilation": Count | Pair, "groups": Count}


class LowbitModule(nn.Module):
    """A module that can describe itself as (JSON attributes, named tensors) and be rebuilt from them.

    ``spec_attrs`` declares the attributes of :meth:`to_spec` with their type hints (a key whose type
    admits None may be absent; an empty dict leaves them unchecked) and ``spec_tensors`` its tensors
    with their dtypes (a name ending in ``?`` is optional; a module that saves tensors must declare
    them, none are accepted otherwise): lowbit.io checks a file against both before calling
    :meth:`from_spec`, and a constructor should check what types cannot say (shapes, ranges).
    """

    kind: ClassVar[str] = "lowbit"
    spec_attrs: ClassVar[dict[str, Any]] = {}
    spec_tensors: ClassVar[dict[str, torch.dtype]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__module__.partition(".")[0] == "torch":
            return  # a subclass torch makes on the fly (torch.export's module proxies): not a new module type
        MODULES[cls.__name__] = cls
        fwd = cls.__dict__.get("forward")
        if fwd is not None and not getattr(fwd, "__lowbit_thread_guard__", False):
            cls.forward = guard_forward(fwd)  # torch single-threaded while it runs (lowbit.kernels.threads)

    @classmethod
    def tensor_spec(cls, attrs: dict[str, Any]) -> dict[str, torch.dtype]:
        """The tensors a file must hold for a module with (checked) ``attrs``: ``spec_tensors``, unless
        the names depend on the attributes (a recurrent layer's per-layer weights)."""
        return cls.spec_tensors

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
