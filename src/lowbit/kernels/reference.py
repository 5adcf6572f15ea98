"""Plain-PyTorch integer references: the bit-exact specification every native kernel is tested against.

Everything here is exact integer arithmetic (int64), so results do not depend on the machine.

Conventions shared with the native kernels (csrc/):
- int8 GEMM: activations ``x`` uint8 [M, K] with zero point ``x_zp``; weights int8 [N, K] (symmetric,
  zero point 0); ``acc[m, n] = sum_k (x[m, k] - x_zp) * w[n, k] + bias[n]`` in int32.
- Requantization epilogue: ``lowbit.formats.affine.requantize`` per output channel (Q31 ``m0``,
  ``rshift``), output zero point, clamp to [qmin, qmax] (a fused ReLU/ReLU6 is a tighter clamp).
- Float epilogue: ``out = float32(acc) * scale[n] + fbias[n]``, two float32 roundings, no FMA.
- Convolution: NCHW semantics; padded positions hold ``x_zp`` (i.e. real zero).
- Accumulator bound: with uint8 activations ``|acc[m, n] - bias[n]| <= 255 * sum_k |w[n, k]|``; weights (and
  biases) for which that bound (plus ``|bias|``) exceeds ``2^31 - 1`` are refused when they are packed, so
  no kernel ever wraps around (:class:`AccumulatorOverflowError`).
- Residual add (:func:`add_ref`): both inputs rescaled to the output scale by integer multipliers sharing
  one shift, summed in int64 and rounded once (half up).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowbit.formats.affine import requantize

from .epilogue import Epilogue, FloatOut, Requant


def apply_epilogue(acc: torch.Tensor, epi: Epilogue | None, channel_axis: int = -1) -> torch.Tensor:
    """int32 accumulator -> output of the epilogue (int32 if ``epi`` is None)."""
    if epi is None:
        return acc
    ax = channel_axis % acc.dim()
    shape = [1] * acc.dim()
    shape[ax] = -1
    if isinstance(epi, Requant):
        q = requantize(acc, epi.m0, epi.rshift, epi.out_zp, epi.qmin, epi.qmax, axis=ax)
        return q.to(epi.out_dtype)
    if isinstance(epi, FloatOut):
        y = acc.to(torch.float32) * epi.scale.to(torch.float32).reshape(shape)
        if epi.bias is not None:
            y = y + epi.bias.to(torch.float32).reshape(shape)
        return y
    raise TypeError(f"unknown epilogue {type(epi).__name__}")


INT32_MAX = 2**31 - 1


class AccumulatorOverflowError(ValueError, OverflowError):
    """The int32 accumulator of a layer could overflow (K too large for its weights and bias)."""


def _check_int32(acc64: torch.Tensor) -> torch.Tensor:
    if acc64.numel() and (acc64.max() > INT32_MAX or acc64.min() < -(2**31)):
        raise AccumulatorOverflowError("int32 accumulator overflow (K too large for these values)")
    return acc64.to(torch.int32)


def int8_gemm_ref(
    x: torch.Tensor, x_zp: int, w: torch.Tensor, bias: torch.Tensor | None = None, epi: Epilogue | None = None
) -> torch.Tensor:
    """uint8 [M, K] x int8 [N, K] -> epilogue([M, N])."""
    acc = (x.to(torch.int64) - int(x_zp)) @ w.to(torch.int64).t()
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    return apply_epilogue(_check_int32(acc), epi)


def int8_conv2d_ref(
    x: torch.Tensor,
    x_zp: int,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    epi: Epilogue | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """uint8 NCHW x int8 [N, C/groups, kh, kw] -> epilogue(NCHW). Exact: float64 holds every partial sum."""
    xc = x.to(torch.float64) - float(x_zp)  # padding with 0 here == padding with x_zp in code space
    acc = F.conv2d(xc, w.to(torch.float64), None, stride, padding, dilation, groups)
    acc = torch.round(acc).to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64).reshape(1, -1, 1, 1)
    return apply_epilogue(_check_int32(acc), epi, channel_axis=1)


# ------------------------------------------------------------------------ pooling on uint8 codes
# Scale and zero point pass through unchanged. Every sum below is exact in float32 (codes <= 255, at
# most 2^16 of them per window), so the plain float pooling ops of PyTorch serve as references.


def _round_div(s: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """Round-half-up integer division of non-negative sums."""
    return torch.div(s + torch.div(n, 2, rounding_mode="floor"), n, rounding_mode="floor")


def adaptive_counts(n_in: int, n_out: int) -> torch.Tensor:
    """Window lengths of adaptive pooling: [floor(i n_in / n_out), ceil((i+1) n_in / n_out))."""
    return torch.tensor([-(-(i + 1) * n_in // n_out) - (i * n_in // n_out) for i in range(n_out)])


def max_pool2d_ref(x: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                   ceil_mode: bool = False) -> torch.Tensor:
    """Max pooling of uint8 codes: ``F.max_pool2d`` on the codes as floats (padding never wins)."""
    y = F.max_pool2d(x.to(torch.float32), kernel_size, stride, padding, dilation, ceil_mode)
    return y.to(torch.uint8)


def avg_pool2d_ref(x: torch.Tensor, zero_point: int, kernel_size: Any, stride: Any = None,
                   padding: Any = 0) -> torch.Tensor:
    """Average pooling of uint8 codes: padding holds ``zero_point`` and counts, divisor kh*kw, rounding
    half up."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=int(zero_point))
    sums = F.avg_pool2d(x.to(torch.float32), (kh, kw), stride if stride is not None else (kh, kw),
                        divisor_override=1)
    return _round_div(torch.round(sums).to(torch.int64), kh * kw).to(torch.uint8)


