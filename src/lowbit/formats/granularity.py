"""Granularity of quantization parameters: one scale per tensor, per slice along an axis, or per group.

Objects rather than flags, so configurations say what they mean (``PerAxis(0)``: one scale per output
channel of a weight) and new granularities need no new option. :func:`parse_granularity` reads the
CLI spellings ``per_tensor``, ``per_channel``, ``per_axis:1``, ``per_group:32``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Granularity", "PerTensor", "PerAxis", "PerGroup", "parse_granularity", "granularity_from_dict"]


class Granularity:
    """Base class. :meth:`param_shape` is the shape of the scale tensor for a tensor of ``shape``;
    :meth:`view` reshapes such a parameter so it broadcasts against that tensor."""

    def param_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def numel_per_param(self, shape: torch.Size | tuple[int, ...]) -> int:
        """How many tensor elements share one parameter (LSQ's ``N`` in its gradient scale)."""
        n = 1
        for s in shape:
            n *= int(s)
        p = 1
        for s in self.param_shape(shape):
            p *= int(s)
        return max(1, n // max(1, p))

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a 2-D ``[params, elements]`` view: row ``i`` holds what parameter ``i`` quantizes."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One parameter for the whole tensor."""

    def param_shape(self, shape: Any) -> tuple[int, ...]:
        return ()

    def view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p.reshape(())

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "per_tensor"}

    def __str__(self) -> str:
        return "per_tensor"


@dataclass(frozen=True)
class PerAxis(Granularity):
    """One parameter per index along ``axis`` (``PerAxis(0)``: per output channel of a weight)."""

    axis: int = 0

    def _ax(self, ndim: int) -> int:
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"axis {self.axis} is out of range for a {ndim}-D tensor")
        return self.axis % ndim

    def param_shape(self, shape: Any) -> tuple[int, ...]:
        return (int(shape[self._ax(len(shape))]),)

    def view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self._ax(x.dim())] = -1
        return p.reshape(shape)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(self._ax(x.dim()), 0).reshape(x.shape[self._ax(x.dim())], -1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "per_axis", "axis": self.axis}

    def __str__(self) -> str:
        return "per_channel" if self.axis == 0 else f"per_axis:{self.axis}"


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One parameter per ``group_size`` consecutive elements of each row (rows along ``axis`` 0, groups
    along the flattened remaining dimensions), as weight-only LLM quantizers use."""

    group_size: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group size must be a positive integer, got {self.group_size!r}")

    def _groups(self, shape: Any) -> int:
        k = 1
        for s in list(shape)[1:]:
            k *= int(s)
        if k % self.group_size:
            raise ValueError(f"{k} elements per row are not a multiple of the group size {self.group_size}")
        return k // self.group_size

    def param_shape(self, shape: Any) -> tuple[int, ...]:
        return (int(shape[0]), self._groups(shape))

    def view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # broadcast over the grouped view: [N, G, 1] expanded to [N, G, group] then back to x's shape
        g = self._groups(x.shape)
        return p.reshape(x.shape[0], g, 1).expand(x.shape[0], g, self.group_size).reshape(x.shape)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0] * self._groups(x.shape), self.group_size)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "per_group", "group_size": self.group_size}

    def __str__(self) -> str:
        return f"per_group:{self.group_size}"


def parse_granularity(v: Granularity | str | dict[str, Any] | None) -> Granularity:
    """A granularity object from itself, a dict (:meth:`Granularity.to_dict`) or a string
    (``per_tensor``, ``per_channel``, ``per_axis:N``, ``per_group:N``)."""
    if isinstance(v, Granularity):
        return v
    if isinstance(v, dict):
        return granularity_from_dict(v)
    if not isinstance(v, str):
        raise TypeError(f"granularity must be a Granularity, a dict or a string, got {v!r}")
    name, _, arg = v.strip().lower().replace("-", "_").partition(":")
    try:
        if name == "per_tensor" and not arg:
            return PerTensor()
        if name == "per_channel" and not arg:
            return PerAxis(0)
        if name == "per_axis":
            return PerAxis(int(arg or 0))
        if name == "per_group":
            return PerGroup(int(arg or 32))
    except ValueError:
        pass
    raise ValueError(f"unknown granularity {v!r}; use per_tensor, per_channel, per_axis:N or per_group:N")


def granularity_from_dict(d: dict[str, Any]) -> Granularity:
    kind = d.get("kind")
    if kind == "per_tensor":
        return PerTensor()
    if kind == "per_axis":
        return PerAxis(int(d.get("axis", 0)))
    if kind == "per_group":
        return PerGroup(int(d["group_size"]))
    raise ValueError(f"not a granularity description: {d!r}")
