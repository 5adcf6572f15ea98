"""Inference modules of binary networks: ±1 weights bit-packed, activations as packed bits between layers.

Values in a binary model are float32, 8-bit codes (:mod:`lowbit.nn.layers`) or **packed signs**: int64
words, 64 channels per word, bit 1 = +1 (:func:`lowbit.kernels.binary.pack_bits`); a feature map is
``[B, H, W, ceil(C/64)]`` (channels packed per pixel), a vector ``[B, ceil(C/64)]``.

* :class:`QBinaryConv`, :class:`QBinaryLinear`: packed signs in; XNOR-popcount dot products
  ``dot = K - 2 popcount(x XOR w)`` on lowbit's binary kernels; out either packed signs through a
  per-channel threshold ``bit = (dot >= thr) XOR flip`` (a BatchNorm and the sign after it, folded at
  convert time), so consecutive binary layers never unpack, or float32 ``scale * dot + bias``.
* :class:`QSignBits`: float32 -> packed signs, ``bit = (y >= thr) XOR flip`` per channel (after an int8
  first layer).
* :class:`QUnpackBits`: packed signs -> 8-bit codes ``{0, 2}`` (zero point 1: the values -1, +1) for an
  int8 layer that takes signs (the last layer by default).
* :class:`QBitMaxPool2d`: max pooling of packed signs (a bitwise OR).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from lowbit.formats.levels import BinaryFormat
from lowbit.formats.qspec import QSpec
from lowbit.kernels import PackedWeights
from lowbit.kernels.binary import PackedBinary, Threshold, max_pool2d_bits, pack_binary, pack_bits, unpack_bits
from lowbit.kernels.epilogue import FloatOut

from .base import Act, Count, Geometry, LowbitModule, float_act
from .layers import _conv_geometry, _IntWeights, _stored_weights
from .ops import QMaxPool2d

__all__ = ["QBinaryConv", "QBinaryLinear", "QSignBits", "QUnpackBits", "QBitMaxPool2d", "SIGN_SPEC"]

#: The spec of ±1 activations (scale 1): as 8-bit kernel codes ``{0, 2}`` with zero point 1.
SIGN_SPEC = QSpec.per_tensor(BinaryFormat(), 1.0)

_OUT = Literal["bits", "float"]


def _channel_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.reshape(-1, *([1] * (dim - 2))) if dim > 2 else t


class _BinaryLayer(_IntWeights):
    """±1 weights (packed for the binary kernels) and the epilogue: ``out="bits"``: packed signs,
    ``bit = (dot >= thr) XOR flip``; ``out="float"``: ``weight_scale * dot + bias`` (float32)."""

    spec_attrs = {"weight": dict[str, Any], "out": _OUT, "act": Act}
    spec_tensors = {"weight_packed": torch.uint8, "weight_scale": torch.float32, "thr?": torch.int32,
                    "flip?": torch.uint8, "bias?": torch.float32}

    def __init__(self, weight: torch.Tensor | PackedWeights, weight_scale: torch.Tensor | None = None,
                 out: str = "float", thr: torch.Tensor | None = None, flip: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, act: str | None = None) -> None:
        packed = weight if isinstance(weight, PackedWeights) else pack_binary(weight)
        if not isinstance(packed, PackedBinary):
            raise TypeError(f"binary layers hold ±1 weights packed for the binary kernels, got {type(packed).__name__}")
        n = packed.out_features
        super().__init__(packed, torch.ones(n) if weight_scale is None else weight_scale)
        if out not in ("bits", "float"):
            raise ValueError(f"a binary layer writes 'bits' or 'float', got {out!r}")
        self.out = out
        self.act = act or None
        if out == "bits":
            if thr is None or bias is not None or self.act is not None:
                raise ValueError("a binary layer writing bits needs thresholds (thr) and takes no bias or activation")
            self.epilogue: Threshold | FloatOut = Threshold(thr.to(torch.int32), None if flip is None else flip != 0)
            if self.epilogue.thr.numel() != n:
                raise ValueError(f"{self.epilogue.thr.numel()} thresholds for {n} output channels")
            self.register_buffer("thr", self.epilogue.thr)
            self.register_buffer("flip", None if flip is None else (flip != 0).to(torch.uint8).reshape(-1))
            self.register_buffer("bias", None)
        else:
            if thr is not None or flip is not None:
                raise ValueError("a binary layer writing float takes a scale and bias, not thresholds")
            b = None if bias is None else bias.to(torch.float32).reshape(-1).contiguous()
            if b is not None and b.numel() != n:
                raise ValueError(f"bias has {b.numel()} values for {n} output channels")
            if b is not None and not bool(torch.isfinite(b).all()):
                raise ValueError("bias must be finite")
            self.register_buffer("thr", None)
            self.register_buffer("flip", None)
            self.register_buffer("bias", b)
            self.epilogue = FloatOut(self.weight_scale, b)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)
        if isinstance(self.epilogue, FloatOut):
            self.epilogue = FloatOut(self.weight_scale, self.bias)
        else:
            self.epilogue = Threshold(self.thr, self.flip)
        return out

    def _tensors(self, codes: torch.Tensor | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        attrs, tensors = self._weight_spec(codes)
        for k in ("thr", "flip", "bias"):
            if getattr(self, k) is not None:
                tensors[k] = getattr(self, k)
        return {**attrs, "out": self.out, "act": self.act}, tensors

    @staticmethod
    def _parts(attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        w = _stored_weights(attrs, tensors)
        if not isinstance(w, PackedBinary):
            raise ValueError("a binary layer's weights must be stored for the binary kernels")
        return {"weight": w, "weight_scale": tensors["weight_scale"], "out": attrs["out"], "thr": tensors.get("thr"),
                "flip": tensors.get("flip"), "bias": tensors.get("bias"), "act": attrs.get("act")}

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight_q.shape)}, out={self.out}" + (f", act={self.act}" if self.act else "")


class QBinaryLinear(_BinaryLayer):
    """Binary linear layer: packed signs ``[..., ceil(K/64)]`` (or ±1 values ``[..., K]``) in; packed signs
    ``[..., ceil(N/64)]`` or float32 ``[..., N]`` out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float_act(self.packed.linear(x, None, None, self.epilogue), self.act)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self._tensors()

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QBinaryLinear:
        return cls(**cls._parts(attrs, tensors))


