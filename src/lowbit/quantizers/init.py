"""Step initializers: the first value of a quantizer's step (and offset), from the tensor it quantizes.

Registered by name in :data:`INITIALIZERS`; each is ``fn(x, q) -> (step, zero_point or None)`` with
the quantizer ``q`` giving the level set, granularity and role (``"weight"`` / ``"act"``). Statistics are
taken per parameter (:meth:`~lowbit.formats.granularity.Granularity.rows`). ``Q_P`` is the largest positive
level; for a non-uniform codebook a statistic rule meant for a uniform grid is applied to the uniform
grid with as many positive levels, and its clip value mapped onto the codebook's top level [ours].

* ``lsq`` (Esser et al., ICLR 2020): ``s = 2 mean|x| / sqrt(Q_P)``.
* ``lsq_plus`` (Bhalgat et al., CVPRW 2020): weights ``s = max(|μ - 3σ|, |μ + 3σ|) / 2^(b-1)``;
  activations: the step (and offset) minimizing the quantization MSE on the batch.
* ``minmax``: the clip covers the observed range.
* ``percentile``: the clip at the 99.99th percentile of ``|x|`` (of ``x`` at both ends with an offset).
* ``mse`` (lowbit's adaptive init; Zharikov & Kuzkina's idea, docs/methods.md): the step minimizing the
  quantization MSE of the tensor with the quantizer's own level set, by a geometric grid of clip ratios
  refined by a linear grid and golden-section search; with an offset, coordinate descent over both ends.
* ``aciq`` (Banner et al., NeurIPS 2019): the analytic clip for a Laplace prior.
* ``apot`` (Li et al., ICLR 2020, authors' code): weights clip at ``3σ`` (their α = 3 on standardized
  weights); activations at ``6σ`` (their α = 6 assumed unit-scale activations; lowbit states it in units of
  the activation's standard deviation [ours]).
* ``mean_abs``: ``mean|x|`` per parameter, the XNOR-Net scale of binary weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lowbit.observers import aciq_alpha

if TYPE_CHECKING:
    from .quantizer import FakeQuantizer

__all__ = ["INITIALIZERS", "register_initializer", "initial_step"]

Init = Callable[[torch.Tensor, "FakeQuantizer"], tuple[torch.Tensor, torch.Tensor | None]]
#: name -> initializer.
INITIALIZERS: dict[str, Init] = {}
_MAX_SEARCH = 1 << 16  # values per row the MSE search looks at (a fixed-seed subsample beyond that)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def register_initializer(name: str) -> Callable[[Init], Init]:
    def deco(fn: Init) -> Init:
        if name in INITIALIZERS:
            raise ValueError(f"initializer {name!r} is registered twice")
        INITIALIZERS[name] = fn
        return fn

    return deco


def initial_step(name: str, x: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run initializer ``name`` on ``x`` for quantizer ``q``; returns (step [param shape], zero point or None)."""
    if name not in INITIALIZERS:
        raise ValueError(f"unknown step initializer {name!r}; known: {', '.join(sorted(INITIALIZERS))}")
    if x.numel() == 0:
        raise ValueError(f"cannot initialize the step of {q.describe()} on an empty tensor")
    x = x.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"cannot initialize the step of {q.describe()}: the tensor holds NaN or Inf")
    step, zp = INITIALIZERS[name](x, q)
    step = torch.where(torch.isfinite(step) & (step > 0), step, torch.ones_like(step))  # all-zero rows
    return step.reshape(q.param_shape), None if zp is None else zp.reshape(q.param_shape)


# ------------------------------------------------------------------------------------------ helpers

def _rows(x: torch.Tensor, q: FakeQuantizer) -> torch.Tensor:
    r = q.granularity.rows(x)
    if r.shape[1] > _MAX_SEARCH:
        g = torch.Generator().manual_seed(0)
        r = r[:, torch.randperm(r.shape[1], generator=g)[:_MAX_SEARCH]]
    return r


