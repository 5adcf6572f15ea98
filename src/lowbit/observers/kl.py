"""Entropy (KL-divergence) calibration, after TensorRT's int8 calibrator (Migacz, GTC 2017).

Values are histogrammed (2048 bins per side of zero, accumulated over batches with exact
re-binning when the range grows, see :class:`RunningHistogram`). For each candidate threshold
``T`` (a bin edge), the reference distribution ``P`` is the histogram up to ``T`` with everything
beyond ``T`` added to the last bin (clipping), and ``Q`` is its quantized version: the bins up to
``T`` merged into ``n`` equal groups (one per quantization level), each group's mass spread evenly
over the group's non-empty bins. The threshold minimizing ``KL(P || Q)`` is chosen.

Number of levels ``n`` [paper: TensorRT uses 128 for int8 on |x|; ours elsewhere]:

* symmetric formats: histogram of ``|x|`` on ``[0, T]``, ``n = 2^(bits-1)`` (128 for int8); range
  ``(-T, T)``;
* asymmetric formats on one-sided data (``min >= 0``, e.g. after ReLU): histogram of ``x`` on
  ``[0, T]``, ``n = qmax - qmin`` (255 for uint8); range ``(0, T)``;
* asymmetric formats on two-sided data: histogram of ``x``, candidate windows
  ``[r_lo·min, r_hi·max]`` on a geometric grid of ratios in ``[0.01, 1]`` — one ratio for both ends
  first, then ``rounds`` passes of coordinate descent on each end (lowbit's reading [ours]);
  ``n = qmax - qmin``; the window edges snap to bin edges.

The bin ``[0, w)`` that holds exact zeros (a large spike after ReLU or zero padding; zero is exactly
representable on every grid) is given the count of its neighbour ``[w, 2w)`` before the search, as
NVIDIA's pytorch-quantization calibrator does; without this the spike drives the threshold down to
the smallest one whose first level is a single bin. Thresholds below ``n`` bins are not searched
(as in TensorRT), so data that fills fewer than ``n`` bins is not clipped.

All candidate thresholds are scored at once (:func:`kl_divergences`, prefix sums, O(levels) per
candidate); :func:`kl_divergence_clipped` is the plain one-window reference. Per channel (weights)
each channel gets its own histogram of the kept data; ``max_candidates`` thins the threshold search
(default: all candidates per tensor, about 256 per channel). Per-channel KL is supported but rarely
a good idea: a weight channel holds too few values to fill 2048 bins, and the sparse histogram makes
KL clip hard; min/max, MSE or percentile suit weights better.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..formats.affine import QFormat
from .base import Observer, _KeepsChannelData
from .histogram import RunningHistogram

__all__ = ["KLObserver", "kl_divergence_clipped", "kl_divergences"]


def kl_divergence_clipped(hist: np.ndarray, start: int, stop: int, levels: int) -> float:
    """KL(P || Q) for the window ``hist[start:stop]`` quantized to ``levels`` levels.

    ``P``: the window with the mass outside it added to its end bins. ``Q``: the window (without the
    clipped mass) merged into ``levels`` groups of ``(stop - start) // levels`` bins (the last group
    takes the remainder), expanded back uniformly over each group's bins that are non-empty in
    ``P``. Returns ``inf`` when ``Q`` is empty.
    """
    sliced = hist[start:stop]
    n = sliced.shape[0]
    if n < levels:
        raise ValueError(f"window of {n} bins is narrower than {levels} levels")
    p = sliced.astype(np.float64, copy=True)
    p[0] += hist[:start].sum()
    p[-1] += hist[stop:].sum()
    nonzero = p > 0
    group = np.minimum(np.arange(n) // (n // levels), levels - 1)
    qsum = np.bincount(group, weights=sliced, minlength=levels)
    qcnt = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, qsum[group] / np.maximum(qcnt[group], 1.0), 0.0)
    ps, qs = p.sum(), q.sum()
    if ps <= 0 or qs <= 0:
        return math.inf
    p = p[nonzero] / ps
    q = q[nonzero] / qs
    q = np.maximum(q, 1e-12)  # a clipped end bin with no in-window mass: heavily penalized
    return float(np.sum(p * np.log(p / q)))


def _xlogx(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def kl_divergences(hist: np.ndarray, starts: np.ndarray, stops: np.ndarray, levels: int) -> np.ndarray:
    """:func:`kl_divergence_clipped` for many windows at once (same numbers, vectorized).

    Per window only ``levels`` group sums are needed: with ``N`` the total count, ``p_j`` the
    clipped window counts, ``P_k`` / ``S_k`` the group masses with / without the clipped mass,
    ``c_k`` the group's non-empty bins and ``S`` the window mass,
    ``KL = (Σ_j p_j log p_j - Σ_k P_k log(S_k / (c_k S))) / N - log N``; prefix sums give every
    term in O(levels) per window.
    """
    h = np.asarray(hist, dtype=np.float64)
    s = np.asarray(starts, dtype=np.int64)
    e = np.asarray(stops, dtype=np.int64)
    if np.any(e - s < levels) or np.any(s < 0) or np.any(e > h.shape[0]):
        raise ValueError(f"every window must lie in the histogram and span at least {levels} bins")
    total = h.sum()
    if total <= 0:
        return np.full(s.shape, math.inf)
    csum = np.concatenate([[0.0], np.cumsum(h)])
    cnz = np.concatenate([[0.0], np.cumsum(h > 0)])
    cxl = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    m = (e - s) // levels
    b = s[:, None] + np.arange(levels + 1)[None, :] * m[:, None]
    b[:, -1] = e
    qsum = csum[b[:, 1:]] - csum[b[:, :-1]]
    cnt = cnz[b[:, 1:]] - cnz[b[:, :-1]]
    left, right = csum[s], total - csum[e]
    h_first, h_last = h[s], h[e - 1]
    cnt[:, 0] += (h_first == 0) & (left > 0)
    cnt[:, -1] += (h_last == 0) & (right > 0)
    big_p = qsum.copy()
    big_p[:, 0] += left
    big_p[:, -1] += right
    window = csum[e] - csum[s]
    plogp = (cxl[e - 1] - cxl[s + 1]) + _xlogx(h_first + left) + _xlogx(h_last + right)
    with np.errstate(divide="ignore", invalid="ignore"):
        qn = qsum / np.maximum(cnt, 1.0) / window[:, None]
    logq = np.log(np.maximum(np.nan_to_num(qn, nan=0.0), 1e-12))  # empty level: heavily penalized
    cross = np.where(big_p > 0, big_p * logq, 0.0).sum(axis=1)
    kl = (plogp - cross) / total - math.log(total)
    kl[window <= 0] = math.inf
    return kl


def _one_sided_threshold(hist: np.ndarray, levels: int, max_candidates: int | None) -> int:
    """Number of bins ``i`` (threshold at the edge after bin ``i-1``) minimizing the divergence."""
    occupied = np.nonzero(hist)[0]
    if occupied.size == 0:
        return 0
    n = int(occupied[-1]) + 1
    if n <= levels:
        return n
    stride = 1 if max_candidates is None else max(1, (n - levels) // max_candidates)
    cands = np.arange(levels, n + 1, stride)
    if cands[-1] != n:
        cands = np.append(cands, n)
    kl = kl_divergences(hist, np.zeros_like(cands), cands, levels)
    return int(cands[int(np.argmin(kl))])  # first minimum: the smallest such threshold


def _window_search(
    hist: np.ndarray, edges: np.ndarray, mn: float, mx: float, levels: int, ratios: np.ndarray, rounds: int
) -> tuple[float, float]:
    """Best window ``[rlo·mn, rhi·mx]`` (snapped to bin edges) on a signed histogram: first one ratio
    for both ends, then ``rounds`` passes of coordinate descent on each end."""
    width = edges[1] - edges[0]
    nb = hist.shape[0]

    def window(rlo: np.ndarray, rhi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = np.clip(np.floor((rlo * mn - edges[0]) / width), 0, nb - 1).astype(np.int64)
        stop = np.clip(np.ceil((rhi * mx - edges[0]) / width), start + 1, nb).astype(np.int64)
        return start, stop

    def best_of(rlo: np.ndarray, rhi: np.ndarray) -> tuple[float, float, float]:
        start, stop = window(rlo, rhi)
        kl = np.full(start.shape, math.inf)
        ok = stop - start >= levels
        if ok.any():
            kl[ok] = kl_divergences(hist, start[ok], stop[ok], levels)
        j = int(np.argmin(kl))  # first minimum: the incumbent (candidate 0) wins ties
        return float(rlo[j]), float(rhi[j]), float(kl[j])

    one = np.ones(1)
    r = np.concatenate([one, ratios])
    rlo, rhi, best = best_of(r, r)
    for _ in range(rounds):
        rlo, rhi, best = best_of(np.full(r.shape, rlo), np.concatenate([[rhi], ratios]))
        rlo, rhi, best = best_of(np.concatenate([[rlo], ratios]), np.full(r.shape, rhi))
    if not math.isfinite(best):
        return mn, mx
    start, stop = window(np.array([rlo]), np.array([rhi]))
    return max(float(edges[start[0]]), mn), min(float(edges[stop[0]]), mx)


class KLObserver(Observer, _KeepsChannelData):
    """TensorRT-style entropy calibration (see the module docstring for the exact procedure)."""

    def __init__(
        self,
        axis: int | None = None,
        bins: int = 2048,
        max_candidates: int | None = None,
        ratios: int = 128,
        rounds: int = 2,
    ) -> None:
        super().__init__(axis)
        self.rounds = rounds
        self.bins = bins
        self.max_candidates = max_candidates
        self._ratios = np.geomspace(1.0, 1e-2, ratios)
        self._hist = RunningHistogram(bins) if axis is None else None

    def _observe(self, flat: torch.Tensor) -> None:
        if self._hist is not None:
            self._hist.add(flat)
        else:
            self._keep(flat)

    @staticmethod
    def _levels(fmt: QFormat) -> int:
        if fmt.symmetric:
            return 1 << (fmt.bits - 1)
        return fmt.qmax - fmt.qmin

    def _choose(
        self,
        hist: RunningHistogram,
        fmt: QFormat,
        mn: float,
        mx: float,
        max_candidates: int | None,
    ) -> tuple[float, float]:
        if fmt.symmetric or mn >= 0.0:
            if fmt.symmetric:
                count, _, _, _ = hist.folded()
                amax = max(-mn, mx)
            else:
                count = hist.pos[0]
                amax = mx
            levels = self._levels(fmt)
            h = count.numpy().copy()
            h[0] = h[1]  # flatten the spike of exact zeros (ReLU, padding), as NVIDIA's calibrator
            i = _one_sided_threshold(h, levels, max_candidates)
            t = min(i * hist.width, amax)
            return (-t, t) if fmt.symmetric else (0.0, t)
        count, _, _, edges = hist.signed()
        levels = self._levels(fmt)
        h = count.numpy().copy()
        h[hist.bins] = h[hist.bins + 1]  # the bin [0, w) holding exact zeros, as above
        return _window_search(h, edges.numpy(), mn, mx, levels, self._ratios, self.rounds)

    def _range(self, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
        mn, mx = self._minmax()
        if self._hist is not None:
            lo, hi = self._choose(self._hist, fmt, float(mn), float(mx), None)
            return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
        data = self._data()
        los, his = [], []
        for c in range(data.shape[0]):
            h = RunningHistogram(self.bins)
            h.add(data[c])
            lo, hi = self._choose(h, fmt, float(mn[c]), float(mx[c]), self.max_candidates or 256)
            los.append(lo)
            his.append(hi)
        return torch.tensor(los, dtype=torch.float64), torch.tensor(his, dtype=torch.float64)
