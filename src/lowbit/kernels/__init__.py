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

from . import torch_backend
from .epilogue import Epilogue, FloatOut, Requant
from .pool import adaptive_avg_pool2d, avg_pool2d, max_pool2d

__all__ = [
    "Epilogue",
    "FloatOut",
    "Requant",
    "PackedInt8",
    "pack_int8",
    "int8_linear",
    "int8_conv2d",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "backend_name",
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


def _use_native() -> bool:
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


@dataclass
class PackedInt8:
    """int8 weights [N, K] (or conv [N, C/g, kh, kw]) prepared once for the kernels."""

    weight: torch.Tensor
    w_t: torch.Tensor = field(init=False, repr=False)
    colsum: torch.Tensor = field(init=False, repr=False)
    native: Any = field(default=None, init=False, repr=False)
    native_conv: Any = field(default=None, init=False, repr=False)  # per-group conv packing, made on first use

    def __post_init__(self) -> None:
        w = self.weight
        if w.dtype != torch.int8:
            raise TypeError(f"int8 weights expected, got {w.dtype}")
        w2 = w.reshape(w.shape[0], -1).contiguous()
        self.w_t = w2.t().contiguous()
        self.colsum = w2.to(torch.int32).sum(1, dtype=torch.int32)
        nat = _native_module()
        if nat is not None and nat.supports_int8():
            self.native = nat.pack_weight(w)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight[0].numel())


def pack_int8(weight: torch.Tensor) -> PackedInt8:
    return PackedInt8(weight.detach())


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
) -> torch.Tensor:
    """Integer 2-D convolution, NCHW semantics (padding holds ``x_zp``, i.e. real zero)."""
    _check_act(x, x_zp)
    if x.dim() != 4:
        raise ValueError(f"conv2d input must be 4-D NCHW, got shape {tuple(x.shape)}")
    Cg = w.weight.shape[1]
    if x.shape[1] != Cg * groups:
        raise ValueError(f"input has {x.shape[1]} channels, the layer expects {Cg * groups}")
    if bias is not None:
        bias = bias.to(torch.int32).contiguous()
    if w.native is not None and _use_native():
        return _native_module().int8_conv2d(x, int(x_zp), w, bias, epi, stride, padding, dilation, groups)
    return torch_backend.int8_conv2d(
        x, int(x_zp), w.weight, w.w_t, w.colsum, bias, epi, stride, padding, dilation, groups
    )
