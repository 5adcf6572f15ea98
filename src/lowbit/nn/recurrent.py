"""Dynamic-range recurrent layers: nn.LSTM / nn.GRU / nn.RNN with int8 weight matrices.

As torch's dynamic quantization does for recurrent nets, both weight matrices of every layer and
direction are int8 per output row; activations are quantized on the fly. The input projection of a
whole sequence is one int8 product (all time steps at once); the recurrent projection is one int8
product per step with the hidden state quantized from its own range. Gates, cell and hidden state are
float32, with the equations of the torch.nn modules (eval mode: no dropout between layers).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from torch import nn

from lowbit import kernels
from lowbit.typed import Range

from .base import LowbitModule
from .dynamic_act import dynamic_linear

__all__ = ["DynamicQRNN", "GATES"]

#: Gate rows per hidden unit of each recurrent kind.
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_Count = Annotated[int, Range(1)]


def _names(mode: str, layers: int, bidirectional: bool, bias: bool) -> list[str]:
    out = []
    for layer in range(layers):
        for sfx in ("", "_reverse") if bidirectional else ("",):
            out += [f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"]
            if bias:
                out += [f"bias_ih_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}"]
    return out


class DynamicQRNN(LowbitModule):
    """An int8 LSTM, GRU or Elman RNN (``mode`` as torch's ``RNNBase.mode``); called like the torch module:
    ``out, (h, c) = lstm(x, (h0, c0))``, ``out, h = gru(x, h0)``, batched or not, batch_first or not."""

    spec_attrs = {"mode": Literal["LSTM", "GRU", "RNN_TANH", "RNN_RELU"], "input_size": _Count,
                  "hidden_size": _Count, "num_layers": Annotated[int, Range(1, 1024)], "bias": bool,
                  "batch_first": bool, "bidirectional": bool, "per_token": bool | None}

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int, bias: bool,
                 batch_first: bool, bidirectional: bool, tensors: dict[str, torch.Tensor],
                 per_token: bool = False) -> None:
        super().__init__()
        if mode not in GATES:
            raise ValueError(f"unknown recurrent mode {mode!r}")
        self.mode, self.input_size, self.hidden_size, self.num_layers = mode, input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bool(bias), bool(batch_first), bool(bidirectional)
        self.per_token = bool(per_token)
        want = self.tensor_spec(self._attrs())
        if set(tensors) != set(want):
            raise ValueError(f"tensors {sorted(tensors)[:6]} given, {sorted(want)[:6]} needed")
        rows = GATES[mode] * hidden_size
        dirs = 2 if bidirectional else 1
        self._cells: list[tuple[Any, Any, str]] = []
        for name in _names(mode, num_layers, bidirectional, self.bias):
            if name.startswith("weight"):
                layer = int(name.split("_l")[1].split("_")[0])
                cols = (input_size if layer == 0 else hidden_size * dirs) if "_ih_" in name else hidden_size
                q, s = tensors[f"{name}_q"], tensors[f"{name}_scale"]
                if tuple(q.shape) != (rows, cols) or tuple(s.shape) != (rows,):
                    raise ValueError(f"{name}: weights {tuple(q.shape)} / scales {tuple(s.shape)}, expected "
                                     f"({rows}, {cols}) / ({rows},)")
                if not (torch.isfinite(s).all() and (s > 0).all()):
                    raise ValueError(f"{name}_scale must be finite and positive")
                self.register_buffer(f"{name}_q", q.contiguous())
                self.register_buffer(f"{name}_scale", s.contiguous())
            else:
                b = tensors[name]
                if tuple(b.shape) != (rows,):
                    raise ValueError(f"{name}: shape {tuple(b.shape)}, expected ({rows},)")
                self.register_buffer(name, b.contiguous())
        self._pack()

    def _attrs(self) -> dict[str, Any]:
        return {"mode": self.mode, "input_size": self.input_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "bias": self.bias, "batch_first": self.batch_first,
                "bidirectional": self.bidirectional}

    def _pack(self) -> None:
        self.packed = {n: kernels.pack_int8(getattr(self, f"{n}_q"))
                       for n in _names(self.mode, self.num_layers, self.bidirectional, False)}

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # keep the packed form in step with .to()
        out = super()._apply(fn, recurse)
        self._pack()
        return out

    @classmethod
    def tensor_spec(cls, attrs: dict[str, Any]) -> dict[str, torch.dtype]:
        out: dict[str, torch.dtype] = {}
        for name in _names(attrs["mode"], attrs["num_layers"], attrs["bidirectional"], attrs["bias"]):
            if name.startswith("weight"):
                out.update({f"{name}_q": torch.int8, f"{name}_scale": torch.float32})
            else:
                out[name] = torch.float32
        return out

    def _proj(self, x: torch.Tensor, name: str, bias: str) -> torch.Tensor:
        b = getattr(self, bias) if self.bias else None
        return dynamic_linear(x, self.packed[name], getattr(self, f"{name}_scale"), b, self.per_token)

    def _cell(self, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        if self.mode == "GRU":
            ir, iz, inn = gi.chunk(3, -1)
            hr, hz, hn = gh.chunk(3, -1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(inn + r * hn)
            return n + z * (h - n), None
        pre = gi + gh
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), None

    def _direction(self, x: torch.Tensor, layer: int, sfx: str, h: torch.Tensor, c: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        gi_all = self._proj(x, f"weight_ih_l{layer}{sfx}", f"bias_ih_l{layer}{sfx}")  # [T, B, G*H]
        steps = range(x.shape[0] - 1, -1, -1) if sfx else range(x.shape[0])
        outs: list[torch.Tensor] = [x.new_empty(0)] * x.shape[0]
        for t in steps:
            gh = self._proj(h, f"weight_hh_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}")
            h, c = self._cell(gi_all[t], gh, h, c)
            outs[t] = h
        return torch.stack(outs), h, c

    def forward(self, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, Any]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.mode} input must be a tensor (packed sequences are not supported), "
                            f"got {type(x).__name__}")
        batched = x.dim() == 3
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            raise ValueError(f"{self.mode} input must be [T, B, {self.input_size}] (or [B, T, ...] with batch_first, "
                             f"or unbatched [T, {self.input_size}]), got {tuple(x.shape)}")
        if not batched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        dirs = 2 if self.bidirectional else 1
        h0, c0 = self._initial(hx, x, dirs, batched)
        hs, cs = [], []
        inp = x
        for layer in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(("", "_reverse")[:dirs]):
                k = layer * dirs + d
                out, h, c = self._direction(inp, layer, sfx, h0[k], None if c0 is None else c0[k])
                outs.append(out)
                hs.append(h)
                cs.append(c)
            inp = outs[0] if dirs == 1 else torch.cat(outs, -1)
        h_n = torch.stack(hs)
        out = inp
        if not batched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if self.mode == "LSTM":
            c_n = torch.stack(cs)  # type: ignore[arg-type]
            return out, (h_n, c_n if batched else c_n.squeeze(1))
        return out, h_n

    def meta_forward(self, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, Any]:
        """The outputs' shapes and dtypes (graph capture, :mod:`lowbit.graph.leaf`)."""
        dirs = 2 if self.bidirectional else 1
        f32 = torch.float32
        if x.dim() == 2:
            out = x.new_empty((x.shape[0], self.hidden_size * dirs), dtype=f32)
            h = x.new_empty((self.num_layers * dirs, self.hidden_size), dtype=f32)
        else:
            t, b = (x.shape[1], x.shape[0]) if self.batch_first else (x.shape[0], x.shape[1])
            shape = (b, t) if self.batch_first else (t, b)
            out = x.new_empty((*shape, self.hidden_size * dirs), dtype=f32)
            h = x.new_empty((self.num_layers * dirs, b, self.hidden_size), dtype=f32)
        return (out, (h, torch.empty_like(h))) if self.mode == "LSTM" else (out, h)

    def _initial(self, hx: Any, x: torch.Tensor, dirs: int, batched: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (self.num_layers * dirs, x.shape[1], self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(shape)
            return zeros, (zeros if self.mode == "LSTM" else None)
        parts = hx if self.mode == "LSTM" else (hx,)
        if self.mode == "LSTM" and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("LSTM initial state must be a tuple (h0, c0)")
        parts = tuple(p if batched else p.unsqueeze(1) for p in parts)
        for p in parts:
            if tuple(p.shape) != shape:
                raise ValueError(f"initial state has shape {tuple(p.shape)}, expected {shape}")
        return parts[0], (parts[1] if self.mode == "LSTM" else None)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        attrs = self._attrs()
        if self.per_token:
            attrs["per_token"] = True
        return attrs, {k: getattr(self, k) for k in self.tensor_spec(attrs)}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DynamicQRNN:
        return cls(attrs["mode"], attrs["input_size"], attrs["hidden_size"], attrs["num_layers"], attrs["bias"],
                   attrs["batch_first"], attrs["bidirectional"], tensors, bool(attrs.get("per_token")))

    @classmethod
    def from_float(cls, rnn: nn.RNNBase, quantize: Any, per_token: bool = False) -> DynamicQRNN:
        """From a torch LSTM/GRU/RNN; ``quantize(weight) -> (int8 codes, scales)`` per output row."""
        if getattr(rnn, "proj_size", 0):
            raise ValueError("LSTM with proj_size is not supported")
        tensors: dict[str, torch.Tensor] = {}
        for name in _names(rnn.mode, rnn.num_layers, rnn.bidirectional, rnn.bias):
            p = getattr(rnn, name).detach()
            if name.startswith("weight"):
                tensors[f"{name}_q"], tensors[f"{name}_scale"] = quantize(p)
            else:
                tensors[name] = p.to(torch.float32)
        return cls(rnn.mode, rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bias, rnn.batch_first,
                   rnn.bidirectional, tensors, per_token)

    def extra_repr(self) -> str:
        return (f"{self.mode}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, batch_first={self.batch_first}, per_token={self.per_token}")
