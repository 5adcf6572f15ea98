"""ACIQ: analytical clipping for integer quantization (Banner, Nahshan, Soudry, NeurIPS 2019).

The observed values are modelled as Laplace(μ, b) or Gauss(μ, σ); the clip value ``α`` that
minimizes the expected clipping + rounding MSE with ``2^M`` levels over ``[μ - α, μ + α]`` is a
fixed multiple of ``b`` (or ``σ``) per bit width. The paper tabulates [paper]

* Laplace: ``α = 2.83 b, 3.89 b, 5.03 b`` for M = 2, 3, 4;
* Gauss: ``α = 1.71 σ, 2.15 σ, 2.55 σ`` for M = 2, 3, 4.

For other bit widths lowbit minimizes the paper's analytic error numerically
(:func:`aciq_alpha_numeric`):

* Laplace: ``E(α) = 2 b² exp(-α/b) + α² / (3·2^(2M))``;
* Gauss: ``E(α) = (α² + σ²)[1 - erf(α/(σ√2))] - α σ √(2/π) exp(-α²/(2σ²)) + α² / (3·2^(2M))``.

The minimizer reproduces the table to within 0.01 (the paper's figures are partly truncated,
partly rounded: 3.897 is printed 3.89, 2.559 is printed 2.55).

Range [ours, following the authors' code for the one-sided case]:

* two-sided data, asymmetric format: ``[max(μ - α, min), min(μ + α, max)]`` with ``M = bits``;
* two-sided data, symmetric format: ``±min(|μ| + α, max|x|)`` with ``M = bits``;
* one-sided data (``min >= 0``, e.g. after ReLU): ``[min, min(max(μ, 0) + α, max)]``. An asymmetric
  format spends all ``2^bits`` codes on ``[0, T]``, which is as fine as ``2^(bits+1)`` codes over a
  two-sided interval of twice the width, so ``M = bits + 1`` (the authors' "positive" table); a
  symmetric format only uses its ``2^(bits-1)`` non-negative codes, so ``M = bits``.

Estimates: ``μ`` the mean, ``b = mean|x - μ|``, ``σ`` the (population) standard deviation. Per
tensor, ``μ`` and ``σ`` are running moments (exact, Chan/Welford merging in float64), and ``b`` is
computed from a :class:`RunningHistogram` that keeps per-bin sums (exact except for the one bin that
contains ``μ``); per channel (weights) everything is exact on the kept data.
"""

from __future__ import annotations

import functools
import math

import torch

from ..formats.affine import QFormat
from .base import Observer, _KeepsChannelData
from .histogram import RunningHistogram

__all__ = [
    "ACIQ_ALPHA",
    "ACIQObserver",
    "ACIQLaplaceObserver",
    "ACIQGaussObserver",
    "aciq_mse",
    "aciq_alpha",
    "aciq_alpha_numeric",
    "aciq_bias_correction",
]

#: The paper's optimal clip multipliers ``α / b`` (Laplace) and ``α / σ`` (Gauss) for M = 2, 3, 4.
ACIQ_ALPHA: dict[str, dict[int, float]] = {
    "laplace": {2: 2.83, 3: 3.89, 4: 5.03},
    "gauss": {2: 1.71, 3: 2.15, 4: 2.55},
}

_PRIORS = ("laplace", "gauss")


def _check_prior(prior: str) -> str:
    if prior not in _PRIORS:
        raise ValueError(f"unknown ACIQ prior {prior!r}; use one of {', '.join(_PRIORS)}")
    return prior


def aciq_mse(alpha: float, bits: int, prior: str, scale: float = 1.0) -> float:
    """The paper's analytic clipping + rounding MSE for clip value ``alpha`` with ``2^bits`` levels;
    ``scale`` is ``b`` (Laplace) or ``σ`` (Gauss)."""
    _check_prior(prior)
    quant = alpha * alpha / (3.0 * 4.0**bits)
    if prior == "laplace":
        return 2.0 * scale * scale * math.exp(-alpha / scale) + quant
    s = scale
    clip = (alpha * alpha + s * s) * (1.0 - math.erf(alpha / (s * math.sqrt(2.0)))) - alpha * s * math.sqrt(
        2.0 / math.pi
    ) * math.exp(-alpha * alpha / (2.0 * s * s))
    return clip + quant


