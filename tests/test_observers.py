"""Observers: range choice by hand computation, on known distributions, and error handling."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats import INT8_WEIGHT, UINT8_ACT, QFormat, fake_quantize
from lowbit.observers import (
    ACIQ_ALPHA,
    OBSERVERS,
    ACIQObserver,
    KLObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    RunningHistogram,
    aciq_alpha,
    aciq_alpha_numeric,
    aciq_bias_correction,
    make_observer,
)

INT8_ASYM = QFormat(bits=8, signed=True, symmetric=False)
INT4_SYM = QFormat(bits=4, signed=True, symmetric=True, narrow=True)
INT4_ASYM = QFormat(bits=4, signed=True, symmetric=False)
UINT4_ASYM = QFormat(bits=4, signed=False, symmetric=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many small tensor ops: intra-op threads only add contention on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quant_mse(x: torch.Tensor, obs, fmt: QFormat, axis: int | None = None) -> float:
    s, z = obs.qparams(fmt)
    return float(((fake_quantize(x, s, z, fmt, axis) - x).double() ** 2).mean())


def observe_all(obs, x: torch.Tensor, chunks: int = 1):
    for c in x.chunk(chunks):
        obs.observe(c)
    return obs


# --- min/max: hand computations -------------------------------------------------------------------


def test_minmax_uint8_asymmetric_hand_computed():
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    obs = observe_all(MinMaxObserver(), x)
    lo, hi = obs.range(UINT8_ACT)
    assert lo.shape == () and hi.shape == ()
    assert lo.item() == -1.0 and hi.item() == 3.0
    scale, zp = obs.qparams(UINT8_ACT)
    assert scale.item() == pytest.approx(4 / 255, rel=1e-6)
    assert zp.item() == 64  # round(0 - (-1) / (4/255)) = round(63.75)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32


def test_minmax_accumulates_over_calls():
    obs = MinMaxObserver()
    obs.observe(torch.tensor([0.0, 1.0]))
    obs.observe(torch.tensor([-2.0, 0.5]))
    obs.observe(torch.tensor([[0.25]]))
    assert obs.observed == 3 and obs.numel == 5
    lo, hi = obs.range(UINT8_ACT)
    assert (lo.item(), hi.item()) == (-2.0, 1.0)


def test_minmax_per_channel_symmetric_int8_narrow():
    w = torch.tensor([[-0.5, 0.25, 0.1], [2.0, -1.27, 0.0], [0.0, 0.0, 0.0], [0.3, 0.2, 0.1]])
    obs = observe_all(MinMaxObserver(axis=0), w)
    lo, hi = obs.range(INT8_WEIGHT)
    assert lo.shape == (4,) and hi.shape == (4,)
    torch.testing.assert_close(lo, torch.tensor([-0.5, -1.27, 0.0, 0.1]))
    scale, zp = obs.qparams(INT8_WEIGHT)
    torch.testing.assert_close(scale[[0, 1, 3]], torch.tensor([0.5, 2.0, 0.3]) / 127)
    assert scale[2].item() > 0  # all-zero channel: eps scale, no division by zero
    assert zp.tolist() == [0, 0, 0, 0]
    q = fake_quantize(w, scale, zp, INT8_WEIGHT, axis=0)
    assert (q - w).abs().max() <= scale.max() / 2 + 1e-7


def test_per_channel_other_axis_shapes():
    g = gen(1)
    x = torch.randn(4, 6, 3, generator=g)
    for name in OBSERVERS:
        obs = make_observer(name, axis=1)
        obs.observe(x)
        lo, hi = obs.range(INT8_ASYM)
        assert lo.shape == (6,) and hi.shape == (6,), name
        s, z = obs.qparams(INT8_WEIGHT)
        assert s.shape == (6,) and z.shape == (6,), name
        assert (lo <= hi).all()
    obs = observe_all(MinMaxObserver(axis=-2), x)
    lo, hi = obs.range(INT8_ASYM)
    torch.testing.assert_close(lo, x.amin(dim=(0, 2)))
    torch.testing.assert_close(hi, x.amax(dim=(0, 2)))


def test_per_channel_channel_count_mismatch():
    obs = MinMaxObserver(axis=0)
    obs.observe(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="channels"):
        obs.observe(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="out of range"):
        MinMaxObserver(axis=3).observe(torch.zeros(3, 4))


# --- percentile ---------------------------------------------------------------------------------


def test_percentile_uniform_asymmetric():
    x = torch.rand(400_000, generator=gen(2)) * 2.0 - 0.5  # U[-0.5, 1.5)
    obs = observe_all(PercentileObserver(percentile=99.0), x, chunks=7)
    lo, hi = obs.range(UINT8_ACT)
    assert lo.item() == pytest.approx(-0.5 + 0.02, abs=3e-3)
    assert hi.item() == pytest.approx(1.5 - 0.02, abs=3e-3)


def test_percentile_gaussian_symmetric_uses_magnitude():
    x = torch.randn(400_000, generator=gen(3))
    obs = observe_all(PercentileObserver(percentile=99.0), x, chunks=5)
    lo, hi = obs.range(INT8_WEIGHT)
    assert hi.item() == pytest.approx(2.5758, rel=0.01)  # P99 of |N(0,1)|
    assert lo.item() == -hi.item()
    lo, hi = obs.range(INT8_ASYM)
    assert hi.item() == pytest.approx(2.3263, rel=0.01)  # P99 of N(0,1)
    assert lo.item() == pytest.approx(-2.3263, rel=0.01)


def test_percentile_100_is_minmax_and_validation():
    x = torch.randn(10_000, generator=gen(4))
    p = observe_all(PercentileObserver(percentile=100.0), x)
    m = observe_all(MinMaxObserver(), x)
    for a, b in zip(p.range(INT8_ASYM), m.range(INT8_ASYM), strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    with pytest.raises(ValueError):
        PercentileObserver(percentile=120)
    with pytest.raises(ValueError):
        PercentileObserver(percentile=10)


def test_percentile_per_channel_exact():
    w = torch.randn(8, 500, generator=gen(5)) * torch.linspace(0.1, 2.0, 8)[:, None]
    obs = observe_all(PercentileObserver(axis=0, percentile=95.0), w)
    lo, hi = obs.range(INT8_ASYM)
    torch.testing.assert_close(hi, torch.quantile(w, 0.95, dim=1))
    torch.testing.assert_close(lo, torch.quantile(w, 0.05, dim=1))
    lo, hi = obs.range(INT8_WEIGHT)
    torch.testing.assert_close(hi, torch.quantile(w.abs(), 0.95, dim=1))


# --- MSE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [UINT8_ACT, INT8_WEIGHT, INT4_SYM, UINT4_ASYM])
def test_mse_never_worse_than_minmax_with_outliers(fmt):
    x = torch.randn(200_000, generator=gen(6))
    x[:5] = torch.tensor([30.0, -12.0, 25.0, 8.0, -40.0])
    mse = observe_all(MSEObserver(), x, chunks=4)
    mm = observe_all(MinMaxObserver(), x)
    e_mse, e_mm = quant_mse(x, mse, fmt), quant_mse(x, mm, fmt)
    assert e_mse <= e_mm * (1 + 1e-3)
    assert e_mse < 0.8 * e_mm  # clipping the few outliers pays off


def test_mse_never_worse_on_clean_uniform_data():
    x = torch.rand(100_000, generator=gen(7)) * 4 - 1
    for fmt in (UINT8_ACT, INT4_SYM):
        mse = observe_all(MSEObserver(), x)
        mm = observe_all(MinMaxObserver(), x)
        assert quant_mse(x, mse, fmt) <= quant_mse(x, mm, fmt) * (1 + 1e-3)


@pytest.mark.parametrize("fmt", [INT8_ASYM, INT4_SYM, UINT4_ASYM])
def test_mse_strictly_better_on_heavy_tailed(fmt):
    d = torch.distributions.StudentT(torch.tensor(2.5))
    torch.manual_seed(8)
    x = d.sample((100_000,))
    mse = observe_all(MSEObserver(), x, chunks=3)
    mm = observe_all(MinMaxObserver(), x)
    pc = observe_all(PercentileObserver(percentile=99.9), x)
    e_mse = quant_mse(x, mse, fmt)
    assert e_mse < 0.9 * quant_mse(x, mm, fmt)
    assert e_mse <= quant_mse(x, pc, fmt) * 1.02


def test_mse_per_channel_exact_never_worse():
    g = gen(9)
    w = torch.randn(16, 288, generator=g) * torch.logspace(-2, 0, 16)[:, None]
    torch.manual_seed(9)
    w[3] = torch.distributions.StudentT(torch.tensor(2.0)).sample((288,)) * 0.1  # heavy-tailed channel
    mse = observe_all(MSEObserver(axis=0), w)
    mm = observe_all(MinMaxObserver(axis=0), w)
    for fmt in (INT8_WEIGHT, INT4_SYM):
        s1, z1 = mse.qparams(fmt)
        s2, z2 = mm.qparams(fmt)
        e1 = ((fake_quantize(w, s1, z1, fmt, 0) - w) ** 2).sum(1)
        e2 = ((fake_quantize(w, s2, z2, fmt, 0) - w) ** 2).sum(1)
        assert (e1 <= e2 * (1 + 1e-5)).all()
    assert e1[3] < 0.95 * e2[3]  # 4 bits: clipping the heavy tail pays off


# --- KL -----------------------------------------------------------------------------------------


def test_kl_clips_far_outlier_on_gaussian():
    x = torch.randn(200_000, generator=gen(10))
    x[0] = 100.0
    obs = observe_all(KLObserver(), x, chunks=5)
    lo, hi = obs.range(INT8_WEIGHT)
    assert hi.item() < 10.0  # far below the max of 100
    assert hi.item() > 3.0  # but keeps the bulk of the Gaussian
    assert lo.item() == -hi.item()
    lo, hi = obs.range(INT8_ASYM)
    assert hi.item() < 0.5 * 100.0 and lo.item() < -2.5


def test_kl_close_to_max_on_uniform():
    x = torch.rand(200_000, generator=gen(11)) * 2 - 1
    obs = observe_all(KLObserver(), x)
    lo, hi = obs.range(INT8_WEIGHT)
    assert hi.item() >= 0.95 * x.abs().max().item()


def test_kl_relu_uint8_uses_full_positive_range():
    x = torch.relu(torch.randn(300_000, generator=gen(12)))
    obs = observe_all(KLObserver(), x, chunks=3)
    lo, hi = obs.range(UINT8_ACT)
    assert lo.item() == 0.0
    assert 2.0 < hi.item() <= x.max().item()
    assert KLObserver._levels(UINT8_ACT) == 255
    assert KLObserver._levels(INT8_WEIGHT) == 128


def _kl_spec(hist, start: int, stop: int, levels: int) -> float:
    """KL(P || Q) of one window written from the description (TensorRT's calibrator, Migacz 2017), with plain
    Python loops: P = the window with the mass outside it added to its first / last bin; Q = the window's own
    bins merged into ``levels`` groups of (stop - start) // levels bins (the last group takes the rest), each
    group's mass spread evenly over its bins that are non-empty in P; both normalized; q floored at 1e-12."""
    n = stop - start
    p = [float(v) for v in hist[start:stop]]
    p[0] += float(sum(hist[:start]))
    p[-1] += float(sum(hist[stop:]))
    width = n // levels
    q = [0.0] * n
    for g in range(levels):
        lo, hi = g * width, (n if g == levels - 1 else (g + 1) * width)
        mass = float(sum(hist[start + lo : start + hi]))
        nonempty = [i for i in range(lo, hi) if p[i] > 0]
        for i in nonempty:
            q[i] = mass / len(nonempty)
    ps, qs = sum(p), sum(q)
    if ps <= 0 or qs <= 0:
        return math.inf
    return sum((pi / ps) * math.log((pi / ps) / max(qi / qs, 1e-12)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def test_kl_by_hand():
    import numpy as np

    from lowbit.observers.kl import kl_divergence_clipped, kl_divergences

    h = np.array([2.0, 1.0, 1.0, 4.0])
    # P = [2, 1, 1 + 4] / 8, Q = (2 + 1 + 1) / 3 per bin / 4
    want = 0.25 * math.log(0.25 * 3) + 0.125 * math.log(0.125 * 3) + 0.625 * math.log(0.625 * 3)
    assert kl_divergence_clipped(h, 0, 3, 1) == pytest.approx(want, rel=1e-12)
    assert kl_divergences(h, np.array([0]), np.array([3]), 1)[0] == pytest.approx(want, rel=1e-12)
    same = np.array([1.0, 1.0, 2.0, 0.0])  # Q reproduces P exactly: KL 0
    assert kl_divergence_clipped(same, 0, 4, 2) == pytest.approx(0.0, abs=1e-15)


def test_kl_matches_independent_spec():
    import numpy as np

    from lowbit.observers.kl import kl_divergence_clipped, kl_divergences

    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(20, 300))
        h = rng.poisson(rng.uniform(0.2, 5), n).astype(np.float64)
        h[rng.random(n) < 0.3] = 0  # empty bins, also at window edges
        if trial % 3 == 0:
            h[0] = 1000.0  # a zero spike
        levels = int(rng.integers(2, 20))
        starts = rng.integers(0, n - levels, 12)
        stops = np.minimum(starts + rng.integers(levels, n + 1, 12), n)
        keep = stops - starts >= levels
        starts, stops = starts[keep], stops[keep]
        spec = np.array([_kl_spec(h, int(a), int(b), levels) for a, b in zip(starts, stops, strict=True)])
        one = np.array([kl_divergence_clipped(h, a, b, levels) for a, b in zip(starts, stops, strict=True)])
        np.testing.assert_allclose(one, spec, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(kl_divergences(h, starts, stops, levels), spec, rtol=1e-9, atol=1e-12)


# --- ACIQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", ["laplace", "gauss"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_aciq_numeric_minimizer_reproduces_table(prior, bits):
    # the paper's figures agree with the exact minimizer to two decimals (some are truncated)
    assert abs(aciq_alpha_numeric(bits, prior) - ACIQ_ALPHA[prior][bits]) < 0.01
    assert aciq_alpha(bits, prior) == ACIQ_ALPHA[prior][bits]


def test_aciq_numeric_other_bits_monotone():
    lap = [aciq_alpha(b, "laplace") for b in range(2, 10)]
    gau = [aciq_alpha(b, "gauss") for b in range(2, 10)]
    assert lap == sorted(lap) and gau == sorted(gau)
    assert aciq_alpha(8, "laplace") == pytest.approx(9.89, abs=0.01)
    assert aciq_alpha(8, "gauss") == pytest.approx(3.92, abs=0.01)


def test_aciq_laplace_estimate_and_range():
    torch.manual_seed(13)
    mu, b = 0.5, 2.0
    x = torch.distributions.Laplace(mu, b).sample((400_000,))
    obs = observe_all(make_observer("aciq_laplace"), x, chunks=10)
    m, b_hat = obs.stats()
    assert m.item() == pytest.approx(mu, abs=0.02)
    assert b_hat.item() == pytest.approx(b, rel=0.02)
    lo, hi = obs.range(INT4_ASYM)  # two-sided data, 4 bits: mu ± 5.03 b
    assert hi.item() == pytest.approx(mu + 5.03 * b, rel=0.03)
    assert lo.item() == pytest.approx(mu - 5.03 * b, rel=0.03)
    lo, hi = obs.range(QFormat(3, True, True, True))
    assert hi.item() == pytest.approx(abs(mu) + 3.89 * b, rel=0.03) and lo.item() == -hi.item()
    # the histogram estimate of b agrees with the exact one
    exact = (x.double() - x.double().mean()).abs().mean().item()
    assert b_hat.item() == pytest.approx(exact, rel=1e-3)


def test_aciq_gauss_estimate_and_range():
    torch.manual_seed(14)
    x = torch.randn(200_000) * 3.0 + 1.0
    obs = observe_all(make_observer("aciq_gauss"), x, chunks=8)
    m, sigma = obs.stats()
    assert m.item() == pytest.approx(x.double().mean().item(), abs=1e-6)
    assert sigma.item() == pytest.approx(x.double().std(unbiased=False).item(), rel=1e-6)
    lo, hi = obs.range(INT4_ASYM)
    assert hi.item() == pytest.approx(1.0 + 2.55 * 3.0, rel=0.02)
    lo, hi = obs.range(UINT8_ACT)  # 8 bits: alpha beyond the data, so intersected with [min, max]
    assert lo.item() == pytest.approx(x.min().item()) or lo.item() > x.min().item()
    assert hi.item() <= x.max().item() + 1e-6


def test_aciq_one_sided_relu_data():
    torch.manual_seed(15)
    x = torch.relu(torch.distributions.Laplace(0.0, 1.0).sample((200_000,)))
    obs = observe_all(ACIQObserver(prior="laplace"), x)
    m, b = obs.stats()
    lo, hi = obs.range(UINT4_ASYM)  # all 16 codes on [0, T]: alpha for 5 bits
    assert lo.item() == 0.0
    assert hi.item() == pytest.approx(m.item() + aciq_alpha(5, "laplace") * b.item(), rel=1e-5)
    assert hi.item() <= x.max().item()


def test_aciq_per_channel_weights():
    g = gen(16)
    w = torch.randn(8, 400, generator=g) * torch.linspace(0.05, 1.0, 8)[:, None]
    obs = observe_all(make_observer("aciq_gauss", axis=0), w)
    lo, hi = obs.range(INT4_SYM)
    assert hi.shape == (8,)
    w64 = w.double()
    expect = torch.minimum(w64.mean(1).abs() + 2.55 * w64.std(1, unbiased=False), w64.abs().amax(1)).float()
    torch.testing.assert_close(hi, expect)
    torch.testing.assert_close(lo, -hi)


# --- ACIQ bias correction -------------------------------------------------------------------------


def _quantize_per_channel(w: torch.Tensor, fmt: QFormat, axis: int = 0) -> torch.Tensor:
    obs = observe_all(MinMaxObserver(axis=axis), w)
    s, z = obs.qparams(fmt)
    return fake_quantize(w, s, z, fmt, axis)


def test_bias_correction_matches_norms_and_means():
    g = gen(17)
    w = torch.randn(16, 3, 3, 3, generator=g) * 0.2 + torch.linspace(-0.1, 0.1, 16)[:, None, None, None]
    wq = _quantize_per_channel(w, QFormat(3, True, True, True))
    flat = w.double().reshape(16, -1)
    mu = flat.mean(1)
    norm = (flat - mu[:, None]).norm(dim=1)

    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = t.double().reshape(16, -1)
        m = f.mean(1)
        return m, (f - m[:, None]).norm(dim=1)

    mq, nq = stats(wq)
    assert not torch.allclose(nq, norm, rtol=1e-3)  # quantization changed them

    # the paper's formula: centred norms match exactly, means up to the factor xi ~ 1
    out = aciq_bias_correction(w, wq)
    assert out.shape == w.shape and out.dtype == w.dtype
    m1, n1 = stats(out)
    torch.testing.assert_close(n1, norm, rtol=1e-5, atol=1e-6)
    xi = norm / nq
    torch.testing.assert_close(m1, xi * mu, rtol=1e-5, atol=1e-6)

    # preserve_mean: both match exactly
    out2 = aciq_bias_correction(w, wq, preserve_mean=True)
    m2, n2 = stats(out2)
    torch.testing.assert_close(m2, mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n2, norm, rtol=1e-5, atol=1e-6)


def test_bias_correction_axis_and_errors():
    g = gen(18)
    w = torch.randn(5, 7, generator=g)
    wq = _quantize_per_channel(w, INT4_SYM, axis=1)
    out = aciq_bias_correction(w, wq, axis=1, preserve_mean=True)
    torch.testing.assert_close(out.mean(0), w.mean(0), rtol=1e-5, atol=1e-6)
    # a channel quantized to a constant keeps xi = 1 (mean shift only), no NaN
    w2 = torch.tensor([[1.0, 1.001, 0.999], [0.5, -0.5, 0.0]])
    out2 = aciq_bias_correction(w2, torch.tensor([[1.0, 1.0, 1.0], [0.5, -0.5, 0.0]]))
    assert torch.isfinite(out2).all()
    with pytest.raises(TypeError, match="dequantized"):
        aciq_bias_correction(w, torch.zeros(5, 7, dtype=torch.int8))
    with pytest.raises(ValueError, match="shape"):
        aciq_bias_correction(w, w[:, :3])


# --- errors and registry ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_rejected(name, bad):
    obs = make_observer(name)
    x = torch.randn(100)
    x[17] = bad
    with pytest.raises(ValueError, match="NaN"):
        obs.observe(x)
    assert obs.observed == 0


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_empty_observer_errors(name):
    for axis in (None, 0):
        obs = make_observer(name, axis=axis)
        with pytest.raises(ValueError, match="observer has seen no data"):
            obs.range(UINT8_ACT)
        with pytest.raises(ValueError, match="observer has seen no data"):
            obs.qparams(INT8_WEIGHT)
    with pytest.raises(ValueError, match="empty"):
        make_observer(name).observe(torch.zeros(0))


def test_registry_and_unknown_name():
    assert set(OBSERVERS) == {"minmax", "percentile", "mse", "kl", "aciq_laplace", "aciq_gauss"}
    assert isinstance(make_observer("percentile", percentile=99.0), PercentileObserver)
    assert make_observer("percentile", percentile=99.0).percentile == 99.0
    assert make_observer("aciq_gauss").prior == "gauss"
    assert make_observer("minmax", axis=0).axis == 0
    with pytest.raises(ValueError, match="minmax") as e:
        make_observer("entropy")
    for name in OBSERVERS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="prior"):
        ACIQObserver(prior="cauchy")


def test_all_zero_data_is_harmless():
    for name in OBSERVERS:
        obs = make_observer(name)
        obs.observe(torch.zeros(1000))
        s, z = obs.qparams(UINT8_ACT)
        assert torch.isfinite(s) and s > 0, name
        obs.observe(torch.randn(1000, generator=gen(19)))  # then the range grows from zero
        lo, hi = obs.range(INT8_ASYM)
        assert lo < 0 < hi, name


# --- histograms and growing ranges ----------------------------------------------------------------


def test_running_histogram_rebinning_is_exact():
    g = gen(20)
    h = RunningHistogram(bins=64)
    parts = [torch.randn(1000, generator=g) * (3.0**k) for k in range(6)]
    for p in parts:
        h.add(p)
    x = torch.cat(parts).double()
    count, s1, s2, edges = h.signed()
    assert count.sum().item() == x.numel()
    assert s1.sum().item() == pytest.approx(x.sum().item(), rel=1e-9, abs=1e-9)
    assert s2.sum().item() == pytest.approx((x * x).sum().item(), rel=1e-9)
    assert h.limit >= x.abs().max().item()
    # every bin's values lie within its edges: mean of bin inside [left, right]
    nz = count > 0
    mean = s1[nz] / count[nz]
    assert (mean >= edges[:-1][nz] - 1e-9).all() and (mean <= edges[1:][nz] + 1e-9).all()
    # the re-binned histogram equals a direct one on the final grid
    direct = torch.histc(x, bins=128, min=-h.limit, max=h.limit)
    assert (direct - count).abs().sum() <= 2  # only values exactly on an edge may differ


@pytest.mark.parametrize("name", ["kl", "mse", "percentile", "aciq_laplace"])
def test_many_batches_with_growing_range(name):
    torch.manual_seed(21)
    batches = [torch.randn(8_000) * (1.0 + 0.15 * k) for k in range(30)]
    x = torch.cat(batches)
    grown = make_observer(name)
    for b in batches:
        grown.observe(b)
    once = observe_all(make_observer(name), x)
    assert grown.observed == 30
    for fmt in (INT8_WEIGHT, UINT4_ASYM):
        lo_g, hi_g = grown.range(fmt)
        lo_o, hi_o = once.range(fmt)
        tol = 0.15 if name == "kl" else 0.08  # KL's threshold moves with the bin resolution
        assert hi_g.item() == pytest.approx(hi_o.item(), rel=tol), fmt
        assert lo_g.item() == pytest.approx(lo_o.item(), rel=tol), fmt
        amax = x.abs().max().item()
        assert -amax <= lo_g.item() < 0 < hi_g.item() <= amax
        if not fmt.symmetric:
            assert x.min().item() <= lo_g.item() and hi_g.item() <= x.max().item()
        mm = observe_all(MinMaxObserver(), x)
        assert quant_mse(x, grown, fmt) < 1.5 * quant_mse(x, mm, fmt)
        if name == "mse":
            assert quant_mse(x, grown, fmt) <= quant_mse(x, mm, fmt) * (1 + 1e-3)


def test_aciq_alpha_validation():
    with pytest.raises(ValueError):
        aciq_alpha_numeric(0, "laplace")
    assert math.isfinite(aciq_alpha_numeric(16, "gauss"))
