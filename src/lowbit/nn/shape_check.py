"""Entry check of a captured graph: each input's dtype and the sizes the graph was captured with."""

from __future__ import annotations

from typing import Annotated, Any

import torch

from lowbit.typed import Range

from .base import LowbitModule

__all__ = ["CheckShape"]

_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


class CheckShape(LowbitModule):
    """Input ``index`` must have ``dtype`` and, per dimension, the captured size (``None``: any size).

    torch.export specializes the sizes a model's code depends on; a captured graph only computes the
    right thing for those, so any other input is refused here, with the reason, before it runs.
    """

    spec_attrs = {"index": Annotated[int, Range(0)], "dtype": str, "shape": list[Annotated[int, Range(0)] | None]}

    def __init__(self, index: int, dtype: str, shape: list[int | None]) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"unknown input dtype {dtype!r}")
        self.index, self.dtype, self.shape = int(index), dtype, list(shape)

    def forward(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input {self.index} must be a tensor, got {type(x).__name__}")
        if str(x.dtype).removeprefix("torch.") != self.dtype:
            raise TypeError(f"input {self.index} must be {self.dtype}, got {str(x.dtype).removeprefix('torch.')}")
        if x.dim() != len(self.shape) or any(s is not None and s != d for s, d in zip(self.shape, x.shape,
                                                                                     strict=True)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in self.shape) + "]"
            raise ValueError(f"input {self.index} has shape {list(x.shape)}; this graph was captured for {want} "
                             "(* = any size)")
        return x

    def to_spec(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"index": self.index, "dtype": self.dtype, "shape": self.shape}, {}

    @classmethod
    def from_spec(cls, attrs: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CheckShape:
        return cls(attrs["index"], attrs["dtype"], attrs["shape"])