@functools.lru_cache(maxsize=64)
def aciq_alpha_numeric(bits: int, prior: str) -> float:
    """``α / b`` (Laplace) or ``α / σ`` (Gauss) minimizing :func:`aciq_mse`, found numerically: a
    scan over (0, 40] in steps of 0.01, then golden-section refinement around the best point."""
    _check_prior(prior)
    if not 1 <= bits <= 32:
        raise ValueError(f"bit width must be in 1..32, got {bits}")

    def f(a: float) -> float:
        return aciq_mse(a, bits, prior)

    grid = [0.01 * k for k in range(1, 4001)]
    a0 = min(grid, key=f)
    lo, hi = max(a0 - 0.01, 1e-9), a0 + 0.01
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(100):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = f(d)
    return 0.5 * (lo + hi)


def aciq_alpha(bits: int, prior: str) -> float:
    """The clip multiplier for ``2^bits`` levels: the paper's table for 2/3/4 bits, else numeric."""
    _check_prior(prior)
    table = ACIQ_ALPHA[prior]
    return table[bits] if bits in table else aciq_alpha_numeric(bits, prior)


class ACIQObserver(Observer, _KeepsChannelData):
    """Analytic clipping (see the module docstring). ``prior``: "laplace" or "gauss"."""

    def __init__(self, axis: int | None = None, prior: str = "laplace", bins: int = 2048) -> None:
        super().__init__(axis)
        self.prior = _check_prior(prior)
        if axis is None:
            self._hist: RunningHistogram | None = RunningHistogram(bins)
            self._n = 0
            self._mean = 0.0
            self._m2 = 0.0
        else:
            self._hist = None

    def _observe(self, flat: torch.Tensor) -> None:
        if self._hist is None:
            self._keep(flat)
            return
        x = flat.to(torch.float64)
        nb = x.numel()
        mb = float(x.mean())
        m2b = float(((x - mb) ** 2).sum())
        n = self._n + nb
        delta = mb - self._mean
        self._mean += delta * nb / n
        self._m2 += m2b + delta * delta * self._n * nb / n
        self._n = n
        self._hist.add(x)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, b)`` for the Laplace prior or ``(μ, σ)`` for the Gauss prior (float64)."""
        if self.observed == 0:
            raise ValueError(f"observer has seen no data: call {type(self).__name__}.observe() first")
        if self._hist is None:
            data = self._data().to(torch.float64)
            mu = data.mean(dim=1)
            if self.prior == "laplace":
                return mu, (data - mu[:, None]).abs().mean(dim=1)
            return mu, data.std(dim=1, unbiased=False)
        mu = self._mean
        if self.prior == "gauss":
            return torch.tensor(mu, dtype=torch.float64), torch.tensor(
                math.sqrt(max(self._m2, 0.0) / self._n), dtype=torch.float64
            )
        count, s1, _, edges = self._hist.signed()
        left, right = edges[:-1], edges[1:]
        dev = torch.where(
            right <= mu,
            mu * count - s1,
            torch.where(left >= mu, s1 - mu * count, (s1 - mu * count).abs()),
        )
        b = float(dev.sum()) / self._n
        return torch.tensor(mu, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)

    def _range(self, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
        mn, mx = self._minmax()
        mu, spread = self.stats()
        one_sided = mn >= 0
        m_two = aciq_alpha(fmt.bits, self.prior)
        m_one = m_two if fmt.symmetric else aciq_alpha(fmt.bits + 1, self.prior)
        alpha = torch.where(one_sided, m_one * spread, m_two * spread)
        if fmt.symmetric:
            amax = torch.maximum(-mn, mx)
            t = torch.minimum(torch.where(one_sided, torch.clamp(mu, min=0.0), mu.abs()) + alpha, amax)
            two_lo, two_hi = -t, t
        else:
            two_lo = torch.maximum(mu - alpha, mn)
            two_hi = torch.minimum(mu + alpha, mx)
        one_hi = torch.minimum(torch.clamp(mu, min=0.0) + alpha, mx)
        lo = torch.where(one_sided, mn, two_lo)
        hi = torch.where(one_sided, one_hi, two_hi)
        return lo, hi


class ACIQLaplaceObserver(ACIQObserver):
    """:class:`ACIQObserver` with the Laplace prior (registry name ``aciq_laplace``)."""

    def __init__(self, axis: int | None = None, bins: int = 2048) -> None:
        super().__init__(axis, prior="laplace", bins=bins)


class ACIQGaussObserver(ACIQObserver):
    """:class:`ACIQObserver` with the Gauss prior (registry name ``aciq_gauss``)."""

    def __init__(self, axis: int | None = None, bins: int = 2048) -> None:
        super().__init__(axis, prior="gauss", bins=bins)


def aciq_bias_correction(
    w: torch.Tensor, w_q: torch.Tensor, axis: int = 0, *, preserve_mean: bool = False
) -> torch.Tensor:
    """ACIQ's per-channel bias correction of quantized weights (docs/methods.md, "Range choice").

    ``w``: float weights; ``w_q``: their quantized weights *dequantized* back to float, same shape.
    Per output channel ``c`` along ``axis``, with ``μ_c``, ``μ̂_c`` the channel means of ``w`` and
    ``w_q`` and ``ξ_c = ‖W_c − μ_c‖ / ‖Ŵ_c − μ̂_c‖``, returns

    * ``ξ_c (Ŵ_c + μ_c − μ̂_c)`` — the paper's formula (default). It restores the centred norm
      exactly; the channel mean becomes ``ξ_c μ_c``, which equals ``μ_c`` up to the factor
      ``ξ_c ≈ 1``;
    * ``ξ_c (Ŵ_c − μ̂_c) + μ_c`` with ``preserve_mean=True`` [ours] — restores mean and centred
      norm exactly.

    Channels whose quantized weights are constant (``‖Ŵ_c − μ̂_c‖ = 0``) get ``ξ_c = 1`` (mean shift
    only). The result is float and generally off the quantization grid: the caller re-quantizes it
    (observe it again or reuse the scale) to get integer weights.
    """
    if not isinstance(w, torch.Tensor) or not isinstance(w_q, torch.Tensor):
        raise TypeError("aciq_bias_correction expects tensors")
    if w.shape != w_q.shape:
        raise ValueError(f"shape mismatch: weights {tuple(w.shape)} vs quantized {tuple(w_q.shape)}")
    if not w_q.is_floating_point():
        raise TypeError("w_q must be the dequantized (float) weights, not integer codes; use dequantize()")
    if w.dim() == 0:
        raise ValueError("aciq_bias_correction needs at least one (channel) dimension")
    ax = axis % w.dim()
    c = w.shape[ax]
    wf = w.detach().to(torch.float64).movedim(ax, 0).reshape(c, -1)
    qf = w_q.detach().to(torch.float64).movedim(ax, 0).reshape(c, -1)
    mu = wf.mean(dim=1, keepdim=True)
    mu_q = qf.mean(dim=1, keepdim=True)
    num = (wf - mu).norm(dim=1, keepdim=True)
    den = (qf - mu_q).norm(dim=1, keepdim=True)
    xi = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
    out = xi * (qf - mu_q) + mu if preserve_mean else xi * (qf + mu - mu_q)
    moved = list(w.movedim(ax, 0).shape)
    dtype = w.dtype if w.is_floating_point() else torch.float32
    return out.reshape(moved).movedim(0, ax).to(dtype)
