"""Binarizers: ±1 fake quantizers of weights and activations for binary networks (docs/methods.md, binary).

:class:`Binarizer` is a :class:`~lowbit.quantizers.FakeQuantizer` on the level set ``{-1, +1}``
(:class:`~lowbit.formats.levels.BinaryFormat`) with one of two rules:

* ``kind="ste"`` — the straight-through sign (BinaryConnect / BNN, [paper]): ``sign(x)`` forward
  (``+1`` for ``x > 0``, else ``-1``, as the bit packing reads it), the gradient passed where ``|x| <= 1``
  (the hardtanh window); latent weights are clipped to ``[-1, 1]`` in training (``clip_latent``).
* ``kind="ubq"`` — lowbit's reading of UBQ (Trusov, Putintsev, Limonova, Computer Optics 2024): the sign of
  a value near zero is uncertain. The forward pass is the *expected* sign under noise of width ``δ``:
  uniform noise on ``[-δ, δ]`` gives ``clip(v / δ, -1, 1)``, Gaussian noise of standard deviation ``δ``
  gives ``erf(v / (δ √2))``; the backward pass is that function's derivative (autograd of the same
  expression). ``δ`` shrinks from ``delta_start`` to ``delta_end`` (0 by default) over ``anneal_steps``
  training steps by a schedule (:func:`delta_at`: linear, cosine, exponential), so that training ends on
  the exact sign. Weights are measured in units of their channel's mean ``|W|`` (so ``δ`` is relative),
  activations in their own units (they follow a BatchNorm). Once ``δ = 0`` the forward pass is the exact
  sign and the backward pass the straight-through window [ours: the derivative of the exact sign is 0
  almost everywhere, which would stop every gradient flowing through a finished layer].

``xnor_scale`` (weights): the output is ``α · sign(W)`` with XNOR-Net's per-output-channel
``α = mean|W|`` (Rastegari et al., ECCV 2016), detached (no gradient through ``α`` [ours]).

A binarizer can be switched off (``enabled = False``: the identity, for layers not yet binarized under
gradual freezing). It counts its own training-mode calls to advance ``δ``, so any training loop drives the
schedule; the counters are buffers and travel with checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.formats.granularity import PerAxis, PerTensor
from lowbit.formats.levels import BinaryFormat
from lowbit.formats.qspec import QSpec

from .quantizer import FakeQuantizer
from .ste import sign_ste

__all__ = ["Binarizer", "BINARIZER_KINDS", "DELTA_SCHEDULES", "NOISES", "delta_at", "expected_sign"]

BINARIZER_KINDS = ("ste", "ubq")
DELTA_SCHEDULES = ("linear", "cosine", "exponential")
NOISES = ("uniform", "gauss")
_EXP_RATE = 5.0  # the exponential schedule: exp(-5 t), shifted and scaled to reach delta_end at t = 1


def delta_at(schedule: str, t: float, start: float, end: float = 0.0) -> float:
    """Noise width at progress ``t`` in [0, 1]: ``start`` at 0, exactly ``end`` at 1.

    linear ``start + (end - start) t``; cosine ``end + (start - end)(1 + cos πt)/2``; exponential
    ``end + (start - end)(e^{-5t} - e^{-5}) / (1 - e^{-5})`` [ours: a decay that still ends exactly on ``end``].
    """
    t = min(max(float(t), 0.0), 1.0)
    if schedule == "linear":
        w = 1.0 - t
    elif schedule == "cosine":
        w = 0.5 * (1.0 + math.cos(math.pi * t))
    elif schedule == "exponential":
        w = (math.exp(-_EXP_RATE * t) - math.exp(-_EXP_RATE)) / (1.0 - math.exp(-_EXP_RATE))
    else:
        raise ValueError(f"unknown delta schedule {schedule!r}; known: {', '.join(DELTA_SCHEDULES)}")
    return end + (start - end) * w


def expected_sign(v: torch.Tensor, delta: float, noise: str = "uniform") -> torch.Tensor:
    """``E[sign(v + n)]`` for noise ``n`` of width ``delta`` > 0 (uniform on [-δ, δ], or N(0, δ²)); differentiable."""
    if delta <= 0:
        raise ValueError(f"the noise width must be > 0, got {delta}")
    if noise == "uniform":
        return F.hardtanh(v / delta)
    if noise == "gauss":
        return torch.erf(v / (delta * math.sqrt(2.0)))
    raise ValueError(f"unknown noise {noise!r}; known: {', '.join(NOISES)}")


class Binarizer(FakeQuantizer):
    """±1 fake quantizer (see the module docstring). ``role``: ``"weight"`` or ``"act"``; ``param_shape``:
    ``(out_channels,)`` for per-channel weight scales."""

    def __init__(self, *, role: str = "act", kind: str = "ste", noise: str = "uniform", xnor_scale: bool = False,
                 param_shape: tuple[int, ...] = (), delta_start: float = 1.0, delta_end: float = 0.0,
                 schedule: str = "cosine", clip_latent: bool = True, enabled: bool = True, name: str = "") -> None:
        if kind not in BINARIZER_KINDS:
            raise ValueError(f"unknown binarizer kind {kind!r}; known: {', '.join(BINARIZER_KINDS)}")
        if noise not in NOISES:
            raise ValueError(f"unknown noise {noise!r}; known: {', '.join(NOISES)}")
        if schedule not in DELTA_SCHEDULES:
            raise ValueError(f"unknown delta schedule {schedule!r}; known: {', '.join(DELTA_SCHEDULES)}")
        if not (math.isfinite(delta_start) and math.isfinite(delta_end) and delta_start >= delta_end >= 0):
            raise ValueError(f"need delta_start >= delta_end >= 0, got {delta_start}, {delta_end}")
        if xnor_scale and role != "weight":
            raise ValueError("the XNOR scale (mean |W| per channel) is a weight scale")
        per_channel = role == "weight" and xnor_scale
        super().__init__(BinaryFormat(), role=role, granularity=PerAxis(0) if per_channel else PerTensor(),
                         param_shape=param_shape if per_channel else (), step="dynamic" if xnor_scale else "fixed",
                         init="mean_abs", lsq_grad_scale=False, name=name)
        self.kind, self.noise, self.schedule = kind, noise, schedule
        self.delta_start, self.delta_end = float(delta_start), float(delta_end)
        self.clip_latent = clip_latent
        self.register_buffer("enabled", torch.tensor(bool(enabled)))
        self.register_buffer("anneal_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("seen_steps", torch.zeros((), dtype=torch.int64))
        self.initialized.fill_(1)  # nothing to initialize: the step is 1 or mean |W|, computed on every call

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Nothing to learn from the data: the step is 1 or the XNOR scale of the tensor itself."""
        self.initialized.fill_(1)

    # --- state ----------------------------------------------------------------------------------
    def enable(self, anneal_steps: int = 0) -> None:
        """Switch on; a UBQ binarizer anneals ``δ`` over the next ``anneal_steps`` training calls."""
        if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 0:
            raise ValueError(f"anneal_steps must be an integer >= 0, got {anneal_steps!r}")
        self.enabled.fill_(True)
        self.anneal_steps.fill_(anneal_steps if self.kind == "ubq" else 0)
        self.seen_steps.zero_()

    def finish(self) -> None:
        """End the annealing now (``δ = delta_end``)."""
        self.seen_steps.copy_(self.anneal_steps)

    def progress(self) -> float:
        n = int(self.anneal_steps)
        return 1.0 if n == 0 else min(int(self.seen_steps) / n, 1.0)

    def delta(self) -> float:
        """The noise width now (0 for the straight-through sign, and for a finished UBQ schedule)."""
        if self.kind != "ubq":
            return 0.0
        if int(self.anneal_steps) == 0:
            return self.delta_end
        return delta_at(self.schedule, self.progress(), self.delta_start, self.delta_end)

    @property
    def exact(self) -> bool:
        """Whether the forward pass is the exact sign (what the integer model computes)."""
        return bool(self.enabled) and self.delta() == 0.0

    # --- forward ------------------------------------------------------------------------------------
    def _alpha(self, x: torch.Tensor) -> torch.Tensor:
        return self.granularity.rows(x.detach()).abs().mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.enabled):
            return x
        if self.clip_latent and self.role == "weight" and self.training and x.is_leaf and x.requires_grad:
            with torch.no_grad():
                x.clamp_(-1.0, 1.0)
        d = self.delta()
        if d > 0:
            b = expected_sign(x / self._unit(x) if self.role == "weight" else x, d, self.noise)
        else:
            b = sign_ste(x)
        if self.training and torch.is_grad_enabled():
            self.seen_steps.add_(1)
        if self.step.dynamic:
            b = b * self._view(self._alpha(x), x)
        return b

    @staticmethod
    def _unit(x: torch.Tensor) -> torch.Tensor:
        """Per-output-channel mean |W| (detached; 1 for an all-zero channel), shaped to broadcast on ``x``."""
        u = x.detach().reshape(x.shape[0] if x.dim() > 1 else 1, -1).abs().mean(1)
        u = torch.where(u > 0, u, torch.ones_like(u))
        return u.reshape(-1, *([1] * (x.dim() - 1))) if x.dim() > 1 else u.reshape(())

    def _view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if p.dim() == 0 or p.numel() == 1:
            return p.reshape(())
        return p.reshape(-1, *([1] * (x.dim() - 1)))

    # --- export ---------------------------------------------------------------------------------------
    def scale_and_zero_point(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.step.dynamic:
            return self._alpha(x).reshape(self.param_shape), None
        return torch.ones(self.param_shape), None

    @torch.no_grad()
    def spec(self, x: torch.Tensor | None = None) -> QSpec:
        if self.step.dynamic:
            if x is None:
                raise ValueError(f"{self.describe()} needs the tensor to export its XNOR scale")
            s = self._alpha(x)
            return QSpec(BinaryFormat(), s, torch.zeros_like(s, dtype=torch.int64), self.granularity)
        return QSpec.per_tensor(BinaryFormat(), 1.0)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, QSpec]:
        """int8 ±1 codes of ``x`` (``+1`` where ``x > 0``) and their spec (scale α or 1)."""
        return torch.where(x > 0, 1, -1).to(torch.int8), self.spec(x)

    def current_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.step.dynamic:
            raise ValueError(f"the XNOR scale of {self.describe()} depends on the weights")
        return torch.ones(self.param_shape), None

    def current_step(self) -> torch.Tensor:
        return self.current_params()[0]

    def extra_repr(self) -> str:
        rule = self.kind if self.kind == "ste" else f"ubq {self.noise} δ={self.delta():.3g} ({self.schedule})"
        return (f"{self.role}, {rule}{', xnor α' if self.step.dynamic else ''}"
                f"{'' if bool(self.enabled) else ', off'}")

    def state_summary(self) -> dict[str, Any]:
        return {"enabled": bool(self.enabled), "delta": self.delta(), "progress": self.progress()}
