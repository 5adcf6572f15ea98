"""lowbit's native int8 kernels (``lowbit._native``, built from csrc/), with checked torch-facing wrappers.

The C++ side never sees torch: the wrappers here validate dtypes, shapes and contiguity, allocate the
outputs with torch and pass raw data pointers. The compute runs with the GIL released, on lowbit's own
thread pool (default size: ``torch.get_num_threads()`` at first use; see :func:`set_num_threads`).

ISA dispatch happens at run time in C++: ``vnni`` (AVX-512 VNNI), ``avx2`` and ``portable`` int8 paths
exist; an ``avx512bw`` cap runs the AVX2 path. A cap lowers the level for testing or comparisons: the
process-wide one (:func:`set_isa`, env ``LOWBIT_ISA``) and, on top of it, a per-thread one scoped to a
block (:func:`isa`). Packed weights do not depend on the ISA.

Threads: independent kernel calls from several Python threads run concurrently (the GIL is released and
each call is its own task group in the pool; the pool's workers help every call in flight). The thread
count (:func:`set_num_threads`, :func:`threads`) is process-wide. A process forked from one that used
the kernels (DataLoader workers, multiprocessing) gets a fresh pool on its first call.

Convolution takes NCHW-semantics input in any memory format and returns an NCHW-semantics tensor in
``torch.channels_last`` memory format (the kernels work on NHWC). Feeding that output to the next
convolution needs no copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .epilogue import EPI_KIND, FloatOut, Requant, ResidualAdd

try:
    from lowbit import _native as _C

    _HAVE = hasattr(_C, "int8_gemm")
except ImportError:  # pragma: no cover - depends on the build
    _C = None
    _HAVE = False

__all__ = [
    "available",
    "supports_int8",
    "active_isa",
    "best_isa",
    "int8_isa",
    "set_isa",
    "isa_cap",
    "isa",
    "set_num_threads",
    "threads",
    "num_threads",
    "spin_us",
    "set_spin_us",
    "pack_int8",
    "pack_weight",
    "ConvPending",
    "int8_gemm",
    "int8_conv2d",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "qadd",
]

_ISA_ORDER = ("portable", "neon", "avx2", "avx512bw", "vnni")
_threads_set = False  # the pool has been sized (from torch's setting or by set_num_threads)
_threads_explicit = False  # ... by set_num_threads: then it no longer follows torch's setting


def available() -> bool:
    """True when lowbit._native (with the int8 kernels) is importable."""
    return _HAVE


def supports_int8() -> bool:
    """The int8 kernels run on every CPU (a portable path exists)."""
    return _HAVE


def _require() -> Any:
    if not _HAVE:
        raise RuntimeError("lowbit's native kernels are not built in this installation")
    return _C


def active_isa() -> str:
    """Instruction-set level in use now (best supported, lowered by the cap)."""
    return str(_require().active_isa())


def best_isa() -> str:
    """Best instruction-set level this CPU supports."""
    return str(_require().best_isa())


def int8_isa() -> str:
    """Kernel family the int8 ops run now: ``portable``, ``avx2`` or ``vnni``."""
    return str(_require().int8_isa())


def _check_isa_name(name: str) -> None:
    if name not in _ISA_ORDER and name != "avx512vnni":
        raise ValueError(f"unknown ISA {name!r}; use one of {', '.join(_ISA_ORDER)}")


def set_isa(name: str | None) -> None:
    """Cap the instruction set for the whole process (``portable``, ``neon``, ``avx2``, ``avx512bw``,
    ``vnni``); None = best. Prefer :func:`isa`, which is scoped to a block and a thread."""
    c = _require()
    if name is None:
        name = "vnni"
    _check_isa_name(name)
    c.set_isa_cap(name)


def isa_cap() -> str:
    """The process-wide cap (:func:`set_isa` or ``LOWBIT_ISA``; ``vnni`` when uncapped)."""
    return str(_require().isa_cap())


@contextlib.contextmanager
def isa(name: str | None) -> Iterator[str]:
    """Cap the ISA for the kernel calls this thread makes inside the block (on top of the process-wide
    cap; other threads are not affected); None removes this thread's cap. Restored on exit, also after
    an exception. Yields the resulting :func:`active_isa`."""
    c = _require()
    if name is not None:
        _check_isa_name(name)
    prev = c.set_thread_isa_cap(name or "")
    try:
        yield active_isa()
    finally:
        c.set_thread_isa_cap(prev)


def set_num_threads(n: int | None) -> None:
    """Threads used by lowbit's kernels, process-wide (the caller's thread counts as one). Waits for the
    kernel calls in flight on other threads. None: follow ``torch.get_num_threads()`` (the default), as read
    when a lowbit model starts running. Prefer :func:`threads`, which restores the count."""
    global _threads_set, _threads_explicit
    if n is None:
        _threads_explicit = False
        _threads_set = False
        _ensure_threads()
        return
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    _require().set_num_threads(n)
    _threads_set = True
    _threads_explicit = True


def follow_torch_threads(n: int) -> None:
    """Size lowbit's pool to torch's thread count ``n`` unless :func:`set_num_threads` fixed it."""
    global _threads_set
    if _threads_explicit or not _HAVE:
        return
    if not _threads_set or int(_C.num_threads()) != n:
        _C.set_num_threads(max(1, int(n)))
    _threads_set = True


@contextlib.contextmanager
def threads(n: int) -> Iterator[int]:
    """Run the block with ``n`` kernel threads; the previous count is restored on exit."""
    prev, explicit = num_threads(), _threads_explicit
    set_num_threads(n)
    try:
        yield n
    finally:
        set_num_threads(prev if explicit else None)  # back to following torch's count if it did


def spin_us() -> int:
    """How long idle pool workers spin (waiting for the next kernel call) before they sleep, in µs."""
    return int(_require().spin_us())


def set_spin_us(us: int) -> None:
    """Set :func:`spin_us` (0 .. 100000; 0 = sleep at once). The default, 200 µs, covers the gaps between
    the kernel calls of a model; longer spins burn a core between models."""
    _require().set_spin_us(int(us))


def num_threads() -> int:
    if not _threads_set:
        _ensure_threads()
    return int(_require().num_threads())


def _ensure_threads() -> None:
    global _threads_set
    if not _threads_set:
        _require().set_num_threads(max(1, torch.get_num_threads()))
        _threads_set = True


def pack_int8(w2: torch.Tensor) -> Any:
    """Pack int8 weights [N, K] (contiguous) once; returns an opaque handle (owns a copy)."""
    c = _require()
    if not isinstance(w2, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(w2).__name__}")
    if w2.dtype != torch.int8:
        raise TypeError(f"int8 weights expected, got {w2.dtype}")
    if w2.dim() != 2:
        raise ValueError(f"weights must be 2-D [N, K], got shape {tuple(w2.shape)}")
    if w2.device.type != "cpu":
        raise ValueError("native kernels need CPU tensors")
    if not w2.is_contiguous():
        raise ValueError("weights must be contiguous")
    n, k = w2.shape
    return c.int8_pack(w2.data_ptr(), int(n), int(k))


class ConvPending:
    """Placeholder handle for conv weights: :func:`int8_conv2d` packs them at first use, once the group
    count is known (K order (kh, kw, c) per group), and caches the result on the PackedInt8."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<lowbit conv weights, packed at first use>"


