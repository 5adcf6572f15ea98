"""How a 4.6-bit layer call runs: checked once per call shape, then a short path to the native kernel.

At batch 1 a small layer computes in a few microseconds, so the Python around the native call matters as
much as the kernel. The first call of a :class:`~lowbit.kernels.w46.PackedW46` with a given input shape,
dtype, strides, geometry and zero point does every check (shapes, groups, bias, epilogue, zero point), picks
the kernel (:mod:`.w46_dispatch`; the protocol's calls only) and builds a *plan*: the output shape and the
native arguments. Later calls with the same key reuse it after a few cheap checks: the same bias and
epilogue objects, unchanged (tensor versions), and the same state of the kernel switches (native kernels
enabled, ISA path, thread count, dispatch mode). The activation codes are range-checked by the native
kernel on every call.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from . import w46_dispatch
from .epilogue import Epilogue
from .w46 import (
    PackedW46,
    _check_acts,
    _check_bias,
    _epi_args,
    _native,
    _pair,
    _zero_point,
    w46_conv2d_ref,
    w46_linear_ref,
)

__all__ = ["call", "route", "quick_state"]

_MAX_PLANS = 64  # per weight object; more distinct input shapes than this restart the cache


def _threads() -> int:
    nat_mod = sys.modules.get("lowbit.kernels.native")
    if nat_mod is None:
        from . import native as nat_mod
    return int(nat_mod.num_threads())


def _state(nat: Any, auto: bool) -> tuple[Any, ...]:
    if nat is None:
        return (None,)
    return (nat.w46_path(), _threads(), w46_dispatch.dispatch_mode() if auto else "w46")


def quick_state(nat: Any) -> tuple[Any, ...]:
    """What a layer's kernel choice depends on beyond its shapes, for a caller that knows the native kernels
    are on (``nat``: ``lowbit._native``): (native path, threads, dispatch mode as set), in three cheap reads
    (the executor checks it on every call of a model with 4.6-bit layers). An invalid
    ``LOWBIT_W46_DISPATCH`` is not checked here, so it cannot fail a model without 4.6-bit layers; a 4.6-bit
    layer's kernel choice (:func:`lowbit.kernels.w46_dispatch.dispatch_mode`) raises on it."""
    mode = w46_dispatch._mode[0] or os.environ.get("LOWBIT_W46_DISPATCH", "").strip().lower() or "auto"
    return (nat.w46_path(), nat.num_threads(), mode)


def route(w: PackedW46, kind: str, x: torch.Tensor, bias: torch.Tensor | None, epi: Epilogue | None,
          x_zp: int | None, geo: tuple[Any, ...]) -> str:
    """The kernel (``"w46"`` or ``"int8"``) the protocol's call of ``kind`` on inputs shaped like ``x`` runs
    (chosen and cached by one call on ``x``, :mod:`.w46_dispatch`)."""
    call(w, kind, x, bias, epi, x_zp, geo, True)
    return str(w._plans[(kind, x.shape, x.dtype, x.stride(), geo, x_zp, True)].route)


def _version(t: torch.Tensor | None) -> int:
    return -1 if t is None else t._version


def _epi_sig(epi: Epilogue | None) -> tuple[int, ...]:
    if epi is None:
        return ()
    return tuple(_version(getattr(epi, k, None)) for k in ("m0", "rshift", "scale", "bias"))


