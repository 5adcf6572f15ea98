"""lowbit's integer kernels behind one interface.

The quantized modules (lowbit.nn) call only the functions here. Weights are packed once
(:class:`PackedInt8`), at quantization or model load; each call picks the fastest available backend:
the native library (lowbit._native, with its own run-time dispatch by CPU features) when it is built,
else stock PyTorch integer ops. ``LOWBIT_KERNELS=torch`` (or :func:`set_backend`) forces the PyTorch
path; the native ISA can be capped with ``LOWBIT_ISA`` (see lowbit.kernels.native).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.formats.levels import Format, IntRange

from . import pooling, reference, torch_backend
from .epilogue import Epilogue, FloatOut, Requant, ResidualAdd
from .packed import PACKINGS, PackedWeights, pack_weights, weights_from_storage
from .pool import adaptive_avg_pool2d, avg_pool2d
from .pooling import PoolGeometry
from .reference import INT32_MAX, AccumulatorOverflowError, add_ref

__all__ = [
    "AccumulatorOverflowError",
    "Epilogue",
    "FloatOut",
    "Requant",
    "ResidualAdd",
    "PackedInt8",
    "PackedWeights",
    "PACKINGS",
    "pack_int8",
    "pack_weights",
    "weights_from_storage",
    "int8_linear",
    "int8_conv2d",
    "qadd",
    "quantize_u8",
    "max_pool2d_codes",
    "PoolGeometry",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "backend_name",
    "check_environment",
    "set_backend",
]

_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force ``"torch"`` or ``"native"`` kernels (None: automatic)."""
    global _forced
    if name not in (None, "torch", "native"):
        raise ValueError(f"unknown kernel backend {name!r}; use 'torch', 'native' or None")
    if name == "native" and _native_module() is None:
        raise RuntimeError("lowbit's native kernels are not built in this installation")
    _forced = name


def _native_module() -> Any:
    try:
        from . import native
    except ImportError:
        return None
    return native if native.available() else None


_ISA_NAMES = ("portable", "neon", "avx2", "avx512bw", "vnni", "avx512vnni")
_env_checked = False


def check_environment() -> None:
    """``LOWBIT_KERNELS``, ``LOWBIT_ISA`` and ``LOWBIT_PLAN``, when set, hold known values (a typo is an error, not
    ignored; every ``lowbit`` command checks them before it starts)."""
    global _env_checked
    kern = os.environ.get("LOWBIT_KERNELS", "").strip().lower()
    if kern not in ("", "torch", "native"):
        raise ValueError(f"LOWBIT_KERNELS={os.environ['LOWBIT_KERNELS']!r}: use 'torch' or 'native' (or unset it)")
    isa = os.environ.get("LOWBIT_ISA", "")
    if isa and isa not in _ISA_NAMES:
        raise ValueError(f"LOWBIT_ISA={isa!r}: use one of {', '.join(_ISA_NAMES[:-1])} (or unset it)")
    plan = os.environ.get("LOWBIT_PLAN", "").strip()
    if plan not in ("", "0", "1"):
        raise ValueError(f"LOWBIT_PLAN={os.environ['LOWBIT_PLAN']!r}: use 0 (node-by-node) or 1 (plans, the default)")
    _env_checked = True


def _use_native() -> bool:
    if not _env_checked:
        check_environment()
    choice = _forced or os.environ.get("LOWBIT_KERNELS", "").strip().lower() or None
    if choice == "torch":
        return False
    nat = _native_module()
    if choice == "native" and nat is None:
        raise RuntimeError("LOWBIT_KERNELS=native but lowbit's native kernels are not built")
    return nat is not None and nat.supports_int8()


def backend_name() -> str:
    """Backend used for int8 now, e.g. ``native:avx2`` or ``torch``."""
    if _use_native():
        return f"native:{_native_module().active_isa()}"
    return torch_backend.name


#: The levels of plain int8 weights.
INT8_CODES = IntRange(-128, 127, True)


