"""The quantized-value spec: how to read the integer codes of one tensor.

A :class:`QSpec` says which levels the codes take (a :class:`~lowbit.formats.levels.Format`), their
scale and zero point (``real = scale * (code - zero_point)``), the granularity of those parameters and
the layout of the codes in memory (``nchw``: the tensor's own layout; ``nhwc``: channels last;
``bits64``: ±1 codes bit-packed along the channels into 64-bit words). The graph builder tracks one
spec per value, integer layers are built from the specs of their input and output and write them into
the model file, and the quantizers of training-aware methods export one. The tensors that flow between
layers at run time stay bare tensors (for speed); the specs are their description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .granularity import Granularity, PerTensor, parse_granularity
from .levels import BinaryFormat, Codebook, Format, IntRange, format_from_dict

__all__ = ["QSpec", "LAYOUTS", "as_spec"]

#: Memory layouts of codes: the tensor's own (NCHW for images), channels-last, bit-packed signs.
LAYOUTS = ("nchw", "nhwc", "bits64")


def _floats(v: Any) -> tuple[float, ...]:
    if isinstance(v, torch.Tensor):
        return tuple(float(t) for t in v.detach().reshape(-1).tolist())
    if isinstance(v, (list, tuple)):
        return tuple(float(t) for t in v)
    return (float(v),)


def _ints(v: Any) -> tuple[int, ...]:
    if isinstance(v, torch.Tensor):
        return tuple(int(t) for t in v.detach().reshape(-1).tolist())
    if isinstance(v, (list, tuple)):
        return tuple(int(t) for t in v)
    return (int(v),)


@dataclass(frozen=True)
class QSpec:
    """Format, scale(s), zero point(s), granularity and layout of one quantized value."""

    format: Format
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    granularity: Granularity = field(default_factory=PerTensor)
    layout: str = "nchw"

    def __post_init__(self) -> None:
        if not isinstance(self.format, Format):
            raise TypeError(f"QSpec.format must be a Format, got {type(self.format).__name__}")
        object.__setattr__(self, "scale", _floats(self.scale))
        object.__setattr__(self, "zero_point", _ints(self.zero_point))
        object.__setattr__(self, "granularity", parse_granularity(self.granularity))
        if len(self.zero_point) == 1 and len(self.scale) > 1:
            object.__setattr__(self, "zero_point", self.zero_point * len(self.scale))
        if len(self.scale) != len(self.zero_point) or not self.scale:
            raise ValueError(f"{len(self.scale)} scales but {len(self.zero_point)} zero points")
        if isinstance(self.granularity, PerTensor) and len(self.scale) != 1:
            raise ValueError(f"a per-tensor spec has one scale, got {len(self.scale)}")
        if not all(math.isfinite(s) and s > 0 for s in self.scale):
            raise ValueError(f"scales must be finite and positive, got {list(self.scale)[:4]}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; known: {', '.join(LAYOUTS)}")

    @classmethod
    def per_tensor(cls, fmt: Format, scale: float, zero_point: int = 0, layout: str = "nchw") -> QSpec:
        return cls(fmt, (float(scale),), (int(zero_point),), PerTensor(), layout)

    # --- parameters ---------------------------------------------------------------------------
    @property
    def per_tensor_params(self) -> tuple[float, int]:
        """``(scale, zero_point)`` of a per-tensor spec (ValueError otherwise)."""
        if len(self.scale) != 1:
            raise ValueError(f"this spec has {len(self.scale)} scales ({self.granularity}), not one")
        return self.scale[0], self.zero_point[0]

    def scale_tensor(self) -> torch.Tensor:
        return torch.tensor(self.scale, dtype=torch.float32)

    def zero_point_tensor(self) -> torch.Tensor:
        return torch.tensor(self.zero_point, dtype=torch.int32)

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = self.scale_tensor(), self.zero_point_tensor()
        if len(self.scale) == 1:
            return s.reshape(()), z.reshape(())
        return self.granularity.view(s, x), self.granularity.view(z, x)

    # --- conversion ---------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x`` in :attr:`format` (``clamp(round(x / s) + z)``, then the nearest level; for ±1 the
        sign of ``x``, ``+1`` where ``x > 0``)."""
        s, z = self._params(x)
        if isinstance(self.format, BinaryFormat):  # the sign (+1 for x > 0), not the nearest of {-1, 0, +1}
            return self.format.project(x.to(torch.float32) / s).to(self.format.dtype)
        q = torch.clamp(torch.round(x.to(torch.float32) / s) + z, self.format.qmin, self.format.qmax)
        if not self.format.uniform:
            q = self.format.project(q)
        return q.to(self.format.dtype)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """``scale * (q - zero_point)`` as float32."""
        s, z = self._params(q)
        return (q.to(torch.int32) - z).to(torch.float32) * s

    def unsigned(self) -> QSpec:
        """The same values with codes shifted to start at 0 (``code - qmin``, zero point moved alike): what
        kernels taking unsigned 8-bit activations need. Identity for formats that start at 0 or above."""
        lo = self.format.qmin
        if lo >= 0:
            return self
        levels = tuple(v - lo for v in self.format.levels)
        if self.format.uniform:
            fmt: Format = IntRange(0, levels[-1], False)
        else:
            fmt = Codebook(levels, False, getattr(self.format, "name", ""), getattr(self.format, "center", 0) - lo)
        return QSpec(fmt, self.scale, tuple(z - lo for z in self.zero_point), self.granularity, self.layout)

    # --- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format.to_dict(), "scale": list(self.scale), "zero_point": list(self.zero_point),
                "granularity": self.granularity.to_dict(), "layout": self.layout}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QSpec:
        if not isinstance(d, dict) or not {"format", "scale", "zero_point"} <= set(d):
            raise ValueError(f"not a quantized-value spec: {d!r}")
        return cls(format_from_dict(d["format"]), tuple(d["scale"]), tuple(d["zero_point"]),
                   parse_granularity(d.get("granularity", "per_tensor")), str(d.get("layout", "nchw")))

    def __str__(self) -> str:
        if len(self.scale) == 1:
            return f"{self.format} scale={self.scale[0]:.6g} zp={self.zero_point[0]} {self.layout}"
        return f"{self.format} {self.granularity} ({len(self.scale)} scales) {self.layout}"


def as_spec(v: QSpec | tuple[float, int] | None, fmt: Format) -> QSpec | None:
    """A spec from itself or a legacy ``(scale, zero_point)`` pair in ``fmt`` (None stays None)."""
    if v is None or isinstance(v, QSpec):
        return v
    s, z = v
    return QSpec.per_tensor(fmt, float(s), int(z))

