"""Binary (±1) kernels (docs/methods.md, "4.6-bit and binary kernels"): XNOR/popcount arithmetic on bit-packed operands.

Bit packing (:func:`pack_bits`)
    A sign vector of length K becomes ``ceil(K/64)`` 64-bit words (stored as int64): element k is bit
    ``k % 64`` of word ``k // 64``; bit 1 = +1, bit 0 = -1. Signs are read as ``x > 0 -> +1`` and
    ``x <= 0 -> -1`` (so sign(0) = -1); for bool tensors ``True -> +1``. Padding bits past K are 0.
    The kernels force padding bits to 0 in both operands, so they never count.

Arithmetic (the specification: :func:`binary_linear_ref`, :func:`binary_conv2d_ref`)
    ``dot[m, n] = sum_k x[m, k] * w[n, k] = K - 2 * popcount(x XOR w)`` (int32), then one epilogue:

    - ``None``: the int32 dot;
    - :class:`~lowbit.kernels.FloatOut`: ``float32(dot) * scale[n] + bias[n]`` (XNOR-Net's per-channel
      ``alpha = mean|W|`` goes in ``scale``; no FMA, as in the other kernels);
    - :class:`Threshold`: ``bit = (dot >= thr[n]) XOR flip[n]``, written bit-packed along the channel
      dimension, the input format of the next binary layer (a BatchNorm followed by sign folds into
      ``thr`` and ``flip``: flip where the BN scale is negative).

Layouts
    linear: input ``[..., K]`` signs (any non-int64 dtype) or int64 words ``[..., ceil(K/64)]``;
    output ``[..., N]`` or, for :class:`Threshold`, int64 words ``[..., ceil(N/64)]``.
    conv2d: NCHW semantics. Input NCHW signs (any memory format), or int64 words ``[B, H, W, ceil(C/64)]``
    (channels packed per pixel, NHWC, which is what a :class:`Threshold` conv writes); output int32 /
    float32 ``[B, N, Ho, Wo]`` in ``torch.channels_last`` memory format, or int64 words
    ``[B, Ho, Wo, ceil(N/64)]`` for :class:`Threshold`.

Padding (conv2d): padded positions hold ``pad_value``, +1 or -1, **default -1**. lowbit's choice:
    -1 is bit 0, i.e. the padded words are all zero (the natural bit-packed padding and the cheapest);
    use +1 to match a network trained with one-padding. (Zero padding, as in a float conv, is not a
    binary value; a network meant to run on these kernels must be trained with the same pad value.)

Native kernels (``lowbit._native``, csrc/binary*.cpp), chosen at run time and capped by
``lowbit._native.set_isa_cap``: ``avx2`` (vpshufb nibble popcount on pre-split nibble planes + vpsadbw),
``avx512bw`` (the same at 512 bits, or VPOPCNTDQ where the CPU has it) and ``portable`` (scalar popcount).
All are bit-exact with the reference; without the native module the ops run the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.formats.levels import BinaryFormat, Format

from .epilogue import EPI_KIND, EpilogueBase, FloatOut
from .packed import PackedWeights
from .reference import apply_epilogue
from .w46 import _epi_args, _native, _pair

__all__ = [
    "Threshold",
    "PackedBinary",
    "pack_bits",
    "unpack_bits",
    "pack_binary",
    "binary_linear",
    "binary_conv2d",
    "binary_linear_ref",
    "binary_conv2d_ref",
    "native_path",
    "max_pool2d_bits",
]

_Pair = int | tuple[int, int]


def _nat() -> Any:
    nat = _native()
    return nat if nat is not None and hasattr(nat, "binary_pack") else None


def native_path() -> str | None:
    """Kernel path the native binary ops use now (``avx2``, ...), or None when they are not used."""
    nat = _nat()
    return None if nat is None else str(nat.binary_path())


@dataclass
class Threshold(EpilogueBase):
    """Binary output epilogue: ``bit[n] = (dot[n] >= thr[n]) XOR flip[n]``, written bit-packed."""

    thr: torch.Tensor  # int32 [N]
    flip: torch.Tensor | None = None  # bool [N]

    def __post_init__(self) -> None:
        if self.thr.dtype.is_floating_point:
            raise TypeError(
                "Threshold.thr must be integer (compare with the integer dot: use ceil of a real threshold)"
            )
        self.thr = self.thr.to(torch.int32).reshape(-1).contiguous()
        if self.flip is not None:
            self.flip = (self.flip.reshape(-1) != 0).contiguous()
            if self.flip.numel() != self.thr.numel():
                raise ValueError("Threshold.flip and Threshold.thr must have the same length")


BinaryEpilogue = FloatOut | Threshold


# ------------------------------------------------------------------------------------------ packing

_POW2 = torch.tensor([1 << i for i in range(63)] + [-(1 << 63)], dtype=torch.int64)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Signs -> bool (True = +1): bool as is, else x > 0."""
    return x if x.dtype == torch.bool else x > 0


