"""What the binary-network methods share (``binary_ste``, ``ubq``): their config, the quantizers they place
and the recipe ``prepare -> train (gradual freezing) -> convert`` (docs/methods.md, "Binary networks").

``bits=(1, 1)`` (default) is a full binary network: ±1 weights and ±1 activations (the sign after a
BatchNorm), run on lowbit's XNOR-popcount kernels with packed signs passed from layer to layer;
``bits=(1, A)`` binarizes the weights only and keeps ``A``-bit activations (the training-aware integer
path of :mod:`lowbit.qat`, ±1 weights on the int8 kernels). The first and the last layer stay at
``first_last_bits`` (8) unless it is None. The model itself is built by :mod:`lowbit.binary`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import fx

from lowbit.formats.levels import IntRange
from lowbit.quantizers import DELTA_SCHEDULES, NOISES, Binarizer, FakeQuantizer

from .base import TrainingData
from .qat import QATConfig, QATMethod

__all__ = ["BinaryConfig", "BinaryMethod"]


@dataclass
class BinaryConfig(QATConfig):
    """Options of the binary-network methods (besides those of :class:`~lowbit.methods.qat.QATConfig`).

    bits: ``(1, 1)`` full binary network; ``(1, A)`` binary weights with ``A``-bit activations (2..8).
    first_last_bits: bits of the first and last layers (8); None binarizes them too (the first layer then
        takes the 8-bit input image with ±1 weights, on the int8 kernels).
    xnor_scale: scale each output channel's ±1 weights by ``α = mean|W|`` (XNOR-Net).
    pad_value: what a binary convolution's padding holds: -1 (default; all-zero bits, the kernels'
        natural padding) or +1; 0 keeps zero padding, which binary kernels cannot compute: such layers then
        run on the int8 kernels (listed in ``lowbit_meta["binary_fallback"]``).
    freeze: ``"gradual"``: layers become binary one at a time in ``order``; each stage trains the layer
        being binarized and everything not yet frozen, then freezes it (its BatchNorm becomes fixed: the
        threshold of the execution form); ``"none"``: every layer is binarized from the start and the whole
        network trains for ``epochs``.
    order: ``("forward",)`` network order, ``("reverse",)``, or the layer names (every binarized layer once).
    stage_epochs: epochs of each stage of gradual freezing: one value for every stage, or one per stage.
    """

    bits: tuple[int, int] | str = (1, 1)
    xnor_scale: bool = True
    pad_value: Literal[-1, 0, 1] = -1
    freeze: Literal["gradual", "none"] = "none"
    order: tuple[str, ...] = ("forward",)
    stage_epochs: tuple[float, ...] = (0.5,)
    lr: float = 1e-3
    epochs: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.order, str):
            self.order = tuple(p.strip() for p in self.order.split(",") if p.strip())
        self.order = tuple(self.order)
        self.stage_epochs = tuple(float(e) for e in self.stage_epochs)
        if not self.order:
            raise ValueError("order must be 'forward', 'reverse' or layer names")
        if not self.stage_epochs or not all(e >= 0 for e in self.stage_epochs):
            raise ValueError(f"stage_epochs must be one or more numbers >= 0, got {self.stage_epochs!r}")
        if self.pad_value not in (-1, 0, 1):
            raise ValueError(f"pad_value must be -1, 0 or 1, got {self.pad_value!r}")
        if self.freeze not in ("gradual", "none"):
            raise ValueError(f"freeze must be 'gradual' or 'none', got {self.freeze!r}")

    @property
    def binary_activations(self) -> bool:
        return self.bits[1] == 1  # type: ignore[index]

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["order"], d["stage_epochs"] = list(self.order), list(self.stage_epochs)
        return d


class BinaryMethod(QATMethod):
    """Base of ``binary_ste`` and ``ubq``: subclasses set ``kind`` (the :class:`~lowbit.quantizers.Binarizer`
    rule) and may add binarizer options to their config."""

    config_cls: ClassVar[type[BinaryConfig]] = BinaryConfig
    kind: ClassVar[str] = "ste"
    default_init = "minmax"
    weight_bits = (1,)
    act_bits = (1, 2, 3, 4, 5, 6, 7, 8)

    @property
    def bcfg(self) -> BinaryConfig:
        assert isinstance(self.config, BinaryConfig)
        return self.config

    def binarizer_options(self) -> dict[str, Any]:
        """Options of every :class:`~lowbit.quantizers.Binarizer` this method places (the rule's own)."""
        return {"kind": self.kind}

    def binarizer(self, role: str, name: str, shape: tuple[int, ...] = ()) -> Binarizer:
        xnor = role == "weight" and self.bcfg.xnor_scale
        return Binarizer(role=role, xnor_scale=xnor, param_shape=shape[:1] if xnor else (), name=name,
                         **self.binarizer_options())

    def weight_quantizer(self, weight: torch.Tensor, bits: int, name: str) -> FakeQuantizer:
        """±1 for ``bits == 1``; else (the first and last layers) ``bits``-bit levels with a step recomputed
        from the weights on every call (per channel, the clip at max |W|: the latent weights move a lot while
        the network around them becomes binary, and a learned step would have to follow) [ours]."""
        if bits == 1:
            return self.binarizer("weight", name, tuple(weight.shape))
        g = self.config.layer(name).weight_granularity
        return FakeQuantizer(IntRange.signed_bits(bits, narrow=True), role="weight", granularity=g,
                             param_shape=g.param_shape(weight.shape), step="dynamic", init=self.inits()[0], name=name)

    def act_quantizer(self, bits: int, signed: bool, name: str) -> FakeQuantizer:
        """8-bit activations (the model input): a step fixed on the calibration batch; fewer bits (binary
        weights with low-bit activations): the method's learned step."""
        if bits == 1:
            raise ValueError(f"{self.name} with binary activations builds its model with lowbit.binary.prepare (signs "
                             "after BatchNorms), not lowbit.qat.prepare")
        if bits < 8:
            return super().act_quantizer(bits, signed, name)
        return FakeQuantizer(self.act_format(bits, signed), role="act", step="fixed", init=self.inits()[1], name=name)

    # --- the recipe for lowbit.quantize / compare -----------------------------------------------------
    def convert(self, prepared: Any, calib: list[torch.Tensor], data: TrainingData | None = None) -> fx.GraphModule:
        from lowbit.binary import convert, prepare_graph, train

        if data is None or data.train is None:
            raise ValueError(f"method {self.name!r} trains the model: it needs labelled training data")
        torch.manual_seed(self.bcfg.seed)
        qm = prepare_graph(prepared, self, calib)
        train(qm, data.train, data.test)
        return convert(qm)


def check_noise_options(noise: str, delta_start: float, delta_end: float, schedule: str) -> None:
    """UBQ's binarizer options, checked before any work; a schedule ending above 0 is warned about."""
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {', '.join(NOISES)}, got {noise!r}")
    if schedule not in DELTA_SCHEDULES:
        raise ValueError(f"delta_schedule must be one of {', '.join(DELTA_SCHEDULES)}, got {schedule!r}")
    if not 0 <= delta_end <= delta_start or delta_start <= 0:
        raise ValueError(f"need delta_start > 0 and 0 <= delta_end <= delta_start, got {delta_start}, {delta_end}")
    if delta_end > 0:
        warnings.warn(f"delta_end={delta_end:g} > 0: the schedule ends on a soft sign, so the trained model is not "
                      "yet exactly binary (the converted model uses the exact sign and may differ from it)",
                      UserWarning, stacklevel=4)
