"""Element-wise and pooling ops on quantized activation codes (unsigned 8-bit codes of a per-tensor
:class:`~lowbit.formats.QSpec`; legacy ``(scale, zero_point)`` pairs mean uint8 codes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch

from lowbit import kernels
from lowbit.formats.affine import UINT8_ACT, add_multipliers
from lowbit.formats.qspec import QSpec
from lowbit.typed import Range

from .base import Act, Code, LowbitModule, Pair, QParams, Scale, act_clamp, pair


class Quantize(LowbitModule):
    """float -> codes of a per-tensor spec, shifted to unsigned 8-bit (the entry of an integer region).

    ``Quantize(spec)`` or, as before, ``Quantize(scale, zero_point)`` for uint8 codes."""

    spec_attrs = {"spec": dict[str, Any] | None, "scale": Scale | None, "zero_point": Code | None}

    def __init__(self, scale: float | QSpec, zero_point: int | None = None) -> None:
        super().__init__()
        if isinstance(scale, QSpec):
            spec = scale
        else:
            spec = QSpec.per_tensor(UINT8_ACT, float(scale), int(zero_point or 0))
        self.spec = spec.unsigned()
        if self.spec.format.qmax > 255 or len(self.spec.scale) != 1:
            raise ValueError(f"Quantize makes per-tensor 8-bit codes, not {self.spec}")
        self.scale, self.zero_point = self.spec.per_tensor_params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.quantize(x).to(torch.uint8)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"spec": self.spec.to_dict()}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Quantize:
        if attrs.get("spec") is not None:
            return cls(QSpec.from_dict(attrs["spec"]))
        if attrs.get("scale") is None or attrs.get("zero_point") is None:
            raise ValueError("Quantize needs a spec or a scale and zero point")
        return cls(attrs["scale"], attrs["zero_point"])

    def extra_repr(self) -> str:
        return f"{self.spec.format}, scale={self.scale:.6g}, zero_point={self.zero_point}"


class Dequantize(Quantize):
    """Codes -> float32 (the exit of an integer region)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.dequantize(x)


class QLookup(LowbitModule):
    """Codes -> ``table[code]`` (uint8 table of 256 entries): snaps requantized integers onto a
    non-uniform level set (APoT codebooks) after a kernel's epilogue."""

    spec_tensors = {"table": torch.uint8}

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        if table.dtype != torch.uint8 or table.shape != (256,):
            raise ValueError(f"QLookup takes a uint8 table of 256 entries, got {table.dtype} {tuple(table.shape)}")
        self.register_buffer("table", table.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long()]

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {"table": self.table}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QLookup:
        return cls(tensors["table"])


class IOConvert(LowbitModule):
    """Full-integer model boundary: uint8 codes <-> int8 codes (``int8 = uint8 - 128``, zero point - 128)."""

    spec_attrs = {"to": Literal["int8", "uint8"]}

    def __init__(self, to: str) -> None:
        super().__init__()
        if to not in ("int8", "uint8"):
            raise ValueError(f"IOConvert target must be int8 or uint8, got {to!r}")
        self.to = to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to == "int8":
            if x.dtype != torch.uint8:
                raise TypeError(f"expected uint8 codes, got {x.dtype}")
            return (x.to(torch.int16) - 128).to(torch.int8)
        if x.dtype != torch.int8:
            raise TypeError(f"this full-integer model takes int8 input, got {x.dtype}")
        return (x.to(torch.int16) + 128).to(torch.uint8)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"to": self.to}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> IOConvert:
        return cls(attrs["to"])


class CheckInput(LowbitModule):
    """Full-integer model entry: reject input of the wrong dtype instead of silently misreading it."""

    spec_attrs = {"dtype": Literal["int8", "uint8"]}

    def __init__(self, dtype: str) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if str(x.dtype).removeprefix("torch.") != self.dtype:
            raise TypeError(f"this full-integer model takes {self.dtype} input codes, got {x.dtype}")
        return x

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"dtype": self.dtype}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CheckInput:
        return cls(attrs["dtype"])


class QClamp(LowbitModule):
    """ReLU / ReLU6 on codes: a clamp, the scale and zero point are unchanged."""

    spec_attrs = {"lo": Code, "hi": Code}

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__()
        self.lo, self.hi = int(lo), int(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"lo": self.lo, "hi": self.hi}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QClamp:
        return cls(attrs["lo"], attrs["hi"])


