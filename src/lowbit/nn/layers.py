"""Inference layers holding packed integer (or float16) weights.

- :class:`QLinear`, :class:`QConv` (static / full integer / training-aware): activation codes in (their
  :class:`~lowbit.formats.QSpec`), codes of the output spec out (or float32 when the layer has none);
  integer weights of any level set within int8 behind the packed-weight protocol, int32 bias and
  accumulation, per-channel Q31 requantization, fused ReLU/ReLU6 as a clamp.
- :class:`DynamicQLinear`, :class:`DynamicQConv` (dynamic range): float in and out; the activation is
  quantized per call from its own min/max, the product is integer, the output dequantized.
- :class:`F16Linear`, :class:`F16Conv` (float16): weights stored as float16, upcast to float32 to run.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from lowbit import kernels
from lowbit.formats.affine import UINT8_ACT, choose_qparams, quantize_multiplier
from lowbit.formats.levels import Format
from lowbit.formats.qspec import QSpec, as_spec
from lowbit.kernels.packed import codes_storage, decode_storage, family

from .base import Act, Geometry, LowbitModule, QParams, act_clamp, float_act, pair
from .dynamic_act import dynamic_linear, quantize_codes


def _conv_geometry(attrs: dict[str, Any], conv1d: bool = False) -> dict[str, Any]:
    """Conv2d geometry; a Conv1d runs as a Conv2d of height 1 (its geometry goes on the width)."""
    g = {k: pair(attrs.get(k, d)) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1))}
    if conv1d:
        g = {"stride": (1, g["stride"][0]), "padding": (0, g["padding"][0]), "dilation": (1, g["dilation"][0])}
    return {**g, "groups": int(attrs.get("groups", 1))}


def _check_bias(bias: torch.Tensor, n: int) -> None:
    if bias.numel() != n:
        raise ValueError(f"bias has {bias.numel()} values for {n} output channels")


class _IntWeights(LowbitModule):
    """Integer weights [N, ...] behind the packed-weight protocol (:mod:`lowbit.kernels.packed`), with
    per-channel (or per-tensor) float scales. ``weight_q``: int8 codes or an already packed object;
    ``weight_format``: the level set of int8 codes (default all of int8)."""

    def __init__(self, weight_q: torch.Tensor | kernels.PackedWeights, weight_scale: torch.Tensor,
                 weight_format: Format | None = None) -> None:
        super().__init__()
        if isinstance(weight_q, kernels.PackedWeights):
            packed = weight_q
        else:
            if weight_q.dtype != torch.int8:
                raise TypeError(f"quantized weights must be int8, got {weight_q.dtype}")
            packed = kernels.pack_int8(weight_q.contiguous(), weight_format)
        codes = packed.codes
        ws = weight_scale.to(torch.float32).reshape(-1)
        if ws.numel() == 1:
            ws = ws.expand(codes.shape[0]).contiguous()
        if ws.numel() != codes.shape[0]:
            raise ValueError(f"{ws.numel()} weight scales for {codes.shape[0]} output channels")
        if not (torch.isfinite(ws).all() and (ws > 0).all()):
            raise ValueError("weight scales must be finite and positive")
        self.register_buffer("weight_q", codes)
        self.register_buffer("weight_scale", ws)
        self.packed = packed

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # keep the packed form in step with .to()
        out = super()._apply(fn, recurse)
        p = self.packed
        self.packed = type(p).from_codes(self.weight_q, p.format, **p.extra_attrs())
        return out

    def _weight_spec(self, codes: torch.Tensor | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Storage of the weights: attrs under ``weight``, tensors ``weight_q`` (8-bit), ``weight_packed`` (bit
        stream) or ``weight_radix`` (radix words)."""
        p = self.packed
        attrs, tensors = codes_storage(p.kernel, p.codes if codes is None else codes, p.format, p.extra_attrs())
        out = {"weight_scale": self.weight_scale}
        out.update({f"weight_{k}": v for k, v in tensors.items()})
        return {"weight": attrs}, out