def pack_weight(w: torch.Tensor) -> Any:
    """What ``PackedInt8.native`` should hold: an Int8Weights for linear [N, K] weights, a
    :class:`ConvPending` for conv [N, C/g, kh, kw] weights (avoids packing them in an order the
    convolution does not use)."""
    if isinstance(w, torch.Tensor) and w.dim() == 4:
        if w.dtype != torch.int8:
            raise TypeError(f"int8 weights expected, got {w.dtype}")
        return ConvPending()
    return pack_int8(w.contiguous() if isinstance(w, torch.Tensor) else w)


def _check_vec(t: torch.Tensor | None, n: int, dtype: torch.dtype, what: str) -> int:
    """Data pointer of a contiguous CPU vector [n] of `dtype` (0 for None); raises on anything else."""
    if t is None:
        return 0
    if isinstance(t, torch.Tensor) and t.dtype == dtype and t.shape == (n,) and t.is_cpu and t.is_contiguous():
        return t.data_ptr()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{what} must be {dtype}, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{what} must have shape [{n}], got {tuple(t.shape)}")
    raise ValueError(f"{what} must be a contiguous CPU tensor")


# (kind, out dtype, m0, rshift, out_zp, qmin, qmax, scale, fbias) for the C++ side (kinds: EPI_KIND).
def _epilogue(epi: Requant | FloatOut | None, n: int) -> tuple[int, torch.dtype, int, int, int, int, int, int, int]:
    if epi is None:
        return EPI_KIND["none"], torch.int32, 0, 0, 0, 0, 0, 0, 0
    if isinstance(epi, Requant):
        if epi.out_dtype not in (torch.uint8, torch.int8):
            raise TypeError(f"requantized output must be uint8 or int8, got {epi.out_dtype}")
        m0v, rsv = epi.per_channel(n)  # per-tensor parameters repeated per channel
        m0 = _check_vec(m0v, n, torch.int32, "Requant.m0")
        rs = _check_vec(rsv, n, torch.int32, "Requant.rshift")
        return epi.kind, epi.out_dtype, m0, rs, int(epi.out_zp), int(epi.qmin), int(epi.qmax), 0, 0
    if isinstance(epi, FloatOut):
        sc = _check_vec(epi.scale, n, torch.float32, "FloatOut.scale")
        fb = _check_vec(epi.bias, n, torch.float32, "FloatOut.bias")
        return EPI_KIND["float_out"], torch.float32, 0, 0, 0, 0, 0, sc, fb
    raise TypeError(f"unknown epilogue {type(epi).__name__}")


