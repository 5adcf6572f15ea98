"""lowbit's fixed-point log-domain scheme for BM layers (methods.md §4 [ours]; docs/methods.md).

A float BM layer (log weights ``v±``, bias ``b``, optional fused ReLU/ReLU6) between uint8 input codes
``(s_in, z_in)`` and uint8 output codes ``(s_out, z_out)`` becomes integer parameters for the kernel
of :mod:`lowbit.kernels.bm`:

- log step ``2^-f`` octave for inputs and weights alike (one step per layer; ``f`` = the layer's
  ``log_step_bits``, default 4 for 8-bit codes and 8 for 16-bit codes);
- input log table ``L[u] = round(2^f log2(u / 255))`` (u = |x - z_in|, L[0] = MIN);
- weights: ``w'± = exp(v±) s_in / s_out`` (a product's size in output codes per input code);
  ``W = max w'`` over the layer; ``c± = round(2^f log2(w'± / W))``, codes below MIN + 1 become MIN
  (zero weight). A sum ``r = a + c`` then means the product ``G 2^(r / 2^f)`` output codes with the
  layer gain ``G = 255 W``;
- exp table: ``E(r) = round(2^F G 2^(r / 2^f))`` realized as ``T[t] >> (sh - e)`` for ``r = e 2^f + t``:
  ``T[t] = round(2^(sh + F) G 2^(t / 2^f))`` with ``sh = 28 - floor(log2(2^F G))`` so ``T`` holds 29-30
  significant bits; ``F`` (fraction bits of the output, default 8) is lowered when ``2^F G`` would not
  fit ``2^28``, and a layer whose largest product does not fit even at ``F = 0`` is refused;
- bias ``B = round(2^F b / s_out)``; output clamp from the fused activation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.kernels.bm import log_table, min_code
from lowbit.nn.bm import QBMConv2d, QBMLinear

__all__ = ["DEFAULT_LOG_STEP_BITS", "DEFAULT_FRAC_BITS", "integer_params", "integer_layer", "BMIntegerError"]

DEFAULT_LOG_STEP_BITS = {8: 4, 16: 8}
DEFAULT_FRAC_BITS = 8
_GAIN_LIMIT = 1 << 28


class BMIntegerError(ValueError):
    """A BM layer cannot be expressed in the integer scheme (names the layer)."""


def integer_params(v_pos: torch.Tensor, v_neg: torch.Tensor, bias: torch.Tensor | None, in_qparams: tuple[float, int],
                   out_qparams: tuple[float, int], bits: int, f: int | None = None, name: str = "",
                   frac_bits: int = DEFAULT_FRAC_BITS) -> dict:
    """Codes, tables and shifts of one layer (see the module docstring); errors name the layer."""
    where = f"BM layer '{name}'" if name else "BM layer"
    f = DEFAULT_LOG_STEP_BITS.get(bits, 4) if f is None else int(f)
    try:
        mn = min_code(bits)
        L = log_table(f, bits)
    except ValueError as e:
        raise BMIntegerError(f"{where}: {e}") from None
    s_in, z_in = float(in_qparams[0]), int(in_qparams[1])
    s_out = float(out_qparams[0])
    if not (s_in > 0 and s_out > 0 and math.isfinite(s_in) and math.isfinite(s_out)):
        raise BMIntegerError(f"{where}: input / output scales must be finite and positive ({s_in}, {s_out})")
    for t_name, t in (("v_pos", v_pos), ("v_neg", v_neg), ("bias", bias)):
        if t is not None and bool(torch.isnan(t).any() or torch.isposinf(t).any()):
            raise BMIntegerError(f"{where}: parameter {t_name} contains NaN or +Inf")
    ln2 = math.log(2.0)
    off = math.log(s_in / s_out)
    lp = (v_pos.detach().double() + off) / ln2  # log2 of w'+ (output codes per input code)
    lq = (v_neg.detach().double() + off) / ln2
    top = float(torch.maximum(lp.max(), lq.max()))
    if not math.isfinite(top):
        raise BMIntegerError(f"{where}: every weight is zero")
    step = float(1 << f)

    def codes(l2: torch.Tensor) -> torch.Tensor:
        c = torch.round((l2 - top) * step).clamp(min=mn)  # -inf (zero weight) -> MIN
        return torch.where(c < mn + 1, float(mn), c).to(torch.int16 if bits == 16 else torch.int8)

    gain = 255.0 * 2.0**top
    F = frac_bits
    while F > 0 and 2.0**F * gain >= _GAIN_LIMIT:
        F -= 1
    if 2.0**F * gain >= _GAIN_LIMIT:
        raise BMIntegerError(
            f"{where}: its largest product is {gain:.3g} output codes (scale {s_in:.3g} in, {s_out:.3g} out), "
            f"beyond the integer range of the exp table (< 2^28): the log-domain step would overflow. "
            "Calibrate the output range on data that reaches this layer, or keep the layer float."
        )
    P = math.floor(math.log2(2.0**F * gain))
    sh = min(62, 28 - P)
    t = torch.arange(1 << f, dtype=torch.float64)
    T = torch.round(2.0 ** (sh + F) * gain * torch.exp2(t / step))
    if float(T.max()) >= 2**31:
        raise BMIntegerError(f"{where}: exp table entry beyond int32")
    bias_q = None
    if bias is not None:
        bq = torch.round(bias.detach().double() * (2.0**F / s_out))
        if bool((bq.abs() >= 2**30).any()):
            raise BMIntegerError(f"{where}: bias of {float(bias.abs().max()):.3g} is beyond the integer range of "
                                 f"its output codes (scale {s_out:.3g})")
        bias_q = bq.to(torch.int32)
    return {"cpos": codes(lp), "cneg": codes(lq), "bits": bits, "f": f, "sh": sh, "F": F,
            "T": T.to(torch.int32), "L": L, "bias_q": bias_q, "z_in": z_in}


def integer_layer(layer: nn.Module, in_qparams: tuple[float, int], out_qparams: tuple[float, int],
                  name: str = "") -> QBMLinear | QBMConv2d:
    """QBMLinear / QBMConv2d running ``layer`` (a lowbit.bm BM layer) on uint8 codes."""
    from .layers import BMConv2d, BMLinear

    p = integer_params(layer.v_pos, layer.v_neg, layer.bias, in_qparams, out_qparams, layer.code_bits,
                       layer.log_step_bits, name)
    args = (p["cpos"], p["cneg"], p["bits"], p["f"], p["sh"], p["F"], p["T"], p["L"], p["bias_q"],
            (float(in_qparams[0]), int(in_qparams[1])), (float(out_qparams[0]), int(out_qparams[1])), layer.act)
    if isinstance(layer, BMLinear):
        return QBMLinear(*args)
    if isinstance(layer, BMConv2d):
        return QBMConv2d(*args, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                         groups=layer.groups)
    raise TypeError(f"not a BM layer: {type(layer).__name__}")