def _stored_weights(attrs: dict[str, Any], tensors: dict[str, torch.Tensor], conv1d: bool = False
                    ) -> torch.Tensor | kernels.PackedWeights:
    """The weights of :meth:`_IntWeights._weight_spec` (or of a file written before weight formats)."""
    if attrs.get("weight") is None:
        if "weight_q" not in tensors:
            raise ValueError("the layer stores no weights")
        return tensors["weight_q"]
    sub = {k[len("weight_"):]: v for k, v in tensors.items() if k in ("weight_q", "weight_packed", "weight_radix")}
    kernel, codes, fmt, extra = decode_storage(attrs["weight"], sub)
    if conv1d:
        codes = codes.unsqueeze(2)
    return family(kernel).from_codes(codes, fmt, **extra)


def _kernel_spec(spec: QSpec, what: str) -> QSpec:
    """A per-tensor activation spec as unsigned 8-bit codes (what the integer kernels take)."""
    spec = spec.unsigned()
    if len(spec.scale) != 1:
        raise ValueError(f"{what} activations must be quantized per tensor, got {spec.granularity}")
    if spec.format.qmax > 255:
        raise ValueError(f"{what} activations of {spec.format} do not fit in 8-bit codes")
    return spec


def snap_table(fmt: Format) -> torch.Tensor | None:
    """uint8 table [256] mapping an integer code to the nearest level of a non-uniform ``fmt`` (None if
    uniform): applied after requantization so the codes stay on the level set."""
    if fmt.uniform:
        return None
    t = torch.arange(256, dtype=torch.int64)
    t[fmt.qmin : fmt.qmax + 1] = fmt.snap_table
    return t.clamp(0, 255).to(torch.uint8)


