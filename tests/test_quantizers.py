"""Fake quantizers: forward values, gradients against hand computations (LSQ, LSQ+, APoT, sign), the step
initializers, and the guards against empty data, NaN and vanishing steps."""

import math

import pytest
import torch

from lowbit.formats import BinaryFormat, IntRange, PerAxis, apot_levels
from lowbit.observers import aciq_alpha
from lowbit.quantizers import INITIALIZERS, FakeQuantizer, initial_step

pytestmark = pytest.mark.usefixtures("one_thread")


def _lsq_ref(x, s, qn, qp):
    """Hand LSQ: value, d/dx, d/ds (unscaled), from the paper's formulas (docs/methods.md §LSQ)."""
    v = x / s
    inside = (v >= -qn) & (v <= qp)
    val = torch.round(torch.clamp(v, -qn, qp)) * s
    dx = inside.double()
    ds = torch.where(inside, torch.round(v) - v, torch.where(v < -qn, torch.full_like(v, -qn), torch.full_like(v, qp)))
    return val, dx, ds


def test_lsq_forward_and_gradients_by_hand():
    x = torch.tensor([-2.0, -1.075, -0.74, -0.2, 0.0, 0.31, 0.52, 0.825, 1.1, 3.0], dtype=torch.float64)
    s0 = 0.25  # x / s: -8, -4.3 and 3.3 (clipped: half a step beyond the range), -2.96, ..., 12
    q = FakeQuantizer(IntRange.signed_bits(3), role="weight", init="lsq").double()  # levels -4..3
    q.initialize(x.float())
    with torch.no_grad():
        q.step.step.fill_(s0)
    xg = x.clone().requires_grad_(True)
    g = torch.linspace(-1.0, 2.0, len(x), dtype=torch.float64)
    out = q(xg)
    (out * g).sum().backward()
    val, dx, ds = _lsq_ref(x, s0, 4, 3)
    assert torch.equal(out.detach(), val)
    assert torch.allclose(xg.grad, g * dx)
    scale = 1.0 / math.sqrt(len(x) * 3)  # LSQ: 1 / sqrt(N * Q_P), N = elements sharing the step
    assert torch.allclose(q.step.step.grad, (g * ds).sum() * scale)


def test_lsq_per_channel_gradient_scale_and_activation_n():
    w = torch.randn(3, 5, dtype=torch.float64)
    q = FakeQuantizer(IntRange.signed_bits(4), role="weight", granularity=PerAxis(0), param_shape=(3,)).double()
    q.initialize(w)
    s = q.step.step.detach().clone()
    q(w).sum().backward()
    _, _, ds = _lsq_ref(w, s[:, None], 8, 7)
    assert torch.allclose(q.step.step.grad, ds.sum(1) / math.sqrt(5 * 7))
    a = FakeQuantizer(IntRange(0, 15, True), role="act").double()
    x = torch.rand(4, 6, dtype=torch.float64) * 3
    a(x).sum().backward()  # activations: N = features per sample (6)
    _, _, ds = _lsq_ref(x, a.step.step.detach(), 0, 15)
    assert torch.allclose(a.step.step.grad, ds.sum() / math.sqrt(6 * 15))


def test_lsq_plus_offset_gradient_is_zero_inside_one_outside():
    q = FakeQuantizer(IntRange.unsigned_bits(2), role="act", init="minmax", offset=True, lsq_grad_scale=False)
    x = torch.tensor([[-3.0, -0.9, 0.0, 0.4, 0.9, 5.0]])
    q.initialize(torch.tensor([[-1.0, 2.0]]))  # s = 1, z = 1: levels -1..2 in reals
    assert float(q.step.step.detach()) == pytest.approx(1.0) and float(q.offset.beta.detach()) == pytest.approx(-1.0)
    out = q(x)
    assert out.tolist() == [[-1.0, -1.0, 0.0, 0.0, 1.0, 2.0]]
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    (out * g).sum().backward()
    # d x̂/dβ: 0 inside the range, 1 outside (Bhalgat et al.): elements 0 and 5 are clipped
    assert float(q.offset.beta.grad) == pytest.approx(1.0 + 6.0)


def test_apot_codebook_gradient_and_exact_codes():
    fmt = apot_levels(4, signed=False)  # levels up to 48, step = alpha / 48
    q = FakeQuantizer(fmt, role="act", init="minmax", lsq_grad_scale=False).double()
    x = torch.tensor([[0.0, 0.11, 0.27, 0.6, 0.95, 1.7]], dtype=torch.float64)
    q.initialize(torch.tensor([[0.0, 0.96]]))  # clip 0.96 -> s = 0.02
    s = float(q.step.step.detach())
    assert s == pytest.approx(0.02)
    out = q(x)
    codes = fmt.project(torch.clamp(torch.round(x / s), 0, 48))
    assert torch.allclose(out.detach(), codes * s)
    assert set(codes.flatten().tolist()) <= set(fmt.levels)
    out.sum().backward()
    v = x / s
    ref = torch.where(v <= 48, codes - v, torch.full_like(v, 48.0)).sum()  # q - v inside, top level outside
    assert torch.allclose(q.step.step.grad, ref)