class QBinaryConv(_BinaryLayer):
    """Binary 2-D convolution (NCHW semantics): packed signs ``[B, H, W, ceil(C/64)]`` (or ±1 values NCHW)
    in; packed signs ``[B, Ho, Wo, ceil(N/64)]`` or float32 NCHW (channels-last memory) out. Padded
    positions hold ``pad_value`` (+1 or -1: binary kernels have no zero)."""

    spec_attrs = _BinaryLayer.spec_attrs | {"pad_value": Literal[-1, 1], **Geometry}

    def __init__(self, weight: torch.Tensor | PackedWeights, weight_scale: torch.Tensor | None = None,
                 out: str = "float", thr: torch.Tensor | None = None, flip: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, act: str | None = None, pad_value: int = -1,
                 **geometry: Any) -> None:
        super().__init__(weight, weight_scale, out, thr, flip, bias, act)
        if self.weight_q.dim() != 4:
            raise ValueError(f"binary conv weights must be 4-D, got shape {tuple(self.weight_q.shape)}")
        if pad_value not in (-1, 1):
            raise ValueError(f"binary convolutions pad with +1 or -1, got {pad_value!r}")
        self.pad_value = int(pad_value)
        self.geometry = _conv_geometry(geometry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed.conv2d(x, None, None, self.epilogue, pad_value=self.pad_value, **self.geometry)
        return float_act(y, self.act)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        attrs, tensors = self._tensors()
        return {**attrs, "pad_value": self.pad_value, **self.geometry}, tensors

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QBinaryConv:
        return cls(**cls._parts(attrs, tensors), pad_value=attrs["pad_value"], stride=attrs["stride"],
                   padding=attrs["padding"], dilation=attrs["dilation"], groups=attrs["groups"])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.geometry}, pad_value={self.pad_value}"


class QSignBits(LowbitModule):
    """float32 ``[B, C, H, W]`` or ``[B, C]`` -> packed signs (``[B, H, W, ceil(C/64)]`` / ``[B, ceil(C/64)]``):
    ``bit = (y >= thr[c]) XOR flip[c]``."""

    spec_tensors = {"thr": torch.float32, "flip": torch.uint8}

    def __init__(self, thr: torch.Tensor, flip: torch.Tensor | None = None) -> None:
        super().__init__()
        thr = thr.to(torch.float32).reshape(-1).contiguous()
        if bool(torch.isnan(thr).any()):
            raise ValueError("sign thresholds must not be NaN")
        flip = torch.zeros(thr.numel(), dtype=torch.uint8) if flip is None else (flip != 0).to(torch.uint8).reshape(-1)
        if flip.numel() != thr.numel():
            raise ValueError(f"{flip.numel()} flips for {thr.numel()} thresholds")
        self.register_buffer("thr", thr)
        self.register_buffer("flip", flip)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() < 2 or y.shape[1] != self.thr.numel():
            raise ValueError(f"expected [B, {self.thr.numel()}, ...] values, got shape {tuple(y.shape)}")
        bit = (y >= _channel_view(self.thr, y.dim())) ^ _channel_view(self.flip.bool(), y.dim())
        return pack_bits(bit.movedim(1, -1))

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {"thr": self.thr, "flip": self.flip}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QSignBits:
        return cls(tensors["thr"], tensors["flip"])

    def extra_repr(self) -> str:
        return f"channels={self.thr.numel()}"


class QUnpackBits(LowbitModule):
    """Packed signs -> 8-bit codes of :data:`SIGN_SPEC` (``0`` for -1, ``2`` for +1; zero point 1): a map
    ``[B, H, W, words]`` -> ``[B, C, H, W]`` (NCHW semantics; ``[B, L, words]`` -> ``[B, C, L]``), a vector
    ``[B, words]`` -> ``[B, C]``."""

    spec_attrs = {"channels": Count}

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = (unpack_bits(x, self.channels) + 1).to(torch.uint8)
        return codes.movedim(-1, 1) if codes.dim() > 2 else codes

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"channels": self.channels}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QUnpackBits:
        return cls(attrs["channels"])


class QBitMaxPool2d(QMaxPool2d):
    """Max pooling of packed signs ``[B, H, W, words]`` (a bitwise OR; geometry as ``nn.MaxPool2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d_bits(x, self.geometry)
