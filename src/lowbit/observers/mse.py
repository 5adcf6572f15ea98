"""MSE-optimal clipping: the range whose quantization error on the observed data is smallest."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..formats.affine import QFormat, choose_qparams
from .base import Observer, _KeepsChannelData
from .histogram import RunningHistogram

__all__ = ["MSEObserver", "fake_quantize64"]

# (R, C) lo-ratios, (R, C) hi-ratios -> (R, C) squared-error sums
_Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fake_quantize64(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize-dequantize in float64 (round half to even, as :func:`~lowbit.formats.quantize`);
    ``scale`` and ``zero_point`` broadcast against ``x``."""
    s = scale.to(torch.float64)
    z = zero_point.to(torch.float64)
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    return (q - z) * s


def _search(
    loss: _Loss,
    rlo: torch.Tensor,
    rhi: torch.Tensor,
    which: str,
    coarse: torch.Tensor,
    fine: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One coarse-to-fine 1-D search over clip ratios, per channel.

    ``which``: "both" (lo and hi ratio move together), "lo" or "hi" (the other stays fixed). The
    incumbent is always candidate 0 and wins ties, so the error never increases.
    """
    cur = rhi if which == "hi" else rlo

    def run(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = grid if which in ("both", "lo") else rlo.expand_as(grid)
        hi = grid if which in ("both", "hi") else rhi.expand_as(grid)
        err = loss(lo, hi)
        j = torch.argmin(err, dim=0, keepdim=True)  # first minimum: incumbent, then larger ratios
        return grid.gather(0, j)[0], err.gather(0, j)[0]

    c = cur.numel()
    best, _ = run(torch.cat([cur[None], coarse[:, None].expand(-1, c)]))
    step = float(coarse[0] / coarse[1])  # geometric grid factor (descending grid)
    top = torch.clamp(best * step, max=1.0)
    bottom = best / step
    t = torch.linspace(1.0, 0.0, fine, dtype=torch.float64)[:, None]
    best, err = run(torch.cat([best[None], bottom + (top - bottom) * t]))
    if which == "both":
        return best, best, err
    if which == "lo":
        return best, rhi, err
    return rlo, best, err


def _optimize(
    loss: _Loss,
    mn: torch.Tensor,
    mx: torch.Tensor,
    fmt: QFormat,
    rounds: int,
    coarse: torch.Tensor,
    fine: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ratios (rlo, rhi), shape (C,), that minimize ``loss``; start at (1, 1) = min/max."""
    c = mn.numel()
    one = torch.ones(c, dtype=torch.float64)
    rlo, rhi, _ = _search(loss, one, one, "both", coarse, fine)
    if not fmt.symmetric:
        # coordinate descent on the two ends (only where that end can clip anything)
        for _ in range(rounds):
            if bool((mx > 0).any()):
                rlo, rhi, _ = _search(loss, rlo, rhi, "hi", coarse, fine)
            if bool((mn < 0).any()):
                rlo, rhi, _ = _search(loss, rlo, rhi, "lo", coarse, fine)
    return rlo, rhi


class MSEObserver(Observer, _KeepsChannelData):
    """Choose the clip range that minimizes the quantization MSE of the observed data for ``fmt``.

    The candidates are clip ratios ``r`` in ``(0, 1]`` of the min/max range (``r = 1`` is min/max
    itself, so the result is never worse than min/max on the data it is computed on):
    symmetric formats clip at ``±r·max|x|``; asymmetric formats first shrink both ends by a common
    ratio, then refine each end on its own (coordinate descent, ``rounds`` passes) [ours]. Each 1-D
    search is a geometric grid of ``grid`` ratios from 1 down to ``min_ratio``, refined by ``fine``
    linear steps around the best (a grid rather than golden-section search: the error is a sawtooth,
    not unimodal, in the clip value). The error of each candidate is that of the actual quantization
    parameters :func:`~lowbit.formats.choose_qparams` gives for it (zero kept exactly
    representable), with round-half-to-even and clamping as in :func:`~lowbit.formats.quantize`.

    Per tensor (activations) the error is computed on a :class:`RunningHistogram` (bounded memory
    over many batches; exact for bins that do not straddle a rounding boundary, see there). Per
    channel (weights) it is computed exactly on the observed tensor(s), which are kept.
    """

    def __init__(
        self,
        axis: int | None = None,
        bins: int = 2048,
        grid: int = 64,
        fine: int = 11,
        min_ratio: float = 0.01,
        rounds: int = 1,
    ) -> None:
        super().__init__(axis)
        if not 0.0 < min_ratio < 1.0:
            raise ValueError(f"min_ratio must be in (0, 1), got {min_ratio}")
        if grid < 2 or fine < 2 or rounds < 0:
            raise ValueError("grid and fine need at least 2 points, rounds must be >= 0")
        self.rounds = rounds
        self.fine = fine
        self._coarse = torch.logspace(0.0, math.log10(min_ratio), grid, dtype=torch.float64)
        self._hist = RunningHistogram(bins) if axis is None else None

    def _observe(self, flat: torch.Tensor) -> None:
        if self._hist is not None:
            self._hist.add(flat)
        else:
            self._keep(flat)

    def _base(self, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
        mn, mx = self._minmax()
        mn = mn.reshape(-1)
        mx = mx.reshape(-1)
        if fmt.symmetric:
            a = torch.maximum(-mn, mx)
            return -a, a
        return mn, mx

    def _range(self, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
        if not fmt.uniform:
            raise TypeError(f"MSEObserver searches uniform grids; {fmt} is not one "
                            "(the quantizers' 'mse' step initializer handles any level set)")
        base_lo, base_hi = self._base(fmt)
        qmin, qmax = fmt.qmin, fmt.qmax

        if self._hist is not None:
            count, s1, s2, _ = self._hist.signed()
            nz = count > 0
            count, s1, s2 = count[nz], s1[nz], s2[nz]
            rep = s1 / count  # mean of the values in each bin

            def loss(rlo: torch.Tensor, rhi: torch.Tensor) -> torch.Tensor:
                scale, zp = choose_qparams(rlo[:, 0] * base_lo, rhi[:, 0] * base_hi, fmt)
                d = fake_quantize64(rep[None, :], scale[:, None], zp[:, None], qmin, qmax)
                err = torch.clamp(s2 - 2.0 * d * s1 + d * d * count, min=0.0)
                return err.sum(dim=1, keepdim=True)

        else:
            data = self._data()  # float32: the rounding the deployed quantize() does

            def loss(rlo: torch.Tensor, rhi: torch.Tensor) -> torch.Tensor:
                out = []
                for k in range(rlo.shape[0]):
                    scale, zp = choose_qparams(rlo[k] * base_lo, rhi[k] * base_hi, fmt)
                    s, z = scale[:, None], zp[:, None].to(torch.float32)
                    d = torch.round(data / s)
                    d.add_(z).clamp_(qmin, qmax).sub_(z).mul_(s).sub_(data)
                    out.append(d.square_().sum(dim=1, dtype=torch.float64))
                return torch.stack(out)

        rlo, rhi = _optimize(loss, base_lo, base_hi, fmt, self.rounds, self._coarse, self.fine)
        lo, hi = rlo * base_lo, rhi * base_hi
        if self._hist is not None:
            return lo[0], hi[0]
        return lo, hi
