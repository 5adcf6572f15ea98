"""Differentiable bipolar morphological (BM) operations (methods.md §4).

The BM neuron, with ``x+ = max(x, 0)``, ``x- = max(-x, 0)`` and log weights ``v± = ln w±``::

    y = exp(max_j(ln x+_j + v+_j)) - exp(max_j(ln x+_j + v-_j))
      - exp(max_j(ln x-_j + v+_j)) + exp(max_j(ln x-_j + v-_j)) + b

Numerically safe log (:func:`safe_log`): ``ln x`` of a positive input is taken of ``max(x, floor)``
(``floor`` = 1e-6 by default, gradient 0 below it); a zero or negative part is exactly ``-inf`` (its
exponential is exactly 0), so a branch whose inputs are all zero contributes nothing, and an input
with no negative entries skips the two ``x-`` branches at no change of the result.

Gradient through ``max`` (:func:`maxplus`): with ``temperature == 0`` (default) the hard max, whose
gradient flows to the first arg-max term only (the subgradient torch.max uses); with ``temperature =
t > 0`` the soft max ``t * logsumexp(z / t)`` in the forward pass and its softmax weights in the
backward pass, an upper bound of the hard max within ``t * ln K`` that becomes the hard max as ``t ->
0`` (training anneals ``t`` to 0). The hard max runs on lowbit's native max-plus kernel (values and
arg-max, csrc/bm*.cpp); the soft max and the fallback run in torch in chunks of bounded memory.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowbit.kernels.bm import f32_maxplus, f32_maxplus_backward

__all__ = ["safe_log", "maxplus", "bm_linear", "bm_conv2d", "DEFAULT_FLOOR"]

DEFAULT_FLOOR = 1e-6
_CHUNK = 1 << 22  # elements of the largest temporary of the soft max


def safe_log(x: torch.Tensor, floor: float = DEFAULT_FLOOR) -> torch.Tensor:
    """``ln max(x, floor)`` where ``x > 0``, exactly ``-inf`` elsewhere (gradient 0 there and below floor)."""
    return torch.where(x > 0, torch.log(torch.clamp(x, min=floor)), float("-inf"))


class _HardMaxPlus(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        Y, idx = f32_maxplus(X, V, with_index=need)
        ctx.save_for_backward(idx if idx is not None else torch.empty(0))
        ctx.kdim = X.shape[1]
        return Y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (idx,) = ctx.saved_tensors
        return f32_maxplus_backward(idx, g, ctx.kdim, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


class _SoftMaxPlus(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, X: torch.Tensor, V: torch.Tensor, t: float) -> torch.Tensor:
        M, K = X.shape
        N = V.shape[0]
        Y = torch.empty(M, N, dtype=X.dtype)
        step = max(1, _CHUNK // max(1, N * K))
        for i in range(0, M, step):
            Y[i : i + step] = torch.logsumexp((X[i : i + step, None, :] + V[None]) / t, -1) * t
        ctx.save_for_backward(X, V, Y)
        ctx.t = t
        return Y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        X, V, Y = ctx.saved_tensors
        t = ctx.t
        M, K = X.shape
        N = V.shape[0]
        gX = torch.zeros_like(X) if ctx.needs_input_grad[0] else None
        gV = torch.zeros_like(V) if ctx.needs_input_grad[1] else None
        step = max(1, _CHUNK // max(1, N * K))
        for i in range(0, M, step):
            y = Y[i : i + step]
            fin = torch.isfinite(y)
            y = torch.where(fin, y, 0.0)  # all -inf rows: weights 0, no NaN
            p = torch.exp((X[i : i + step, None, :] + V[None] - y[..., None]) / t) * fin[..., None]
            gp = g[i : i + step, :, None] * p
            if gX is not None:
                gX[i : i + step] = gp.sum(1)
            if gV is not None:
                gV += gp.sum(0)
        return gX, gV, None


def maxplus(X: torch.Tensor, V: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
    """``Y[m, n] = max_k X[m, k] + V[n, k]`` (hard, ``temperature == 0``) or ``t * logsumexp`` (soft)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return _HardMaxPlus.apply(X, V)
    return _SoftMaxPlus.apply(X, V, float(temperature))


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        bad = "NaN" if torch.isnan(x).any() else "Inf"
        raise ValueError(f"BM layer '{name}': its input contains {bad}, which would reach the log of the inputs")


def _branches(lx: list[torch.Tensor], v_pos: torch.Tensor, v_neg: torch.Tensor, temperature: float) -> torch.Tensor:
    """``exp(R++) - exp(R+-) [- exp(R-+) + exp(R--)]`` for log inputs ``lx`` = [ln x+] or [ln x+, ln x-]."""
    M, N = lx[0].shape[0], v_pos.shape[0]
    E = torch.exp(maxplus(torch.cat(lx) if len(lx) > 1 else lx[0], torch.cat([v_pos, v_neg]), temperature))
    y = E[:M, :N] - E[:M, N:]
    if len(lx) > 1:
        y = y - E[M:, :N] + E[M:, N:]
    return y


def _log_parts(x: torch.Tensor, floor: float) -> list[torch.Tensor]:
    parts = [safe_log(x, floor)]
    if bool((x < 0).any()):
        parts.append(safe_log(-x, floor))
    return parts


def bm_linear(x: torch.Tensor, v_pos: torch.Tensor, v_neg: torch.Tensor, bias: torch.Tensor | None,
              floor: float = DEFAULT_FLOOR, temperature: float = 0.0, name: str = "") -> torch.Tensor:
    """The BM neuron for every output of a linear layer: x [..., K], v± [N, K] -> [..., N]."""
    _check_finite(x, name)
    K = v_pos.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    y = _branches(_log_parts(x2, floor), v_pos, v_neg, temperature)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, v_pos.shape[0])


def bm_conv2d(x: torch.Tensor, v_pos: torch.Tensor, v_neg: torch.Tensor, bias: torch.Tensor | None,
              stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
              floor: float = DEFAULT_FLOOR, temperature: float = 0.0, name: str = "") -> torch.Tensor:
    """The BM neuron over every patch of a 2-D convolution (NCHW; padding is zero input, ln 0 = -inf).

    Memory: the patches of one log input ([B*Ho*Wo, C/g*kh*kw]) and the maxima; the max-plus product
    itself never materializes its [M, N, K] terms (native kernel, or torch in bounded chunks)."""
    _check_finite(x, name)
    B, C, H, W = x.shape
    N, Cg, kh, kw = v_pos.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    parts = [F.pad(p, (pw, pw, ph, ph), value=float("-inf")) for p in _log_parts(x, floor)]
    Ng = N // groups
    outs = []
    for g in range(groups):
        cols = [F.unfold(p[:, g * Cg : (g + 1) * Cg], (kh, kw), dilation=(dh, dw), stride=(sh, sw))
                .transpose(1, 2).reshape(B * Ho * Wo, Cg * kh * kw) for p in parts]
        vp = v_pos[g * Ng : (g + 1) * Ng].reshape(Ng, -1)
        vn = v_neg[g * Ng : (g + 1) * Ng].reshape(Ng, -1)
        outs.append(_branches(cols, vp, vn, temperature).reshape(B, Ho * Wo, Ng))
    y = torch.cat(outs, 2).transpose(1, 2).reshape(B, N, Ho, Wo)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y
