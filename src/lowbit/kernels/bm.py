"""Bipolar morphological (BM) kernels (methods.md §4; the scheme is lowbit's, docs/methods.md "BM networks").

Integer BM layer (the specification: :func:`bm_linear_ref`, :func:`bm_conv2d_ref`)
    Log-domain codes are ``bits`` = 8 or 16 wide; ``MIN = -2^(bits-1)`` stands for the log of zero and
    every other code is <= 0. Input: uint8 codes ``x`` with zero point ``zin``; ``d = x - zin``;
    through the 256-entry log table ``L`` (int16, :func:`log_table`): ``a+ = L[d]`` where ``d > 0`` else
    MIN, ``a- = L[-d]`` where ``d < 0`` else MIN. Weights: codes ``c+``, ``c-`` in ``[MIN, 0]``. Then

    - ``R_st[m, n] = max_k sat(a_s[m, k] + c_t[n, k])`` for s, t in {+, -}; ``sat`` clamps to
      ``[MIN, 2^(bits-1) - 1]`` (saturating add, as vpaddsb / vpaddsw); since codes are <= 0 only the
      lower end is ever reached, and ``MIN + anything`` stays MIN;
    - ``E(r) = 0`` for ``r == MIN``, else ``rshift_round(T[r & (2^f - 1)], sh - (r >> f))`` (``>>``
      arithmetic, i.e. floor), with ``rshift_round(v, s) = (v + 2^(s-1)) >> s`` and 0 once ``s >= 63``;
    - ``y = E(R++) - E(R+-) - E(R-+) + E(R--) + bias[n]`` (int64);
    - ``q = clamp(zp + ((y + 2^(F-1)) >> F), lo, hi)`` (``>> 0`` for F = 0), stored as uint8.

    With ``epi=None`` the ops return the four maxima instead (int32, branch order ++, +-, -+, --). An
    input with ``zin == 0`` has no negative part: its ``a-`` codes are all MIN (the kernels skip them).
    Convolution: NCHW semantics; padded positions are zero input (log code MIN).

Float max-plus (training): :func:`f32_maxplus` ``Y[m, n] = max_k X[m, k] + V[n, k]`` and the first
    argmax, ``-inf`` meaning log 0.

Native kernels (``lowbit._native``, csrc/bm*.cpp) run at ``avx512bw``, ``avx2`` or ``portable`` (run-time
dispatch, capped by ``LOWBIT_ISA`` / ``lowbit._native.set_isa_cap``), bit-exact with the reference;
without them (or with ``LOWBIT_KERNELS=torch``) the ops run the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .w46 import _native, _pair

__all__ = [
    "CODE_BITS",
    "BMEpilogue",
    "PackedBM",
    "min_code",
    "log_table",
    "pack_bm",
    "bm_linear",
    "bm_conv2d",
    "bm_linear_ref",
    "bm_conv2d_ref",
    "f32_maxplus",
    "f32_maxplus_backward",
    "native_path",
]

CODE_BITS = (8, 16)
_Pair = int | tuple[int, int]


def _nat() -> Any:
    nat = _native()
    return nat if nat is not None and hasattr(nat, "bm_pack") else None


def native_path() -> str | None:
    """Kernel path the native BM ops use now (``avx512bw``, ``avx2``, ``portable``), or None."""
    nat = _nat()
    return None if nat is None else str(nat.bm_path())


def min_code(bits: int) -> int:
    if bits not in CODE_BITS:
        raise ValueError(f"BM log-domain codes are 8 or 16 bits wide, got {bits}")
    return -(1 << (bits - 1))


def log_table(f: int, bits: int) -> torch.Tensor:
    """The input log table: ``L[0] = MIN``, ``L[u] = max(MIN + 1, round(2^f * log2(u / 255)))`` (int16 [256]).

    The log step is ``2^-f`` octave; the codes of u = 1..255 span ``2^f * log2(255)`` steps, which must
    fit the code width (f <= 4 for 8-bit codes, f <= 12 for 16-bit codes)."""
    mn = min_code(bits)
    if not 0 <= f <= 14:
        raise ValueError(f"log step bits f must be in [0, 14], got {f}")
    if (1 << f) * math.log2(255.0) > -mn:
        raise ValueError(
            f"a log step of 2^-{f} octave needs {math.ceil((1 << f) * math.log2(255.0))} codes for the input "
            f"range 1..255, more than {bits}-bit codes hold ({-mn}): use a coarser step or wider codes"
        )
    u = torch.arange(1, 256, dtype=torch.float64)
    codes = torch.round(torch.log2(u / 255.0) * (1 << f)).clamp(min=mn + 1)
    return torch.cat([torch.tensor([mn], dtype=torch.float64), codes]).to(torch.int16)


@dataclass
class BMEpilogue:
    """exp table ``T`` (int32 [2^f]) with shifts ``sh`` and ``F``, int32 ``bias`` [N] (or None), and the
    output code format: zero point ``zp`` and clamp ``[lo, hi]`` (a fused ReLU is a tighter clamp)."""

    T: torch.Tensor
    f: int
    sh: int
    F: int
    bias: torch.Tensor | None = None
    zp: int = 0
    lo: int = 0
    hi: int = 255

    def __post_init__(self) -> None:
        self.T = self.T.to(torch.int32).reshape(-1).contiguous()
        if self.bias is not None:
            self.bias = self.bias.to(torch.int32).reshape(-1).contiguous()
        if self.T.numel() != 1 << int(self.f):
            raise ValueError(f"exp table has {self.T.numel()} entries, 2^f = {1 << int(self.f)} expected")
        if not (0 <= self.sh <= 62 and 0 <= self.F <= 30):
            raise ValueError(f"exp shift sh={self.sh} must be in [0, 62] and F={self.F} in [0, 30]")
        if not 0 <= self.lo <= self.hi <= 255 or not 0 <= self.zp <= 255:
            raise ValueError(f"output clamp [{self.lo}, {self.hi}] / zero point {self.zp} outside [0, 255]")


@dataclass
class PackedBM:
    """Weight codes ``c+`` / ``c-`` (original shape: linear [N, K], conv [N, C/g, kh, kw]) for the kernels."""

    cpos: torch.Tensor
    cneg: torch.Tensor
    bits: int
    _native: dict[int, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        mn = min_code(self.bits)
        if self.cpos.shape != self.cneg.shape or self.cpos.dim() not in (2, 4):
            raise ValueError(
                f"c+ {tuple(self.cpos.shape)} and c- {tuple(self.cneg.shape)} must share one 2-D or 4-D shape"
            )
        for name, c in (("c+", self.cpos), ("c-", self.cneg)):
            if c.dtype.is_floating_point or c.dtype == torch.bool:
                raise TypeError(f"BM weight codes must be integers, got {c.dtype}")
            if c.numel() and (int(c.min()) < mn or int(c.max()) > 0):
                raise ValueError(f"{name} codes must lie in [{mn}, 0] for {self.bits}-bit codes")
        self.cpos = self.cpos.to(torch.int16).contiguous()
        self.cneg = self.cneg.to(torch.int16).contiguous()

    @property
    def out_features(self) -> int:
        return int(self.cpos.shape[0])

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes as [N, K] rows in the kernels' k order (conv: kh, kw, C/g)."""
        if self.cpos.dim() == 2:
            return self.cpos, self.cneg
        return (self.cpos.permute(0, 2, 3, 1).reshape(self.out_features, -1).contiguous(),
                self.cneg.permute(0, 2, 3, 1).reshape(self.out_features, -1).contiguous())

    def native(self, groups: int) -> Any:
        if groups not in self._native:
            nat = _nat()
            if nat is None:
                return None
            cp, cn = self.rows()
            N, K = cp.shape
            self._native[groups] = nat.bm_pack(cp.data_ptr(), cn.data_ptr(), N, K, int(groups), int(self.bits))
        return self._native[groups]