def _uniform_equivalent(s_u: torch.Tensor, q: FakeQuantizer) -> torch.Tensor:
    """A step chosen for a uniform grid with the codebook's number of positive levels -> the codebook step."""
    fmt = q.levels.fmt
    if fmt.uniform:
        return s_u
    return s_u * max(fmt.positive_levels, 1) / q.levels.q_p


def _from_range(lo: torch.Tensor, hi: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(step, zero point) covering ``[lo, hi]``: with a learned offset the whole range maps onto
    ``[qmin, qmax]``; without, the clip ``max(|lo|, |hi|)`` maps onto ``Q_P``."""
    fmt = q.levels.fmt
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if q.offset is None:
        return torch.maximum(-lo if fmt.signed else torch.zeros_like(lo), hi) / q.levels.q_p, None
    s = (hi - lo) / (fmt.qmax - fmt.qmin)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.clamp(torch.round(fmt.qmin - lo / s), fmt.qmin, fmt.qmax)
    return s, z


def _from_clip(c: torch.Tensor, rows: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A symmetric clip ``c``: ``[-c, c]`` where the data has negative values, ``[0, c]`` where not."""
    neg = rows.amin(1) < 0
    return _from_range(torch.where(neg, -c, torch.zeros_like(c)), c, q)


def _sq_error(rows: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, q: FakeQuantizer) -> torch.Tensor:
    """Per-row sum of squared quantization errors with steps ``s`` [P] and zero points ``z`` [P]."""
    s2 = s[:, None]
    z2 = None if z is None else z[:, None]
    codes = q.levels.quantize(rows / s2, z2)
    deq = codes * s2 if z2 is None else (codes - z2) * s2
    return (deq - rows).square().sum(1, dtype=torch.float64)


def _minimize_ratio(err: Callable[[torch.Tensor], torch.Tensor], p: int, grid: int = 32, fine: int = 24,
                    golden_iters: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ratio r in (0, 1] minimizing ``err(r) -> [P]``: a geometric grid from 1 down to 0.01, a
    linear grid between the neighbours of its best point (the error is a sawtooth in the clip, not unimodal),
    then golden-section search between the neighbours of the best fine point. Returns (ratio, error), never
    worse than any grid point evaluated."""
    ratios = torch.logspace(0.0, -2.0, grid, dtype=torch.float64)
    errs = torch.stack([err(torch.full((p,), float(r), dtype=torch.float64)) for r in ratios])  # [G, P]
    k = errs.argmin(0)
    best_r, best_e = ratios[k], errs.gather(0, k[None])[0]
    lo = ratios[torch.clamp(k + 1, max=grid - 1)]
    hi = ratios[torch.clamp(k - 1, min=0)]
    t = torch.linspace(0.0, 1.0, fine, dtype=torch.float64)[:, None]
    cand = lo + (hi - lo) * t  # [F, P]
    ferrs = torch.stack([err(c) for c in cand])
    j = ferrs.argmin(0)
    better = ferrs.gather(0, j[None])[0] < best_e
    best_r = torch.where(better, cand.gather(0, j[None])[0], best_r)
    best_e = torch.where(better, ferrs.gather(0, j[None])[0], best_e)
    a = cand.gather(0, torch.clamp(j - 1, min=0)[None])[0]
    b = cand.gather(0, torch.clamp(j + 1, max=fine - 1)[None])[0]
    for _ in range(golden_iters):
        c1, c2 = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
        f1, f2 = err(c1), err(c2)
        left = f1 < f2  # the minimum lies in [a, c2]
        b = torch.where(left, c2, b)
        a = torch.where(left, a, c1)
        for c, f in ((c1, f1), (c2, f2)):
            better = f < best_e
            best_r = torch.where(better, c, best_r)
            best_e = torch.where(better, f, best_e)
    return best_r, best_e


# ----------------------------------------------------------------------------------- initializers

@register_initializer("lsq")
def _lsq(x: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = q.granularity.rows(x)
    n_pos = max(q.levels.fmt.positive_levels, 1)
    s = _uniform_equivalent(2.0 * rows.abs().mean(1) / math.sqrt(n_pos), q)
    if q.offset is None:
        return s, None
    return _from_clip(s * q.levels.q_p, rows, q)


@register_initializer("lsq_plus")
def _lsq_plus(x: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    if q.role != "weight":
        return _mse(x, q)
    rows = q.granularity.rows(x).to(torch.float64)
    mu, sigma = rows.mean(1), rows.std(1, unbiased=False)
    m = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs())
    s = _uniform_equivalent((m / (q.levels.fmt.n_levels / 2.0)).to(torch.float32), q)
    if q.offset is None:
        return s, None
    return _from_clip(s * q.levels.q_p, rows.to(torch.float32), q)


@register_initializer("minmax")
def _minmax(x: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = q.granularity.rows(x)
    return _from_range(rows.amin(1), rows.amax(1), q)


@register_initializer("percentile")
def _percentile(x: torch.Tensor, q: FakeQuantizer, p: float = 0.9999) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = _rows(x, q)
    k = max(1, min(rows.shape[1], math.ceil(p * rows.shape[1])))
    if q.offset is None:
        return _from_clip(rows.abs().kthvalue(k, dim=1).values, rows, q)
    lo = -(-rows).kthvalue(k, dim=1).values
    return _from_range(lo, rows.kthvalue(k, dim=1).values, q)


@register_initializer("aciq")
def _aciq(x: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = q.granularity.rows(x).to(torch.float64)
    mu = rows.mean(1)
    b = (rows - mu[:, None]).abs().mean(1)
    bits = max(1, round(q.levels.fmt.effective_bits))
    one_sided = rows.amin(1) >= 0
    alpha = torch.where(one_sided, aciq_alpha(bits + 1, "laplace") * b, aciq_alpha(bits, "laplace") * b)
    amax = rows.abs().amax(1)
    c = torch.minimum(torch.where(one_sided, mu.clamp(min=0), mu.abs()) + alpha, amax)
    return _from_clip(c.to(torch.float32), rows.to(torch.float32), q)


@register_initializer("apot")
def _apot(x: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = q.granularity.rows(x)
    c = (3.0 if q.role == "weight" else 6.0) * rows.std(1, unbiased=False)
    return _from_clip(torch.minimum(c, rows.abs().amax(1)), rows, q)


@register_initializer("mean_abs")
def _mean_abs(x: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    return q.granularity.rows(x).abs().mean(1), None


@register_initializer("mse")
def _mse(x: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = _rows(x, q)
    p = rows.shape[0]
    if q.offset is None:
        amax = rows.abs().amax(1) if q.levels.fmt.signed else rows.clamp(min=0).amax(1)

        def err(r: torch.Tensor) -> torch.Tensor:
            return _sq_error(rows, torch.clamp(r.float() * amax / q.levels.q_p, min=1e-30), None, q)

        return _minimize_ratio(err, p)[0].float() * amax / q.levels.q_p, None
    lo0 = rows.amin(1).clamp(max=0)
    hi0 = rows.amax(1).clamp(min=0)

    def err_of(rlo: torch.Tensor, rhi: torch.Tensor) -> torch.Tensor:
        s, z = _from_range(rlo.float() * lo0, rhi.float() * hi0, q)
        return _sq_error(rows, torch.clamp(s, min=1e-30), z, q)

    # both ends shrink together, then each end on its own (coordinate descent; a step never raises the error)
    r, e = _minimize_ratio(lambda t: err_of(t, t), p)
    rlo, rhi = r, r
    for end in ("hi", "lo"):
        if end == "hi":
            cand, ce = _minimize_ratio(lambda t, lo=rlo: err_of(lo, t), p)
        else:
            cand, ce = _minimize_ratio(lambda t, hi=rhi: err_of(t, hi), p)
        better = ce < e
        e = torch.where(better, ce, e)
        if end == "hi":
            rhi = torch.where(better, cand, rhi)
        else:
            rlo = torch.where(better, cand, rlo)
    return _from_range(rlo.float() * lo0, rhi.float() * hi0, q)
