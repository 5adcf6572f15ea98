"""A bounded-memory running histogram of activations, anchored at zero, with exact re-binning.

lowbit's reading [ours] of "a histogram accumulated over batches with re-binning when the range
grows": the real line is covered by ``2 * bins`` equal bins over ``[-L, L]`` (``bins`` a power of two
on each side of zero, so zero is always a bin edge — every quantization grid contains zero too).
``L`` is set to ``max|x|`` of the first batch. When a later batch exceeds it, ``L`` is doubled as
often as needed and each group of ``2^k`` adjacent bins is merged into one: re-binning is *exact*
(no redistribution of counts by interpolation), at the price of up to half the resolution after
growth (at least ``bins / 2`` bins still cover the data on the wider side).

Every bin keeps the count, the sum of ``|x|`` and the sum of ``x²`` of the values that fell into
it. With these, sums like ``Σ (x - c)²`` or ``Σ |x - c|`` over a bin are exact whenever ``c`` is
constant on that bin, so quantization errors and mean deviations computed from the histogram are
exact except on the few bins that straddle a rounding or clipping boundary.
"""

from __future__ import annotations

import torch

__all__ = ["RunningHistogram"]

_TINY = 1e-30  # initial half-width when the first batch is all zeros


class RunningHistogram:
    """Zero-anchored running histogram with per-bin count, sum of ``|x|`` and sum of squares."""

    def __init__(self, bins: int = 2048) -> None:
        if bins < 8 or bins & (bins - 1):
            raise ValueError(f"bins per side must be a power of two >= 8, got {bins}")
        self.bins = bins
        self.limit = 0.0  # L: the histogram covers [-L, L]; 0 before the first add()
        # rows: count, sum |x|, sum x^2; index j covers |x| in [j w, (j + 1) w)
        self.pos = torch.zeros(3, bins, dtype=torch.float64)
        self.neg = torch.zeros(3, bins, dtype=torch.float64)

    @property
    def width(self) -> float:
        return self.limit / self.bins

    @property
    def total(self) -> float:
        return float(self.pos[0].sum() + self.neg[0].sum())

    def _merge(self, side: torch.Tensor, k: int) -> torch.Tensor:
        if k == 0:
            return side
        out = torch.zeros_like(side)
        if (1 << k) >= self.bins:
            out[:, 0] = side.sum(dim=1)
        else:
            f = 1 << k
            out[:, : self.bins // f] = side.reshape(3, self.bins // f, f).sum(dim=2)
        return out

    def add(self, x: torch.Tensor) -> None:
        """Add the values of ``x`` (any shape, finite)."""
        x = x.detach().reshape(-1).to(torch.float64)
        if x.numel() == 0:
            return
        a = x.abs()
        amax = float(a.max())
        if self.limit == 0.0:
            self.limit = amax if amax > 0 else _TINY
        k = 0
        while self.limit < amax:
            self.limit *= 2.0
            k += 1
        if k:
            self.pos = self._merge(self.pos, k)
            self.neg = self._merge(self.neg, k)
        idx = torch.clamp((a / self.width).floor_(), max=self.bins - 1).to(torch.int64)
        neg = x < 0
        for side, mask in ((self.pos, ~neg), (self.neg, neg)):
            i, v = idx[mask], a[mask]
            if i.numel() == 0:
                continue
            side[0] += torch.bincount(i, minlength=self.bins).to(torch.float64)
            side[1] += torch.bincount(i, weights=v, minlength=self.bins)
            side[2] += torch.bincount(i, weights=v * v, minlength=self.bins)

    def signed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bins over ``[-L, L]`` left to right: (count, sum x, sum x², edges of length 2*bins+1)."""
        count = torch.cat([self.neg[0].flip(0), self.pos[0]])
        s1 = torch.cat([-self.neg[1].flip(0), self.pos[1]])
        s2 = torch.cat([self.neg[2].flip(0), self.pos[2]])
        edges = torch.linspace(-self.limit, self.limit, 2 * self.bins + 1, dtype=torch.float64)
        return count, s1, s2, edges

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Histogram of ``|x|`` over ``[0, L]``: (count, sum |x|, sum x², edges of length bins+1)."""
        h = self.pos + self.neg
        edges = torch.linspace(0.0, self.limit, self.bins + 1, dtype=torch.float64)
        return h[0], h[1], h[2], edges


def hist_quantile(count: torch.Tensor, edges: torch.Tensor, q: float) -> float:
    """The ``q``-quantile (0..1) of histogrammed data, interpolating linearly inside a bin."""
    total = float(count.sum())
    if total <= 0:
        raise ValueError("empty histogram")
    cdf = torch.cumsum(count, 0)
    target = min(max(q, 0.0), 1.0) * total
    j = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64))[0])
    j = min(j, count.numel() - 1)
    # skip empty bins so that q = 0 lands on the first occupied bin
    while count[j] == 0 and j < count.numel() - 1:
        j += 1
    before = float(cdf[j - 1]) if j > 0 else 0.0
    frac = (target - before) / float(count[j]) if count[j] > 0 else 0.0
    frac = min(max(frac, 0.0), 1.0)
    return float(edges[j]) + frac * float(edges[j + 1] - edges[j])