def pack_bits(x_sign: torch.Tensor) -> torch.Tensor:
    """Signs ``[..., K]`` (±1 values, any real dtype, or bool with True = +1) -> int64 words
    ``[..., ceil(K/64)]``: bit ``k % 64`` of word ``k // 64`` is 1 where ``x > 0``; padding bits are 0."""
    if x_sign.dim() < 1:
        raise ValueError("pack_bits needs at least one dimension")
    K = x_sign.shape[-1]
    lead = x_sign.shape[:-1]
    KW = (K + 63) // 64
    b = _bits(x_sign).reshape(-1, K)
    nat = _nat()
    if nat is not None and b.numel():
        src = b.to(torch.uint8).contiguous()
        out = torch.empty(src.shape[0], KW, dtype=torch.int64)
        nat.pack_bits_u8(src.data_ptr(), src.shape[0], K, K, out.data_ptr())
        return out.reshape(*lead, KW)
    return _pack_bits_torch(b).reshape(*lead, KW)


def _pack_bits_torch(b: torch.Tensor) -> torch.Tensor:
    """Bool [R, K] -> int64 words [R, ceil(K/64)] in plain PyTorch (the reference never uses native code)."""
    K = b.shape[-1]
    KW = (K + 63) // 64
    bb = F.pad(b.to(torch.int64), (0, KW * 64 - K)).reshape(-1, KW, 64)
    return (bb * _POW2).sum(-1)  # distinct powers of two: the sum never carries


def unpack_bits(words: torch.Tensor, K: int) -> torch.Tensor:
    """int64 words ``[..., ceil(K/64)]`` -> int8 signs ``[..., K]`` (+1 / -1)."""
    if words.dtype != torch.int64:
        raise TypeError(f"packed bits are int64 words, got {words.dtype}")
    KW = (int(K) + 63) // 64
    if words.shape[-1] != KW:
        raise ValueError(f"{K} bits need {KW} words, got {words.shape[-1]}")
    sh = torch.arange(64, dtype=torch.int64)
    bits = (words.unsqueeze(-1) >> sh) & 1
    bits = bits.reshape(*words.shape[:-1], KW * 64)[..., : int(K)]
    return (bits * 2 - 1).to(torch.int8)