def test_sign_levels_pass_gradient_in_the_hardtanh_window():
    q = FakeQuantizer(BinaryFormat(), role="weight", step="fixed", init="mean_abs")
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5], requires_grad=True)
    q.initialize(torch.ones(1))  # step 1
    out = q(x)
    assert out.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_fake_quant_equals_the_exported_codes_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 5, 5, generator=g) * 2
    cases = [
        FakeQuantizer(IntRange.signed_bits(4), role="act", init="mse"),
        FakeQuantizer(IntRange.unsigned_bits(3), role="act", init="lsq_plus", offset=True),
        FakeQuantizer(apot_levels(5, True), role="act", init="percentile"),
        FakeQuantizer(IntRange.signed_bits(2), role="weight", granularity=PerAxis(0), param_shape=(16,), init="aciq"),
        FakeQuantizer(apot_levels(4, True), role="weight", init="apot", scale_by_std=True),
    ]
    for q in cases:
        out = q(x)
        codes, spec = q.codes(x)
        assert torch.equal(spec.dequantize(codes), out), q
        assert set(codes.unique().tolist()) <= set(q.fmt.levels)


def _q(fmt, role="weight", **kw):
    return FakeQuantizer(fmt, role=role, **kw)


def test_initializers_by_hand():
    w = torch.tensor([[0.5, -1.5, 0.25, 2.0], [0.1, 0.2, -0.1, 0.0]])
    q4 = _q(IntRange.signed_bits(4), granularity="per_channel", param_shape=(2,))
    s, z = initial_step("lsq", w, q4)
    assert z is None and torch.allclose(s, 2 * w.abs().mean(1) / math.sqrt(7))
    s, _ = initial_step("minmax", w, q4)
    assert torch.allclose(s, w.abs().amax(1) / 7)
    s, _ = initial_step("lsq_plus", w, q4)
    mu, sd = w.double().mean(1), w.double().std(1, unbiased=False)
    assert torch.allclose(s.double(), torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 8)
    x = torch.randn(10000, generator=torch.Generator().manual_seed(1)).reshape(1, -1)
    s, _ = initial_step("aciq", x, _q(IntRange.signed_bits(4), role="act"))
    b = (x.double() - x.double().mean()).abs().mean()
    assert float(s) == pytest.approx(float(aciq_alpha(4, "laplace") * b + x.double().mean().abs()) / 7, rel=1e-5)
    # ReLU-like data, unsigned levels with a free zero point: minmax covers [0, max]
    r = torch.tensor([[0.0, 1.0, 3.0]])
    s, z = initial_step("minmax", r, _q(IntRange.unsigned_bits(2), role="act", offset=True))
    assert float(s) == pytest.approx(1.0) and float(z) == 0.0


def test_mse_init_minimizes_the_error_of_the_actual_levels():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((4000,)).reshape(1, -1)  # heavy tails: min/max is poor
    for fmt in (IntRange.signed_bits(3), apot_levels(4, True)):
        q = _q(fmt, role="act")

        def err(s, fmt=fmt):
            return float((fmt.project(torch.clamp(torch.round(x / s), fmt.qmin, fmt.qmax)) * s - x).square().sum())

        s_mse, _ = initial_step("mse", x, q)
        s_max, _ = initial_step("minmax", x, q)
        assert err(s_mse) < 0.8 * err(s_max)
        grid = [float(s_max) * r for r in torch.linspace(0.02, 1.0, 400).tolist()]
        assert err(s_mse) <= min(err(s) for s in grid) * 1.001  # no 400-point grid does better


def test_bad_input_is_a_clear_error():
    q = _q(IntRange.signed_bits(4), role="act")
    with pytest.raises(ValueError, match="empty"):
        q(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="NaN"):
        q(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="unknown step initializer"):
        FakeQuantizer(IntRange.signed_bits(4), init="nope")
    q = _q(IntRange.signed_bits(4))
    q(torch.randn(10))
    with torch.no_grad():
        q.step.step.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        q(torch.randn(10))
    with torch.no_grad():
        q.step.step.fill_(-0.5)
    with pytest.warns(RuntimeWarning, match="reached zero"):
        out = q(torch.randn(10))
    assert bool(torch.isfinite(out).all()) and float(q.step.step) > 0
    assert {"lsq", "lsq_plus", "minmax", "percentile", "mse", "aciq"} <= set(INITIALIZERS)
