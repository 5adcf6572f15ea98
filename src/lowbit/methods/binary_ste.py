"""binary_ste — binary networks trained with the straight-through sign (BinaryConnect, Courbariaux et al.,
NeurIPS 2015; BNN, Hubara et al., NeurIPS 2016; XNOR-Net scales, Rastegari et al., ECCV 2016).

Forward ``sign(x)`` (``+1`` for ``x > 0``), backward the gradient where ``|x| <= 1`` (hardtanh window),
latent weights clipped to ``[-1, 1]``; optional per-channel ``α = mean|W|``. Every layer but the first and
the last is binarized from the start (``freeze="none"``) unless gradual freezing is asked for. The
BatchNorm before each sign becomes a per-channel threshold at convert time, and the model runs on the
XNOR-popcount kernels with packed signs between layers. See docs/methods.md and :mod:`lowbit.binary`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .binary import BinaryConfig, BinaryMethod


@dataclass
class BinarySTEConfig(BinaryConfig):
    """Options of :class:`BinarySTE` (those of :class:`~lowbit.methods.binary.BinaryConfig`)."""


@register
class BinarySTE(BinaryMethod):
    name = "binary_ste"
    order = 60
    summary = "binary network, straight-through sign (BNN/XNOR-Net), packed XNOR-popcount execution"
    config_cls = BinarySTEConfig
    kind = "ste"