@dataclass
class PackedInt8(PackedWeights):
    """int8 weights [N, K] (or conv [N, C/g, kh, kw]) prepared once for the kernels.

    ``fmt``: the level set the codes come from (default all of int8); any format whose levels fit in
    int8 runs here, e.g. 4-bit learned-step weights, APoT codebooks or ±1, and is stored at its own width.
    """

    kernel = "int8"
    weight: torch.Tensor
    fmt: Format | None = None
    w_t: torch.Tensor = field(init=False, repr=False)
    colsum: torch.Tensor = field(init=False, repr=False)
    native: Any = field(default=None, init=False, repr=False)
    native_conv: Any = field(default=None, init=False, repr=False)  # per-group conv packing, made on first use

    def __post_init__(self) -> None:
        w = self.weight
        if w.dtype != torch.int8:
            raise TypeError(f"int8 weights expected, got {w.dtype}")
        if self.fmt is None:
            self.fmt = INT8_CODES
        elif not self.accepts(self.fmt):
            raise ValueError(f"the int8 kernels cannot run weights of {self.fmt}")
        w2 = w.reshape(w.shape[0], -1).contiguous()
        # accumulator bound: |acc - bias[n]| <= 255 * sum_k |w[n, k]| for any uint8 input and zero point
        self.acc_bound = 255 * w2.to(torch.int64).abs().sum(1)
        if self.acc_bound.numel() and int(self.acc_bound.max()) > INT32_MAX:
            n = int(self.acc_bound.argmax())
            raise AccumulatorOverflowError(
                f"int8 weights of shape {tuple(w.shape)}: output channel {n} can overflow the int32 accumulator "
                f"(255 * sum|w| = {int(self.acc_bound[n])} > 2^31 - 1 for K = {w2.shape[1]}); split the layer along K"
            )
        self.w_t = w2.t().contiguous()
        self.colsum = w2.to(torch.int32).sum(1, dtype=torch.int32)
        nat = _native_module()
        if nat is not None and nat.supports_int8():
            self.native = nat.pack_weight(w)

    @property
    def codes(self) -> torch.Tensor:
        return self.weight

    @property
    def format(self) -> Format:
        assert self.fmt is not None
        return self.fmt

    @classmethod
    def accepts(cls, fmt: Format) -> bool:
        """Any level set within int8, ±1 included (binary weights with 8-bit activations run here; binary
        weights *and* activations run on the binary kernels, which :func:`pack_weights` prefers)."""
        return fmt.dtype == torch.int8

    @classmethod
    def from_codes(cls, codes: torch.Tensor, fmt: Format, **extra: Any) -> PackedInt8:
        if extra:
            raise ValueError(f"unexpected int8 weight attributes {sorted(extra)}")
        return pack_int8(codes.to(torch.int8), fmt)

    def linear(self, x: torch.Tensor, x_zp: int | None, bias: torch.Tensor | None = None,
               epi: Epilogue | None = None) -> torch.Tensor:
        return int8_linear(x, 0 if x_zp is None else x_zp, self, bias, epi)

    def conv2d(self, x: torch.Tensor, x_zp: int | None, bias: torch.Tensor | None = None,
               epi: Epilogue | None = None, stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
               dilation: tuple[int, int] = (1, 1), groups: int = 1) -> torch.Tensor:
        return int8_conv2d(x, 0 if x_zp is None else x_zp, self, bias, epi, stride, padding, dilation, groups)


def pack_int8(weight: torch.Tensor, fmt: Format | None = None) -> PackedInt8:
    """Pack int8 weight codes once; ``fmt`` is their level set (default all of int8), checked."""
    w = weight.detach()
    if fmt is not None and w.numel():
        lo, hi = int(w.min()), int(w.max())
        if lo < fmt.qmin or hi > fmt.qmax:
            raise ValueError(f"weight codes in [{lo}, {hi}] fall outside {fmt}")
    return PackedInt8(w, fmt)


def _check_act(x: torch.Tensor, x_zp: int) -> None:
    if x.dtype != torch.uint8:
        raise TypeError(f"int8 kernels take uint8 activation codes, got {x.dtype}")
    if not 0 <= int(x_zp) <= 255:
        raise ValueError(f"activation zero point {x_zp} outside [0, 255]")


def int8_linear(
    x: torch.Tensor, x_zp: int, w: PackedInt8, bias: torch.Tensor | None = None, epi: Epilogue | None = None
) -> torch.Tensor:
    """``epi(sum_k (x - x_zp) * w + bias)``: x uint8 [..., K] -> [..., N]."""
    _check_act(x, x_zp)
    K = w.in_features
    if x.shape[-1] != K:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    if bias is not None:
        bias = bias.to(torch.int32).contiguous()
        w.check_bias(bias)
    if w.native is not None and _use_native():
        y = _native_module().int8_gemm(x2, int(x_zp), w.native, bias, epi)
    else:
        y = torch_backend.int8_gemm(x2, int(x_zp), w.w_t, w.colsum, bias, epi)
    return y.reshape(*lead, w.out_features)


