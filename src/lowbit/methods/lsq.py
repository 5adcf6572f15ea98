"""LSQ — learned step size quantization (Esser, McKinstry, Bablani, Appuswamy, Modha, ICLR 2020).

Weights and activations are fake-quantized with a trainable step ``s``:
``v̂ = round(clip(v / s, -Q_N, Q_P)) · s``; the gradient to ``s`` is ``round(v/s) - v/s`` inside the range
and ``-Q_N`` / ``Q_P`` outside, scaled by ``1 / sqrt(N · Q_P)``; the step starts at
``2 · mean|v| / sqrt(Q_P)``. Weights use signed levels ``[-2^(b-1), 2^(b-1) - 1]``, activations after a
ReLU unsigned levels ``[0, 2^b - 1]``. See docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .qat import QATConfig, QATMethod


@dataclass
class LSQConfig(QATConfig):
    """Options of :class:`LSQ` (those of :class:`~lowbit.methods.qat.QATConfig`)."""


@register
class LSQ(QATMethod):
    name = "lsq"
    order = 50
    summary = "learned step size QAT (Esser et al.): trains steps of weights and activations"
    config_cls = LSQConfig
    default_init = "lsq"
