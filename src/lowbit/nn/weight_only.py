"""A torch.nn module whose weights are stored small and dequantized when it runs (weight-only storage).

:class:`WeightOnly` holds one allow-listed torch.nn module (Linear, Conv1d/Conv2d, Embedding, LSTM, GRU,
RNN, MultiheadAttention: the classes of :mod:`lowbit.modelfile.torch_modules`) by class name and
constructor arguments, and its parameters in one of two storages:

* ``int8``: every matrix or kernel (a parameter of two or more dimensions) as int8 codes with one float32
  scale per output row (symmetric, zero point 0); vectors (biases) stay float32;
* ``float16``: every parameter as float16.

At run time the parameters are dequantized to float32 and the module's own computation runs on them
(for an Embedding only the looked-up rows are dequantized). Activations stay float32 throughout, so
the result is that of the float module with rounded weights.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import LowbitModule

__all__ = ["WeightOnly", "stored_names"]

Storage = Literal["int8", "float16"]


def stored_names(name: str, shape: torch.Size | tuple[int, ...], storage: str) -> dict[str, torch.dtype]:
    """File tensors of parameter ``name``: ``name_q`` (int8) and ``name_scale`` (float32 per row) for an
    int8-stored matrix, else ``name`` itself (float32, or float16 in float16 storage)."""
    if storage == "int8" and len(shape) >= 2:
        return {f"{name}_q": torch.int8, f"{name}_scale": torch.float32}
    return {name: torch.float16 if storage == "float16" else torch.float32}


def _skeleton(module_class: str, args: dict[str, Any]) -> nn.Module:
    from lowbit.modelfile.torch_modules import skeleton

    m = skeleton(module_class, args, module_class)
    if any(True for _ in m.buffers()):
        raise ValueError(f"{module_class} has buffers; weight-only storage covers modules with parameters only")
    return m.eval()


class WeightOnly(LowbitModule):
    spec_attrs = {"module": str, "args": dict[str, Any], "storage": Storage}

    def __init__(self, module_class: str, args: dict[str, Any], storage: str,
                 tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        if storage not in ("int8", "float16"):
            raise ValueError(f"storage must be 'int8' or 'float16', got {storage!r}")
        sk = _skeleton(module_class, args)
        object.__setattr__(self, "_skeleton", sk)  # on the meta device, outside the module tree
        self.module_class, self.args, self.storage = module_class, dict(args), storage
        self._params: list[tuple[str, str, bool]] = []  # (parameter name, buffer prefix, stored int8)
        want = self.tensor_spec({"module": module_class, "args": args, "storage": storage})
        if set(tensors) != set(want):
            raise ValueError(f"tensors {sorted(tensors)} given, {sorted(want)} needed")
        for i, (name, p) in enumerate(sk.named_parameters()):
            buf = f"p{i}"
            q = storage == "int8" and p.dim() >= 2
            if q:
                codes, scale = tensors[f"{name}_q"], tensors[f"{name}_scale"]
                _check(codes, tuple(p.shape), torch.int8, f"{name}_q")
                _check(scale, (p.shape[0],), torch.float32, f"{name}_scale")
                if not (torch.isfinite(scale).all() and (scale > 0).all()):
                    raise ValueError(f"{name}_scale must be finite and positive")
                self.register_buffer(f"{buf}_q", codes)
                self.register_buffer(f"{buf}_scale", scale)
            else:
                t = tensors[name]
                _check(t, tuple(p.shape), want[name], name)
                self.register_buffer(buf, t)
            self._params.append((name, buf, q))

    @classmethod
    def tensor_spec(cls, attrs: dict[str, Any]) -> dict[str, torch.dtype]:
        sk = _skeleton(attrs["module"], attrs["args"])
        out: dict[str, torch.dtype] = {}
        for name, p in sk.named_parameters():
            out.update(stored_names(name, p.shape, attrs["storage"]))
        return out

    def _param(self, buf: str, q: bool) -> torch.Tensor:
        if q:
            codes, scale = getattr(self, f"{buf}_q"), getattr(self, f"{buf}_scale")
            return codes * scale.reshape(-1, *([1] * (codes.dim() - 1)))
        return getattr(self, buf).to(torch.float32)

    def params(self) -> dict[str, torch.Tensor]:
        """The float32 parameters (dequantized), by the torch module's parameter names."""
        return {name: self._param(buf, q) for name, buf, q in self._params}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        sk = self._skeleton
        if type(sk) is nn.Embedding and not kwargs and self._params[0][2]:
            return self._lookup(args[0])
        return self._run(self.params(), args, kwargs)

    def _run(self, p: dict[str, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        sk = self._skeleton
        if type(sk) is nn.Linear and not kwargs:
            return F.linear(args[0], p["weight"], p.get("bias"))
        return torch.func.functional_call(sk, p, args, kwargs)

    def meta_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The outputs' shapes and dtypes (graph capture, :mod:`lowbit.graph.leaf`): the module run on
        empty parameters of the right shapes."""
        x = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        p = {n: x.new_empty(tuple(t.shape), dtype=torch.float32) for n, t in self._skeleton.named_parameters()}
        return self._run(p, args, kwargs)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows gathered as int8 codes, then dequantized (never the whole table)."""
        buf = self._params[0][1]
        codes, scale = getattr(self, f"{buf}_q"), getattr(self, f"{buf}_scale")
        pad = self._skeleton.padding_idx
        rows = F.embedding(ids, codes, pad).to(torch.float32)
        return rows.mul_(F.embedding(ids, scale.unsqueeze(1), pad))

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, buf, q in self._params:
            if q:
                tensors[f"{name}_q"] = getattr(self, f"{buf}_q")
                tensors[f"{name}_scale"] = getattr(self, f"{buf}_scale")
            else:
                tensors[name] = getattr(self, buf)
        return {"module": self.module_class, "args": self.args, "storage": self.storage}, tensors

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> WeightOnly:
        return cls(attrs["module"], attrs["args"], attrs["storage"], tensors)

    def extra_repr(self) -> str:
        return f"{self.module_class}({self.args}), storage={self.storage}"

    # the wrapped module's attributes that callers read (nn.TransformerEncoderLayer reads batch_first ...)
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _READ_THROUGH:
                return getattr(self.__dict__["_skeleton"], name)
            if name in ("in_proj_weight", "in_proj_bias"):  # no float tensors: torch's fused fast paths stay off
                return None
            raise


_READ_THROUGH = frozenset({"batch_first", "embed_dim", "num_heads", "head_dim", "_qkv_same_embed_dim", "hidden_size",
                           "input_size", "num_layers", "bidirectional", "embedding_dim", "num_embeddings",
                           "padding_idx", "in_features", "out_features", "in_channels", "out_channels"})


def _check(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"tensor {name}: {got}, expected {dtype} {shape}")
