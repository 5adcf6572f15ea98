"""What a kernel does with its int32 accumulator before writing the output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class EpilogueBase:
    """Kernel bindings cache validated native arguments on epilogue objects (``_lb_*`` attributes,
    holding raw data pointers); copies and pickles must not carry them."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_lb_")}


@dataclass
class Requant(EpilogueBase):
    """Per-channel integer requantization to 8-bit codes (see lowbit.formats.affine.requantize)."""

    m0: torch.Tensor  # int32 [N], Q31 mantissa
    rshift: torch.Tensor  # int32 [N], in [1, 62]
    out_zp: int
    qmin: int
    qmax: int
    out_dtype: torch.dtype = torch.uint8

    def __post_init__(self) -> None:
        self.m0 = self.m0.to(torch.int32).contiguous().reshape(-1)
        self.rshift = self.rshift.to(torch.int32).contiguous().reshape(-1)
        lo, hi = (0, 255) if self.out_dtype == torch.uint8 else (-128, 127)
        if self.out_dtype not in (torch.uint8, torch.int8):
            raise TypeError(f"requantized output must be uint8 or int8, got {self.out_dtype}")
        if not lo <= self.qmin <= self.qmax <= hi:
            raise ValueError(f"clamp [{self.qmin}, {self.qmax}] is outside the {self.out_dtype} range")


@dataclass
class FloatOut(EpilogueBase):
    """``out = float32(acc) * scale[n] + bias[n]`` (dequantized output)."""

    scale: torch.Tensor  # float32 [N]
    bias: torch.Tensor | None = None  # float32 [N]

    def __post_init__(self) -> None:
        self.scale = self.scale.to(torch.float32).contiguous().reshape(-1)
        if self.bias is not None:
            self.bias = self.bias.to(torch.float32).contiguous().reshape(-1)


Epilogue = Requant | FloatOut