def adaptive_avg_pool2d_ref(x: torch.Tensor, output_size: Any) -> torch.Tensor:
    """Adaptive average pooling of uint8 codes: window sums divided by the window sizes, rounding half up."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if (oh, ow) == (1, 1):
        n = x.shape[-1] * x.shape[-2]
        return _round_div(x.to(torch.int64).sum((-2, -1), keepdim=True), n).to(torch.uint8)
    avg = F.adaptive_avg_pool2d(x.to(torch.float32), (oh, ow))
    cnt = adaptive_counts(x.shape[-2], oh)[:, None] * adaptive_counts(x.shape[-1], ow)[None, :]
    sums = torch.round(avg.to(torch.float64) * cnt).to(torch.int64)
    return _round_div(sums, cnt).to(torch.uint8)


def add_ref(
    a: torch.Tensor, a_zp: int, b: torch.Tensor, b_zp: int, m_a: int, m_b: int, rshift: int, out_zp: int,
    lo: int = 0, hi: int = 255,
) -> torch.Tensor:
    """Residual add of uint8 codes, the specification (one rounding):

    ``acc = m_a (a - a_zp) + m_b (b - b_zp)`` in int64, ``out = clamp(((acc + 2^(rshift-1)) >> rshift) + out_zp,
    lo, hi)`` with an arithmetic shift (rounds half up), as uint8. ``lo = max(0, out_zp)`` fuses a ReLU.
    ``m_a, m_b, rshift`` come from :func:`lowbit.formats.affine.add_multipliers`. a and b broadcast."""
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise TypeError(f"residual add takes uint8 codes, got {a.dtype} and {b.dtype}")
    if not 1 <= int(rshift) <= 62:
        raise ValueError(f"residual add shift {rshift} outside [1, 62]")
    if not 0 <= int(lo) <= int(hi) <= 255:
        raise ValueError(f"residual add clamp [{lo}, {hi}] outside [0, 255]")
    acc = (a.to(torch.int64) - int(a_zp)) * int(m_a) + (b.to(torch.int64) - int(b_zp)) * int(m_b)
    out = torch.bitwise_right_shift(acc + (1 << (int(rshift) - 1)), int(rshift)) + int(out_zp)
    return torch.clamp(out, int(lo), int(hi)).to(torch.uint8)


def quantize_u8_ref(x: torch.Tensor, scale: float | torch.Tensor, zp: int, lo: int = 0, hi: int = 255
                    ) -> torch.Tensor:
    """``clamp(round(x / scale) + zp, lo, hi)`` as uint8, float32 operations in that order."""
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        scale = scale.to(torch.float32).reshape(-1, 1)
        q = torch.div(x.to(torch.float32).reshape(scale.shape[0], -1), scale).reshape(x.shape)
    else:
        q = torch.div(x.to(torch.float32), float(scale))
    q.round_().add_(zp).clamp_(lo, hi)
    return q.to(torch.uint8)
