"""Affine integer formats: what numbers a quantized tensor can hold, and the exact integer math.

``real = scale * (q - zero_point)`` (docs/methods.md, "Formats and the integer scheme"). Pure functions
on tensors, no state.

Requantization follows Jacob et al. (CVPR 2018): a real multiplier ``M`` (``s_in * s_w / s_out``) is
stored as a Q31 fixed-point mantissa ``m0`` in ``[2^30, 2^31)`` (i.e. ``M0 = m0 / 2^31`` in
``[0.5, 1)``) and a right shift; the int32 accumulator is scaled as

    out = clamp(((acc * m0) + 2^(rshift-1)) >> rshift + zero_point, qmin, qmax)

with ``rshift = 31 + n`` where ``M = M0 * 2^-n``, computed in 64-bit integers and rounded half up
(towards +inf). This single-rounding form is lowbit's reading of the Q31 scheme: it is what the
native kernels implement, and the plain-PyTorch reference here is the bit-exact specification
they are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .levels import Format

__all__ = [
    "QFormat",
    "INT8_WEIGHT",
    "UINT8_ACT",
    "qrange",
    "choose_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_multiplier",
    "requantize",
    "add_multipliers",
    "quantize_bias",
]


@dataclass(frozen=True)
class QFormat(Format):
    """A 2..8-bit power-of-two integer range (the post-training methods' formats); any other level set
    is a :class:`~lowbit.formats.levels.Format` of :mod:`lowbit.formats.levels`.

    bits: 2..8. signed: int (two's complement range) or uint. symmetric: zero point fixed
    (0 for signed, mid-range for unsigned). narrow: drop the most negative code so the range is
    symmetric ([-127, 127] for int8), which lets a weight and its negation both be represented.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow: bool = False
    kind: ClassVar[str] = "qformat"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bit width must be in 2..8, got {self.bits}")

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(range(self.qmin, self.qmax + 1))

    @property
    def n_levels(self) -> int:
        return self.qmax - self.qmin + 1

    @property
    def uniform(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "bits": self.bits, "signed": self.signed, "symmetric": self.symmetric,
                "narrow": self.narrow}

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> QFormat:
        return cls(int(d["bits"]), bool(d["signed"]), bool(d["symmetric"]), bool(d.get("narrow", False)))

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[1]

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8


#: docs/methods.md: weights int8 symmetric in [-127, 127], zero point 0.
INT8_WEIGHT = QFormat(bits=8, signed=True, symmetric=True, narrow=True)
#: docs/methods.md: activations per tensor, asymmetric uint8.
UINT8_ACT = QFormat(bits=8, signed=False, symmetric=False, narrow=False)


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a format: int8 -> (-128, 127), narrow int8 -> (-127, 127), uint8 -> (0, 255)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bit width must be in 2..8, got {bits}")
    if signed:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return (lo + 1 if narrow else lo), hi
    return (1 if narrow else 0), (1 << bits) - 1


def _as_tensor(v: torch.Tensor | float) -> torch.Tensor:
    return v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)


def _choose_qparams_one(min_val: float, max_val: float, fmt: QFormat, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`choose_qparams` of one range given as Python floats: the same float64 operations in the same
    order (Python's ``round`` rounds half to even like ``torch.round``), without tensor overhead."""
    lo, hi = min(min_val, 0.0), max(max_val, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("cannot choose quantization parameters for a range with NaN or Inf")
    qmin, qmax = fmt.qmin, fmt.qmax
    if fmt.symmetric:
        amax = max(-lo, hi)
        if fmt.signed:
            scale, zp = amax / float(min(-qmin, qmax)), 0.0
        else:
            scale, zp = 2 * amax / float(qmax - qmin), float((qmin + qmax + 1) // 2)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        zp = float(min(max(round(qmin - lo / max(scale, eps)), qmin), qmax))
    scale = max(scale, eps) if hi - lo > 0 else 1.0
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(int(zp), dtype=torch.int32)


def choose_qparams(
    min_val: torch.Tensor | float,
    max_val: torch.Tensor | float,
    fmt: Format,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the real range [min_val, max_val] onto ``fmt``.

    Works element-wise, so per-channel ranges give per-channel parameters. The range is first
    widened to include 0, so that real zero is exactly representable (zero padding, ReLU). An empty
    range (all zeros: a pruned channel, a dead activation) gets scale 1, so every value is the code of
    real zero. ``fmt`` may be any level set: its extreme levels ``qmin`` and ``qmax`` map onto the range.
    Returns (scale float32, zero_point int32).
    """
    if type(min_val) is float and type(max_val) is float and type(fmt) is QFormat:
        return _choose_qparams_one(min_val, max_val, fmt, eps)  # per call (dynamic layers): no tensor ops
    lo = torch.minimum(_as_tensor(min_val), torch.zeros(()))
    hi = torch.maximum(_as_tensor(max_val), torch.zeros(()))
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("cannot choose quantization parameters for a range with NaN or Inf")
    qmin, qmax = fmt.qmin, fmt.qmax
    if fmt.symmetric:
        amax = torch.maximum(-lo, hi)
        if fmt.signed:
            scale = amax / float(min(-qmin, qmax))
            zp = torch.zeros_like(scale)
        elif not isinstance(fmt, QFormat):  # unsigned level set with its zero point fixed at 0 (ReLU outputs)
            scale = hi / float(qmax)
            zp = torch.zeros_like(scale)
        else:
            scale = 2 * amax / float(qmax - qmin)
            zp = torch.full_like(scale, float((qmin + qmax + 1) // 2))
    else:
        scale = (hi - lo) / float(qmax - qmin)
        zp = torch.clamp(torch.round(qmin - lo / torch.clamp(scale, min=eps)), qmin, qmax)
    scale = torch.where(hi - lo > 0, torch.clamp(scale, min=eps), torch.ones_like(scale))
    return scale.to(torch.float32), zp.to(torch.int32)


def _bcast(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    fmt: Format,
    axis: int | None = None,
) -> torch.Tensor:
    """``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` (round half to even), as ``fmt.dtype``;
    for a non-uniform level set the clamped integer is then snapped to its nearest level
    (:meth:`~lowbit.formats.levels.Format.project`)."""
    s = _bcast(torch.as_tensor(scale, dtype=torch.float32), x, axis)
    z = _bcast(torch.as_tensor(zero_point, dtype=torch.int32), x, axis)
    q = torch.clamp(torch.round(x.to(torch.float32) / s) + z, fmt.qmin, fmt.qmax)
    if not fmt.uniform:
        q = fmt.project(q)
    return q.to(fmt.dtype)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    axis: int | None = None,
) -> torch.Tensor:
    """``real = scale * (q - zero_point)`` as float32."""
    s = _bcast(torch.as_tensor(scale, dtype=torch.float32), q, axis)
    z = _bcast(torch.as_tensor(zero_point, dtype=torch.int32), q, axis)
    return (q.to(torch.int32) - z).to(torch.float32) * s


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    fmt: Format,
    axis: int | None = None,
) -> torch.Tensor:
    """Quantize then dequantize (float in, float out); the values an integer layer would see."""
    return dequantize(quantize(x, scale, zero_point, fmt, axis), scale, zero_point, axis)


def quantize_multiplier(multiplier: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Real multiplier(s) ``M > 0`` -> (``m0`` int32 Q31 mantissa in [2^30, 2^31), ``rshift`` int32).

    ``M ≈ m0 * 2^-rshift`` with ``rshift = 31 + n`` and ``M = M0 * 2^-n``, ``M0 in [0.5, 1)``.
    Valid for ``2^-31 < M < 2^30`` (rshift in [1, 62]); anything else is a clear error.
    """
    m = _as_tensor(multiplier).reshape(-1)
    if not torch.isfinite(m).all() or (m <= 0).any():
        raise ValueError("requantization multipliers must be finite and positive")
    m0s, shifts = [], []
    for v in m.tolist():
        mant, exp = math.frexp(v)  # v = mant * 2^exp, mant in [0.5, 1)
        q = round(mant * (1 << 31))
        if q == (1 << 31):  # rounding carried into the next power of two
            q //= 2
            exp += 1
        rshift = 31 - exp
        if not 1 <= rshift <= 62:
            raise ValueError(f"requantization multiplier {v:g} is outside the representable range")
        m0s.append(q)
        shifts.append(rshift)
    shape = _as_tensor(multiplier).shape
    return (
        torch.tensor(m0s, dtype=torch.int32).reshape(shape),
        torch.tensor(shifts, dtype=torch.int32).reshape(shape),
    )


def requantize(
    acc: torch.Tensor,
    m0: torch.Tensor,
    rshift: torch.Tensor,
    zero_point: int,
    qmin: int,
    qmax: int,
    axis: int = -1,
) -> torch.Tensor:
    """Reference integer requantization (see module docstring). ``acc`` int32; per-channel ``m0``,
    ``rshift`` broadcast along ``axis``. Returns int32 codes in [qmin, qmax]."""
    if acc.dtype != torch.int32:
        raise TypeError(f"accumulator must be int32, got {acc.dtype}")
    ax = axis % acc.dim()
    m = _bcast(m0.to(torch.int64), acc, ax)
    r = _bcast(rshift.to(torch.int64), acc, ax)
    v = acc.to(torch.int64) * m + torch.bitwise_left_shift(torch.ones_like(r), r - 1)
    out = torch.bitwise_right_shift(v, r) + zero_point
    return torch.clamp(out, qmin, qmax).to(torch.int32)


def add_multipliers(s_a: float, s_b: float, s_out: float) -> tuple[int, int, int]:
    """Integer multipliers of a residual add ``out = a + b`` (scales ``s_a``, ``s_b`` -> ``s_out``).

    ``M_a = s_a / s_out``, ``M_b = s_b / s_out``; ``rshift`` is the shift :func:`quantize_multiplier` gives
    for ``max(M_a, M_b)`` (so the larger multiplier's mantissa is below ``2^31``), and
    ``m = round(M * 2^rshift)`` in float64 (exact products; Python ``round``, i.e. half to even). Returns
    ``(m_a, m_b, rshift)``; both multipliers must be >= 1, otherwise the scales differ by more than
    ``2^31`` and the add is refused. The arithmetic is :func:`lowbit.kernels.reference.add_ref`.
    """
    m_a, m_b = float(s_a) / float(s_out), float(s_b) / float(s_out)
    if not all(math.isfinite(v) and v > 0 for v in (m_a, m_b)):
        raise ValueError(f"residual add scales must be finite and positive, got {s_a}, {s_b} -> {s_out}")
    _, rs = quantize_multiplier(max(m_a, m_b))
    rshift = int(rs)
    ma, mb = round(m_a * 2.0**rshift), round(m_b * 2.0**rshift)
    if min(ma, mb) < 1:
        raise ValueError(
            f"residual add input scales {s_a:g} and {s_b:g} differ by more than 2^31 relative to the output "
            f"scale {s_out:g}: the smaller input would vanish"
        )
    return ma, mb, rshift


def quantize_bias(bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """Bias as int32 at scale ``s_in * s_w`` (per output channel), saturating at the int32 range."""
    s = weight_scale.to(torch.float64) * float(input_scale)
    q = torch.round(bias.to(torch.float64) / s)
    return torch.clamp(q, -(2**31), 2**31 - 1).to(torch.int32)