def _bad_activation(x: Any, shape: str, dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"activations must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"int8 kernels take uint8 activation codes, got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"activations must be {dim}-D {shape}, got shape {tuple(x.shape)}")
    raise ValueError("native kernels need CPU tensors")


def _check_zp(x_zp: int) -> int:
    if type(x_zp) is int and 0 <= x_zp <= 255:
        return x_zp
    if isinstance(x_zp, bool) or not isinstance(x_zp, int):
        if isinstance(x_zp, torch.Tensor) and x_zp.numel() == 1:
            x_zp = int(x_zp.item())
        else:
            raise TypeError(f"activation zero point must be an int, got {type(x_zp).__name__}")
    if not 0 <= x_zp <= 255:
        raise ValueError(f"activation zero point {x_zp} outside [0, 255]")
    return x_zp


def int8_gemm(
    x: torch.Tensor,
    x_zp: int,
    handle: Any,
    bias: torch.Tensor | None = None,
    epi: Requant | FloatOut | None = None,
) -> torch.Tensor:
    """``epi(sum_k (x[m, k] - x_zp) * w[n, k] + bias[n])``: x uint8 [M, K] (rows contiguous) -> [M, N]."""
    c = _require()
    if not isinstance(handle, c.Int8Weights):
        raise TypeError(f"handle must come from pack_int8, got {type(handle).__name__}")
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 2 and x.is_cpu):
        _bad_activation(x, "[M, K]", 2)
    m, k = x.shape
    n = handle.n
    if k != handle.k:
        raise ValueError(f"activations have K = {k}, the packed weights expect {handle.k}")
    if (x.stride(1) != 1 and k > 1) or (m > 1 and x.stride(0) < k):
        raise ValueError("activation rows must be contiguous (x.stride(1) == 1)")
    zp = _check_zp(x_zp)
    b = _check_vec(bias, n, torch.int32, "bias")
    kind, odt, m0, rs, ozp, qmin, qmax, sc, fb = _epilogue(epi, n)
    out = torch.empty((m, n), dtype=odt)
    if not _threads_set:
        _ensure_threads()
    ldx = x.stride(0) if m > 1 else k
    c.int8_gemm(x.data_ptr(), m, k, ldx, zp, handle, b, kind, out.data_ptr(), m0, rs, ozp, qmin, qmax, sc, fb)
    return out


