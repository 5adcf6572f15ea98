"""LSQ+ — learned step and offset (Bhalgat, Lee, Nagel, Blankevoort, Kwak, CVPR Workshops 2020).

LSQ with a learned offset ``β`` for activations: ``x̂ = round(clamp((x - β) / s, 0, 2^b - 1)) · s + β``,
so asymmetric ranges (negative inputs, residual sums) use every level. Initialization: weights
``s = max(|μ - 3σ|, |μ + 3σ|) / 2^(b-1)``; activations ``(s, β)`` minimizing the quantization MSE on a
batch. lowbit keeps ``β`` on the step's grid (an integer zero point) so the integer model reproduces the
fake-quant model exactly [ours]. See docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.formats.levels import IntRange
from lowbit.quantizers import FakeQuantizer

from .base import register
from .qat import QATConfig, QATMethod


@dataclass
class LSQPlusConfig(QATConfig):
    """Options of :class:`LSQPlus` (those of :class:`~lowbit.methods.qat.QATConfig`)."""


@register
class LSQPlus(QATMethod):
    name = "lsq_plus"
    order = 51
    summary = "LSQ+ (Bhalgat et al.): learned step plus a learned activation offset"
    config_cls = LSQPlusConfig
    default_init = "lsq_plus"

    def act_quantizer(self, bits: int, signed: bool, name: str) -> FakeQuantizer:
        return FakeQuantizer(IntRange.unsigned_bits(bits), role="act", init=self.inits()[1], offset=True, name=name)
