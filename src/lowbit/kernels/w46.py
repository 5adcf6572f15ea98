"""4.6-bit integer kernels (docs/methods.md, "4.6-bit and binary kernels"; Trusov, Limonova, Nikolaev,
Arlazarov, Mathematics 2024).

Operands
    activation codes ``a``: uint8 in ``[0, 2*K_x]`` with zero point ``K_x`` (centred code ``a - K_x``);
    weight codes ``w``: int8 in ``[-K_w, K_w]``, zero point 0;
    the defining constraint ``K_x * K_w <= 127`` (every centred product fits in int8). With ``N_w``
    weight levels, ``K_w = N_w // 2`` and ``K_x = 127 // K_w`` (:func:`w46_levels`).

Arithmetic (the specification: :func:`w46_linear_ref`, :func:`w46_conv2d_ref`)
    ``acc[m, n] = sum_k (a[m, k] - zp) * w[n, k] + bias[n]`` in int32, then the same epilogues as the
    int8 kernels (:class:`~lowbit.kernels.Requant`, :class:`~lowbit.kernels.FloatOut`, or the raw int32).
    ``zp`` is the activation zero point, any code in ``[0, 2 K_x]`` (default ``K_x``): the kernels multiply
    the raw codes (the int16 bound above holds for every code in range) and subtract ``zp * sum_k w`` once,
    so an activation range from calibration min/max (e.g. ``[0, max]`` after a ReLU, zero point 0) uses all
    its ``N_x`` levels. Convolution has NCHW semantics; padded positions hold ``zp`` (real zero).

Native kernels (``lowbit._native``, csrc/w46*.cpp), chosen at run time by CPU features and capped by
``lowbit._native.set_isa_cap`` / ``LOWBIT_ISA``: ``avx2`` (vpmaddubsw pair sums, which cannot saturate
under the bound, accumulated in int16 and widened to int32 before they can overflow), ``avx512bw``
(the same at 512 bits), ``vnni`` (vpdpbusd) and ``portable`` C++. All are bit-exact with the reference.
Without the native module (or with ``LOWBIT_KERNELS=torch``) the ops run the reference.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.formats.levels import Format, IntRange

from .epilogue import EPI_KIND, Epilogue, FloatOut, Requant
from .packed import PackedWeights
from .reference import INT32_MAX, AccumulatorOverflowError, _check_int32, apply_epilogue

__all__ = [
    "PackedW46",
    "w46_levels",
    "check_w46_levels",
    "pack_w46",
    "w46_linear",
    "w46_conv2d",
    "w46_linear_ref",
    "w46_conv2d_ref",
    "native_path",
]

_Pair = int | tuple[int, int]


# ----------------------------------------------------------------------------------------- helpers


_NAT: list[Any] = []  # [lowbit._native with the 4.6-bit / binary kernels, or None], resolved once


def env(name: str) -> str:
    """``os.environ.get(name, "")``, read from the environment's own dict where it has one (on every call,
    so a changed variable counts, at a fraction of ``os.environ.get``'s cost: this runs on every layer call)."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        v = data.get(name.encode() if data and isinstance(next(iter(data)), bytes) else name)
        return "" if v is None else (v.decode() if isinstance(v, bytes) else str(v))
    return os.environ.get(name, "")


def _native() -> Any:
    """lowbit._native when it is built with these kernels and not disabled (``LOWBIT_KERNELS=torch`` or
    ``lowbit.kernels.set_backend("torch")``), else None."""
    pkg = sys.modules.get("lowbit.kernels")
    forced = getattr(pkg, "_forced", None) if pkg is not None else None
    choice = forced or env("LOWBIT_KERNELS").strip().lower() or None
    if choice == "torch":
        return None
    if not _NAT:
        try:
            from lowbit import _native as nat
        except ImportError:
            nat = None
        _NAT.append(nat if nat is not None and hasattr(nat, "w46_pack") else None)
    return _NAT[0]