@dataclass
class PackedBinary(PackedWeights):
    """±1 weights ([N, K] linear or [N, C/g, kh, kw] conv) bit-packed once for the kernels.

    ``words``: linear [N, ceil(K/64)]; conv [N, kh*kw*ceil((C/g)/64)] (per kernel position (i, j) the
    channel bits in whole words). ``K`` is the number of ±1 products per output. Implements the
    packed-weight protocol (:mod:`lowbit.kernels.packed`): its products take sign inputs (no zero
    point, no bias: a bias belongs in the epilogue).
    """

    kernel = "binary"
    weight: torch.Tensor  # int8 ±1, original shape
    words: torch.Tensor = field(init=False, repr=False)
    K: int = field(init=False)
    seg_words: int = field(init=False, repr=False)
    seg_bits: int = field(init=False, repr=False)
    _native: dict[int, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        w = self.weight
        if w.dim() == 2:
            N, K = w.shape
            self.words = pack_bits(w).contiguous()
            self.K, self.seg_words, self.seg_bits = int(K), int(self.words.shape[1]), int(K)
        elif w.dim() == 4:
            N, Cg, kh, kw = w.shape
            wp = pack_bits(w.permute(0, 2, 3, 1))  # [N, kh, kw, CgW]
            self.words = wp.reshape(N, -1).contiguous()
            self.K, self.seg_words, self.seg_bits = int(kh * kw * Cg), int(wp.shape[-1]), int(Cg)
        else:
            raise ValueError(f"binary weights must be 2-D [N, K] or 4-D [N, C/g, kh, kw], got {tuple(w.shape)}")
        if _nat() is not None:
            self.native(1)

    @property
    def codes(self) -> torch.Tensor:
        return self.weight

    @property
    def format(self) -> Format:
        return BinaryFormat()

    @classmethod
    def accepts(cls, fmt: Format) -> bool:
        return isinstance(fmt, BinaryFormat)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, fmt: Format, **extra: Any) -> PackedBinary:
        if not cls.accepts(fmt) or extra:
            raise ValueError(f"binary kernels take ±1 weights without extra attributes, got {fmt} {extra}")
        return pack_binary(codes)

    @staticmethod
    def _no_bias(x_zp: int | None, bias: torch.Tensor | None) -> None:
        if x_zp is not None or bias is not None:
            raise ValueError("binary products take sign inputs without zero point or bias (put the bias "
                             "into the epilogue)")

    def linear(self, x: torch.Tensor, x_zp: int | None = None, bias: torch.Tensor | None = None,
               epi: BinaryEpilogue | None = None) -> torch.Tensor:
        self._no_bias(x_zp, bias)
        return binary_linear(x, self, epi)

    def conv2d(self, x: torch.Tensor, x_zp: int | None = None, bias: torch.Tensor | None = None,
               epi: BinaryEpilogue | None = None, stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1,
               groups: int = 1, pad_value: int = -1) -> torch.Tensor:
        self._no_bias(x_zp, bias)
        return binary_conv2d(x, self, epi, stride, padding, dilation, groups, pad_value)

    def native(self, groups: int) -> Any:
        if groups not in self._native:
            nat = _nat()
            if nat is None:
                return None
            N, KW = self.words.shape
            self._native[groups] = nat.binary_pack(self.words.data_ptr(), N, KW, self.seg_words, self.seg_bits,
                                                   int(groups))
        return self._native[groups]


def pack_binary(w_sign: torch.Tensor) -> PackedBinary:
    """Pack ±1 weights (any real dtype, ``w > 0 -> +1``; or bool) for :func:`binary_linear` / :func:`binary_conv2d`."""
    w = w_sign.detach()
    return PackedBinary(torch.where(_bits(w), 1, -1).to(torch.int8))


# ------------------------------------------------------------------------------------- reference


def _ref_epi(dot: torch.Tensor, epi: BinaryEpilogue | None, channel_axis: int) -> torch.Tensor:
    if epi is None or isinstance(epi, FloatOut):
        return apply_epilogue(dot, epi, channel_axis)
    if isinstance(epi, Threshold):
        ax = channel_axis % dot.dim()
        shape = [1] * dot.dim()
        shape[ax] = -1
        bit = dot >= epi.thr.reshape(shape)
        if epi.flip is not None:
            bit = bit ^ epi.flip.reshape(shape)
        bit = bit.movedim(ax, -1)
        return _pack_bits_torch(bit.reshape(-1, bit.shape[-1])).reshape(*bit.shape[:-1], -1)
    raise TypeError(f"binary kernels support FloatOut and Threshold epilogues, got {type(epi).__name__}")


def binary_linear_ref(
    x_sign: torch.Tensor, w_sign: torch.Tensor, epi: BinaryEpilogue | None = None
) -> torch.Tensor:
    """The specification: signs [M, K] x signs [N, K] -> epi(dot) with dot = sum x*w (int32)."""
    xs = torch.where(_bits(x_sign), 1, -1).to(torch.int64)
    ws = torch.where(_bits(w_sign), 1, -1).to(torch.int64)
    return _ref_epi((xs @ ws.t()).to(torch.int32), epi, -1)


def binary_conv2d_ref(
    x_sign: torch.Tensor,
    w_sign: torch.Tensor,
    epi: BinaryEpilogue | None = None,
    stride: _Pair = 1,
    padding: _Pair = 0,
    dilation: _Pair = 1,
    groups: int = 1,
    pad_value: int = -1,
) -> torch.Tensor:
    """The specification: NCHW signs, weight signs [N, C/g, kh, kw]; padded positions hold pad_value
    (+1 or -1). Returns epi(dot) NCHW, or for Threshold int64 words [B, Ho, Wo, ceil(N/64)].
    Exact: float64 holds every partial sum."""
    if pad_value not in (1, -1):
        raise ValueError(f"pad_value must be +1 or -1, got {pad_value}")
    xs = torch.where(_bits(x_sign), 1.0, -1.0).to(torch.float64)
    ws = torch.where(_bits(w_sign), 1.0, -1.0).to(torch.float64)
    ph, pw = _pair(padding, "padding")
    xs = F.pad(xs, (pw, pw, ph, ph), value=float(pad_value))
    dot = F.conv2d(xs, ws, None, _pair(stride, "stride"), 0, _pair(dilation, "dilation"), groups)
    return _ref_epi(torch.round(dot).to(torch.int32), epi, 1)


