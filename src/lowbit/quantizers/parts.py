"""The swappable parts a :class:`~lowbit.quantizers.FakeQuantizer` is built from.

* **level sets** (:class:`LevelSet`): which codes exist and how a real-valued code ``v = x / s`` is
  rounded onto them, forward and backward — :class:`UniformLevels` (any integer range), :class:`CodebookLevels`
  (APoT and other integer codebooks), :class:`SignLevels` (±1);
* **steps** (the scale ``s``): :class:`LearnedStep` (a parameter, LSQ), :class:`FixedStep` (a buffer set
  once by the initializer), :class:`DynamicStep` (recomputed from the tensor on every call, e.g. XNOR-Net's
  ``mean|W|``);
* **offsets**: :class:`LearnedOffset` (LSQ+'s learned ``β``, kept on the grid of the step so that its
  zero point is an integer) or none (the zero point is fixed by the format).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.levels import BinaryFormat, Format

from .ste import round_ste, sign_ste, snap_ste

__all__ = [
    "LevelSet",
    "UniformLevels",
    "CodebookLevels",
    "SignLevels",
    "level_set",
    "Step",
    "LearnedStep",
    "FixedStep",
    "DynamicStep",
    "LearnedOffset",
]


# ------------------------------------------------------------------------------------- level sets

class LevelSet:
    """A format and its rounding rule. ``quantize(v, z)`` maps real-valued codes ``v = x / s`` to codes
    (float tensor) with the zero point ``z`` already added; gradients follow the part's surrogate."""

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt

    @property
    def q_p(self) -> int:
        """The largest positive level (LSQ's ``Q_P``; what a clip value maps to)."""
        return self.fmt.qmax if self.fmt.qmax > 0 else -self.fmt.qmin

    def quantize(self, v: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _clamped_round(self, v: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        lo, hi = self.fmt.qmin, self.fmt.qmax
        if z is None:
            return round_ste(torch.clamp(v, lo, hi))
        # clip first (LSQ: the gradient is cut where v is outside the range), then round; + z is exact
        return round_ste(torch.clamp(v, lo - z, hi - z)) + z

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fmt})"


class UniformLevels(LevelSet):
    """Every integer in ``[qmin, qmax]``: ``round(clamp(v, qmin - z, qmax - z)) + z``, straight-through."""

    def quantize(self, v: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return self._clamped_round(v, z)


class CodebookLevels(LevelSet):
    """An integer codebook: round to the integer grid as :class:`UniformLevels`, then snap to the nearest
    level (ties to the smaller magnitude; :meth:`~lowbit.formats.levels.Format.project`), straight-through."""

    def __init__(self, fmt: Format) -> None:
        super().__init__(fmt)
        self.table = fmt.snap_table.to(torch.float32)

    def quantize(self, v: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return snap_ste(self._clamped_round(v, z), self.table, self.fmt.qmin)


class SignLevels(LevelSet):
    """±1: ``sign(v)`` forward, gradient passed where ``|v| <= 1`` (straight-through in the hardtanh window)."""

    def quantize(self, v: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return sign_ste(v)


def level_set(fmt: Format) -> LevelSet:
    if isinstance(fmt, BinaryFormat):
        return SignLevels(fmt)
    return UniformLevels(fmt) if fmt.uniform else CodebookLevels(fmt)


# ------------------------------------------------------------------------------------------ steps

class Step(nn.Module):
    """The quantization step: ``value(x)`` returns it with the granularity's parameter shape."""

    learned = False
    dynamic = False

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def set(self, s: torch.Tensor) -> None:
        raise NotImplementedError


class LearnedStep(Step):
    """A trainable step (LSQ): the initializer sets it once, then the optimizer updates it."""

    learned = True

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(shape)
        self.step = nn.Parameter(torch.ones(self.shape))

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return self.step

    def set(self, s: torch.Tensor) -> None:
        with torch.no_grad():
            self.step.copy_(s.reshape(self.shape))


class FixedStep(Step):
    """A step set once by the initializer (an observer) and then frozen."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(shape)
        self.register_buffer("step", torch.ones(self.shape))

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return self.step

    def set(self, s: torch.Tensor) -> None:
        self.step.copy_(s.reshape(self.shape))


class DynamicStep(Step):
    """A step recomputed from the tensor on every call by ``fn(x) -> step`` (no gradient through it unless
    ``fn`` lets one through), e.g. XNOR-Net's per-channel ``mean|W|``."""

    dynamic = True

    def __init__(self, shape: tuple[int, ...], fn: object) -> None:
        super().__init__(shape)
        self.fn = fn

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x).reshape(self.shape)  # type: ignore[operator]

    def set(self, s: torch.Tensor) -> None:
        pass


# ----------------------------------------------------------------------------------------- offset

class LearnedOffset(nn.Module):
    """LSQ+'s learned offset ``β``: ``x̂ = round(clamp((x - β) / s)) s + β``. lowbit keeps ``β`` on the grid
    of the step, ``β = -z s`` with the integer zero point ``z = round(-β / s)`` (straight-through), clamped
    to the format so real zero stays exactly representable [ours]: the integer model then reproduces the
    fake-quant model exactly (zero padding included)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(tuple(shape)))

    def zero_point(self, s: torch.Tensor, fmt: Format) -> torch.Tensor:
        return torch.clamp(round_ste(-self.beta / s), fmt.qmin, fmt.qmax)

    def set(self, z: torch.Tensor, s: torch.Tensor) -> None:
        with torch.no_grad():
            self.beta.copy_((-z * s).reshape(self.beta.shape))