def native_path() -> str | None:
    """Kernel path the native 4.6-bit ops use now (``avx2``, ...), or None when they are not used."""
    nat = _native()
    return None if nat is None else str(nat.w46_path())


def w46_levels(n_w: int) -> tuple[int, int]:
    """``(K_x, K_w)`` for ``N_w`` weight levels: ``K_w = N_w // 2``, ``K_x = 127 // K_w`` (so ``N_x = 2 K_x + 1``).

    E.g. 19 -> (14, 9) i.e. (N_x, N_w) = (29, 19); 21 -> (12, 10); 23 -> (11, 11); 3 -> (127, 1).
    """
    if n_w < 3 or n_w % 2 == 0:
        raise ValueError(f"the number of weight levels must be odd and >= 3, got {n_w}")
    k_w = n_w // 2
    if k_w > 127:
        raise ValueError(f"{n_w} weight levels do not fit in int8")
    return 127 // k_w, k_w


def check_w46_levels(K_x: int, K_w: int) -> None:
    """Raise ValueError unless ``K_x >= 1``, ``K_w >= 1`` and ``K_x * K_w <= 127``."""
    if int(K_x) < 1 or int(K_w) < 1:
        raise ValueError(f"K_x and K_w must be >= 1, got K_x={K_x}, K_w={K_w}")
    if int(K_x) * int(K_w) > 127:
        raise ValueError(
            f"K_x * K_w = {int(K_x) * int(K_w)} exceeds 127: a centred activation code times a weight code "
            "must fit in int8 (docs/methods.md, 4.6-bit kernels)"
        )