def _pair(v: Any, what: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"{what} must be an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _conv_weights(packed: Any, groups: int) -> tuple[list[Any], torch.Tensor | None]:
    """Packed GEMM weights per group in (kh, kw, c) K order, cached on the PackedInt8 (``native_conv``);
    depthwise returns ([], w) with w int8 [C, kh*kw] contiguous."""
    w = packed.weight
    n, cg, kh, kw = w.shape
    cache = getattr(packed, "native_conv", None)
    if cache is not None and cache[0] == groups:
        return cache[1], cache[2]
    if groups == n and cg == 1 and groups > 1:
        entry: tuple[int, list[Any], torch.Tensor | None] = (groups, [], w.reshape(n, kh * kw).contiguous())
    elif groups == 1 and kh == 1 and kw == 1 and _HAVE and isinstance(getattr(packed, "native", None), _C.Int8Weights):
        entry = (groups, [packed.native], None)
    elif groups == 1 and (kw * cg) % 4:
        # each kernel row padded to a multiple of 4 bytes (zero weights): lets the VNNI kernels read the
        # kernel rows of a small-channel convolution (an RGB stem) straight from the input
        rows = w.permute(0, 2, 3, 1).reshape(n, kh, kw * cg)
        rows = torch.nn.functional.pad(rows, (0, -(kw * cg) % 4))
        entry = (groups, [pack_int8(rows.reshape(n, -1).contiguous())], None)
    else:
        ng = n // groups
        wp = w.permute(0, 2, 3, 1)  # [N, kh, kw, Cg]
        entry = (groups, [pack_int8(wp[g * ng:(g + 1) * ng].reshape(ng, -1).contiguous()) for g in range(groups)],
                 None)
    try:
        packed.native_conv = entry
    except AttributeError:  # pragma: no cover - frozen container
        pass
    return entry[1], entry[2]


def int8_conv2d(
    x: torch.Tensor,
    x_zp: int,
    packed: Any,
    bias: torch.Tensor | None = None,
    epi: Requant | FloatOut | None = None,
    stride: Any = (1, 1),
    padding: Any = (0, 0),
    dilation: Any = (1, 1),
    groups: int = 1,
    add: ResidualAdd | None = None,
) -> torch.Tensor:
    """Integer 2-D convolution with NCHW semantics (padding holds ``x_zp``).

    ``add``: a residual add fused into the (uint8 :class:`Requant`) epilogue (:class:`ResidualAdd`).

    x: uint8 [B, C, H, W] (any memory format); packed: a ``lowbit.kernels.PackedInt8`` of int8 weights
    [N, C/groups, kh, kw]. Returns [B, N, Ho, Wo] (int32 / uint8 / int8 / float32 by epilogue) in
    ``torch.channels_last`` memory format.
    """
    c = _require()
    w = getattr(packed, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dtype != torch.int8 or w.dim() != 4:
        raise TypeError("packed must be a PackedInt8 of int8 conv weights [N, C/groups, kh, kw]")
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4 and x.is_cpu):
        _bad_activation(x, "NCHW", 4)
    groups = int(groups)
    n, cg, kh, kw = (int(s) for s in w.shape)
    bsz, ch, h, wd = (int(s) for s in x.shape)
    if groups < 1 or n % groups:
        raise ValueError(f"groups={groups} must divide the {n} output channels")
    if ch != cg * groups:
        raise ValueError(f"input has {ch} channels, the layer expects {cg * groups}")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("stride and dilation must be >= 1 and padding >= 0")
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"output would be empty: input {h}x{wd}, kernel {kh}x{kw}, padding {ph},{pw}")
    zp = _check_zp(x_zp)
    b = _check_vec(bias, n, torch.int32, "bias")
    kind, odt, m0, rs, ozp, qmin, qmax, sc, fb = _epilogue(epi, n)
    ws, wdw = _conv_weights(packed, groups)
    xc = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((bsz, n, ho, wo), dtype=odt, memory_format=torch.channels_last)
    add_args: dict[str, int] = {}
    if add is not None:
        if not isinstance(add, ResidualAdd):
            raise TypeError(f"add must be a lowbit.kernels.ResidualAdd, got {type(add).__name__}")
        if kind != EPI_KIND["requant_u8"]:
            raise ValueError("a fused residual add needs a uint8 Requant epilogue")
        r = add.residual
        if tuple(r.shape) != (bsz, n, ho, wo) or not r.is_cpu:
            raise ValueError(f"the residual must be a CPU tensor of the output shape {(bsz, n, ho, wo)}, "
                             f"got {tuple(r.shape)}")
        rc = r.contiguous(memory_format=torch.channels_last)
        add_args = {"add_res": rc.data_ptr(), "add_m_a": int(add.m_a), "add_m_b": int(add.m_b),
                    "add_rshift": int(add.rshift), "add_r_zp": int(add.r_zp), "add_out_zp": int(add.out_zp),
                    "add_lo": int(add.lo), "add_hi": int(add.hi)}
    if not _threads_set:
        _ensure_threads()
    c.int8_conv2d(
        xc.data_ptr(), (bsz, ch, h, wd), zp, ws, 0 if wdw is None else wdw.data_ptr(), n, (kh, kw), (sh, sw),
        (ph, pw), (dh, dw), groups, b, kind, out.data_ptr(), m0, rs, ozp, qmin, qmax, sc, fb, **add_args,
    )
    return out