class _StaticInt8(_IntWeights):
    """Static integer layer: uint8 activation codes in; the int32 accumulator is requantized to the next
    value's codes (``out`` spec; its level set, e.g. 4-bit or APoT, bounds the clamp), or, with no output
    spec, dequantized to float32 (``acc * s_in * s_w``, exact up to one float rounding).

    ``in_qparams`` / ``out_qparams``: a :class:`~lowbit.formats.QSpec` or a legacy ``(scale, zero_point)``
    pair of uint8 codes."""

    def __init__(self, weight_q: torch.Tensor | kernels.PackedWeights, weight_scale: torch.Tensor,
                 bias_q: torch.Tensor | None, in_qparams: QSpec | tuple[float, int],
                 out_qparams: QSpec | tuple[float, int] | None, act: str | None = None,
                 weight_format: Format | None = None) -> None:
        super().__init__(weight_q, weight_scale, weight_format)
        self.in_spec = _kernel_spec(as_spec(in_qparams, UINT8_ACT), "input")  # type: ignore[arg-type]
        out = as_spec(out_qparams, UINT8_ACT)
        self.out_spec = None if out is None else _kernel_spec(out, "output")
        self.in_scale, self.in_zp = self.in_spec.per_tensor_params
        self.act = act or None
        n = self.weight_q.shape[0]
        if bias_q is None:
            bias_q = torch.zeros(n, dtype=torch.int32)
        _check_bias(bias_q, n)
        self.register_buffer("bias_q", bias_q.to(torch.int32).reshape(-1).contiguous())
        if self.out_spec is None:
            self.packed.check_bias(self.bias_q)
            self.out_scale, self.out_zp = None, None
            self.epilogue: kernels.Epilogue = kernels.FloatOut(self.weight_scale * self.in_scale)
            self.register_buffer("snap", None)
            return
        self.out_scale, self.out_zp = self.out_spec.per_tensor_params
        m0, rshift = quantize_multiplier(self.weight_scale.to(torch.float64) * self.in_scale / self.out_scale)
        self.packed.check_bias(self.bias_q)  # no input can overflow the int32 accumulator
        ofmt = self.out_spec.format
        lo, hi = act_clamp(self.act, self.out_zp, self.out_scale, ofmt.qmin, ofmt.qmax)
        self.epilogue = kernels.Requant(m0, rshift, self.out_zp, lo, hi, torch.uint8)
        self.register_buffer("snap", snap_table(ofmt))

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.out_spec is None:
            return float_act(y, self.act)
        if self.snap is not None:
            y = self.snap[y.long()]
        return y

    def _spec(self, extra: dict[str, Any], codes: torch.Tensor | None = None
              ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        wattrs, tensors = self._weight_spec(codes)
        attrs = {"in": self.in_spec.to_dict(), "out": None if self.out_spec is None else self.out_spec.to_dict(),
                 "act": self.act, **wattrs, **extra}
        tensors["bias_q"] = self.bias_q
        return attrs, tensors

    @staticmethod
    def _io_specs(attrs: dict[str, Any]) -> tuple[Any, Any]:
        if attrs.get("in") is not None:
            out = attrs.get("out")
            return QSpec.from_dict(attrs["in"]), None if out is None else QSpec.from_dict(out)
        if attrs.get("in_qparams") is None or attrs.get("out_qparams") is None:
            raise ValueError("the layer has neither an input spec nor legacy quantization parameters")
        return tuple(attrs["in_qparams"]), tuple(attrs["out_qparams"])  # files written before QSpec

    def extra_repr(self) -> str:
        out = "float" if self.out_spec is None else str(self.out_spec.format)
        return f"weights {self.packed.format}, in={self.in_spec.format}, out={out}, act={self.act}"


_STATIC_TENSORS = {"weight_q?": torch.int8, "weight_packed?": torch.uint8, "weight_radix?": torch.uint8,
                   "weight_scale": torch.float32, "bias_q": torch.int32}
# "in" / "out": QSpec dicts, "weight": packed-weight storage (both checked by their own from_dict);
# "in_qparams" / "out_qparams": the uint8 (scale, zero point) of files written before QSpecs
_STATIC_ATTRS = {"in": dict[str, Any] | None, "out": dict[str, Any] | None, "weight": dict[str, Any] | None,
                 "in_qparams": QParams | None, "out_qparams": QParams | None, "act": Act}
_DYNAMIC_TENSORS = {"weight_q": torch.int8, "weight_scale": torch.float32, "bias?": torch.float32}


class QLinear(_StaticInt8):
    spec_attrs = _STATIC_ATTRS
    spec_tensors = _STATIC_TENSORS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self.packed.linear(x, self.in_zp, self.bias_q, self.epilogue))

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self._spec({})

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QLinear:
        i, o = cls._io_specs(attrs)
        return cls(_stored_weights(attrs, tensors), tensors["weight_scale"], tensors["bias_q"], i, o, attrs["act"])