def _pair(v: _Pair, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _zero_point(zp: int | None, K_x: int) -> int:
    """The activation zero point of a call: ``K_x`` for None, else an int in ``[0, 2 K_x]``."""
    if zp is None:
        return int(K_x)
    if isinstance(zp, bool) or not 0 <= int(zp) <= 2 * int(K_x):
        raise ValueError(f"4.6-bit activation zero point {zp!r} outside [0, 2*K_x] = [0, {2 * int(K_x)}]")
    return int(zp)


def _check_acts(x: torch.Tensor, K_x: int) -> None:
    if x.dtype != torch.uint8:
        raise TypeError(f"4.6-bit kernels take uint8 activation codes, got {x.dtype}")
    if x.numel() and int(x.max()) > 2 * K_x:
        raise ValueError(f"activation code {int(x.max())} outside [0, 2*K_x] = [0, {2 * K_x}]")


def _check_weights(w: torch.Tensor, K_w: int) -> None:
    if w.dtype != torch.int8:
        raise TypeError(f"4.6-bit weight codes must be int8, got {w.dtype}")
    if w.numel() and int(w.abs().max()) > K_w:
        raise ValueError(f"weight code of magnitude {int(w.abs().max())} outside [-K_w, K_w] = [-{K_w}, {K_w}]")


def _check_bias(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if bias is None:
        return None
    if bias.dtype == torch.int32 and bias.shape == (n,) and bias.is_contiguous():
        return bias
    if bias.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8):
        raise TypeError(f"bias must hold int32 values (accumulator scale), got {bias.dtype}")
    b = bias.reshape(-1).to(torch.int32).contiguous()
    if b.numel() != n:
        raise ValueError(f"bias has {b.numel()} entries, expected {n}")
    return b


def _epi_args(epi: Epilogue | None, n: int) -> tuple[int, int, int, int, int, int, torch.dtype, list[Any]]:
    """(kind, p0, p1, zp, qmin, qmax, out dtype, tensors to keep alive) for the native binding.

    Validated once per epilogue object and cached on it (keyed by its tensors' identity and version),
    so a layer that reuses its epilogue pays for the checks only on the first call."""
    if epi is None:
        return EPI_KIND["none"], 0, 0, 0, 0, 0, torch.int32, []
    if isinstance(epi, FloatOut):
        sig: tuple[Any, ...] = (n, id(epi.scale), epi.scale._version,
                                None if epi.bias is None else (id(epi.bias), epi.bias._version))
    elif isinstance(epi, Requant):
        sig = (n, id(epi.m0), epi.m0._version, id(epi.rshift), epi.rshift._version, epi.out_zp, epi.qmin,
               epi.qmax, epi.out_dtype)
    else:
        raise TypeError(f"unknown epilogue {type(epi).__name__}")
    cached = getattr(epi, "_lb_native_args", None)
    if cached is not None and cached[0] == sig:
        return cached[1]
    res = _epi_args_uncached(epi, n)
    object.__setattr__(epi, "_lb_native_args", (sig, res))
    return res


def _epi_args_uncached(epi: Epilogue, n: int) -> tuple[int, int, int, int, int, int, torch.dtype, list[Any]]:
    if isinstance(epi, FloatOut):
        s = epi.scale.to(torch.float32).reshape(-1).contiguous()
        if s.numel() != n:
            raise ValueError(f"FloatOut.scale has {s.numel()} entries, expected {n}")
        keep = [s]
        p1 = 0
        if epi.bias is not None:
            b = epi.bias.to(torch.float32).reshape(-1).contiguous()
            if b.numel() != n:
                raise ValueError(f"FloatOut.bias has {b.numel()} entries, expected {n}")
            keep.append(b)
            p1 = b.data_ptr()
        return EPI_KIND["float_out"], s.data_ptr(), p1, 0, 0, 0, torch.float32, keep
    assert isinstance(epi, Requant)
    m0, rs = epi.per_channel(n)  # the binding checks rshift in [1, 62] and the clamp range
    lims = (int(epi.out_zp), int(epi.qmin), int(epi.qmax))
    return epi.kind, m0.data_ptr(), rs.data_ptr(), *lims, epi.out_dtype, [m0, rs]


def _ref_epilogue(epi: Epilogue | None, n: int) -> Epilogue | None:
    """Requant with per-tensor (one-element) parameters broadcast to n channels, as the native path does."""
    if isinstance(epi, Requant) and (epi.m0.numel() == 1 or epi.rshift.numel() == 1) and n > 1:
        m0, rs = epi.per_channel(n)
        return Requant(m0, rs, epi.out_zp, epi.qmin, epi.qmax, epi.out_dtype)
    return epi


# ------------------------------------------------------------------------------------- reference


def w46_linear_ref(
    x: torch.Tensor, K_x: int, w: torch.Tensor, bias: torch.Tensor | None = None, epi: Epilogue | None = None,
    zp: int | None = None,
) -> torch.Tensor:
    """The specification: x uint8 [M, K] codes in [0, 2K_x], w int8 [N, K] in [-K_w, K_w] (K_w implied by
    the bound) -> ``epi(sum_k (x - zp) * w + bias)`` [M, N] (``zp``: default K_x). Exact int64 arithmetic,
    int32 result."""
    acc = (x.to(torch.int64) - _zero_point(zp, K_x)) @ w.to(torch.int64).t()
    if bias is not None:
        acc = acc + bias.to(torch.int64).reshape(-1)
    return apply_epilogue(_check_int32(acc), _ref_epilogue(epi, w.shape[0]))


def w46_conv2d_ref(
    x: torch.Tensor,
    K_x: int,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    epi: Epilogue | None = None,
    stride: _Pair = 1,
    padding: _Pair = 0,
    dilation: _Pair = 1,
    groups: int = 1,
    zp: int | None = None,
) -> torch.Tensor:
    """The specification for convolution: x uint8 NCHW, w int8 [N, C/groups, kh, kw] -> epi(NCHW).
    Padding holds the zero point ``zp`` (default K_x; real zero). Exact: float64 holds every partial sum
    (< 2^53)."""
    xc = x.to(torch.float64) - float(_zero_point(zp, K_x))
    acc = F.conv2d(xc, w.to(torch.float64), None, _pair(stride, "stride"), _pair(padding, "padding"),
                   _pair(dilation, "dilation"), groups)
    acc = torch.round(acc).to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64).reshape(1, -1, 1, 1)
    return apply_epilogue(_check_int32(acc), _ref_epilogue(epi, w.shape[0]), channel_axis=1)


