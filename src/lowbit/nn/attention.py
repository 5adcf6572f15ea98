"""Dynamic-range multi-head attention: nn.MultiheadAttention with its projections on int8 kernels.

The input projection (the packed ``in_proj_weight``, one int8 product for self-attention, three for
distinct query/key/value) and the output projection are int8 with activations quantized on the fly;
the attention itself (scores, mask, softmax, weighted sum) is float32, as in torch's dynamic
quantization of a transformer. Called like the torch module, with the same masks and options.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.typed import Range

from .base import LowbitModule
from .dynamic_act import dynamic_linear

__all__ = ["DynamicQMultiheadAttention"]

_Count = Annotated[int, Range(1)]


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not allowed) as an additive float mask, as torch's attention does."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"attention masks must be bool or float, got {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(mask, float("-inf"))


class DynamicQMultiheadAttention(LowbitModule):
    spec_attrs = {"embed_dim": _Count, "num_heads": _Count, "batch_first": bool, "bias": bool,
                  "per_token": bool | None}
    _qkv_same_embed_dim = True
    in_proj_weight = None  # no float tensors: the fused fast paths of torch's transformer layers stay off
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool, tensors: dict[str, torch.Tensor],
                 per_token: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, bool(batch_first)
        self.head_dim = embed_dim // num_heads
        self.bias = "in_bias" in tensors
        self.per_token = bool(per_token)
        want = self.tensor_spec({"bias": self.bias})
        if set(tensors) != set(want):
            raise ValueError(f"tensors {sorted(tensors)} given, {sorted(want)} needed")
        e = embed_dim
        shapes = {"in_q": (3 * e, e), "in_scale": (3 * e,), "in_bias": (3 * e,),
                  "out_q": (e, e), "out_scale": (e,), "out_bias": (e,)}
        for k, t in tensors.items():
            if tuple(t.shape) != shapes[k]:
                raise ValueError(f"{k}: shape {tuple(t.shape)}, expected {shapes[k]}")
            if k.endswith("scale") and not (torch.isfinite(t).all() and (t > 0).all()):
                raise ValueError(f"{k} must be finite and positive")
            self.register_buffer(k, t.contiguous())
        self._pack()

    def _pack(self) -> None:
        w, e = self.in_q, self.embed_dim
        self.packed = {"in": kernels.pack_int8(w), "out": kernels.pack_int8(self.out_q)}
        self.packed.update({k: kernels.pack_int8(w[i * e:(i + 1) * e].contiguous()) for i, k in enumerate("qkv")})

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # keep the packed form in step with .to()
        out = super()._apply(fn, recurse)
        self._pack()
        return out

    @classmethod
    def tensor_spec(cls, attrs: dict[str, Any]) -> dict[str, torch.dtype]:
        out = {"in_q": torch.int8, "in_scale": torch.float32, "out_q": torch.int8,
               "out_scale": torch.float32}
        if attrs.get("bias", True):
            out.update(in_bias=torch.float32, out_bias=torch.float32)
        return out

    def _lin(self, x: torch.Tensor, which: str) -> torch.Tensor:
        e = self.embed_dim
        if which == "out":
            return dynamic_linear(x, self.packed["out"], self.out_scale, getattr(self, "out_bias", None),
                                  self.per_token)
        if which == "in":
            return dynamic_linear(x, self.packed["in"], self.in_scale, getattr(self, "in_bias", None),
                                  self.per_token)
        i = "qkv".index(which)
        b = self.in_bias[i * e:(i + 1) * e] if self.bias else None
        return dynamic_linear(x, self.packed[which], self.in_scale[i * e:(i + 1) * e].contiguous(), b,
                              self.per_token)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        batched = query.dim() == 3
        same = key is query and value is query
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        L, B, E = query.shape
        S = key.shape[0]
        if same:
            q, k, v = self._lin(query, "in").chunk(3, -1)
        else:
            q, k, v = self._lin(query, "q"), self._lin(key, "k"), self._lin(value, "v")
        h, d = self.num_heads, self.head_dim
        q = q.reshape(L, B * h, d).transpose(0, 1).reshape(B, h, L, d)
        k = k.reshape(S, B * h, d).transpose(0, 1).reshape(B, h, S, d)
        v = v.reshape(S, B * h, d).transpose(0, 1).reshape(B, h, S, d)
        mask = self._mask(attn_mask, key_padding_mask, B, L, S, q.dtype)
        if need_weights:
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, -1)
            out = torch.matmul(attn, v)
            weights: torch.Tensor | None = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            weights = None
        out = out.permute(2, 0, 1, 3).reshape(L, B, E)
        out = self._lin(out, "out")
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def meta_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                     attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                     is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The outputs' shapes and dtypes (graph capture, :mod:`lowbit.graph.leaf`)."""
        out = query.new_empty(tuple(query.shape), dtype=torch.float32)
        if not need_weights:
            return out, None
        if query.dim() == 2:
            lead: tuple[Any, ...] = ()
            L, S = query.shape[0], key.shape[0]
        elif self.batch_first:
            lead, L, S = (query.shape[0],), query.shape[1], key.shape[1]
        else:
            lead, L, S = (query.shape[1],), query.shape[0], key.shape[0]
        heads = () if average_attn_weights else (self.num_heads,)
        return out, query.new_empty((*lead, *heads, L, S), dtype=torch.float32)

    def _mask(self, attn_mask: torch.Tensor | None, kpm: torch.Tensor | None, B: int, L: int, S: int,
              dtype: torch.dtype) -> torch.Tensor | None:
        am, km = _float_mask(attn_mask, dtype), _float_mask(kpm, dtype)
        if am is not None:
            if am.dim() == 2:
                am = am.reshape(1, 1, L, S)
            elif am.dim() == 3:
                am = am.reshape(B, self.num_heads, L, S)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {tuple(am.shape)}")
        if km is not None:
            km = km.reshape(B, 1, 1, S)
            am = km if am is None else am + km
        return am

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        attrs: dict[str, Any] = {"embed_dim": self.embed_dim, "num_heads": self.num_heads,
                                 "batch_first": self.batch_first, "bias": self.bias}
        if self.per_token:
            attrs["per_token"] = True
        return attrs, {k: getattr(self, k) for k in self.tensor_spec(attrs)}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> DynamicQMultiheadAttention:
        if bool(attrs["bias"]) != ("in_bias" in tensors):
            raise ValueError(f"bias={attrs['bias']} but the tensors are {sorted(tensors)}")
        return cls(attrs["embed_dim"], attrs["num_heads"], attrs["batch_first"], tensors,
                   bool(attrs.get("per_token")))

    @classmethod
    def supports(cls, mha: nn.MultiheadAttention) -> str | None:
        """Why ``mha`` cannot be converted (None: it can)."""
        if not mha._qkv_same_embed_dim:
            return "key/value dimensions differ from embed_dim"
        if mha.bias_k is not None or mha.add_zero_attn:
            return "add_bias_kv / add_zero_attn"
        if (mha.in_proj_bias is None) != (mha.out_proj.bias is None):
            return "only one of the projections has a bias"
        return None

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, quantize: Any, per_token: bool = False
                   ) -> DynamicQMultiheadAttention:
        why = cls.supports(mha)
        if why:
            raise ValueError(f"MultiheadAttention with {why} is not supported")
        t: dict[str, torch.Tensor] = {}
        t["in_q"], t["in_scale"] = quantize(mha.in_proj_weight.detach())
        t["out_q"], t["out_scale"] = quantize(mha.out_proj.weight.detach())
        if mha.in_proj_bias is not None:
            t["in_bias"] = mha.in_proj_bias.detach().to(torch.float32)
            t["out_bias"] = mha.out_proj.bias.detach().to(torch.float32)
        return cls(mha.embed_dim, mha.num_heads, mha.batch_first, t, per_token)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
