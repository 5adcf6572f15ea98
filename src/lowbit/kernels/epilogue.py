"""What a kernel does with its int32 accumulator before writing the output.

The native kernels of every family (int8, 4.6-bit, binary) share one description of these epilogues
(csrc/epilogue.h); :data:`EPI_KIND` is its numbering, the ``kind`` argument of every binding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: csrc/epilogue.h's epilogue kinds (checked against ``lowbit._native.epilogue_kinds()`` by the tests).
EPI_KIND = {"none": 0, "float_out": 1, "requant_u8": 2, "requant_s8": 3, "bits": 4}


class EpilogueBase:
    """Kernel bindings cache validated native arguments on epilogue objects (``_lb_*`` attributes,
    holding raw data pointers); copies and pickles must not carry them."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_lb_")}


@dataclass
class Requant(EpilogueBase):
    """Integer requantization to 8-bit codes (see lowbit.formats.affine.requantize), per output channel
    (``m0``, ``rshift`` of length N) or per tensor (length 1, the same for every channel)."""

    m0: torch.Tensor  # int32 [N] or [1], Q31 mantissa
    rshift: torch.Tensor  # int32 [N] or [1], in [1, 62]
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
        if self.m0.numel() != self.rshift.numel() and 1 not in (self.m0.numel(), self.rshift.numel()):
            raise ValueError(f"Requant has {self.m0.numel()} multipliers but {self.rshift.numel()} shifts")

    @property
    def kind(self) -> int:
        return EPI_KIND["requant_u8" if self.out_dtype == torch.uint8 else "requant_s8"]

    def per_channel(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(m0, rshift) as contiguous int32 [n] (per-tensor parameters repeated); cached per n."""
        cached = getattr(self, "_lb_per_channel", None)
        key = (n, self.m0.data_ptr(), self.m0._version, self.rshift.data_ptr(), self.rshift._version)
        if cached is not None and cached[0] == key:
            return cached[1]
        pair = []
        for t, what in ((self.m0, "multipliers"), (self.rshift, "shifts")):
            if t.numel() == 1 and n != 1:
                t = t.expand(n).contiguous()
            if t.numel() != n:
                raise ValueError(f"Requant has {t.numel()} {what}, the layer has {n} output channels")
            pair.append(t)
        out = (pair[0], pair[1])
        object.__setattr__(self, "_lb_per_channel", (key, out))
        return out


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


@dataclass
class ResidualAdd:
    """A residual add fused into a convolution's uint8 requantizing epilogue.

    The convolution's own output code ``c`` (zero point ``Requant.out_zp``, clamp ``[qmin, qmax]``) is
    added to the residual code ``r`` (``residual``: uint8 with the convolution's output shape) with the
    single-rounding add of :func:`lowbit.kernels.reference.add_ref`:
    ``out = clamp(((m_a (c - out_zp_conv) + m_b (r - r_zp) + 2^(rshift-1)) >> rshift) + out_zp, lo, hi)``
    (``lo = max(0, out_zp)`` fuses a ReLU). Bit-exact with running the convolution, then the add.
    """

    residual: torch.Tensor
    r_zp: int
    m_a: int
    m_b: int
    rshift: int
    out_zp: int
    lo: int = 0
    hi: int = 255

    def __post_init__(self) -> None:
        if not isinstance(self.residual, torch.Tensor) or self.residual.dtype != torch.uint8:
            raise TypeError("the residual of a fused add must be a uint8 tensor of codes")
        if not 0 <= int(self.r_zp) <= 255:
            raise ValueError(f"residual zero point {self.r_zp} outside [0, 255]")
        if not (1 <= int(self.m_a) <= 2**31 and 1 <= int(self.m_b) <= 2**31):
            raise ValueError("residual add multipliers must be in [1, 2^31]")
        if not 1 <= int(self.rshift) <= 62:
            raise ValueError(f"residual add shift {self.rshift} outside [1, 62]")
        if not 0 <= int(self.lo) <= int(self.hi) <= 255:
            raise ValueError(f"residual add clamp [{self.lo}, {self.hi}] outside [0, 255]")