# ------------------------------------------------------------------------------------------ packing


@dataclass
class PackedW46(PackedWeights):
    """4.6-bit weight codes (int8 in [-K_w, K_w]; [N, K] for linear or [N, C/g, kh, kw] for conv) prepared
    once for the kernels. The native packing is made on first use per (kind, groups) and cached.
    Implements the packed-weight protocol (:mod:`lowbit.kernels.packed`); its activations are codes in
    ``[0, 2 K_x]`` with any zero point in that range. The protocol's :meth:`linear` / :meth:`conv2d` run
    the 4.6-bit kernel or, where it measures faster for the call's shape, the int8 kernel on the same codes
    (:mod:`lowbit.kernels.w46_dispatch`; same integers either way); :func:`w46_linear` /
    :func:`w46_conv2d` always run the 4.6-bit kernel."""

    kernel = "w46"
    weight: torch.Tensor
    K_x: int
    K_w: int
    _native: dict[tuple[str, int], Any] = field(default_factory=dict, init=False, repr=False)
    _int8: Any = field(default=None, init=False, repr=False)
    _plans: dict[tuple[Any, ...], Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_w46_levels(self.K_x, self.K_w)
        self.K_x, self.K_w = int(self.K_x), int(self.K_w)
        if self.weight.dim() not in (2, 4):
            shape = tuple(self.weight.shape)
            raise ValueError(f"4.6-bit weights must be 2-D [N, K] or 4-D [N, C/g, kh, kw], got {shape}")
        _check_weights(self.weight, self.K_w)
        self.weight = self.weight.detach().contiguous()
        # accumulator bound, on every backend, for any zero point in [0, 2 K_x]:
        # |acc - bias| <= max(zp, 2 K_x - zp) * sum_k |w[n, k]| <= 2 K_x * sum_k |w[n, k]|
        self.acc_bound = 2 * self.K_x * self.weight.reshape(self.weight.shape[0], -1).to(torch.int64).abs().sum(1)
        if self.acc_bound.numel() and int(self.acc_bound.max()) > INT32_MAX:
            n = int(self.acc_bound.argmax())
            raise AccumulatorOverflowError(
                f"4.6-bit weights of shape {tuple(self.weight.shape)}: output channel {n} can overflow the int32 "
                f"accumulator (2 K_x * sum|w| = {int(self.acc_bound[n])} > 2^31 - 1); split the layer along K"
            )
        nat = _native()
        if nat is not None:
            self.native("linear" if self.weight.dim() == 2 else "conv", 1)

    @property
    def codes(self) -> torch.Tensor:
        return self.weight

    @property
    def format(self) -> Format:
        return IntRange(-self.K_w, self.K_w, True)

    @classmethod
    def accepts(cls, fmt: Format) -> bool:
        return fmt.uniform and fmt.symmetric and fmt.qmin == -fmt.qmax and 1 <= fmt.qmax <= 127

    @classmethod
    def from_codes(cls, codes: torch.Tensor, fmt: Format, **extra: Any) -> PackedW46:
        if not cls.accepts(fmt):
            raise ValueError(f"4.6-bit kernels need odd symmetric weight levels, got {fmt}")
        if "K_x" not in extra:
            raise ValueError("4.6-bit weights need the activation bound K_x")
        return pack_w46(codes.to(torch.int8), int(extra["K_x"]), fmt.qmax)

    def extra_attrs(self) -> dict[str, Any]:
        return {"K_x": self.K_x}

    # --- the protocol's products: the 4.6-bit kernel, or the int8 kernel where it is faster ------------
    def as_int8(self) -> Any:
        """The same codes packed for the int8 kernels (made once): what :mod:`.w46_dispatch` may run instead."""
        if self._int8 is None:
            from . import pack_int8

            self._int8 = pack_int8(self.weight, self.format)
        return self._int8

    def linear(self, x: torch.Tensor, x_zp: int | None, bias: torch.Tensor | None = None,
               epi: Epilogue | None = None) -> torch.Tensor:
        return _plans().call(self, "linear", x, bias, epi, x_zp, (), True)

    def conv2d(self, x: torch.Tensor, x_zp: int | None, bias: torch.Tensor | None = None,
               epi: Epilogue | None = None, stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1,
               groups: int = 1) -> torch.Tensor:
        return _plans().call(self, "conv", x, bias, epi, x_zp, (stride, padding, dilation, groups), True)

    def routes(self) -> dict[str, str]:
        """The kernel each call shape of these weights took so far (``"w46"`` or ``"int8"``), by input shape."""
        return {f"{k[0]} {tuple(k[1])}": p.route for k, p in self._plans.items() if k[-1]}

    def native(self, kind: str, groups: int) -> Any:
        """The lowbit._native.W46Packed for ``kind`` ("linear" or "conv") and ``groups`` (None if unbuilt)."""
        key = (kind, int(groups))
        if key not in self._native:
            nat = _native()
            if nat is None:
                return None
            w = self.weight
            N = w.shape[0]
            if kind == "conv":
                w = w.permute(0, 2, 3, 1)  # K order (i, j, c): a patch row is kh*kw runs of C/g channels
            w2 = w.reshape(N, -1).contiguous()
            self._native[key] = nat.w46_pack(w2.data_ptr(), N, w2.shape[1], self.K_x, self.K_w, int(groups))
        return self._native[key]


def pack_w46(w_codes: torch.Tensor, K_x: int, K_w: int) -> PackedW46:
    """Validate (``K_x*K_w <= 127``, int8 codes in [-K_w, K_w]) and pack 4.6-bit weights."""
    return PackedW46(w_codes.detach(), int(K_x), int(K_w))


# ---------------------------------------------------------------------------------------------- ops


def _plans() -> Any:
    if not _PLANS:
        from . import w46_plan

        _PLANS.append(w46_plan)
    return _PLANS[0]


_PLANS: list[Any] = []


def w46_linear(
    x: torch.Tensor, w: PackedW46, bias: torch.Tensor | None = None, epi: Epilogue | None = None,
    x_zp: int | None = None,
) -> torch.Tensor:
    """``epi(sum_k (x - x_zp) * w + bias)``: x uint8 codes [..., K] in [0, 2 K_x] -> [..., N]; ``x_zp``: the
    activation zero point in [0, 2 K_x] (default K_x). Always the 4.6-bit kernel (see :mod:`.w46_plan` for
    how a call is checked once per shape and then run)."""
    if not isinstance(w, PackedW46):
        raise TypeError("w46_linear takes weights from pack_w46()")
    return _plans().call(w, "linear", x, bias, epi, x_zp, (), False)


def w46_conv2d(
    x: torch.Tensor,
    w: PackedW46,
    bias: torch.Tensor | None = None,
    epi: Epilogue | None = None,
    stride: _Pair = 1,
    padding: _Pair = 0,
    dilation: _Pair = 1,
    groups: int = 1,
    x_zp: int | None = None,
) -> torch.Tensor:
    """4.6-bit 2-D convolution, NCHW semantics: x uint8 [B, C, H, W] codes in [0, 2 K_x] (any memory
    format; channels_last is read as is) with zero point ``x_zp`` (default K_x), weights
    [N, C/groups, kh, kw]; padded positions hold ``x_zp`` (real zero). Returns epi(acc) [B, N, Ho, Wo] in
    ``torch.channels_last`` memory format (as the int8 conv). Always the 4.6-bit kernel."""
    if not isinstance(w, PackedW46):
        raise TypeError("w46_conv2d takes weights from pack_w46()")
    return _plans().call(w, "conv", x, bias, epi, x_zp, (stride, padding, dilation, groups), False)