class QAdd(LowbitModule):
    """Integer residual add of uint8 codes, rounded once (:func:`lowbit.kernels.qadd`; the specification
    is :func:`lowbit.kernels.reference.add_ref`): with ``M = s_in / s_out`` for each input,

    ``out = clamp(((m_a (a - z_a) + m_b (b - z_b) + 2^(R-1)) >> R) + z_out, lo, hi)``,

    ``m_a, m_b, R`` from :func:`~lowbit.formats.affine.add_multipliers` (one shift for both, 64-bit
    integers). ``[qmin, qmax]`` are the output format's codes; ``act`` fuses a ReLU / ReLU6 as a tighter
    clamp (``lo = max(qmin, z_out)``). The file stores the scales; the multipliers are derived when the
    module is built.
    """

    spec_attrs = {"a": QParams, "b": QParams, "out": QParams, "qmin": Code | None, "qmax": Code | None, "act": Act}

    def __init__(self, a: tuple[float, int], b: tuple[float, int], out: tuple[float, int], qmin: int = 0,
                 qmax: int = 255, act: str | None = None) -> None:
        super().__init__()
        self.a, self.b, self.out = (float(a[0]), int(a[1])), (float(b[0]), int(b[1])), (float(out[0]), int(out[1]))
        if not 0 <= qmin < qmax <= 255:
            raise ValueError(f"QAdd output codes [{qmin}, {qmax}] must lie in [0, 255]")
        self.qmin, self.qmax = int(qmin), int(qmax)  # the output format's codes
        self.act = act or None
        self.m_a, self.m_b, self.rshift = add_multipliers(self.a[0], self.b[0], self.out[0])
        self.lo, self.hi = act_clamp(self.act, self.out[1], self.out[0], self.qmin, self.qmax)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return kernels.qadd(x, self.a[1], y, self.b[1], self.m_a, self.m_b, self.rshift, self.out[1], self.lo,
                            self.hi)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"a": list(self.a), "b": list(self.b), "out": list(self.out), "qmin": self.qmin, "qmax": self.qmax,
                "act": self.act}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QAdd:
        qmin, qmax = attrs.get("qmin"), attrs.get("qmax")  # absent in files written before they existed
        return cls(tuple(attrs["a"]), tuple(attrs["b"]), tuple(attrs["out"]), 0 if qmin is None else qmin,
                   255 if qmax is None else qmax, attrs.get("act"))

    def extra_repr(self) -> str:
        return f"m_a={self.m_a}, m_b={self.m_b}, rshift={self.rshift}, out_zp={self.out[1]}, act={self.act}"


class QAvgPool2d(LowbitModule):
    """Average pooling of codes (scale and zero point unchanged): integer window sums, rounded division.

    ``output_size`` set: adaptive pooling (global pooling when it is 1); else kernel/stride/padding.
    Padded positions count as the zero point (real zero), like a float average with zero padding.
    """

    spec_attrs = {"zero_point": Code, "kernel_size": Pair | None, "stride": Pair | None,
                  "padding": tuple[Annotated[int, Range(0)], Annotated[int, Range(0)]], "output_size": Pair | None}

    def __init__(self, zero_point: int, kernel_size: Any = None, stride: Any = None, padding: Any = 0,
                 output_size: Any = None) -> None:
        super().__init__()
        self.zero_point = int(zero_point)
        self.output_size = None if output_size is None else pair(output_size)
        self.kernel_size = None if kernel_size is None else pair(kernel_size)
        self.stride = None if self.kernel_size is None else pair(stride if stride is not None else kernel_size)
        self.padding = pair(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_size is not None:
            return kernels.adaptive_avg_pool2d(x, self.output_size)
        return kernels.avg_pool2d(x, self.zero_point, self.kernel_size, self.stride, self.padding)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"zero_point": self.zero_point, "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "output_size": self.output_size}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QAvgPool2d:
        return cls(attrs["zero_point"], attrs["kernel_size"], attrs["stride"], attrs["padding"],
                   attrs["output_size"])


class QMaxPool2d(LowbitModule):
    """2-D max pooling of codes (scale and zero point unchanged: max commutes with requantization).

    NCHW semantics, any map size; padding never wins a window (torch's behaviour), dilation and
    ``ceil_mode`` as in ``nn.MaxPool2d``. The geometry is checked when the module is built.
    """

    spec_attrs = {"kernel_size": Pair, "stride": Pair, "padding": tuple[int, int], "dilation": Pair,
                  "ceil_mode": bool}

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                 ceil_mode: bool = False) -> None:
        super().__init__()
        self.geometry = kernels.PoolGeometry.make(kernel_size, stride, padding, dilation, ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.max_pool2d_codes(x, self.geometry)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        g = self.geometry
        return {"kernel_size": list(g.kernel), "stride": list(g.stride), "padding": list(g.padding),
                "dilation": list(g.dilation), "ceil_mode": g.ceil_mode}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QMaxPool2d:
        return cls(attrs["kernel_size"], attrs["stride"], attrs["padding"], attrs["dilation"], attrs["ceil_mode"])

    def extra_repr(self) -> str:
        g = self.geometry
        return f"kernel_size={g.kernel}, stride={g.stride}, padding={g.padding}, dilation={g.dilation}, " \
               f"ceil_mode={g.ceil_mode}"
