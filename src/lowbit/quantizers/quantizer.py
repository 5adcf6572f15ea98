"""The fake quantizer: an ``nn.Module`` that quantizes and dequantizes a tensor, made of swappable parts.

``FakeQuantizer(fmt, step="learned", init="lsq", offset=False, granularity=PerTensor())`` computes

    s = step (LSQ gradient scale 1/sqrt(N·Q_P) on a learned step; times std(x) with ``scale_by_std``)
    z = zero point (0, or from a learned offset)
    codes = levels.quantize(x / s, z)          # clip, round (and snap / sign), surrogate gradients
    out = (codes - z) · s

so ``out`` equals the dequantized codes of :meth:`FakeQuantizer.spec` bit for bit: the integer model of a
trained network sees exactly the values training saw. The first call initializes the step from the
tensor with the chosen initializer (:mod:`lowbit.quantizers.init`); under ``torch.distributed`` rank 0's
initialization is broadcast so every rank starts alike. A learned step that becomes NaN stops training
with an error naming the quantizer; one that reaches zero or below is clamped to a tiny positive value
with a warning (never a silent NaN model).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from lowbit.formats.granularity import Granularity, PerTensor, parse_granularity
from lowbit.formats.levels import Format
from lowbit.formats.qspec import QSpec

from .init import INITIALIZERS, initial_step
from .parts import DynamicStep, FixedStep, LearnedOffset, LearnedStep, LevelSet, Step, level_set
from .ste import grad_scale

__all__ = ["FakeQuantizer", "broadcast_from_rank0"]

_MIN_STEP = 1e-12
_STEPS = ("learned", "fixed", "dynamic")


def broadcast_from_rank0(*tensors: torch.Tensor) -> None:
    """Copy rank 0's values into ``tensors`` on every rank (no-op outside torch.distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for t in tensors:
        dist.broadcast(t, src=0)


