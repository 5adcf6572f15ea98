"""Quantizers of small parts: fake-quant modules for training-aware quantization.

A :class:`FakeQuantizer` is built from a level set (:mod:`.parts`: uniform, codebook, ±1), a step
(learned, fixed, dynamic), an optional learned offset, a granularity and a step initializer
(:mod:`.init`: ``lsq``, ``lsq_plus``, ``minmax``, ``percentile``, ``mse``, ``aciq``, ``apot``,
``mean_abs``); the surrogate gradients live in :mod:`.ste`. :class:`Binarizer` (:mod:`.binary`) is the ±1
quantizer of binary networks: the straight-through sign or UBQ's annealed expected sign. See
docs/methods.md for the methods that combine them (LSQ, LSQ+, APoT, binary_ste, ubq) and the references.
"""

from .binary import BINARIZER_KINDS, DELTA_SCHEDULES, NOISES, Binarizer, delta_at, expected_sign
from .init import INITIALIZERS, initial_step, register_initializer
from .parts import (
    CodebookLevels,
    DynamicStep,
    FixedStep,
    LearnedOffset,
    LearnedStep,
    LevelSet,
    SignLevels,
    Step,
    UniformLevels,
    level_set,
)
from .quantizer import FakeQuantizer, broadcast_from_rank0
from .ste import grad_scale, round_ste, sign_ste, snap_ste, straight_through

__all__ = [
    "BINARIZER_KINDS",
    "DELTA_SCHEDULES",
    "INITIALIZERS",
    "NOISES",
    "Binarizer",
    "CodebookLevels",
    "DynamicStep",
    "FakeQuantizer",
    "FixedStep",
    "LearnedOffset",
    "LearnedStep",
    "LevelSet",
    "SignLevels",
    "Step",
    "UniformLevels",
    "broadcast_from_rank0",
    "delta_at",
    "expected_sign",
    "grad_scale",
    "initial_step",
    "level_set",
    "register_initializer",
    "round_ste",
    "sign_ste",
    "snap_ste",
    "straight_through",
]
