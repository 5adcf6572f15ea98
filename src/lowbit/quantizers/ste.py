"""Rounding with surrogate gradients (straight-through estimators) and gradient scaling.

Each is a custom autograd function whose forward pass is *exactly* the plain operation (so fake-quant
codes equal the integer model's codes bit for bit), with the backward pass of the method's paper:

* :func:`round_ste` — ``round`` (half to even) forward, identity backward (Bengio et al.; LSQ);
* :func:`snap_ste` — nearest level of a non-uniform level set (from an integer code), identity backward;
* :func:`sign_ste` — ``sign`` forward (``+1`` for ``v > 0``, else ``-1``), gradient passed where ``|v| <= 1``
  (the hardtanh window of BinaryConnect / BNN);
* :func:`grad_scale` — identity forward, gradient times ``g`` backward (LSQ's step-size gradient scale);
* :func:`straight_through` — forward ``value``, backward passes the gradient to ``x`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["round_ste", "snap_ste", "sign_ste", "grad_scale", "straight_through"]


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


class _SnapSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, c: torch.Tensor, table: torch.Tensor, qmin: int) -> torch.Tensor:
        return table.to(c.device)[(c.detach() - qmin).long()].to(c.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return g, None, None


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v)
        return torch.where(v > 0, 1.0, -1.0).to(v.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (v,) = ctx.saved_tensors
        return g * (v.abs() <= 1).to(g.dtype)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()  # not a view: the step parameter may be clamped in place later in the pass

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g * ctx.scale, None


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass (exactly), the gradient of the identity on ``x`` in the backward pass."""
    return _StraightThrough.apply(x, value)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def snap_ste(codes: torch.Tensor, table: torch.Tensor, qmin: int) -> torch.Tensor:
    """``table[codes - qmin]`` (integer codes in [qmin, qmax] -> nearest level), identity gradient."""
    return _SnapSTE.apply(codes, table, int(qmin))


def sign_ste(v: torch.Tensor) -> torch.Tensor:
    return _SignSTE.apply(v)


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _GradScale.apply(x, float(scale))
