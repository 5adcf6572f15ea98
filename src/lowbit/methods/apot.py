"""APoT — additive powers-of-two quantization (Li, Dong, Wang, ICLR 2020).

Levels are sums of powers of two (4-bit activations: ``a + b``, ``a ∈ {0, 2^-1, 2^-3, 2^-5}``,
``b ∈ {0, 2^-2, 2^-4, 2^-6}``), scaled to a learned clip ``α``; weights take a sign and ``b - 1`` bits of
magnitude, and are standardized per layer before quantization. The gradient to ``α`` is that of the
authors' reparameterized clipping function (``Π(x/α) - x/α`` inside, ``sign(x)`` outside).

lowbit's reading [ours]: the levels are integers (the sums times the smallest power of two that makes them
whole: at most 48 for 4 bits), so APoT layers run exactly on the int8 kernels with step ``α / max level``;
weights are divided by their standard deviation for quantization and multiplied back (no mean shift), so
that quantization of a trained network with BatchNorm folded keeps its function and the integer weights
need no zero point; codes are rounded to the integer grid, then snapped to the nearest level. The first and
last layers at 8 bits use uniform levels (8-bit APoT levels do not fit in int8). See docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.granularity import Granularity, PerTensor
from lowbit.formats.levels import apot_levels
from lowbit.quantizers import FakeQuantizer

from .base import register
from .qat import QATConfig, QATMethod


@dataclass
class APoTConfig(QATConfig):
    """Options of :class:`APoT`; weights are quantized per tensor, as in the paper."""

    weight_granularity: Granularity | str = "per_tensor"


@register
class APoT(QATMethod):
    name = "apot"
    order = 52
    summary = "additive powers-of-two levels (Li et al.) with learned clipping, exact on int8 kernels"
    config_cls = APoTConfig
    default_init = "apot"
    weight_bits = (2, 3, 4, 5, 6)
    act_bits = (2, 3, 4, 5)

    def weight_quantizer(self, weight: torch.Tensor, bits: int, name: str) -> FakeQuantizer:
        if bits == 8:
            return super().weight_quantizer(weight, bits, name)
        return FakeQuantizer(apot_levels(bits, signed=True), role="weight", granularity=PerTensor(),
                             init=self.inits()[0], scale_by_std=True, lsq_grad_scale=False, name=name)

    def act_quantizer(self, bits: int, signed: bool, name: str) -> FakeQuantizer:
        if bits == 8:
            return super().act_quantizer(bits, signed, name)
        return FakeQuantizer(apot_levels(bits, signed=signed), role="act", init=self.inits()[1],
                             lsq_grad_scale=False, name=name)
