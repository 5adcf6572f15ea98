"""Observers: how quantization ranges are chosen.

An observer sees float tensors (activations over a calibration set, or a weight tensor once),
chooses a clip range for a :class:`~lowbit.formats.QFormat` and from it the quantization
parameters::

    obs = make_observer("kl")              # per tensor (activations)
    for batch in calibration:
        obs.observe(layer_input(batch))
    scale, zero_point = obs.qparams(UINT8_ACT)

    wobs = make_observer("mse", axis=0)    # per output channel (weights)
    wobs.observe(conv.weight)
    w_scale, w_zp = wobs.qparams(INT8_WEIGHT)   # vectors, use with quantize(..., axis=0)

Registry names: ``minmax``, ``percentile``, ``mse``, ``kl``, ``aciq_laplace``, ``aciq_gauss``.
"""

from __future__ import annotations

from .aciq import (
    ACIQ_ALPHA,
    ACIQGaussObserver,
    ACIQLaplaceObserver,
    ACIQObserver,
    aciq_alpha,
    aciq_alpha_numeric,
    aciq_bias_correction,
    aciq_mse,
)
from .base import Observer
from .histogram import RunningHistogram
from .kl import KLObserver
from .minmax import MinMaxObserver
from .mse import MSEObserver
from .percentile import PercentileObserver

__all__ = [
    "ACIQ_ALPHA",
    "ACIQGaussObserver",
    "ACIQLaplaceObserver",
    "ACIQObserver",
    "KLObserver",
    "MSEObserver",
    "MinMaxObserver",
    "OBSERVERS",
    "Observer",
    "PercentileObserver",
    "RunningHistogram",
    "aciq_alpha",
    "aciq_alpha_numeric",
    "aciq_bias_correction",
    "aciq_mse",
    "make_observer",
]

#: Observer classes by registry name.
OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
    "aciq_laplace": ACIQLaplaceObserver,
    "aciq_gauss": ACIQGaussObserver,
}


def make_observer(name: str, axis: int | None = None, **kw: object) -> Observer:
    """A fresh observer by registry name; ``kw`` go to its constructor (e.g. ``percentile=99.9``).

    Raises ValueError for an unknown name, listing the known ones.
    """
    try:
        cls = OBSERVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown observer {name!r}; known: {', '.join(sorted(OBSERVERS))}") from None
    return cls(axis=axis, **kw)  # type: ignore[arg-type]