def pack_bm(cpos: torch.Tensor, cneg: torch.Tensor, bits: int) -> PackedBM:
    return PackedBM(cpos.detach(), cneg.detach(), int(bits))


# ------------------------------------------------------------------------------------- reference


def _log_codes(x: torch.Tensor, zin: int, L: torch.Tensor, mn: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.to(torch.int64) - int(zin)
    lt = L.to(torch.int64)
    ap = torch.where(d > 0, lt[d.clamp(min=0)], mn)
    am = torch.where(d < 0, lt[(-d).clamp(min=0)], mn)
    return ap, am


def _maxplus_ref(a: torch.Tensor, c: torch.Tensor, bits: int) -> torch.Tensor:
    """``max_k clamp(a[m, k] + c[n, k], MIN, MAX)`` (int64 [M, N]), in row chunks."""
    mn, mx = min_code(bits), -min_code(bits) - 1
    out = torch.empty(a.shape[0], c.shape[0], dtype=torch.int64)
    step = max(1, (1 << 22) // max(1, c.numel()))
    for i in range(0, a.shape[0], step):
        out[i : i + step] = (a[i : i + step, None, :] + c[None]).clamp(mn, mx).amax(-1)
    return out


def _exp_ref(r: torch.Tensor, epi: BMEpilogue, mn: int) -> torch.Tensor:
    t = r & ((1 << epi.f) - 1)
    s = epi.sh - (r >> epi.f)
    sc = s.clamp(1, 62)
    v = epi.T.to(torch.int64)[t]
    e = (v + (torch.ones_like(sc) << (sc - 1))) >> sc
    e = torch.where(s <= 0, v << (-s).clamp(0, 62), e)
    return torch.where((r <= mn) | (s >= 63), torch.zeros_like(e), e)


def _combine_ref(R: torch.Tensor, epi: BMEpilogue, mn: int, channel_axis: int) -> torch.Tensor:
    """R: int64 [..., 4, ...] maxima with the branch axis at ``channel_axis - 1`` -> uint8 codes."""
    ax = channel_axis % R.dim()
    pp, pm, mp, mm = (R.select(ax - 1, i) for i in range(4))
    y = _exp_ref(pp, epi, mn) - _exp_ref(pm, epi, mn) - _exp_ref(mp, epi, mn) + _exp_ref(mm, epi, mn)
    if epi.bias is not None:
        shape = [1] * y.dim()
        shape[ax - 1] = -1
        y = y + epi.bias.to(torch.int64).reshape(shape)
    if epi.F > 0:
        y = (y + (1 << (epi.F - 1))) >> epi.F
    return (y + epi.zp).clamp(epi.lo, epi.hi).to(torch.uint8)


def bm_linear_ref(x: torch.Tensor, zin: int, cpos: torch.Tensor, cneg: torch.Tensor, bits: int, L: torch.Tensor,
                  epi: BMEpilogue | None = None) -> torch.Tensor:
    """The specification (module docstring): uint8 x [M, K] -> uint8 [M, N], or int32 maxima [M, 4, N]."""
    mn = min_code(bits)
    ap, am = _log_codes(x, zin, L, mn)
    cp, cn = cpos.to(torch.int64), cneg.to(torch.int64)
    R = torch.stack([_maxplus_ref(ap, cp, bits), _maxplus_ref(ap, cn, bits),
                     _maxplus_ref(am, cp, bits), _maxplus_ref(am, cn, bits)], 1)
    if epi is None:
        return R.to(torch.int32)
    return _combine_ref(R, epi, mn, -1)


def bm_conv2d_ref(x: torch.Tensor, zin: int, cpos: torch.Tensor, cneg: torch.Tensor, bits: int, L: torch.Tensor,
                  epi: BMEpilogue | None = None, stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1,
                  groups: int = 1) -> torch.Tensor:
    """The specification for NCHW uint8 x and codes [N, C/g, kh, kw]: uint8 [B, N, Ho, Wo], or int32
    maxima [B, 4, N, Ho, Wo]. Padding is zero input (log code MIN)."""
    mn = min_code(bits)
    B, C, H, W = x.shape
    N, Cg, kh, kw = cpos.shape
    ph, pw = _pair(padding, "padding")
    sh_, sw_ = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh_ + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw_ + 1
    Ng = N // groups
    branches = []
    for a in _log_codes(x, zin, L, mn):
        ap = F.pad(a.to(torch.float64), (pw, pw, ph, ph), value=float(mn))
        per_c = []
        for c in (cpos, cneg):
            outs = []
            for g in range(groups):
                cols = F.unfold(ap[:, g * Cg : (g + 1) * Cg], (kh, kw), dilation=(dh, dw), stride=(sh_, sw_))
                rows = cols.transpose(1, 2).reshape(-1, Cg * kh * kw).to(torch.int64)  # k order (c, i, j)
                wr = c[g * Ng : (g + 1) * Ng].reshape(Ng, -1).to(torch.int64)
                outs.append(_maxplus_ref(rows, wr, bits).reshape(B, Ho * Wo, Ng))
            per_c.append(torch.cat(outs, 2).transpose(1, 2).reshape(B, N, Ho, Wo))
        branches += per_c
    R = torch.stack(branches, 1)  # [B, 4, N, Ho, Wo]
    if epi is None:
        return R.to(torch.int32)
    return _combine_ref(R, epi, mn, 2)


# ---------------------------------------------------------------------------------------------- ops


def _check_codes(x: torch.Tensor, zin: int) -> None:
    if x.dtype != torch.uint8:
        raise TypeError(f"BM kernels take uint8 input codes, got {x.dtype}")
    if not 0 <= int(zin) <= 255:
        raise ValueError(f"input zero point {zin} outside [0, 255]")


def _check_table(L: torch.Tensor, bits: int) -> torch.Tensor:
    if L.numel() != 256:
        raise ValueError(f"the log table has {L.numel()} entries, 256 expected")
    L = L.to(torch.int16).reshape(-1).contiguous()
    mn = min_code(bits)
    if int(L.min()) < mn or int(L.max()) > 0:
        raise ValueError(f"log table entries must lie in [{mn}, 0] for {bits}-bit codes")
    return L


def _epi_args(epi: BMEpilogue | None, n: int) -> tuple[int, int, int, int, int, int, int, int, int, bool]:
    if epi is None:
        return 0, 0, 0, 0, 0, 0, 0, 0, 0, True
    if epi.bias is not None and epi.bias.numel() != n:
        raise ValueError(f"bias has {epi.bias.numel()} entries, expected {n}")
    b = 0 if epi.bias is None else epi.bias.data_ptr()
    return (epi.T.data_ptr(), b, int(epi.f), int(epi.sh), int(epi.F), int(epi.zp), int(epi.lo), int(epi.hi),
            0, False)


def bm_linear(x: torch.Tensor, zin: int, w: PackedBM, L: torch.Tensor, epi: BMEpilogue | None = None) -> torch.Tensor:
    """Integer BM linear layer: uint8 codes x [..., K] -> uint8 codes [..., N] (or int32 maxima
    [..., 4, N] for ``epi=None``); see the module docstring."""
    if not isinstance(w, PackedBM):
        raise TypeError("bm_linear takes weights from pack_bm()")
    if w.cpos.dim() != 2:
        raise ValueError("bm_linear needs 2-D [N, K] weight codes (these are conv codes)")
    _check_codes(x, zin)
    N, K = w.cpos.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"input has {x.shape[-1] if x.dim() else 0} features, the layer expects {K}")
    L = _check_table(L, w.bits)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    nat = _nat()
    if nat is None:
        y = bm_linear_ref(x2, zin, w.cpos, w.cneg, w.bits, L, epi)
        return y.reshape(*lead, *y.shape[1:])
    T, b, f, sh, Fb, zp, lo, hi, _, raw = _epi_args(epi, N)
    out = torch.empty((x2.shape[0], 4, N) if raw else (x2.shape[0], N), dtype=torch.int32 if raw else torch.uint8)
    nat.bm_linear(x2.data_ptr(), x2.shape[0], K, K, w.native(1), L.data_ptr(), T, b, f, sh, Fb, int(zin), zp, lo, hi,
                  raw, out.data_ptr())
    return out.reshape(*lead, *out.shape[1:])


def bm_conv2d(x: torch.Tensor, zin: int, w: PackedBM, L: torch.Tensor, epi: BMEpilogue | None = None,
              stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1, groups: int = 1) -> torch.Tensor:
    """Integer BM 2-D convolution, NCHW semantics: uint8 x [B, C, H, W] -> uint8 [B, N, Ho, Wo]
    (``torch.channels_last`` memory, as the int8 conv), or int32 maxima [B, 4, N, Ho, Wo] for ``epi=None``."""
    if not isinstance(w, PackedBM):
        raise TypeError("bm_conv2d takes weights from pack_bm()")
    if w.cpos.dim() != 4:
        raise ValueError("bm_conv2d needs 4-D [N, C/groups, kh, kw] weight codes")
    _check_codes(x, zin)
    if x.dim() != 4:
        raise ValueError(f"conv2d input must be 4-D NCHW, got shape {tuple(x.shape)}")
    sh_, sw_ = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    groups = int(groups)
    N, Cg, kh, kw = w.cpos.shape
    B, C, H, W = x.shape
    if groups < 1 or N % groups != 0 or C != Cg * groups:
        raise ValueError(f"input has {C} channels; the layer expects {Cg} per group x {groups} groups "
                         f"(and {N} outputs divisible by the groups)")
    if min(sh_, sw_, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("stride and dilation must be >= 1, padding >= 0")
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh_ + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw_ + 1
    if Ho < 1 or Wo < 1 or B < 1:
        raise ValueError(f"input {tuple(x.shape)} is too small for this kernel / padding / dilation")
    L = _check_table(L, w.bits)
    nat = _nat()
    if nat is None:
        y = bm_conv2d_ref(x, zin, w.cpos, w.cneg, w.bits, L, epi, (sh_, sw_), (ph, pw), (dh, dw), groups)
        return y if epi is None else y.contiguous(memory_format=torch.channels_last)
    T, b, f, sh, Fb, zp, lo, hi, _, raw = _epi_args(epi, N)
    xh = x.permute(0, 2, 3, 1).contiguous()
    if raw:
        out = torch.empty(B, Ho, Wo, 4, N, dtype=torch.int32)
    else:
        out = torch.empty((B, N, Ho, Wo), dtype=torch.uint8, memory_format=torch.channels_last)
    nat.bm_conv2d(xh.data_ptr(), B, C, H, W, w.native(groups), kh, kw, sh_, sw_, ph, pw, dh, dw, groups,
                  L.data_ptr(), T, b, f, sh, Fb, int(zin), zp, lo, hi, raw, out.data_ptr())
    return out.permute(0, 3, 4, 1, 2) if raw else out


# ------------------------------------------------------------------------------- float (training)


def f32_maxplus(X: torch.Tensor, V: torch.Tensor, with_index: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``Y[m, n] = max_k X[m, k] + V[n, k]`` (float32 [M, N]) and the first argmax (int32, or None).

    -inf entries stand for log 0. Native when built, else torch in row chunks (bounded memory)."""
    if X.dim() != 2 or V.dim() != 2 or X.shape[1] != V.shape[1]:
        raise ValueError(f"f32_maxplus needs X [M, K] and V [N, K], got {tuple(X.shape)} and {tuple(V.shape)}")
    X = X.detach().to(torch.float32).contiguous()
    V = V.detach().to(torch.float32).contiguous()
    M, K = X.shape
    N = V.shape[0]
    nat = _nat()
    if nat is not None and K > 0 and N > 0:
        Y = torch.empty(M, N)
        idx = torch.empty(M, N, dtype=torch.int32) if with_index else None
        nat.bm_f32_maxplus(X.data_ptr(), M, K, K, V.data_ptr(), N, Y.data_ptr(), 0 if idx is None else idx.data_ptr())
        return Y, idx
    Y = torch.empty(M, N)
    arg = torch.empty(M, N, dtype=torch.int32) if with_index else None
    step = max(1, (1 << 22) // max(1, N * K))
    for i in range(0, M, step):
        z = (X[i : i + step, None, :] + V[None]).max(-1)
        Y[i : i + step] = z.values
        if arg is not None:
            arg[i : i + step] = z.indices
    return Y, arg


def f32_maxplus_backward(idx: torch.Tensor, g: torch.Tensor, K: int, need_x: bool = True,
                         need_v: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradient of the hard max-plus: ``gX[m, idx[m, n]] += g[m, n]``, ``gV[n, idx[m, n]] += g[m, n]``."""
    M, N = g.shape
    g = g.detach().to(torch.float32).contiguous()
    idx = idx.to(torch.int32).contiguous()
    gX = torch.zeros(M, K) if need_x else None
    gV = torch.zeros(N, K) if need_v else None
    nat = _nat()
    if nat is not None and hasattr(nat, "bm_f32_maxplus_backward"):
        nat.bm_f32_maxplus_backward(idx.data_ptr(), g.data_ptr(), M, N, K, 0 if gX is None else gX.data_ptr(),
                                    0 if gV is None else gV.data_ptr())
        return gX, gV
    i64 = idx.to(torch.int64)
    if gX is not None:
        gX.scatter_add_(1, i64, g)
    if gV is not None:
        flat = (i64 + torch.arange(N, dtype=torch.int64)[None, :] * K).reshape(-1)
        gV.view(-1).index_add_(0, flat, g.reshape(-1))
    return gX, gV