def int8_conv2d(
    x: torch.Tensor,
    x_zp: int,
    w: PackedInt8,
    bias: torch.Tensor | None = None,
    epi: Epilogue | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    add: ResidualAdd | None = None,
) -> torch.Tensor:
    """Integer 2-D convolution, NCHW semantics (padding holds ``x_zp``, i.e. real zero). ``add``: a residual
    add fused into the uint8 requantizing epilogue (:class:`ResidualAdd`; the same integers as the
    convolution followed by :func:`reference.add_ref`)."""
    _check_act(x, x_zp)
    if x.dim() != 4:
        raise ValueError(f"conv2d input must be 4-D NCHW, got shape {tuple(x.shape)}")
    Cg = w.weight.shape[1]
    if x.shape[1] != Cg * groups:
        raise ValueError(f"input has {x.shape[1]} channels, the layer expects {Cg * groups}")
    if bias is not None:
        bias = bias.to(torch.int32).contiguous()
        w.check_bias(bias)
    if w.native is not None and _use_native():
        return _native_module().int8_conv2d(x, int(x_zp), w, bias, epi, stride, padding, dilation, groups, add)
    y = torch_backend.int8_conv2d(
        x, int(x_zp), w.weight, w.w_t, w.colsum, bias, epi, stride, padding, dilation, groups
    )
    if add is None:
        return y
    if not isinstance(epi, Requant) or epi.out_dtype != torch.uint8:
        raise ValueError("a fused residual add needs a uint8 Requant epilogue")
    return reference.add_ref(y, epi.out_zp, add.residual, add.r_zp, add.m_a, add.m_b, add.rshift, add.out_zp,
                             add.lo, add.hi)


def qadd(
    a: torch.Tensor, a_zp: int, b: torch.Tensor, b_zp: int, m_a: int, m_b: int, rshift: int, out_zp: int,
    lo: int = 0, hi: int = 255,
) -> torch.Tensor:
    """Integer residual add of uint8 codes, rounded once (the specification: :func:`reference.add_ref`):
    ``clamp(((m_a (a - a_zp) + m_b (b - b_zp) + 2^(rshift-1)) >> rshift) + out_zp, lo, hi)`` as uint8;
    ``lowbit.formats.affine.add_multipliers`` derives ``m_a, m_b, rshift`` from the scales."""
    nat = _native_module() if _use_native() else None
    if nat is not None and hasattr(nat, "qadd"):
        return nat.qadd(a, a_zp, b, b_zp, m_a, m_b, rshift, out_zp, lo, hi)
    return add_ref(a, a_zp, b, b_zp, m_a, m_b, rshift, out_zp, lo, hi)


def max_pool2d_codes(x: torch.Tensor, geometry: PoolGeometry) -> torch.Tensor:
    """2-D max pooling of integer codes (uint8 or int8) [N, C, H, W] or [C, H, W], NCHW semantics.

    Exact for any map size and memory format; padding never wins a window (it holds the lowest code),
    as torch ignores padding. ``geometry``: :meth:`PoolGeometry.make` (kernel, stride, padding,
    dilation, ceil_mode, checked as torch checks them). uint8 codes run lowbit's native kernel when it is
    built (NHWC or NCHW in, the same layout out); otherwise, and for int8, the plain-PyTorch
    implementation (:mod:`lowbit.kernels.pooling`). The same integers either way.
    """
    if not isinstance(geometry, PoolGeometry):
        raise TypeError(f"geometry must be a lowbit.kernels.PoolGeometry, got {type(geometry).__name__}")
    if x.dtype == torch.uint8 and x.dim() in (3, 4) and x.is_cpu and _use_native():
        g = geometry
        g.output_size(int(x.shape[-2]), int(x.shape[-1]))  # its error for a window larger than the map
        return _native_module().max_pool2d(x, g.kernel, g.stride, g.padding, g.dilation, g.ceil_mode)
    return pooling.max_pool2d_codes(x, geometry)


def quantize_u8(x: torch.Tensor, scale: float | torch.Tensor, zp: int, lo: int = 0, hi: int = 255) -> torch.Tensor:
    """uint8 codes ``clamp(round(x / scale) + zp, lo, hi)`` (round half to even) of a float tensor, as
    float32 operations in that order: the rule of :func:`lowbit.formats.affine.quantize`. ``scale``: a float
    (per tensor) or a tensor [M, 1] of per-row scales of ``x`` viewed as [M, K]. One native pass over ``x``
    when the kernels are built (the same codes; a NaN gives ``lo`` there, so callers reject NaN first),
    else torch ops (:func:`lowbit.kernels.reference.quantize_u8_ref`)."""
    if not 0 <= lo <= hi <= 255:
        raise ValueError(f"clamp [{lo}, {hi}] must lie in [0, 255]")
    x = x.to(torch.float32)
    if x.is_cpu and _use_native():
        return _native_module().quantize_u8(x, scale, zp, lo, hi)
    return reference.quantize_u8_ref(x, scale, zp, lo, hi)
