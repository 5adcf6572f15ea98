"""What each of lowbit's inference modules must output, computed by the independent specification
(tests/_spec.py) from the module's stored parameters (its file contents: codes, scales, zero points) and its
actual inputs. No lowbit code runs here: modules are recognized by class name and only their attributes
are read.

:func:`check_layers` runs a model with forward hooks and asserts that every integer module's output equals
the specification's on the same inputs, bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

import _spec as S


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def spec_epilogue(acc: np.ndarray, epi: Any, axis: int) -> torch.Tensor:
    """The specification's output of a kernel epilogue object (None, FloatOut, Requant, Threshold: read by
    their fields) on the int64 accumulator ``acc`` (channels along ``axis``), as a tensor of the kernel's
    output dtype."""
    if epi is None:
        return torch.from_numpy(S.epilogue(acc, "none", axis).astype(np.int32))
    if hasattr(epi, "thr"):
        S.check_int32(acc)
        return torch.from_numpy(S.threshold_bits(acc, _np(epi.thr), None if epi.flip is None else _np(epi.flip), axis))
    if hasattr(epi, "scale"):
        bias = None if epi.bias is None else _np(epi.bias)
        return torch.from_numpy(S.epilogue(acc, "float", axis, scale=_np(epi.scale), bias=bias))
    y = S.epilogue(acc, "requant", axis, m0=_np(epi.m0), rshift=_np(epi.rshift), zp=epi.out_zp, lo=epi.qmin,
                   hi=epi.qmax)
    return torch.from_numpy(y.astype(np.uint8 if epi.out_dtype == torch.uint8 else np.int8))


def _static_layer(mod: Any, x: np.ndarray) -> np.ndarray:
    w = _np(mod.weight_q).astype(np.int64)
    ws = _np(mod.weight_scale).astype(np.float64)
    pairs = [S.multiplier(float(v) * mod.in_scale / mod.out_scale) for v in ws]  # M = s_w * s_in / s_out
    m0 = np.array([p[0] for p in pairs], np.int64)
    rs = np.array([p[1] for p in pairs], np.int64)
    lo, hi = S.act_clamp(mod.act, mod.out_zp, mod.out_scale)
    xc = x.astype(np.int64) - mod.in_zp
    bias = _np(mod.bias_q)
    if type(mod).__name__ == "QLinear":
        acc = S.linear_acc(xc.reshape(-1, w.shape[1]), w, bias).reshape(*x.shape[:-1], -1)
        return S.epilogue(acc, "requant", -1, m0=m0, rshift=rs, zp=mod.out_zp, lo=lo, hi=hi)
    if mod.conv1d:
        xc = xc[:, :, None, :]
    acc = S.conv_acc(xc, w, bias, **mod.geometry)
    y = S.epilogue(acc, "requant", 1, m0=m0, rshift=rs, zp=mod.out_zp, lo=lo, hi=hi)
    return y[:, :, 0] if mod.conv1d else y


def _float_act(y: np.ndarray, act: str | None) -> np.ndarray:
    if act == "relu":
        return np.maximum(y, np.float32(0))
    if act == "relu6":
        return np.clip(y, np.float32(0), np.float32(6))
    return y


def _dynamic_layer(mod: Any, x: np.ndarray) -> np.ndarray:
    s, z = S.qparams(float(x.min()), float(x.max()), 0, 255)
    xc = S.quantize(x, s, z, 0, 255) - z
    w = _np(mod.weight_q).astype(np.int64)
    scale = _np(mod.weight_scale).astype(np.float32) * np.float32(s)
    bias = None if mod.bias is None else _np(mod.bias)
    if type(mod).__name__ == "DynamicQLinear":
        acc = S.linear_acc(xc.reshape(-1, w.shape[1]), w).reshape(*x.shape[:-1], -1)
        return _float_act(S.epilogue(acc, "float", -1, scale=scale, bias=bias), mod.act)
    if mod.conv1d:
        xc = xc[:, :, None, :]
    acc = S.conv_acc(xc, w, None, **mod.geometry)
    y = _float_act(S.epilogue(acc, "float", 1, scale=scale, bias=bias), mod.act)
    return y[:, :, 0] if mod.conv1d else y


def spec_output(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> np.ndarray | None:
    """The specification's output of a lowbit integer module on ``inputs`` (None for other modules)."""
    kind = type(mod).__name__
    xs = [_np(t) for t in inputs]
    if kind in ("QLinear", "QConv"):
        return _static_layer(mod, xs[0])
    if kind in ("DynamicQLinear", "DynamicQConv"):
        return _dynamic_layer(mod, xs[0])
    if kind == "QAdd":
        qmin, qmax = getattr(mod, "qmin", 0), getattr(mod, "qmax", 255)
        lo, hi = S.act_clamp(getattr(mod, "act", None), mod.out[1], mod.out[0], qmin, qmax)
        return S.add(xs[0], mod.a[1], xs[1], mod.b[1], (mod.a[0], mod.b[0], mod.out[0]), mod.out[1], lo, hi)
    if kind == "QClamp":
        return np.clip(xs[0].astype(np.int64), mod.lo, mod.hi)
    if kind == "QAvgPool2d":
        if mod.output_size is not None:
            return S.adaptive_avg_pool(xs[0], mod.output_size)
        return S.avg_pool(xs[0], mod.kernel_size, mod.stride, mod.padding, mod.zero_point)
    if kind == "Quantize":
        return S.quantize(xs[0], np.float32(mod.scale), mod.zero_point, 0, 255)
    if kind == "Dequantize":
        return S.dequantize(xs[0], np.float32(mod.scale), mod.zero_point)
    if kind == "IOConvert":
        return xs[0].astype(np.int64) + (-128 if mod.to == "int8" else 128)
    return None


def check_layers(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Runs ``model(x)``; every integer module's output must equal :func:`spec_output` on the same inputs.
    Returns the model output and how many modules were checked."""
    failures: list[str] = []
    checked = [0]

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        want = spec_output(mod, inp)
        if want is None:
            return
        checked[0] += 1
        got = _np(out)
        same = got.shape == want.shape and (
            np.array_equal(got.astype(np.int64), want) if want.dtype == np.int64 else np.array_equal(got, want)
        )
        if not same:
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64)) if got.shape == want.shape else None
            detail = f"max |diff| {diff.max():g} in {int((diff > 0).sum())} values" if diff is not None else "shape"
            failures.append(f"{type(mod).__name__} {mod.extra_repr()[:80]}: {detail}")

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    assert not failures, "layers differ from the specification:\n" + "\n".join(failures)
    return y, checked[0]