# ---------------------------------------------------------------------------------------------- ops


def _epi_native(epi: BinaryEpilogue | None, n: int) -> tuple[int, int, int, torch.dtype, list[Any]]:
    if epi is None or isinstance(epi, FloatOut):
        kind, p0, p1, _, _, _, dt, keep = _epi_args(epi, n)
        return kind, p0, p1, dt, keep
    if isinstance(epi, Threshold):
        if epi.thr.numel() != n:
            raise ValueError(f"Threshold has {epi.thr.numel()} thresholds, expected {n}")
        thr = epi.thr
        if thr.dtype != torch.int32 or not thr.is_contiguous():
            thr = thr.to(torch.int32).contiguous()
        keep: list[Any] = [thr]
        p1 = 0
        if epi.flip is not None:
            sig = (id(epi.flip), epi.flip._version)
            cached = getattr(epi, "_lb_flip_u8", None)
            if cached is None or cached[0] != sig:
                cached = (sig, epi.flip.reshape(-1).ne(0).to(torch.uint8).contiguous())
                object.__setattr__(epi, "_lb_flip_u8", cached)
            if cached[1].numel() != n:
                raise ValueError(f"Threshold.flip has {cached[1].numel()} entries, expected {n}")
            keep.append(cached[1])
            p1 = cached[1].data_ptr()
        return EPI_KIND["bits"], thr.data_ptr(), p1, torch.int64, keep
    raise TypeError(f"binary kernels support FloatOut and Threshold epilogues, got {type(epi).__name__}")


def binary_linear(x: torch.Tensor, w: PackedBinary, epi: BinaryEpilogue | None = None) -> torch.Tensor:
    """``epi(sum_k x*w)`` for ±1 operands. x: signs [..., K] (non-int64 dtype) or int64 words
    [..., ceil(K/64)]. Returns int32 / float32 [..., N], or int64 words [..., ceil(N/64)] for Threshold."""
    if not isinstance(w, PackedBinary):
        raise TypeError("binary_linear takes weights from pack_binary()")
    if w.weight.dim() != 2:
        raise ValueError("binary_linear needs 2-D [N, K] weights (these are conv weights)")
    N, K = w.weight.shape
    KW = (K + 63) // 64
    if x.dim() < 1:
        raise ValueError("binary_linear input needs at least one dimension")
    if x.dtype == torch.int64:
        if x.shape[-1] != KW:
            raise ValueError(f"packed input has {x.shape[-1]} words per row; {K} features need {KW}")
        words = x
    else:
        if x.shape[-1] != K:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {K}")
        if x.dtype.is_complex:
            raise TypeError(f"binary inputs are real signs or bool, got {x.dtype}")
        words = pack_bits(x)
    lead = words.shape[:-1]
    w2 = words.reshape(-1, KW).contiguous()
    nat = _nat()
    if nat is None:
        return binary_linear_ref(unpack_bits(w2, K), w.weight, epi).reshape(*lead, -1)
    kind, p0, p1, dt, keep = _epi_native(epi, N)
    bits = kind == EPI_KIND["bits"]
    ncol = (N + 63) // 64 if bits else N
    out = (torch.zeros if bits else torch.empty)(w2.shape[0], ncol, dtype=dt)
    nat.binary_linear(w2.data_ptr(), w2.shape[0], KW, w.native(1), kind, p0, p1, out.data_ptr())
    del keep
    return out.reshape(*lead, ncol)