class QConv(_StaticInt8):
    """Static integer Conv1d/Conv2d (NCHW semantics; padding holds the input zero point)."""

    spec_attrs = _STATIC_ATTRS | {"conv1d": bool, **Geometry}
    spec_tensors = _STATIC_TENSORS

    def __init__(self, weight_q: torch.Tensor | kernels.PackedWeights, weight_scale: torch.Tensor,
                 bias_q: torch.Tensor | None, in_qparams: QSpec | tuple[float, int],
                 out_qparams: QSpec | tuple[float, int] | None, act: str | None = None,
                 weight_format: Format | None = None, conv1d: bool | None = None, **geometry: Any) -> None:
        """Conv2d weights are 4-D; Conv1d weights are 3-D codes, or packed as 4-D ``[N, C/g, 1, k]`` with
        ``conv1d=True``."""
        codes = weight_q.codes if isinstance(weight_q, kernels.PackedWeights) else weight_q
        self.conv1d = codes.dim() == 3 if conv1d is None else bool(conv1d)
        if codes.dim() == 3:
            if isinstance(weight_q, kernels.PackedWeights):
                raise ValueError("pack Conv1d weights as [N, C/g, 1, k] (and pass conv1d=True)")
            weight_q = weight_q.unsqueeze(2)
        super().__init__(weight_q, weight_scale, bias_q, in_qparams, out_qparams, act, weight_format)
        self.geometry = _conv_geometry(geometry, self.conv1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1d:
            x = x.unsqueeze(2)
        y = self._finish(self.packed.conv2d(x, self.in_zp, self.bias_q, self.epilogue, **self.geometry))
        return y.squeeze(2) if self.conv1d else y

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        g = dict(self.geometry)
        codes = self.weight_q.squeeze(2) if self.conv1d else None
        attrs, tensors = self._spec({"conv1d": self.conv1d, **g}, codes)
        if self.conv1d:
            attrs.update(stride=g["stride"][1], padding=g["padding"][1], dilation=g["dilation"][1])
        return attrs, tensors

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QConv:
        i, o = cls._io_specs(attrs)
        w = _stored_weights(attrs, tensors, bool(attrs.get("conv1d")))
        return cls(w, tensors["weight_scale"], tensors["bias_q"], i, o, attrs["act"],
                   conv1d=bool(attrs.get("conv1d")), stride=attrs["stride"], padding=attrs["padding"],
                   dilation=attrs["dilation"], groups=attrs["groups"])

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight_q.shape)}, {self.geometry}, " + super().extra_repr()


def _dynamic_qparams(x: torch.Tensor) -> tuple[float, int]:
    """Per-call activation range (TFLite dynamic range: quantized on the fly from the batch); scale and zero
    point by the one rule of :func:`~lowbit.formats.affine.choose_qparams` (float64, as calibration)."""
    lo, hi = torch.aminmax(x)  # NaN propagates into the extremes
    try:
        s, z = choose_qparams(float(lo), float(hi), UINT8_ACT)
    except ValueError:
        raise ValueError("input contains NaN or Inf") from None
    return float(s), int(z)


class _DynamicInt8(_IntWeights):
    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 act: str | None = None) -> None:
        super().__init__(weight_q, weight_scale)
        self.act = act or None
        if bias is not None:
            _check_bias(bias, weight_q.shape[0])
        self.register_buffer("bias", None if bias is None else bias.to(torch.float32).reshape(-1).contiguous())

    def _epilogue(self, x: torch.Tensor) -> tuple[torch.Tensor, int, kernels.FloatOut]:
        s, z = _dynamic_qparams(x)
        xq = quantize_codes(x, s, z, UINT8_ACT.qmin, UINT8_ACT.qmax)
        return xq, z, kernels.FloatOut(self.weight_scale * s, self.bias)

    def _spec(self, extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        t = {"weight_q": self.weight_q, "weight_scale": self.weight_scale}
        if self.bias is not None:
            t["bias"] = self.bias
        return {"act": self.act, **extra}, t


class DynamicQLinear(_DynamicInt8):
    """Dynamic-range linear; ``per_token``: one activation scale per input row instead of per tensor
    (see :mod:`lowbit.nn.dynamic_act`)."""

    spec_attrs = {"act": Act, "per_token": bool | None}
    spec_tensors = _DYNAMIC_TENSORS

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 act: str | None = None, per_token: bool = False) -> None:
        super().__init__(weight_q, weight_scale, bias, act)
        self.per_token = bool(per_token)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float_act(dynamic_linear(x, self.packed, self.weight_scale, self.bias, self.per_token), self.act)

    def meta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output's shape and dtype (graph capture, :mod:`lowbit.graph.leaf`)."""
        return x.new_empty((*x.shape[:-1], self.packed.out_features), dtype=torch.float32)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self._spec({"per_token": self.per_token} if self.per_token else {})

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DynamicQLinear:
        return cls(tensors["weight_q"], tensors["weight_scale"], tensors.get("bias"), attrs["act"],
                   bool(attrs.get("per_token")))

    def extra_repr(self) -> str:
        return (f"in_features={self.packed.in_features}, out_features={self.packed.out_features}, "
                f"per_token={self.per_token}, act={self.act}")


