"""Modules of a training-aware (fake-quant) model: layers with quantized weights, pooling requantizers.

A fake-quant model is an ordinary ``torch.fx.GraphModule``: the prepared float graph (BatchNorm folded,
ReLU fused) with

* every quantized layer replaced by a :class:`QATLayer` (the float conv/linear, its weight quantizer,
  and its bias rounded to the integer accumulator's grid ``s_in * s_w`` as the integer layer stores it);
* a :class:`~lowbit.quantizers.FakeQuantizer` after every value that becomes codes in the integer model
  (the model input, layer outputs, residual adds);
* a :class:`PoolRequant` after average pools on codes (the integer pool rounds the window mean).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.graph import Fused
from lowbit.quantizers import FakeQuantizer, round_ste, straight_through

__all__ = ["QATLayer", "PoolRequant"]


class QATLayer(nn.Module):
    """``act(layer(x, ŵ, b̂))``: conv/linear with fake-quantized weights ``ŵ = weight_quantizer(W)`` and bias
    ``b̂`` rounded to the grid ``s_in * s_w`` of the int32 accumulator (``s_in``: the step of the quantizer
    that feeds the layer, set by :func:`lowbit.qat.prepare`). ``act``: None, ``"relu"`` or ``"relu6"``."""

    def __init__(self, layer: nn.Conv1d | nn.Conv2d | nn.Linear, act: str | None, weight_quantizer: FakeQuantizer
                 ) -> None:
        super().__init__()
        if type(layer) not in (nn.Conv1d, nn.Conv2d, nn.Linear):
            raise TypeError(f"QATLayer wraps nn.Conv1d, nn.Conv2d or nn.Linear, not {type(layer).__name__}")
        self.layer = layer
        self.act = act
        self.weight_quantizer = weight_quantizer
        self._input_quantizer: list[FakeQuantizer] = []  # a reference, not a submodule

    def set_input_quantizer(self, q: FakeQuantizer | None) -> None:
        self._input_quantizer = [] if q is None else [q]

    @property
    def input_quantizer(self) -> FakeQuantizer | None:
        return self._input_quantizer[0] if self._input_quantizer else None

    def _bias(self, s_w: torch.Tensor) -> torch.Tensor | None:
        b = self.layer.bias
        q = self.input_quantizer
        if b is None or q is None or q.scale_by_std or q.step.dynamic or not bool(q.initialized):
            return b
        grid = (q.current_step() * s_w.detach()).reshape(-1)
        return round_ste(b / grid) * grid

    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel weight steps (a per-tensor step repeated), detached."""
        w = self.layer.weight
        s = self.weight_quantizer.scale_and_zero_point(w)[0].detach().reshape(-1)
        return s.expand(w.shape[0]) if s.numel() == 1 else s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_quantizer(self.layer.weight)
        b = self._bias(self.weight_scale())
        layer = self.layer
        if isinstance(layer, nn.Linear):
            y = F.linear(x, w, b)
        elif isinstance(layer, nn.Conv1d):
            y = F.conv1d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
        else:
            y = F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
        if self.act == "relu":
            return F.relu(y)
        if self.act == "relu6":
            return F.hardtanh(y, 0.0, 6.0)
        return y

    @torch.no_grad()
    def export(self) -> dict[str, Any]:
        """``codes`` (int8), per-channel ``scale``, ``format``, float ``bias``: the integer layer's weights."""
        w = self.layer.weight
        codes, spec = self.weight_quantizer.codes(w)
        return {"codes": codes.to(torch.int8), "scale": self.weight_scale(), "format": spec.format,
                "bias": None if self.layer.bias is None else self.layer.bias.detach()}

    def float_module(self) -> nn.Module:
        """The float layer (with its fused activation): what a float tail of a partial conversion runs."""
        return Fused(self.layer, self.act) if self.act else self.layer

    def extra_repr(self) -> str:
        return f"act={self.act}"


def _round_half_up_div(total: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    return torch.floor((total + torch.div(torch.as_tensor(n), 2, rounding_mode="floor")) / n)


class PoolRequant(nn.Module):
    """After an average pool of fake-quantized values: round the window mean of the codes half up, exactly as
    the integer pool (:class:`~lowbit.nn.QAvgPool2d`) does, with the spec of the quantizer ``source`` that
    made the codes. ``counts``: the window sizes, a number or a tensor broadcasting against the output.
    Straight-through gradient."""

    lowbit_fake_quant = True

    def __init__(self, source: FakeQuantizer, counts: torch.Tensor | int) -> None:
        super().__init__()
        self._source = [source]
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32))

    @property
    def source(self) -> FakeQuantizer:
        return self._source[0]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        q = self.source
        s, z = q.current_params()
        z0 = torch.zeros_like(s) if z is None else z
        with torch.no_grad():
            n = self.counts.to(y.device)
            total = torch.round((y / s + z0) * n)  # the integer window sum (exact up to float error < 0.5)
            codes = _round_half_up_div(total, n)
            if not q.fmt.uniform:
                codes = q.fmt.project(codes)
            exact = (codes - z0) * s
        return straight_through(y, exact)
