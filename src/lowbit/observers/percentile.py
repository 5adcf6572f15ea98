"""Percentile clipping: cut off the rarest ``100 - percentile`` % of values."""

from __future__ import annotations

import torch

from ..formats.affine import QFormat
from .base import Observer, _KeepsChannelData
from .histogram import RunningHistogram, hist_quantile

__all__ = ["PercentileObserver", "quantile_rows"]


def quantile_rows(x: torch.Tensor, q: float) -> torch.Tensor:
    """Exact ``q``-quantile (0..1) of each row of a 2-D tensor, linear interpolation between order
    statistics (``torch.quantile``'s default, without its input-size limit)."""
    n = x.shape[1]
    s, _ = torch.sort(x.to(torch.float64), dim=1)
    pos = q * (n - 1)
    i0 = min(int(pos), n - 1)
    i1 = min(i0 + 1, n - 1)
    frac = pos - i0
    return s[:, i0] + frac * (s[:, i1] - s[:, i0])


class PercentileObserver(Observer, _KeepsChannelData):
    """Clip at a percentile of the observed values.

    Asymmetric formats: ``range = (P_{100-p}(x), P_p(x))``. Symmetric formats: ``range = ±P_p(|x|)``
    (lowbit's reading [ours]: the symmetric grid is set by magnitudes, as in the 4.6-bit method's
    ``(1 - 1e-4)`` quantile of ``|W|``). ``percentile=100`` reproduces min/max.

    Per tensor the values are summarized in a :class:`RunningHistogram` (bounded memory over many
    batches; the quantile is interpolated inside a bin, so it is accurate to about
    ``max|x| / bins``). Per channel (weights) the quantile is exact on the observed tensor(s),
    which are kept.
    """

    def __init__(self, axis: int | None = None, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(axis)
        if not 50.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile (the upper clip point, in %) must be in [50, 100], got {percentile}")
        self.percentile = float(percentile)
        self._hist = RunningHistogram(bins) if axis is None else None

    def _observe(self, flat: torch.Tensor) -> None:
        if self._hist is not None:
            self._hist.add(flat)
        else:
            self._keep(flat)

    def _range(self, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.percentile / 100.0
        mn, mx = self._minmax()
        if self._hist is not None:
            if fmt.symmetric:
                count, _, _, edges = self._hist.folded()
                a = min(hist_quantile(count, edges, p), float(torch.maximum(-mn, mx)))
                return torch.tensor(-a, dtype=torch.float64), torch.tensor(a, dtype=torch.float64)
            count, _, _, edges = self._hist.signed()
            lo = max(hist_quantile(count, edges, 1.0 - p), float(mn))
            hi = min(hist_quantile(count, edges, p), float(mx))
            return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
        data = self._data()
        if fmt.symmetric:
            a = quantile_rows(data.abs(), p)
            return -a, a
        return quantile_rows(data, 1.0 - p), quantile_rows(data, p)
