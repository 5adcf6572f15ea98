"""Level sets: which integer codes a quantized tensor may hold (docs/methods.md, "Formats").

A :class:`Format` is a finite, sorted set of integer levels. The real value of a code ``q`` is
``scale * (q - zero_point)`` (see :mod:`lowbit.formats.qspec`); the format only says which ``q`` exist.

* :class:`IntRange` — every integer in ``[qmin, qmax]``, of any width (a 4-bit signed range, the odd
  symmetric ``N``-level sets of 4.6-bit quantization, 16-bit intermediates, ...);
  :class:`~lowbit.formats.affine.QFormat` is the 2–8-bit power-of-two special case the post-training
  methods use.
* :class:`Codebook` — an explicit set of integers, e.g. the additive powers-of-two levels of APoT
  scaled to integers (:func:`apot_levels`), which then run exactly on the int8 kernels.
* :class:`BinaryFormat` — the two levels ±1 of binary networks (stored one bit each).

Formats are immutable, hashable and serializable (:meth:`Format.to_dict` / :func:`format_from_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch

__all__ = [
    "Format",
    "IntRange",
    "Codebook",
    "BinaryFormat",
    "odd_levels",
    "apot_levels",
    "format_from_dict",
    "FORMAT_KINDS",
]

#: kind name -> Format subclass, for :func:`format_from_dict`.
FORMAT_KINDS: dict[str, type[Format]] = {}


class Format:
    """Base class of level sets. Subclasses are frozen dataclasses that define :attr:`levels`."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.kind:
            FORMAT_KINDS[cls.kind] = cls

    # --- what every format answers --------------------------------------------------------------
    @property
    def levels(self) -> tuple[int, ...]:
        """The allowed codes, sorted ascending, without duplicates."""
        raise NotImplementedError

    @property
    def qmin(self) -> int:
        return self.levels[0]

    @property
    def qmax(self) -> int:
        return self.levels[-1]

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def uniform(self) -> bool:
        """Whether the levels are every integer from qmin to qmax (an affine integer grid)."""
        return self.n_levels == self.qmax - self.qmin + 1

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def symmetric(self) -> bool:
        """Whether the zero point is fixed (0 for signed formats) rather than chosen from the data."""
        return set(self.levels) == {-v for v in self.levels}

    @property
    def bits(self) -> int:
        """Bits one code needs in storage (index into the levels)."""
        return max(1, math.ceil(math.log2(self.n_levels)))

    @property
    def effective_bits(self) -> float:
        """``log2`` of the number of levels (4.6 for 25 levels)."""
        return math.log2(self.n_levels)

    @property
    def dtype(self) -> torch.dtype:
        """Smallest torch integer dtype holding every code."""
        lo, hi = self.qmin, self.qmax
        if -128 <= lo and hi <= 127:
            return torch.int8
        if 0 <= lo and hi <= 255:
            return torch.uint8
        if -(2**15) <= lo and hi < 2**15:
            return torch.int16
        return torch.int32

    @property
    def positive_levels(self) -> int:
        """Number of levels above zero (what a uniform grid of the same resolution would have)."""
        return sum(1 for v in self.levels if v > 0)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """Nearest level to real-valued codes ``v`` (float in, float out; no gradient rules).

        Uniform formats: ``clamp(round(v))`` (round half to even, as :func:`torch.round`). Other
        formats first round to the integer grid, then snap to the nearest level with ties going to the
        level of smaller magnitude [ours]: an integer kernel that requantizes to integers and then looks
        the level up in a table gives exactly the same codes.
        """
        r = torch.clamp(torch.round(v), self.qmin, self.qmax)
        if self.uniform:
            return r
        return self.snap_table.to(v.device, v.dtype)[(r - self.qmin).long()]

    @cached_property
    def snap_table(self) -> torch.Tensor:
        """int64 table: integer code ``c`` in [qmin, qmax] -> nearest level (at index ``c - qmin``)."""
        lv = torch.tensor(self.levels, dtype=torch.float64)
        grid = torch.arange(self.qmin, self.qmax + 1, dtype=torch.float64)
        d = (grid[:, None] - lv[None, :]).abs()
        # ties: prefer the level of smaller magnitude, |level - center| (a tiny penalty on it)
        d = d + (lv - float(getattr(self, "center", 0))).abs()[None, :] * 1e-9
        return lv[d.argmin(1)].to(torch.int64)

    def index(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> their index in :attr:`levels` (int64); raises ValueError for a code not in the set."""
        lv = torch.tensor(self.levels, dtype=torch.int64)
        c = codes.to(torch.int64)
        i = torch.searchsorted(lv, c)
        ok = (i < len(lv)) & (lv[i.clamp(max=len(lv) - 1)] == c)
        if not bool(ok.all()):
            bad = c[~ok].flatten()[:5].tolist()
            raise ValueError(f"codes {bad} are not levels of {self}")
        return i

    def from_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`index`: int64 codes."""
        return torch.tensor(self.levels, dtype=torch.int64)[idx.to(torch.int64)]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        return str(self)


def format_from_dict(d: dict[str, Any]) -> Format:
    """Rebuild a format written by :meth:`Format.to_dict`."""
    if not isinstance(d, dict) or d.get("kind") not in FORMAT_KINDS:
        raise ValueError(f"not a lowbit format description: {d!r}")
    return FORMAT_KINDS[d["kind"]]._from_dict(d)


@dataclass(frozen=True)
class IntRange(Format):
    """Every integer in ``[qmin, qmax]``; ``symmetric``: zero point fixed at 0 (needs qmin <= 0 <= qmax)."""

    lo: int
    hi: int
    zero_fixed: bool = False
    kind: ClassVar[str] = "range"

    def __post_init__(self) -> None:
        if isinstance(self.lo, bool) or isinstance(self.hi, bool) or not (
            isinstance(self.lo, int) and isinstance(self.hi, int)
        ):
            raise TypeError(f"IntRange bounds must be ints, got {self.lo!r}, {self.hi!r}")
        if self.lo >= self.hi:
            raise ValueError(f"IntRange needs qmin < qmax, got [{self.lo}, {self.hi}]")
        if not -(2**31) <= self.lo and self.hi < 2**31:
            raise ValueError("IntRange must fit in 32-bit integers")
        if self.zero_fixed and not self.lo <= 0 <= self.hi:
            raise ValueError(f"a fixed zero point needs 0 in [{self.lo}, {self.hi}]")

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(range(self.lo, self.hi + 1))

    @property
    def qmin(self) -> int:
        return self.lo

    @property
    def qmax(self) -> int:
        return self.hi

    @property
    def n_levels(self) -> int:
        return self.hi - self.lo + 1

    @property
    def uniform(self) -> bool:
        return True

    @property
    def symmetric(self) -> bool:
        return self.zero_fixed

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "qmin": self.lo, "qmax": self.hi, "zero_fixed": self.zero_fixed}

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> IntRange:
        return cls(int(d["qmin"]), int(d["qmax"]), bool(d.get("zero_fixed", False)))

    @classmethod
    def signed_bits(cls, bits: int, narrow: bool = False) -> IntRange:
        """``[-2^(b-1), 2^(b-1) - 1]`` (``narrow``: from ``-(2^(b-1) - 1)``), zero point 0."""
        _check_bits(bits, 1, 31)
        return cls(-(1 << (bits - 1)) + int(narrow), (1 << (bits - 1)) - 1, True)

    @classmethod
    def unsigned_bits(cls, bits: int) -> IntRange:
        """``[0, 2^b - 1]`` with a free zero point."""
        _check_bits(bits, 1, 31)
        return cls(0, (1 << bits) - 1, False)

    def __str__(self) -> str:
        return f"int[{self.lo}, {self.hi}]" + ("" if self.zero_fixed else " (zero point free)")


