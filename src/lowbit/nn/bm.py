"""Integer BM inference layers: :class:`QBMLinear`, :class:`QBMConv2d` (uint8 codes in, uint8 codes out).

They hold log-domain weight codes (int8 or int16), the exp and log tables and the output format made by
:func:`lowbit.bm.integer.integer_layer`, and run :func:`lowbit.kernels.bm.bm_linear` / ``bm_conv2d``:
additions, maxima, table look-ups and shifts, no multiplication.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch

from lowbit.kernels import bm as kbm
from lowbit.typed import Range

from .base import Act, Geometry, LowbitModule, QParams, act_clamp, pair

__all__ = ["QBMLinear", "QBMConv2d"]


_CODE_NAMES = {8: ("cpos8", "cneg8"), 16: ("cpos16", "cneg16")}


class _QBM(LowbitModule):
    # codes are stored at their width: int8 tensors cpos8 / cneg8 or int16 tensors cpos16 / cneg16
    spec_attrs: ClassVar[dict[str, Any]] = {
        "bits": Literal[8, 16], "f": Annotated[int, Range(0, 14)], "sh": Annotated[int, Range(0, 62)],
        "F": Annotated[int, Range(0, 30)], "in_qparams": QParams, "out_qparams": QParams, "act": Act}
    spec_tensors: ClassVar[dict[str, torch.dtype]] = {
        "cpos8?": torch.int8, "cneg8?": torch.int8, "cpos16?": torch.int16, "cneg16?": torch.int16,
        "T": torch.int32, "L": torch.int16, "bias_q?": torch.int32}

    def __init__(self, cpos: torch.Tensor, cneg: torch.Tensor, bits: int, f: int, sh: int, F: int, T: torch.Tensor,
                 L: torch.Tensor, bias_q: torch.Tensor | None, in_qparams: tuple[float, int],
                 out_qparams: tuple[float, int], act: str | None = None) -> None:
        super().__init__()
        if int(bits) not in (8, 16):
            raise ValueError(f"BM codes are 8 or 16 bits wide, got {bits}")
        if cpos.shape != cneg.shape or cpos.dim() != (2 if type(self).__name__ == "QBMLinear" else 4):
            raise ValueError(f"weight codes of shapes {tuple(cpos.shape)} / {tuple(cneg.shape)} do not fit this layer")
        dt = torch.int8 if int(bits) == 8 else torch.int16
        self.bits, self.f, self.sh, self.F = int(bits), int(f), int(sh), int(F)
        self.in_scale, self.in_zp = float(in_qparams[0]), int(in_qparams[1])
        self.out_scale, self.out_zp = float(out_qparams[0]), int(out_qparams[1])
        self.act = act or None
        self.register_buffer("cpos", cpos.to(dt).contiguous())
        self.register_buffer("cneg", cneg.to(dt).contiguous())
        self.register_buffer("T", T.to(torch.int32).reshape(-1).contiguous())
        self.register_buffer("L", L.to(torch.int16).reshape(-1).contiguous())
        self.register_buffer("bias_q", None if bias_q is None else bias_q.to(torch.int32).reshape(-1).contiguous())
        self._pack()

    def _pack(self) -> None:
        self.packed = kbm.pack_bm(self.cpos, self.cneg, self.bits)
        lo, hi = act_clamp(self.act, self.out_zp, self.out_scale, 0, 255)
        self.epilogue = kbm.BMEpilogue(self.T, self.f, self.sh, self.F, self.bias_q, self.out_zp, lo, hi)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # keep the packed form in step with .to()
        out = super()._apply(fn, recurse)
        self._pack()
        return out

    @property
    def signed_input(self) -> bool:
        """Whether the input has a negative part (then all four branches run, else two)."""
        return self.in_zp != 0

    def _spec(self, extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        attrs = {"bits": self.bits, "f": self.f, "sh": self.sh, "F": self.F,
                 "in_qparams": [self.in_scale, self.in_zp], "out_qparams": [self.out_scale, self.out_zp],
                 "act": self.act, **extra}
        cp, cn = _CODE_NAMES[self.bits]
        t = {cp: self.cpos, cn: self.cneg, "T": self.T, "L": self.L}
        if self.bias_q is not None:
            t["bias_q"] = self.bias_q
        return attrs, t

    @classmethod
    def _args(cls, attrs: dict[str, Any], t: dict[str, torch.Tensor]) -> tuple[Any, ...]:
        bits = int(attrs["bits"])
        cp, cn = _CODE_NAMES[bits]
        other = [k for k in _CODE_NAMES[24 - bits] if k in t]
        if cp not in t or cn not in t or other:
            raise ValueError(f"{bits}-bit codes are stored as tensors {cp} and {cn} (and only those)")
        return (t[cp], t[cn], attrs["bits"], attrs["f"], attrs["sh"], attrs["F"], t["T"], t["L"],
                t.get("bias_q"), tuple(attrs["in_qparams"]), tuple(attrs["out_qparams"]), attrs["act"])


class QBMLinear(_QBM):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kbm.bm_linear(x, self.in_zp, self.packed, self.L, self.epilogue)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self._spec({})

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QBMLinear:
        return cls(*cls._args(attrs, tensors))

    def extra_repr(self) -> str:
        n, k = self.cpos.shape
        return f"in_features={k}, out_features={n}, codes=int{self.bits}, log step=2^-{self.f}, act={self.act}"


class QBMConv2d(_QBM):
    spec_attrs = _QBM.spec_attrs | Geometry

    def __init__(self, *args: Any, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> None:
        super().__init__(*args)
        self.geometry = {"stride": pair(stride), "padding": pair(padding), "dilation": pair(dilation),
                         "groups": int(groups)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kbm.bm_conv2d(x, self.in_zp, self.packed, self.L, self.epilogue, **self.geometry)

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        g = self.geometry
        return self._spec({"stride": list(g["stride"]), "padding": list(g["padding"]),
                           "dilation": list(g["dilation"]), "groups": g["groups"]})

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QBMConv2d:
        return cls(*cls._args(attrs, tensors), stride=attrs["stride"], padding=attrs["padding"],
                   dilation=attrs["dilation"], groups=attrs["groups"])

    def extra_repr(self) -> str:
        return (f"weight={tuple(self.cpos.shape)}, {self.geometry}, codes=int{self.bits}, log step=2^-{self.f}, "
                f"act={self.act}")
