"""ubq — the uncertainty-based binary quantizer (Trusov, Putintsev, Limonova, Computer Optics 2024, 48(4)),
as lowbit reads it, trained with gradual freezing and BatchNorm replacement.

The paper's [paper]: a binary quantizer meant for stable training and good results with few parameters,
trained with gradual network freezing and replacement of BatchNorm so that the trained network turns
smoothly into its execution form; better than earlier binarizations on small networks (MNIST, CIFAR-10).
Its formulas are not public to us; lowbit's reading [ours]:

* the sign of a value near zero is uncertain: the forward pass is the *expected* sign under noise of width
  ``δ`` (``noise="uniform"``: ``clip(v/δ, -1, 1)``; ``"gauss"``: ``erf(v/(δ√2))``), weights measured in units
  of their channel's mean ``|W|``; the backward pass is that function's derivative;
* ``δ`` goes from ``delta_start`` to ``delta_end`` = 0 over each layer's stage by ``delta_schedule``
  (linear, cosine, exponential), so every layer ends on the exact sign;
* gradual freezing in network order (``freeze="gradual"``, the default here): stage ``k`` binarizes layer
  ``k`` (its weights and the sign taken of its output), trains it and every layer not yet frozen, then
  freezes it — the BatchNorm before that sign keeps its running statistics from then on, i.e. it *is* the
  threshold the integer model computes;
* ``δ`` reaches 0 within the first ``anneal_fraction`` (0.5) of a stage; the rest of the stage trains on the
  exact sign;
* after ``δ`` reaches 0 the backward pass is the straight-through window (the exact sign's derivative is 0).

See docs/methods.md and :mod:`lowbit.binary`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .base import register
from .binary import BinaryConfig, BinaryMethod, check_noise_options


@dataclass
class UBQConfig(BinaryConfig):
    """Options of :class:`UBQ`: those of :class:`~lowbit.methods.binary.BinaryConfig` and

    noise: ``"uniform"`` or ``"gauss"`` (the noise whose expected sign is the forward pass).
    delta_start, delta_end: noise width at the start and the end of each annealing (end 0: exact sign;
        above 0 is warned about: the model would not be exactly binary).
    delta_schedule: ``"linear"``, ``"cosine"`` or ``"exponential"``.
    anneal_fraction: the part of each stage (of the whole training with ``freeze="none"``) over which ``δ``
        reaches ``delta_end``; the rest trains on the exact sign [ours: the network adapts to the exact sign
        before the layer freezes, while the learning rate is still above 0].
    """

    freeze: Literal["gradual", "none"] = "gradual"
    noise: str = "uniform"
    delta_start: float = 1.0
    delta_end: float = 0.0
    delta_schedule: str = "cosine"
    anneal_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_noise_options(self.noise, self.delta_start, self.delta_end, self.delta_schedule)
        if not 0 < self.anneal_fraction <= 1:
            raise ValueError(f"anneal_fraction must be in (0, 1], got {self.anneal_fraction!r}")


@register
class UBQ(BinaryMethod):
    name = "ubq"
    order = 61
    summary = "binary network, UBQ (annealed expected sign) with gradual freezing, packed execution"
    config_cls = UBQConfig
    kind = "ubq"

    def binarizer_options(self) -> dict[str, Any]:
        c = self.config
        assert isinstance(c, UBQConfig)
        return {"kind": "ubq", "noise": c.noise, "delta_start": c.delta_start, "delta_end": c.delta_end,
                "schedule": c.delta_schedule}
