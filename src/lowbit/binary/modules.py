"""Modules of a binary network in training (the fake-binary model :func:`lowbit.binary.prepare` builds).

* :class:`BinaryLayer` — a conv/linear of the training model: its weight quantizer (a
  :class:`~lowbit.quantizers.Binarizer`, or an 8-bit :class:`~lowbit.quantizers.FakeQuantizer` for the first
  and last layers), and for a layer that takes signs the value its padding holds (``pad_value``, ±1: what
  the binary kernels pad with), once its input binarizer is on.
* :class:`SignBatchNorm` — the BatchNorm before a sign: batch statistics while it trains, its running
  statistics once frozen (whatever ``train()`` says), when it has become the per-channel threshold of the
  execution form.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.qat.modules import QATLayer
from lowbit.quantizers import Binarizer, FakeQuantizer, round_ste

__all__ = ["BinaryLayer", "SignBatchNorm"]


class BinaryLayer(QATLayer):
    """``act(layer(x, ŵ, b̂))`` with ``ŵ = weight_quantizer(W)``. A conv whose input is binarized pads with
    ``pad_value`` (±1) while its input binarizer is on (zero padding before: the float layer of a network not
    yet binarized). The bias is rounded to the accumulator grid ``s_in * s_w`` where the integer layer adds it
    in int32 (``int8_kernel``: 8-bit weights or inputs, or a layer the binary kernels cannot run); a layer on
    the binary kernels takes its bias into its threshold or float epilogue as is."""

    def __init__(self, layer: nn.Conv1d | nn.Conv2d | nn.Linear, act: str | None,
                 weight_quantizer: FakeQuantizer, pad_value: int | None = None, int8_kernel: bool = False) -> None:
        super().__init__(layer, act, weight_quantizer)
        self.pad_value = pad_value
        self.int8_kernel = int8_kernel  # runs on the int8 kernels, which add the bias in int32

    @property
    def binary_weights(self) -> bool:
        return isinstance(self.weight_quantizer, Binarizer)

    @property
    def binary_input(self) -> bool:
        return isinstance(self.input_quantizer, Binarizer)

    def _signs_padded(self) -> bool:
        q = self.input_quantizer
        return (self.pad_value is not None and isinstance(q, Binarizer) and bool(q.enabled)
                and not isinstance(self.layer, nn.Linear))

    def _bias(self, s_w: torch.Tensor) -> torch.Tensor | None:
        b = self.layer.bias
        q = self.input_quantizer
        if b is None or not self.int8_kernel or q is None or q.step.dynamic or not bool(q.initialized):
            return b
        if isinstance(q, Binarizer) and not bool(q.enabled):
            return b
        s_in = q.scale_and_zero_point(torch.zeros(()))[0].detach()
        grid = (s_in * s_w.detach()).reshape(-1)
        return round_ste(b / grid) * grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._signs_padded() or not any(self.layer.padding):  # type: ignore[union-attr]
            return super().forward(x)
        layer = self.layer
        w = self.weight_quantizer(layer.weight)
        b = self._bias(self.weight_scale())
        if isinstance(layer, nn.Conv1d):
            p = layer.padding[0]
            y = F.conv1d(F.pad(x, (p, p), value=float(self.pad_value)), w, b, layer.stride, 0, layer.dilation,
                         layer.groups)
        else:
            ph, pw = layer.padding  # type: ignore[misc]
            y = F.conv2d(F.pad(x, (pw, pw, ph, ph), value=float(self.pad_value)), w, b, layer.stride, 0,
                         layer.dilation, layer.groups)
        if self.act == "relu":
            return F.relu(y)
        if self.act == "relu6":
            return F.hardtanh(y, 0.0, 6.0)
        return y

    def weight_scale(self) -> torch.Tensor:
        if self.binary_weights and not bool(self.weight_quantizer.enabled):  # type: ignore[attr-defined]
            return torch.ones(self.layer.weight.shape[0])
        return super().weight_scale()

    def extra_repr(self) -> str:
        return f"act={self.act}" + ("" if self.pad_value is None else f", pad_value={self.pad_value}")


class SignBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1-d or 2-d input) before a sign. ``frozen``: normalize with the running statistics and stop
    updating them, in training mode too — the threshold it becomes at convert time is then fixed."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.register_buffer("frozen", torch.tensor(False))

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2-D, 3-D or 4-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(self.frozen):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)

    def freeze(self) -> None:
        self.frozen.fill_(True)
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def init_identity(self, y: torch.Tensor) -> None:
        """Statistics of ``y`` (the layer output on a calibration batch) and ``γ = σ``, ``β = μ``: the identity in
        eval mode, close to it in training mode, so inserting it leaves a trained network unchanged."""
        dims = [d for d in range(y.dim()) if d != 1]
        mu = y.mean(dims)
        var = y.var(dims, unbiased=False)
        self.running_mean.copy_(mu)
        self.running_var.copy_(var)
        self.weight.copy_(torch.sqrt(var + self.eps))
        self.bias.copy_(mu)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, c)`` in float64 with ``bn(y) = a * y + c`` per channel (running statistics)."""
        inv = 1.0 / torch.sqrt(self.running_var.detach().double() + self.eps)
        a = self.weight.detach().double() * inv
        return a, self.bias.detach().double() - self.running_mean.detach().double() * a

    def extra_repr(self) -> str:
        return super().extra_repr() + (", frozen" if bool(self.frozen) else "")


def binarizers(model: nn.Module) -> dict[str, Binarizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Binarizer)}


def describe_state(model: nn.Module) -> dict[str, Any]:
    """Per binarizer: on/off, δ and annealing progress (for logs)."""
    return {n: b.state_summary() for n, b in binarizers(model).items()}
