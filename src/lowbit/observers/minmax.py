"""Running min/max: the range covers everything observed (no clipping)."""

from __future__ import annotations

import torch

from ..formats.affine import QFormat
from .base import Observer

__all__ = ["MinMaxObserver"]


class MinMaxObserver(Observer):
    """``range = (running min, running max)`` per tensor or per channel, for any format.

    For symmetric formats :func:`~lowbit.formats.choose_qparams` turns it into ``±max|x|``.
    """

    def _range(self, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
        return self._minmax()