def odd_levels(n: int) -> IntRange:
    """``N`` odd symmetric levels ``[-(N // 2), N // 2]`` (4.6-bit quantization, docs/methods.md)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 3 or n % 2 == 0:
        raise ValueError(f"the number of odd symmetric levels must be an odd integer >= 3, got {n!r}")
    return IntRange(-(n // 2), n // 2, True)


@dataclass(frozen=True)
class Codebook(Format):
    """An explicit set of integer levels (sorted, distinct); ``zero_fixed`` as in :class:`IntRange`."""

    values: tuple[int, ...]
    zero_fixed: bool = True
    name: str = field(default="", compare=False)
    center: int = 0  # ties of the projection go to the level nearer this code (the shifted real zero)
    kind: ClassVar[str] = "codebook"

    def __post_init__(self) -> None:
        vals = tuple(sorted({int(v) for v in self.values}))
        if len(vals) < 2:
            raise ValueError("a codebook needs at least two distinct levels")
        if any(isinstance(v, bool) or int(v) != v for v in self.values):
            raise TypeError("codebook levels must be integers")
        if self.zero_fixed and 0 not in vals:
            raise ValueError("a codebook with a fixed zero point must contain the level 0")
        if not -(2**31) <= vals[0] and vals[-1] < 2**31:
            raise ValueError("codebook levels must fit in 32-bit integers")
        object.__setattr__(self, "values", vals)

    @property
    def levels(self) -> tuple[int, ...]:
        return self.values

    @property
    def symmetric(self) -> bool:
        return self.zero_fixed

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "levels": list(self.values), "zero_fixed": self.zero_fixed, "name": self.name,
                "center": self.center}

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> Codebook:
        return cls(tuple(int(v) for v in d["levels"]), bool(d.get("zero_fixed", True)), str(d.get("name", "")),
                   int(d.get("center", 0)))

    def __str__(self) -> str:
        return f"{self.name or 'codebook'}{{{', '.join(map(str, self.values))}}}"


@dataclass(frozen=True)
class BinaryFormat(Format):
    """The two levels ±1 (no zero level; zero point meaningless). One bit each in storage."""

    kind: ClassVar[str] = "binary"

    @property
    def levels(self) -> tuple[int, ...]:
        return (-1, 1)

    @property
    def symmetric(self) -> bool:
        return True

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``+1`` where ``v > 0``, else ``-1`` (sign(0) = -1, as the bit packing reads it)."""
        return torch.where(v > 0, 1.0, -1.0).to(v.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> BinaryFormat:
        return cls()

    def __str__(self) -> str:
        return "binary{-1, +1}"


def _check_bits(bits: int, lo: int, hi: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"bit width must be an integer in {lo}..{hi}, got {bits!r}")


# ------------------------------------------------------------------------------------------- APoT

def _apot_magnitudes(b: int) -> tuple[list[float], ...]:
    """The additive terms of APoT magnitudes for ``b`` bits (Li, Dong, Wang, ICLR 2020; the authors'
    ``build_power_value``): each level is one term from every list added together."""
    if b == 1:
        return ([0.0, 0.5],)
    if b == 2:
        return ([0.0, 2**-1, 2**-2, 2**-3],)
    if b == 3:
        return ([0.0, 2**-1, 2**-2, 2**-4], [0.0, 2**-3])
    if b == 4:
        return ([0.0, 2**-1, 2**-3, 2**-5], [0.0, 2**-2, 2**-4, 2**-6])
    if b == 5:
        return ([0.0, 2**-1, 2**-3, 2**-6], [0.0, 2**-2, 2**-4, 2**-7], [0.0, 2**-5])
    raise ValueError(f"APoT magnitudes are defined here for 1..5 bits, got {b}")


def apot_levels(bits: int, signed: bool) -> Codebook:
    """APoT levels as integers: every sum of one term per list of :func:`_apot_magnitudes`, scaled by
    the smallest power of two that makes them all integers.

    Unsigned (activations after ReLU): ``bits`` bits of magnitude, e.g. 4 bits ->
    ``a + b``, ``a in {0, 2^-1, 2^-3, 2^-5}``, ``b in {0, 2^-2, 2^-4, 2^-6}``, times ``2^6``:
    16 levels ``{0, 1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 32, 33, 36, 48}``. Signed (weights): a sign and
    ``bits - 1`` bits of magnitude (as the authors quantize weights). Every level fits in int8 for
    unsigned 2..5 bits and signed 2..6 bits, so APoT layers run exactly on the int8 kernels.
    """
    _check_bits(bits, 2, 6 if signed else 5)
    mag_bits = bits - 1 if signed else bits
    terms = _apot_magnitudes(mag_bits)
    sums = {0.0}
    for t in terms:
        sums = {s + v for s in sums for v in t}
    denom = max(-math.floor(math.log2(min(v for v in sums if v > 0))), 0)
    for k in range(denom + 8):  # smallest 2^k making every level an integer
        if all(float(v * 2**k).is_integer() for v in sums):
            denom = k
            break
    mags = sorted({int(round(v * 2**denom)) for v in sums})
    vals = sorted({-m for m in mags} | set(mags)) if signed else mags
    return Codebook(tuple(vals), True, f"apot{bits}{'s' if signed else 'u'}")