class _Plan:
    __slots__ = ("state", "bias", "bver", "epi", "esig", "route", "run")

    def __init__(self, state: tuple[Any, ...], bias: torch.Tensor | None, epi: Epilogue | None, route: str,
                 run: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.state, self.bias, self.bver, self.epi, self.esig = state, bias, _version(bias), epi, _epi_sig(epi)
        self.route, self.run = route, run

    def valid(self, state: tuple[Any, ...], bias: torch.Tensor | None, epi: Epilogue | None) -> bool:
        return (state == self.state and bias is self.bias and epi is self.epi and _version(bias) == self.bver
                and _epi_sig(epi) == self.esig)


def call(w: PackedW46, kind: str, x: torch.Tensor, bias: torch.Tensor | None, epi: Epilogue | None,
         x_zp: int | None, geo: tuple[Any, ...], auto: bool) -> torch.Tensor:
    """Run ``kind`` (``"linear"`` or ``"conv"``; ``geo`` = (stride, padding, dilation, groups)) of weights ``w``
    on ``x``; ``auto``: the kernel may be the int8 one where it is faster (:mod:`.w46_dispatch`)."""
    nat = _native()
    state = _state(nat, auto)
    key = (kind, x.shape, x.dtype, x.stride(), geo, x_zp, auto)
    plan = w._plans.get(key)
    if plan is None or not plan.valid(state, bias, epi):
        if len(w._plans) >= _MAX_PLANS:
            w._plans.clear()
        plan = _make(w, kind, x, bias, epi, x_zp, geo, auto, nat, state)
        w._plans[key] = plan
    return plan.run(x)


def _make(w: PackedW46, kind: str, x: torch.Tensor, bias: torch.Tensor | None, epi: Epilogue | None,
          x_zp: int | None, geo: tuple[Any, ...], auto: bool, nat: Any, state: tuple[Any, ...]) -> _Plan:
    if x.dtype != torch.uint8:
        raise TypeError(f"4.6-bit kernels take uint8 activation codes, got {x.dtype}")
    z = _zero_point(x_zp, w.K_x)
    if kind == "linear":
        run = _linear(w, x, bias, epi, z, nat)
    else:
        run = _conv(w, x, bias, epi, z, geo, nat)
    route = "w46"
    if auto and nat is not None:
        int8_run = _int8_run(w, kind, bias, epi, z, geo)
        problem = (kind, tuple(w.weight.shape), tuple(x.shape), x.is_contiguous(), _geometry(geo) if geo else ())
        route = w46_dispatch.choose(problem, state[0], state[1], lambda: run(x), lambda: int8_run(x))
        if route == "int8":
            run = int8_run
    return _Plan(state, bias, epi, route, run)


def _int8_run(w: PackedW46, kind: str, bias: torch.Tensor | None, epi: Epilogue | None, z: int,
              geo: tuple[Any, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    p = w.as_int8()
    if kind == "linear":
        return lambda x: p.linear(x, z, bias, epi)
    g = _geometry(geo)
    return lambda x: p.conv2d(x, z, bias, epi, *g)


def _geometry(geo: tuple[Any, ...]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
    stride, padding, dilation, groups = geo
    return _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), int(groups)


def _linear(w: PackedW46, x: torch.Tensor, bias: torch.Tensor | None, epi: Epilogue | None, z: int,
            nat: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if w.weight.dim() != 2:
        raise ValueError("w46_linear needs 2-D [N, K] weights (these are conv weights)")
    N, K = w.weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"input has {x.shape[-1] if x.dim() else 0} features, the layer expects {K}")
    b = _check_bias(bias, N)
    lead = tuple(x.shape[:-1])
    if nat is None:
        def ref(x: torch.Tensor) -> torch.Tensor:
            x2 = x.reshape(-1, K)
            _check_acts(x2, w.K_x)
            return w46_linear_ref(x2, w.K_x, w.weight, b, epi, z).reshape(*lead, N)
        return ref
    kind, p0, p1, ozp, qmin, qmax, dt, keep = _epi_args(epi, N)
    packed = w.native("linear", 1)
    bptr = 0 if b is None else b.data_ptr()
    M = 1
    for d in lead:
        M *= int(d)
    flat = x.dim() == 2 and x.is_contiguous()
    fn = nat.w46_linear
    empty = torch.empty

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x if flat else x.reshape(M, K).contiguous()
        out = empty((M, N), dtype=dt)
        fn(x2.data_ptr(), M, K, packed, bptr, kind, p0, p1, ozp, qmin, qmax, out.data_ptr(), z)
        return out if flat else out.reshape(*lead, N)

    run.keep = (keep, b)  # type: ignore[attr-defined]  # the pointers' owners live as long as the plan
    return run


def _conv(w: PackedW46, x: torch.Tensor, bias: torch.Tensor | None, epi: Epilogue | None, z: int,
          geo: tuple[Any, ...], nat: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if w.weight.dim() != 4:
        raise ValueError("w46_conv2d needs 4-D [N, C/groups, kh, kw] weights")
    if x.dim() != 4:
        raise ValueError(f"conv2d input must be 4-D NCHW, got shape {tuple(x.shape)}")
    (sh, sw), (ph, pw), (dh, dw), groups = _geometry(geo)
    N, Cg, kh, kw = w.weight.shape
    B, C, H, W = x.shape
    if groups < 1 or N % groups != 0 or C != Cg * groups:
        raise ValueError(f"input has {C} channels; the layer expects {Cg} per group x {groups} groups (N={N})")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("stride and dilation must be >= 1, padding >= 0")
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"input {H}x{W} is too small for this kernel / padding / dilation")
    b = _check_bias(bias, N)
    if nat is None:
        def ref(x: torch.Tensor) -> torch.Tensor:
            _check_acts(x, w.K_x)
            return w46_conv2d_ref(x, w.K_x, w.weight, b, epi, (sh, sw), (ph, pw), (dh, dw), groups, z)
        return ref
    nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    kind, p0, p1, ozp, qmin, qmax, dt, keep = _epi_args(epi, N)
    packed = w.native("conv", groups)
    bptr = 0 if b is None else b.data_ptr()
    fn, empty, cl = nat.w46_conv2d, torch.empty, torch.channels_last
    shape = (B, N, Ho, Wo)

    def run(x: torch.Tensor) -> torch.Tensor:
        xc = x if nhwc else x.contiguous()
        out = empty(shape, dtype=dt, memory_format=cl)
        fn(xc.data_ptr(), B, C, H, W, packed, kh, kw, sh, sw, ph, pw, dh, dw, groups, nhwc, bptr, kind, p0, p1,
           ozp, qmin, qmax, out.data_ptr(), z)
        return out

    run.keep = (keep, b)  # type: ignore[attr-defined]
    return run