class DynamicQConv(_DynamicInt8):
    spec_attrs = {"act": Act, **Geometry}
    spec_tensors = _DYNAMIC_TENSORS

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 act: str | None = None, **geometry: Any) -> None:
        self.conv1d = weight_q.dim() == 3
        super().__init__(weight_q.unsqueeze(2) if self.conv1d else weight_q, weight_scale, bias, act)
        self.geometry = _conv_geometry(geometry, self.conv1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1d:
            x = x.unsqueeze(2)
        xq, z, epi = self._epilogue(x)
        y = float_act(kernels.int8_conv2d(xq, z, self.packed, None, epi, **self.geometry), self.act)
        return y.squeeze(2) if self.conv1d else y

    def meta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output's shape and dtype (graph capture, :mod:`lowbit.graph.leaf`)."""
        w = x.new_empty(tuple(self.weight_q.shape), dtype=torch.float32)
        if self.conv1d:
            return F.conv2d(x.unsqueeze(2).to(torch.float32), w, None, **self.geometry).squeeze(2)
        return F.conv2d(x.to(torch.float32), w, None, **self.geometry)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        g = dict(self.geometry)
        attrs, t = self._spec(g)
        if self.conv1d:
            t["weight_q"] = self.weight_q.squeeze(2)
            attrs.update(stride=g["stride"][1], padding=g["padding"][1], dilation=g["dilation"][1])
        return attrs, t

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DynamicQConv:
        return cls(tensors["weight_q"], tensors["weight_scale"], tensors.get("bias"), attrs["act"],
                   stride=attrs["stride"], padding=attrs["padding"], dilation=attrs["dilation"],
                   groups=attrs["groups"])


class F16Layer(LowbitModule):
    """float16-stored Linear/Conv1d/Conv2d; computes in float32 (CPUs lack fast fp16 arithmetic)."""

    spec_attrs = {"kind": Literal["linear", "conv1d", "conv2d"], "act": Act,
                  **{k: v | None for k, v in Geometry.items()}}
    spec_tensors = {"weight": torch.float16, "bias?": torch.float16}

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None = None,
                 **geometry: Any) -> None:
        super().__init__()
        if kind not in ("linear", "conv1d", "conv2d"):
            raise ValueError(f"unknown float16 layer kind {kind!r}")
        self.kind, self.act = kind, act or None
        if weight.dim() != {"linear": 2, "conv1d": 3, "conv2d": 4}[kind]:
            raise ValueError(f"{kind} weights must be {2 if kind == 'linear' else 3 + (kind == 'conv2d')}-D, "
                             f"got shape {tuple(weight.shape)}")
        if bias is not None:
            _check_bias(bias, weight.shape[0])
        self.register_buffer("weight", weight.to(torch.float16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(torch.float16).contiguous())
        self.geometry = _conv_geometry(geometry) if kind != "linear" else {}
        if kind == "conv1d":
            g = self.geometry
            self.geometry = {k: (v[0] if isinstance(v, tuple) else v) for k, v in g.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        b = None if self.bias is None else self.bias.to(torch.float32)
        return self._run(x, w, b)

    def _run(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            y = F.linear(x, w, b)
        elif self.kind == "conv1d":
            y = F.conv1d(x, w, b, **self.geometry)
        else:
            y = F.conv2d(x, w, b, **self.geometry)
        return float_act(y, self.act)

    def meta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output's shape and dtype (graph capture, :mod:`lowbit.graph.leaf`)."""
        return self._run(x, x.new_empty(tuple(self.weight.shape), dtype=torch.float32), None)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        t = {"weight": self.weight}
        if self.bias is not None:
            t["bias"] = self.bias
        return {"kind": self.kind, "act": self.act, **self.geometry}, t

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> F16Layer:
        geo = {k: attrs[k] for k in ("stride", "padding", "dilation", "groups") if k in attrs}
        return cls(attrs["kind"], tensors["weight"], tensors.get("bias"), attrs["act"], **geo)