def binary_conv2d(
    x: torch.Tensor,
    w: PackedBinary,
    epi: BinaryEpilogue | None = None,
    stride: _Pair = 1,
    padding: _Pair = 0,
    dilation: _Pair = 1,
    groups: int = 1,
    pad_value: int = -1,
) -> torch.Tensor:
    """Binary 2-D convolution, NCHW semantics (see the module docstring for layouts and padding).

    x: NCHW signs [B, C, H, W] (non-int64 dtype) or int64 words [B, H, W, ceil(C/64)]; weights
    [N, C/groups, kh, kw]; padded positions hold ``pad_value`` (+1 or -1, default -1).
    Returns int32 / float32 [B, N, Ho, Wo] (NCHW semantics, ``torch.channels_last`` memory format, as the
    int8 conv), or int64 words [B, Ho, Wo, ceil(N/64)] for a Threshold epilogue.
    """
    if not isinstance(w, PackedBinary):
        raise TypeError("binary_conv2d takes weights from pack_binary()")
    if w.weight.dim() != 4:
        raise ValueError("binary_conv2d needs 4-D [N, C/groups, kh, kw] weights")
    if pad_value not in (1, -1):
        raise ValueError(f"pad_value must be +1 or -1, got {pad_value}")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    groups = int(groups)
    N, Cg, kh, kw = w.weight.shape
    C = Cg * groups
    if groups < 1 or N % groups != 0:
        raise ValueError(f"{N} output channels cannot be split into {groups} groups")
    if x.dim() != 4:
        raise ValueError(f"conv2d input must be 4-D, got shape {tuple(x.shape)}")
    packed = x.dtype == torch.int64
    if packed:
        B, H, W, XW = x.shape
        if XW != (C + 63) // 64:
            raise ValueError(f"packed input has {XW} words per pixel; {C} channels need {(C + 63) // 64}")
    else:
        B, Cx, H, W = x.shape
        if Cx != C:
            raise ValueError(f"input has {Cx} channels; the layer expects {Cg} per group x {groups} groups")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("stride and dilation must be >= 1, padding >= 0")
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"input {H}x{W} is too small for this kernel / padding / dilation")
    nat = _nat()
    if nat is None:
        xs = unpack_bits(x, C).permute(0, 3, 1, 2) if packed else x
        return binary_conv2d_ref(xs, w.weight, epi, (sh, sw), (ph, pw), (dh, dw), groups, pad_value)
    CgW = (Cg + 63) // 64
    # activation words [B, H, W, groups, CgW]: channels packed per group
    if packed and (groups == 1 or Cg % 64 == 0):
        xw = x.contiguous()
    else:
        signs = unpack_bits(x, C) if packed else _bits(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        xw = pack_bits(signs.reshape(B, H, W, groups, Cg)).contiguous()
    kind, p0, p1, dt, keep = _epi_native(epi, N)
    if kind == EPI_KIND["bits"]:
        out = torch.zeros(B, Ho, Wo, (N + 63) // 64, dtype=torch.int64)
    else:
        out = torch.empty((B, N, Ho, Wo), dtype=dt, memory_format=torch.channels_last)
    assert xw.numel() == B * H * W * groups * CgW
    nat.binary_conv2d(xw.data_ptr(), B, C, H, W, w.native(groups), kh, kw, sh, sw, ph, pw, dh, dw, groups,
                      int(pad_value), kind, p0, p1, out.data_ptr())
    del keep
    return out


def max_pool2d_bits(x: torch.Tensor, geometry: Any) -> torch.Tensor:
    """2-D max pooling of bit-packed signs: int64 words ``[B, H, W, CW]`` (channels packed per pixel, what a
    :class:`Threshold` conv writes) -> ``[B, Ho, Wo, CW]``. The max of ±1 values is their OR in bits (+1 = 1);
    padded positions are 0 bits (-1, the smallest value, so they never win a window, as torch ignores its
    padding). ``geometry``: a :class:`~lowbit.kernels.PoolGeometry`. Exact; plain PyTorch."""
    if x.dtype != torch.int64 or x.dim() != 4:
        raise ValueError(f"bit max-pool takes int64 words [B, H, W, words], got {x.dtype} {tuple(x.shape)}")
    h, w = int(x.shape[1]), int(x.shape[2])
    (oh, ow), (kh, kw), (sh, sw) = geometry.output_size(h, w), geometry.kernel, geometry.stride
    (ph, pw), (dh, dw) = geometry.padding, geometry.dilation
    need_h, need_w = (oh - 1) * sh + dh * (kh - 1) + 1, (ow - 1) * sw + dw * (kw - 1) + 1
    if ph or pw or need_h > h + ph or need_w > w + pw:
        xp = x.new_zeros((x.shape[0], max(need_h, h + ph), max(need_w, w + pw), x.shape[3]))
        xp[:, ph:ph + h, pw:pw + w] = x
    else:
        xp = x
    out: torch.Tensor | None = None
    for i in range(kh):
        for j in range(kw):
            v = xp[:, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
            out = v.clone() if out is None else out.bitwise_or_(v)
    assert out is not None
    return out
