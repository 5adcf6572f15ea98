"""Activations quantized on the fly (dynamic range) and the int8 product with a float result.

Two granularities for the activation of a linear product, both with int8 weights per output channel:

* per tensor (``per_token=False``): one uint8 (scale, zero point) from the input's own min/max
  (:func:`lowbit.nn.layers._dynamic_qparams`), as TFLite's dynamic range and torch's ``quantize_dynamic``;
* per token (``per_token=True``): every row of the input (a token of a sequence, a sample of a batch) has
  its own scale ``max|x_row| / 127``, codes ``round(x / s_row) + 128`` in [1, 255] (symmetric, so the
  kernel's one zero point 128 serves every row and the integer product stays exact); the row scale is
  applied to the dequantized product.

Either way the product runs on lowbit's int8 kernels (:func:`lowbit.kernels.int8_linear`). An input
several layers read (an attention layer's query, key and value projections) is quantized once.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from lowbit import kernels
from lowbit.formats.affine import INT8_WEIGHT, UINT8_ACT, choose_qparams

__all__ = ["dynamic_linear", "quantize_codes", "token_qparams"]

#: Zero point of per-token codes: symmetric int8 codes shifted into uint8.
TOKEN_ZP = 128


def quantize_codes(x: torch.Tensor, scale: torch.Tensor | float, zp: torch.Tensor | int, lo: int = 0,
                   hi: int = 255) -> torch.Tensor:
    """``clamp(round(x / scale) + zp, lo, hi)`` as uint8 (round half to even), with one temporary: the
    same numbers as :func:`lowbit.formats.affine.quantize`, in fewer passes over ``x``."""
    return kernels.quantize_u8(x, scale, int(zp), lo, hi)


def token_qparams(x2: torch.Tensor) -> torch.Tensor:
    """Per-row scales [M, 1] (float32) of a 2-D input: ``max|x_row| / 127`` (1 for an all-zero row)."""
    lo, hi = torch.aminmax(x2, dim=1, keepdim=True)
    try:
        scale, _ = choose_qparams(lo, hi, INT8_WEIGHT)
    except ValueError:
        raise ValueError("input contains NaN or Inf") from None
    return scale


class _Last(threading.local):
    """The last input quantized on this thread and its codes: the query, key and value projections of an
    attention layer read the same tensor, which is then quantized once. The entry holds the input itself
    (so its memory cannot be reused by another tensor) and its version counter (an in-place change
    invalidates it)."""

    entry: tuple[torch.Tensor, int, bool, tuple[torch.Tensor, Any, Any]] | None = None


_LAST = _Last()


def _codes(x: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, Any, Any]:
    """(uint8 codes [M, K], scale (float or [M, 1]), zero point) of an input, per tensor or per row."""
    # inference tensors have no version counter (an in-place change could not be seen): not cached
    cacheable = not x.is_inference() and not (torch.is_grad_enabled() and x.requires_grad)
    e = _LAST.entry
    if cacheable and e is not None and e[0] is x and e[1] == x._version and e[2] == per_token:
        return e[3]
    x2 = x.reshape(-1, x.shape[-1])
    if per_token:
        s = token_qparams(x2)
        out: tuple[torch.Tensor, Any, Any] = (quantize_codes(x2, s, TOKEN_ZP, TOKEN_ZP - 127, TOKEN_ZP + 127), s,
                                               TOKEN_ZP)
    else:
        from .layers import _dynamic_qparams

        sf, z = _dynamic_qparams(x)
        out = (quantize_codes(x2, sf, z, UINT8_ACT.qmin, UINT8_ACT.qmax), sf, z)
    _LAST.entry = (x, x._version, per_token, out) if cacheable else None
    return out


def dynamic_linear(x: torch.Tensor, packed: kernels.PackedInt8, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, per_token: bool = False) -> torch.Tensor:
    """``x @ W^T + bias`` with x quantized on the fly (float32 [..., K] -> float32 [..., N])."""
    xq, s, z = _codes(x, per_token)
    if not per_token:
        y = kernels.int8_linear(xq, z, packed, None, kernels.FloatOut(weight_scale * s, bias))
    else:
        y = kernels.int8_linear(xq, TOKEN_ZP, packed, None, kernels.FloatOut(weight_scale))
        y = y.mul_(s) if bias is None else torch.addcmul(bias, y, s)
    return y.reshape(*x.shape[:-1], y.shape[-1])
