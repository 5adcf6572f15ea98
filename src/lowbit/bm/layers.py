"""Trainable BM layers: :class:`BMLinear` and :class:`BMConv2d` (see :mod:`lowbit.bm.functional`).

Parameters: ``v_pos = ln w+`` and ``v_neg = ln w-`` (same shape as the float layer's weight) and the
bias. A converted layer starts from ``v± = ln max(±W, eps)`` (:meth:`BMLinear.from_float`). Options:
``floor`` (input log floor), ``temperature`` (0: hard max; > 0: soft max, see functional), ``act``
(``None``, ``"relu"`` or ``"relu6"`` applied after the neuron; set when lowbit fuses the activation).

For integer execution (lowbit's fixed-point log-domain scheme, :mod:`lowbit.bm.integer`) a layer
carries ``code_bits`` (8 or 16) and ``log_step_bits`` (f: the log step is 2^-f octave; None = the
default of the code width); BatchNorm after a BM layer folds into it exactly
(:meth:`fold_batchnorm`): a channel scale ``s`` adds ``ln |s|`` to both log weights (and swaps them
when ``s < 0``), its shift goes into the bias.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import nn

from lowbit.nn.base import Act, Count, Geometry, LowbitModule, Pair, float_act, pair
from lowbit.typed import Range

from . import functional as BF

__all__ = ["BMLinear", "BMConv2d", "BMLayer", "ZERO_LOG"]

#: log weight of a weight that must be exactly zero (exp underflows to 0 in float32)
ZERO_LOG = -200.0


def _log_weights(w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().to(torch.float32)
    return torch.log(torch.clamp(w, min=eps)), torch.log(torch.clamp(-w, min=eps))


_OPTIONS = {"floor": Annotated[float, Range(0.0, gt=True)], "temperature": Annotated[float, Range(0.0)],
            "act": Act, "code_bits": Literal[8, 16], "log_step_bits": Annotated[int, Range(0, 14)] | None}
_TENSORS = {"v_pos": torch.float32, "v_neg": torch.float32, "bias?": torch.float32}


class BMLayer(LowbitModule):
    """Common part of the BM layers (parameters, options, BatchNorm folding, activation fusion)."""

    spec_tensors: ClassVar[dict[str, torch.dtype]] = _TENSORS

    lowbit_layer: ClassVar[bool] = True  # lowbit.graph.prepare: a layer (leaf, BN folding, act fusion)
    batchnorm_type: ClassVar[type[nn.Module]] = nn.BatchNorm1d
    float_type: ClassVar[type[nn.Module]] = nn.Linear  # the float layer a BM layer replaces

    v_pos: nn.Parameter
    v_neg: nn.Parameter
    bias: nn.Parameter | None

    def _init_options(self, floor: float, temperature: float, act: str | None, code_bits: int,
                      log_step_bits: int | None) -> None:
        if not floor > 0:
            raise ValueError(f"the input log floor must be > 0, got {floor}")
        if act not in (None, "relu", "relu6"):
            raise ValueError(f"unsupported BM activation {act!r}")
        if code_bits not in (8, 16):
            raise ValueError(f"BM integer codes are 8 or 16 bits wide, got {code_bits}")
        self.floor = float(floor)
        self.temperature = float(temperature)
        self.act = act
        self.code_bits = int(code_bits)
        self.log_step_bits = None if log_step_bits is None else int(log_step_bits)
        self.lowbit_name = ""  # set by lowbit.bm.convert: named in errors

    def _set_weights(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> None:
        vp, vn = _log_weights(weight, eps)
        with torch.no_grad():
            self.v_pos.copy_(vp)
            self.v_neg.copy_(vn)
            if self.bias is not None:
                self.bias.copy_(bias.detach() if bias is not None else torch.zeros_like(self.bias))

    def float_origin(self) -> dict[str, Any]:
        """The float layer this one replaces (class and parameter shapes), as a weights-only file records
        each replaced layer (:mod:`lowbit.modelfile.weights`): such a file loads into the float model."""
        from lowbit.methods.module_swap import class_key

        params = {"weight": list(self.v_pos.shape)}
        if self.bias is not None:
            params["bias"] = list(self.bias.shape)
        return {"class": class_key(self.float_type), "params": params}

    def weight(self) -> torch.Tensor:
        """The equivalent float weight ``exp(v+) - exp(v-)``."""
        return torch.exp(self.v_pos) - torch.exp(self.v_neg)

    def _options_spec(self) -> dict[str, Any]:
        return {"floor": self.floor, "temperature": self.temperature, "act": self.act, "code_bits": self.code_bits,
                "log_step_bits": self.log_step_bits}

    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {"v_pos": self.v_pos.detach(), "v_neg": self.v_neg.detach()}
        if self.bias is not None:
            t["bias"] = self.bias.detach()
        return t

    @staticmethod
    def _check_shapes(tensors: dict[str, torch.Tensor], shape: tuple[int, ...], bias: bool) -> None:
        """A file's tensors have exactly the shapes its attributes give (checked before anything of that
        size is allocated; ``copy_`` would broadcast a smaller tensor)."""
        want = {"v_pos": shape, "v_neg": shape, **({"bias": (shape[0],)} if bias else {})}
        for k, s in want.items():
            got = tuple(tensors[k].shape) if k in tensors else None
            if got != tuple(s):
                raise ValueError(f"BM layer tensor {k}: expected shape {tuple(s)}, got {got or 'nothing'}")

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.v_pos.copy_(tensors["v_pos"])
            self.v_neg.copy_(tensors["v_neg"])
            if self.bias is not None:
                self.bias.copy_(tensors["bias"])

    def fold_batchnorm(self, bn: nn.Module) -> BMLayer:
        """A copy with ``bn`` (eval statistics) folded in: ``bn(self(x))`` exactly, up to float rounding."""
        if self.act is not None:
            raise ValueError(f"cannot fold BatchNorm after the activation of BM layer '{self.lowbit_name}'")
        mean = bn.running_mean.detach().double()  # type: ignore[union-attr]
        var = bn.running_var.detach().double()  # type: ignore[union-attr]
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)  # type: ignore
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)  # type: ignore
        s = gamma / torch.sqrt(var + bn.eps)  # type: ignore[operator]
        b = self.bias.detach().double() if self.bias is not None else torch.zeros_like(mean)
        new = copy.deepcopy(self)
        if new.bias is None:
            new.bias = nn.Parameter(torch.zeros(self.v_pos.shape[0], dtype=self.v_pos.dtype))
        shape = (-1,) + (1,) * (self.v_pos.dim() - 1)
        ls = torch.log(s.abs().clamp(min=1e-300)).reshape(shape)
        neg = (s < 0).reshape(shape)
        zero = (s == 0).reshape(shape)
        vp, vn = self.v_pos.detach().double(), self.v_neg.detach().double()
        new_p = torch.where(neg, vn, vp) + ls
        new_n = torch.where(neg, vp, vn) + ls
        with torch.no_grad():
            new.v_pos.copy_(torch.where(zero, ZERO_LOG, new_p).to(self.v_pos.dtype))
            new.v_neg.copy_(torch.where(zero, ZERO_LOG, new_n).to(self.v_neg.dtype))
            new.bias.copy_(((b - mean) * s + beta).to(self.v_pos.dtype))
        return new

    def with_activation(self, act: str) -> BMLayer:
        """A copy that applies ``act`` ("relu" / "relu6") after the neuron."""
        if act not in ("relu", "relu6"):
            raise ValueError(f"unsupported BM activation {act!r}")
        new = copy.deepcopy(self)
        new.act = act
        return new

    def to_integer(self, in_qparams: tuple[float, int], out_qparams: tuple[float, int], name: str = "") -> nn.Module:
        """The integer BM layer (lowbit.nn.QBMLinear / QBMConv2d) for these input / output codes."""
        from .integer import integer_layer

        return integer_layer(self, in_qparams, out_qparams, name or self.lowbit_name)


class BMLinear(BMLayer):
    """BM version of ``nn.Linear(in_features, out_features, bias)``."""

    spec_attrs = {"in_features": Count, "out_features": Count, "bias": bool, **_OPTIONS}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, floor: float = BF.DEFAULT_FLOOR,
                 temperature: float = 0.0, act: str | None = None, code_bits: int = 16,
                 log_step_bits: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.v_pos = nn.Parameter(torch.empty(out_features, in_features))
        self.v_neg = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._init_options(floor, temperature, act, code_bits, log_step_bits)
        ref = nn.Linear(in_features, out_features, bias)  # the float layer's default initialization
        self._set_weights(ref.weight, ref.bias, eps)

    @classmethod
    def from_float(cls, layer: nn.Linear, eps: float = 1e-6, **options: Any) -> BMLinear:
        """Conversion of a trained layer: ``v± = ln max(±W, eps)``, bias copied."""
        m = cls(layer.in_features, layer.out_features, layer.bias is not None, eps=eps, **options)
        m._set_weights(layer.weight, layer.bias, eps)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = BF.bm_linear(x, self.v_pos, self.v_neg, self.bias, self.floor, self.temperature, self.lowbit_name)
        return float_act(y, self.act)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                **self._options_spec()}, self._tensors()

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> BMLinear:
        cls._check_shapes(tensors, (attrs["out_features"], attrs["in_features"]), attrs["bias"])
        m = cls(**attrs)
        m._load(tensors)
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act={self.act}, temperature={self.temperature:g}")


class BMConv2d(BMLayer):
    """BM version of ``nn.Conv2d`` (stride, padding, dilation, groups; zero padding)."""

    batchnorm_type = nn.BatchNorm2d
    float_type = nn.Conv2d
    spec_attrs = {"in_channels": Count, "out_channels": Count, "kernel_size": Pair, "bias": bool, **Geometry,
                  **_OPTIONS}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True, *,
                 floor: float = BF.DEFAULT_FLOOR, temperature: float = 0.0, act: str | None = None,
                 code_bits: int = 16, log_step_bits: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels} -> {out_channels} are not divisible into {groups} groups")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair(kernel_size)
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)
        self.groups = int(groups)
        if min(self.stride + self.dilation + self.kernel_size) < 1 or min(self.padding) < 0:
            raise ValueError("kernel size, stride and dilation must be >= 1, padding >= 0")
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.v_pos = nn.Parameter(torch.empty(shape))
        self.v_neg = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self._init_options(floor, temperature, act, code_bits, log_step_bits)
        ref = nn.Conv2d(in_channels, out_channels, self.kernel_size, groups=groups, bias=bias)
        self._set_weights(ref.weight, ref.bias, eps)

    @classmethod
    def from_float(cls, layer: nn.Conv2d, eps: float = 1e-6, **options: Any) -> BMConv2d:
        """Conversion of a trained layer: ``v± = ln max(±W, eps)``, bias copied."""
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            pad = layer.padding_mode if layer.padding_mode != "zeros" else layer.padding
            raise ValueError(f"BM convolution supports numeric zero padding only, got {pad!r}")
        m = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups, layer.bias is not None, eps=eps, **options)
        m._set_weights(layer.weight, layer.bias, eps)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"BM layer '{self.lowbit_name}' expects NCHW input with {self.in_channels} channels, "
                             f"got shape {tuple(x.shape)}")
        y = BF.bm_conv2d(x, self.v_pos, self.v_neg, self.bias, self.stride, self.padding, self.dilation, self.groups,
                         self.floor, self.temperature, self.lowbit_name)
        return float_act(y, self.act)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        attrs = {"in_channels": self.in_channels, "out_channels": self.out_channels,
                 "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                 "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None}
        return {**attrs, **self._options_spec()}, self._tensors()

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> BMConv2d:
        a = {k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()}
        groups, cin = a.get("groups", 1), a["in_channels"]
        if groups < 1 or cin % groups:
            raise ValueError(f"{cin} input channels are not divisible into {groups} groups")
        cls._check_shapes(tensors, (a["out_channels"], cin // groups, *pair(a["kernel_size"])), a["bias"])
        m = cls(**a)
        m._load(tensors)
        return m

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, act={self.act}, "
                f"temperature={self.temperature:g}")
