"""Element-wise and pooling ops on quantized activation codes (uint8, per-tensor scale and zero point)."""

from __future__ import annotations

from typing import Any

import torch

from lowbit import kernels
from lowbit.formats.affine import UINT8_ACT, dequantize, quantize, quantize_multiplier

from .base import LowbitModule, pair


class Quantize(LowbitModule):
    """float -> uint8 codes (the entry of an integer region)."""

    def __init__(self, scale: float, zero_point: int) -> None:
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.scale, self.zero_point, UINT8_ACT)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"scale": self.scale, "zero_point": self.zero_point}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Quantize:
        return cls(attrs["scale"], attrs["zero_point"])

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}"


class Dequantize(Quantize):
    """uint8 codes -> float (the exit of an integer region)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize(x, self.scale, self.zero_point)


class IOConvert(LowbitModule):
    """Full-integer model boundary: uint8 codes <-> int8 codes (``int8 = uint8 - 128``, zero point - 128)."""

    def __init__(self, to: str) -> None:
        super().__init__()
        if to not in ("int8", "uint8"):
            raise ValueError(f"IOConvert target must be int8 or uint8, got {to!r}")
        self.to = to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to == "int8":
            if x.dtype != torch.uint8:
                raise TypeError(f"expected uint8 codes, got {x.dtype}")
            return (x.to(torch.int16) - 128).to(torch.int8)
        if x.dtype != torch.int8:
            raise TypeError(f"this full-integer model takes int8 input, got {x.dtype}")
        return (x.to(torch.int16) + 128).to(torch.uint8)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"to": self.to}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> IOConvert:
        return cls(attrs["to"])


class CheckInput(LowbitModule):
    """Full-integer model entry: reject input of the wrong dtype instead of silently misreading it."""

    def __init__(self, dtype: str) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if str(x.dtype).removeprefix("torch.") != self.dtype:
            raise TypeError(f"this full-integer model takes {self.dtype} input codes, got {x.dtype}")
        return x

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"dtype": self.dtype}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CheckInput:
        return cls(attrs["dtype"])


class QClamp(LowbitModule):
    """ReLU / ReLU6 on codes: a clamp, the scale and zero point are unchanged."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__()
        self.lo, self.hi = int(lo), int(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"lo": self.lo, "hi": self.hi}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QClamp:
        return cls(attrs["lo"], attrs["hi"])


_ADD_FRAC = 16  # fractional bits of the common scale in QAdd


class QAdd(LowbitModule):
    """Integer residual add: ``out = zo + round(Ma (a - za) + Mb (b - zb))``, ``M = s_in / s_out``.

    Each input is rescaled by its own Q31 multiplier to units of ``s_out / 2^16`` (64-bit
    integers), the two are summed and rounded once more: integer-only, as in TFLite's ADD.
    """

    def __init__(self, a: tuple[float, int], b: tuple[float, int], out: tuple[float, int]) -> None:
        super().__init__()
        self.a, self.b, self.out = (float(a[0]), int(a[1])), (float(b[0]), int(b[1])), (float(out[0]), int(out[1]))
        ma, sa = quantize_multiplier(self.a[0] / self.out[0])
        mb, sb = quantize_multiplier(self.b[0] / self.out[0])
        if int(sa) <= _ADD_FRAC or int(sb) <= _ADD_FRAC:
            raise ValueError("residual add input scale is too large relative to its output scale")
        self._m = (int(ma), int(sa) - _ADD_FRAC, int(mb), int(sb) - _ADD_FRAC)

    @staticmethod
    def _scale(x: torch.Tensor, zp: int, m0: int, shift: int) -> torch.Tensor:
        v = (x.to(torch.int64) - zp) * m0 + (1 << (shift - 1))
        return torch.bitwise_right_shift(v, shift)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ma, sa, mb, sb = self._m
        acc = self._scale(x, self.a[1], ma, sa) + self._scale(y, self.b[1], mb, sb)
        out = torch.bitwise_right_shift(acc + (1 << (_ADD_FRAC - 1)), _ADD_FRAC) + self.out[1]
        return torch.clamp(out, 0, 255).to(torch.uint8)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"a": list(self.a), "b": list(self.b), "out": list(self.out)}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QAdd:
        return cls(tuple(attrs["a"]), tuple(attrs["b"]), tuple(attrs["out"]))


class QAvgPool2d(LowbitModule):
    """Average pooling of codes (scale and zero point unchanged): integer window sums, rounded division.

    ``output_size`` set: adaptive pooling (global pooling when it is 1); else kernel/stride/padding.
    Padded positions count as the zero point (real zero), like a float average with zero padding.
    """

    def __init__(self, zero_point: int, kernel_size: Any = None, stride: Any = None, padding: Any = 0,
                 output_size: Any = None) -> None:
        super().__init__()
        self.zero_point = int(zero_point)
        self.output_size = None if output_size is None else pair(output_size)
        self.kernel_size = None if kernel_size is None else pair(kernel_size)
        self.stride = None if self.kernel_size is None else pair(stride if stride is not None else kernel_size)
        self.padding = pair(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_size is not None:
            return kernels.adaptive_avg_pool2d(x, self.output_size)
        return kernels.avg_pool2d(x, self.zero_point, self.kernel_size, self.stride, self.padding)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"zero_point": self.zero_point, "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "output_size": self.output_size}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QAvgPool2d:
        return cls(attrs["zero_point"], attrs["kernel_size"], attrs["stride"], attrs["padding"],
                   attrs["output_size"])
