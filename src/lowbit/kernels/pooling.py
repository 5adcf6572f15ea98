"""Max pooling on integer codes, plain PyTorch (exact for any map size, any memory format).

Max pooling commutes with every monotone (non-decreasing) map, so pooling the codes of a per-tensor
quantized activation equals quantizing the pooled float values: the codes keep their scale and
zero point. Padded positions hold the lowest code of the dtype, so they never win a window that
holds a real value (torch ignores padding the same way: it pads with -inf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _pair(v: Any, what: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) == 1:
        t = (t[0], t[0])
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise ValueError(f"max-pool {what} must be an int or a pair of ints, got {v!r}")
    return (int(t[0]), int(t[1]))


@dataclass(frozen=True)
class PoolGeometry:
    """Window of a 2-D max pool, checked as torch checks it (``stride`` None: the kernel size)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool

    @classmethod
    def make(cls, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
             ceil_mode: bool = False) -> PoolGeometry:
        k = _pair(kernel_size, "kernel_size")
        s = k if stride is None or stride == () or stride == [] else _pair(stride, "stride")
        p, d = _pair(padding, "padding"), _pair(dilation, "dilation")
        if min(k) < 1 or min(s) < 1 or min(d) < 1 or min(p) < 0:
            raise ValueError(f"max-pool kernel {k}, stride {s} and dilation {d} must be >= 1, padding {p} >= 0")
        for pi, ki, di in zip(p, k, d, strict=True):
            if 2 * pi > di * (ki - 1) + 1:
                raise ValueError(f"max-pool padding {p} must be at most half the effective kernel size")
        if not isinstance(ceil_mode, bool):
            raise ValueError(f"max-pool ceil_mode must be a bool, got {ceil_mode!r}")
        return cls(k, s, p, d, ceil_mode)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Output (height, width) for an input map of ``h`` x ``w``, as torch's max_pool2d computes it."""
        out = []
        for n, k, s, p, d in zip((h, w), self.kernel, self.stride, self.padding, self.dilation, strict=True):
            span = n + 2 * p - d * (k - 1) - 1
            if span < 0:
                raise ValueError(f"max-pool input {h}x{w} is smaller than the window {self.kernel} (dilation "
                                 f"{self.dilation}, padding {self.padding})")
            o = (span + (s - 1 if self.ceil_mode else 0)) // s + 1
            if self.ceil_mode and (o - 1) * s >= n + p:  # the last window must start inside the input
                o -= 1
            out.append(o)
        return out[0], out[1]


def max_pool2d_codes(x: torch.Tensor, g: PoolGeometry) -> torch.Tensor:
    """``max`` over each window of ``x`` [..., H, W] (integer codes); NCHW semantics."""
    if x.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"max-pool on codes takes uint8 or int8, got {x.dtype}")
    if x.dim() not in (3, 4):
        raise ValueError(f"max-pool input must be 3-D or 4-D, got shape {tuple(x.shape)}")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    (oh, ow), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.output_size(h, w), g.kernel, g.stride, g.padding, g.dilation
    need_h, need_w = (oh - 1) * sh + dh * (kh - 1) + 1, (ow - 1) * sw + dw * (kw - 1) + 1
    if ph or pw or need_h > h + ph or need_w > w + pw:
        xp = torch.full((*x.shape[:-2], max(need_h, h + ph), max(need_w, w + pw)), torch.iinfo(x.dtype).min,
                        dtype=x.dtype)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            xp = xp.contiguous(memory_format=torch.channels_last)
        xp[..., ph:ph + h, pw:pw + w] = x
    else:
        xp = x
    out: torch.Tensor | None = None
    for i in range(kh):
        for j in range(kw):
            v = xp[..., i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            out = v.clone() if out is None else torch.maximum(out, v, out=out)
    assert out is not None
    return out
