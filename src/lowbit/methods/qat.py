"""What the training-aware methods share: their config, the quantizers they place, and the recipe
``prepare -> train -> convert`` that makes them usable by ``lowbit.quantize`` and ``lowbit compare``.

A training-aware method is a :class:`QATMethod` subclass that says which quantizer goes on a layer's
weights (:meth:`QATMethod.weight_quantizer`) and on an activation (:meth:`QATMethod.act_quantizer`);
:func:`lowbit.qat.prepare` places them and :func:`lowbit.qat.convert` turns the trained model into an
integer one. See docs/methods.md for each method and its references.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from lowbit.formats.levels import Format, IntRange
from lowbit.quantizers import INITIALIZERS, FakeQuantizer
from lowbit.trainer import FitOptions

from .base import Method, QuantConfig, TrainingData

__all__ = ["QATConfig", "QATMethod", "parse_bits"]


def parse_bits(v: Any) -> tuple[int, int]:
    """``(weight bits, activation bits)`` from a pair, one int (both) or a string ``"4,4"`` / ``"4"``."""
    if isinstance(v, str):
        parts = [p for p in v.replace(" ", "").split(",") if p]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"bits must be 'W,A' integers, e.g. '4,4'; got {v!r}") from None
    elif isinstance(v, int) and not isinstance(v, bool):
        nums = [v]
    else:
        nums = list(v)
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in nums):
        raise ValueError(f"bits must be one integer or a pair (weights, activations), got {v!r}")
    return nums[0], nums[1]


@dataclass
class QATConfig(QuantConfig):
    """Options of the training-aware methods.

    bits: ``(weights, activations)`` bit widths, or ``"4,4"``.
    init: step initializer of weights and activations (default: the method's own; see
        :data:`lowbit.quantizers.INITIALIZERS`); ``weight_init`` / ``act_init`` override one side.
    first_last_bits: bit width of the first and the last layer (weights and input), 8 by default, as usual
        in the literature; None quantizes them at ``bits`` too.
    The training options (``epochs``, ``lr``, ``batch_size``, ``optimizer``, ``weight_decay``, ``schedule``,
    ``seed``, ``eval_every``, ``device``, ``threads``) apply when the method trains through
    ``lowbit.quantize(..., train=...)`` or ``lowbit compare``; ``lowbit.qat.prepare`` users train with
    their own loop instead. ``epochs`` may be fractional.
    """

    bits: tuple[int, int] | str = (4, 4)
    init: str | None = None
    weight_init: str | None = None
    act_init: str | None = None
    first_last_bits: int | None = 8
    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    eval_every: float | None = None
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True
    calib_samples: int = 256
    calib_batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bits = parse_bits(self.bits)
        for name in ("init", "weight_init", "act_init"):
            v = getattr(self, name)
            if v is not None and v not in INITIALIZERS:
                raise ValueError(f"unknown {name} {v!r}; known: {', '.join(sorted(INITIALIZERS))}")
        if self.first_last_bits is not None and not (isinstance(self.first_last_bits, int)
                                                     and 2 <= self.first_last_bits <= 8):
            raise ValueError(f"first_last_bits must be in 2..8 or None, got {self.first_last_bits!r}")
        FitOptions.from_config(self)  # the training options are checked where they are used

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["bits"] = list(self.bits)  # type: ignore[arg-type]
        return d


class QATMethod(Method):
    """Base of the training-aware methods. Subclasses set ``name``, ``config_cls``, ``default_init``,
    ``weight_bits`` / ``act_bits`` (the bit widths they support) and build the quantizers."""

    needs_calibration = True
    needs_training_data = True
    config_cls: ClassVar[type[QuantConfig]] = QATConfig
    default_init: ClassVar[str] = "lsq"
    weight_bits: ClassVar[tuple[int, ...]] = tuple(range(2, 9))
    act_bits: ClassVar[tuple[int, ...]] = tuple(range(2, 9))

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        cfg = self.config
        assert isinstance(cfg, QATConfig)
        w, a = cfg.bits  # type: ignore[misc]
        for what, b, allowed in (("weight", w, self.weight_bits), ("activation", a, self.act_bits)):
            if b not in allowed:
                raise ValueError(f"method {self.name!r} quantizes {what}s to {min(allowed)}..{max(allowed)} bits, "
                                 f"got {b}")

    @property
    def cfg(self) -> QATConfig:
        assert isinstance(self.config, QATConfig)
        return self.config

    def inits(self) -> tuple[str, str]:
        """(weight initializer, activation initializer)."""
        cfg = self.cfg
        base = cfg.init or self.default_init
        return cfg.weight_init or base, cfg.act_init or base

    def precision(self, order: list[str]) -> Callable[[str | None], tuple[int, int]]:
        """``(weight bits, input bits)`` of each quantized layer (by name, ``order``: all of them in execution
        order); None: the bits of the other activations (layer outputs, residual adds). The first and the
        last layer take ``first_last_bits``."""
        w_bits, a_bits = self.cfg.bits  # type: ignore[misc]
        fl = self.cfg.first_last_bits
        edge = {order[0], order[-1]} if fl is not None and order else set()
        return lambda target: (fl, fl) if target in edge else (w_bits, a_bits)  # type: ignore[return-value]

    # --- the quantizers a method places ------------------------------------------------------------
    def weight_quantizer(self, weight: torch.Tensor, bits: int, name: str) -> FakeQuantizer:
        """Default: a learned step (LSQ) on signed ``bits``-bit levels."""
        g = self.config.layer(name).weight_granularity
        return FakeQuantizer(IntRange.signed_bits(bits), role="weight", granularity=g,
                             param_shape=g.param_shape(weight.shape), init=self.inits()[0], name=name)

    def act_format(self, bits: int, signed: bool) -> Format:
        return IntRange.signed_bits(bits) if signed else IntRange(0, (1 << bits) - 1, True)

    def act_quantizer(self, bits: int, signed: bool, name: str) -> FakeQuantizer:
        """Default: a learned step (LSQ) on signed levels, or unsigned ones (zero point 0) for non-negative
        values such as ReLU outputs."""
        return FakeQuantizer(self.act_format(bits, signed), role="act", init=self.inits()[1], name=name)

    # --- the recipe for lowbit.quantize / compare -----------------------------------------------------
    def convert(self, prepared: Any, calib: list[torch.Tensor], data: TrainingData | None = None) -> fx.GraphModule:
        from lowbit.qat import convert, prepare_graph
        from lowbit.trainer import fit

        if data is None or data.train is None:
            raise ValueError(f"method {self.name!r} trains the model: it needs labelled training data")
        torch.manual_seed(self.cfg.seed)
        qm = prepare_graph(prepared, self, calib)
        fit(qm, data.train, data.test, FitOptions.from_config(self.cfg))
        return convert(qm)