class FakeQuantizer(nn.Module):
    """See the module docstring. ``role``: ``"weight"`` or ``"act"`` (initializers and the gradient scale
    differ); ``param_shape``: the shape of the step (``granularity.param_shape`` of the tensor; ``()`` per
    tensor)."""

    #: the integer graph builder passes codes through a quantizer whose input already has its spec
    lowbit_fake_quant = True

    def __init__(
        self,
        fmt: Format,
        *,
        role: str = "act",
        granularity: Granularity | str = "per_tensor",
        param_shape: tuple[int, ...] = (),
        step: str = "learned",
        init: str = "lsq",
        offset: bool = False,
        lsq_grad_scale: bool = True,
        scale_by_std: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        if role not in ("weight", "act"):
            raise ValueError(f"role must be 'weight' or 'act', got {role!r}")
        if step not in _STEPS:
            raise ValueError(f"step must be one of {_STEPS}, got {step!r}")
        if init not in INITIALIZERS:
            raise ValueError(f"unknown step initializer {init!r}; known: {', '.join(sorted(INITIALIZERS))}")
        self.levels: LevelSet = level_set(fmt)
        self.role, self.init, self.name = role, init, name
        self.granularity = parse_granularity(granularity)
        if isinstance(self.granularity, PerTensor):
            param_shape = ()
        self.param_shape = tuple(int(d) for d in param_shape)
        if step == "learned":
            self.step: Step = LearnedStep(self.param_shape)
        elif step == "fixed":
            self.step = FixedStep(self.param_shape)
        else:
            self.step = DynamicStep(self.param_shape, lambda x: initial_step(self.init, x, self)[0])
        self.offset = LearnedOffset(self.param_shape) if offset else None
        if offset and fmt.qmin == fmt.qmax:
            raise ValueError("an offset needs at least two levels")
        self.lsq_grad_scale = lsq_grad_scale
        self.scale_by_std = scale_by_std
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self._warned = False

    @property
    def fmt(self) -> Format:
        return self.levels.fmt

    def describe(self) -> str:
        return f"quantizer '{self.name or '?'}' ({self.role}, {self.fmt})"

    def extra_repr(self) -> str:
        kind = type(self.step).__name__
        return (f"{self.fmt}, {self.role}, {self.granularity}, {kind}, init={self.init}"
                f"{', offset' if self.offset is not None else ''}{', std-scaled' if self.scale_by_std else ''}")

    # --- initialization ---------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the step (and offset) from ``x`` with the initializer; rank 0 decides under DDP."""
        xs = x.detach()
        if self.scale_by_std:
            xs = xs / self._std(xs)
        step, zp = initial_step(self.init, xs, self)
        step = step.to(self.initialized.device)
        if zp is None:
            zp = torch.zeros_like(step)
        broadcast_from_rank0(step, zp)
        self.step.set(step)
        if self.offset is not None:
            self.offset.set(zp.to(step), step)
        self.initialized.fill_(1)

    @staticmethod
    def _std(x: torch.Tensor) -> torch.Tensor:
        sd = x.std()
        return torch.where(sd > 0, sd, torch.ones_like(sd))

    # --- forward ------------------------------------------------------------------------------------
    def _grad_scale(self, x: torch.Tensor) -> float:
        if self.role == "act":
            n = x[0].numel() if x.dim() > 1 else x.numel()
        else:
            n = self.granularity.numel_per_param(x.shape)
        return 1.0 / math.sqrt(max(n, 1) * max(self.levels.q_p, 1))

    def _check(self) -> None:
        if not self.step.learned:
            return
        s = self.step.step  # type: ignore[attr-defined]
        if bool(torch.isnan(s).any()):
            raise FloatingPointError(f"the learned step of {self.describe()} became NaN: lower the learning "
                                     "rate or check the data for NaN")
        if bool((s <= _MIN_STEP).any()):
            with torch.no_grad():
                s.clamp_(min=_MIN_STEP)
            if not self._warned:
                warnings.warn(f"the learned step of {self.describe()} reached zero; clamped to {_MIN_STEP:g}",
                              RuntimeWarning, stacklevel=3)
                self._warned = True

    def scale_and_zero_point(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step (with its gradient rules) and zero point used for ``x``, in the parameter shape."""
        if not bool(self.initialized) and not self.step.dynamic:
            self.initialize(x)
        self._check()
        s = self.step.value(x)
        if self.step.learned and self.lsq_grad_scale:
            s = grad_scale(s, self._grad_scale(x))
        if self.scale_by_std:
            s = s * self._std(x)
        z = None if self.offset is None else self.offset.zero_point(s, self.fmt)
        return s, z

    @torch.no_grad()
    def current_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(step, zero point or None) now, in the parameter shape, detached (no initialization, checks or
        gradient rules), of a quantizer whose step does not depend on the tensor it quantizes."""
        if self.step.dynamic or self.scale_by_std:
            raise ValueError(f"the step of {self.describe()} depends on the tensor it quantizes")
        s = self.step.value(torch.zeros(())).detach().clone()
        return s, None if self.offset is None else self.offset.zero_point(s, self.fmt).detach()

    def current_step(self) -> torch.Tensor:
        return self.current_params()[0]

    def _view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p if p.dim() == 0 else self.granularity.view(p, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.scale_and_zero_point(x)
        sv = self._view(s, x)
        zv = None if z is None else self._view(z, x)
        codes = self.levels.quantize(x / sv, zv)
        return codes * sv if zv is None else (codes - zv) * sv

    # --- export to the integer side -------------------------------------------------------------------
    @torch.no_grad()
    def spec(self, x: torch.Tensor | None = None) -> QSpec:
        """The :class:`~lowbit.formats.QSpec` this quantizer's codes follow (``x``: the tensor, needed for a
        step that depends on it: dynamic, or scaled by the tensor's std)."""
        if x is None:
            if self.step.dynamic or self.scale_by_std:
                raise ValueError(f"{self.describe()} needs the tensor to export its step")
            if not bool(self.initialized):
                raise ValueError(f"{self.describe()} was never initialized (run data through the model first)")
            x = torch.zeros(())
        s, z = self.scale_and_zero_point(x)
        zp = torch.zeros_like(s) if z is None else z
        return QSpec(self.fmt, s.detach().reshape(-1), zp.detach().round().to(torch.int64).reshape(-1),
                     self.granularity if s.dim() else PerTensor())

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, QSpec]:
        """Integer codes of ``x`` and their spec (``spec.dequantize(codes) == self(x)``)."""
        spec = self.spec(x)
        return spec.quantize(x), spec

    def state_summary(self) -> dict[str, Any]:
        """Step and offset values as plain numbers (for logs and reports)."""
        s = self.step.value(torch.zeros(())) if not self.step.dynamic else torch.tensor(math.nan)
        out: dict[str, Any] = {"step": s.detach().reshape(-1).tolist()}
        if self.offset is not None:
            out["beta"] = self.offset.beta.detach().reshape(-1).tolist()
        return out