# ------------------------------------------------------------------ pooling and residual add on codes


def _codes(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"{what} must hold uint8 codes, got {x.dtype}")
    if not x.is_cpu:
        raise ValueError("native kernels need CPU tensors")
    return x


def _nhwc_or_nchw(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x (4-D) as it is if it is NCHW- or NHWC-contiguous, else copied to NHWC; returns (x, is_nhwc)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not (x.is_contiguous() and x.shape[1] > 1):
        return x, True
    if x.is_contiguous():
        return x, False
    return x.contiguous(memory_format=torch.channels_last), True


def _pool_out(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    o = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (o - 1) * s >= n + p:
        o -= 1
    return o


def _pool(x: torch.Tensor, out_hw: tuple[int, int], geometry: tuple[int, ...], fixed: bool, op: int, zp: int,
          ceil_mode: bool) -> torch.Tensor:
    c = _require()
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"pooling takes 3-D or 4-D input, got shape {tuple(x.shape)}")
    b, ch, h, w = (int(s) for s in x.shape)
    if min(ch, h, w) < 1:
        raise ValueError(f"pooling input has an empty dimension: {tuple(x.shape)}")
    xc, nhwc = _nhwc_or_nchw(x)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    y = torch.empty((b, ch, *out_hw), dtype=torch.uint8, memory_format=fmt)
    if b:
        if not _threads_set:
            _ensure_threads()
        c.qops_pool2d(xc.data_ptr(), (b, ch, h, w), out_hw, geometry, fixed, op, zp, nhwc, ceil_mode, y.data_ptr())
    return y.squeeze(0) if squeeze else y


def max_pool2d(x: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
               ceil_mode: bool = False) -> torch.Tensor:
    """Max pooling of uint8 codes with ``torch.nn.functional.max_pool2d``'s semantics (padding never wins);
    the scale and zero point are unchanged. NHWC input gives NHWC output, NCHW gives NCHW."""
    _codes(x, "max_pool2d input")
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(kernel_size if stride is None or stride == [] else stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("kernel size, stride and dilation must be >= 1 and padding >= 0")
    if 2 * ph > (kh - 1) * dh + 1 or 2 * pw > (kw - 1) * dw + 1:
        raise ValueError(f"padding {(ph, pw)} must be at most half of the (dilated) kernel {(kh, kw)}")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    out = (_pool_out(h, kh, sh, ph, dh, ceil_mode), _pool_out(w, kw, sw, pw, dw, ceil_mode))
    if min(out) < 1:
        raise ValueError(f"max_pool2d output would be empty: input {h}x{w}, kernel {kh}x{kw}")
    return _pool(x, out, (kh, kw, sh, sw, ph, pw, dh, dw), True, 0, 0, bool(ceil_mode))


def avg_pool2d(x: torch.Tensor, zero_point: int, kernel_size: Any, stride: Any = None,
               padding: Any = 0) -> torch.Tensor:
    """Average pooling of uint8 codes: padded positions hold ``zero_point`` and count (count_include_pad),
    divisor kh*kw, sums divided with rounding half up (the semantics of ``lowbit.nn.QAvgPool2d``)."""
    _codes(x, "avg_pool2d input")
    zp = _check_zp(zero_point)
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(kernel_size if stride is None else stride, "stride")
    ph, pw = _pair(padding, "padding")
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError("kernel size and stride must be >= 1 and padding >= 0")
    if 2 * ph > kh or 2 * pw > kw:
        raise ValueError(f"padding {(ph, pw)} must be at most half of the kernel {(kh, kw)}")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    out = (_pool_out(h, kh, sh, ph, 1, False), _pool_out(w, kw, sw, pw, 1, False))
    if min(out) < 1:
        raise ValueError(f"avg_pool2d output would be empty: input {h}x{w}, kernel {kh}x{kw}")
    return _pool(x, out, (kh, kw, sh, sw, ph, pw, 1, 1), True, 1, zp, False)


def adaptive_avg_pool2d(x: torch.Tensor, output_size: Any) -> torch.Tensor:
    """Adaptive average pooling of uint8 codes: windows [floor(i H / Ho), ceil((i+1) H / Ho)), each sum
    divided by its window size with rounding half up (``lowbit.nn.QAvgPool2d(output_size=...)``)."""
    _codes(x, "adaptive_avg_pool2d input")
    ho, wo = _pair(output_size, "output_size")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if not (1 <= ho <= h and 1 <= wo <= w):
        raise ValueError(f"adaptive pooling output {(ho, wo)} must be between 1 and the input size {(h, w)}")
    return _pool(x, (ho, wo), (1, 1, 1, 1, 0, 0, 1, 1), False, 1, 0, False)


def qadd(a: torch.Tensor, a_zp: int, b: torch.Tensor, b_zp: int, m_a: int, m_b: int, rshift: int, out_zp: int,
         lo: int = 0, hi: int = 255) -> torch.Tensor:
    """Residual add of uint8 codes, one rounding: ``clamp(((m_a (a - a_zp) + m_b (b - b_zp) + 2^(rshift-1))
    >> rshift) + out_zp, lo, hi)`` in 64-bit integers (:func:`lowbit.kernels.reference.add_ref`). a and b
    broadcast; the output has a's memory format (NHWC or NCHW)."""
    c = _require()
    _codes(a, "add input a")
    _codes(b, "add input b")
    za, zb = _check_zp(a_zp), _check_zp(b_zp)
    if a.shape != b.shape:
        a, b = (t.contiguous() for t in torch.broadcast_tensors(a, b))
    if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous():
        fmt = torch.channels_last
    else:
        fmt = torch.contiguous_format
    a = a.contiguous(memory_format=fmt)
    b = b.contiguous(memory_format=fmt)
    out = torch.empty(a.shape, dtype=torch.uint8, memory_format=fmt)
    if not _threads_set:
        _ensure_threads()
    c.qops_add(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(), int(m_a), int(m_b), int(rshift), za, zb,
               int(out_zp), int(lo), int(hi))
    return out


def quantize_u8(x: torch.Tensor, scale: float | torch.Tensor, zp: int, lo: int, hi: int) -> torch.Tensor:
    """uint8 codes ``clamp(round(x / scale) + zp, lo, hi)`` of a float32 tensor in one pass (csrc/quantize.h);
    ``scale``: a float (per tensor) or a float32 tensor [M, 1] of per-row scales of ``x`` viewed as [M, K]."""
    c = _require()
    if x.dtype != torch.float32 or not x.is_cpu:
        raise TypeError(f"quantize_u8 takes a float32 CPU tensor, got {x.dtype} on {x.device}")
    x = x.contiguous()
    cols = int(x.shape[-1]) if x.dim() else 1
    rows = x.numel() // cols if cols else 0
    per_row = isinstance(scale, torch.Tensor) and scale.numel() != 1
    if isinstance(scale, torch.Tensor):
        s = scale.to(torch.float32).reshape(-1).contiguous()
        if per_row and s.numel() != rows:
            raise ValueError(f"{s.numel()} row scales for {rows} rows")
    else:
        s = torch.tensor([float(scale)], dtype=torch.float32)
    out = torch.empty(x.shape, dtype=torch.uint8)
    if not _threads_set:
        _ensure_threads()
    c.quant_f32_u8(x.data_ptr(), out.data_ptr(), rows, cols, s.data_ptr(), per_row, int(zp), int(lo), int(hi))
    return out
