"""Binarizers (lowbit.quantizers.binary): forward values and gradients against hand computations, the δ
schedules, annealing by training steps, latent clipping, XNOR scales, and the ±1 codes they export."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.formats import BinaryFormat, QSpec
from lowbit.quantizers import Binarizer, delta_at, expected_sign

X = torch.tensor([-2.0, -1.0, -0.6, -0.25, 0.0, 0.25, 0.6, 1.0, 2.0])


def _grad(b: Binarizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = b(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad


def test_straight_through_sign_forward_and_window():
    b = Binarizer(role="act", kind="ste").train()
    y, g = _grad(b, X)
    assert torch.equal(y, torch.tensor([-1.0, -1, -1, -1, -1, 1, 1, 1, 1]))  # sign(0) = -1, as the bits read it
    assert torch.equal(g, torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 1, 0]))  # |x| <= 1 passes


@pytest.mark.parametrize("delta", [0.5, 1.5])
def test_ubq_uniform_noise_expected_sign_and_derivative(delta):
    b = Binarizer(role="act", kind="ubq", noise="uniform", delta_start=delta, schedule="linear").train()
    b.enable(100)  # delta = delta_start at progress 0
    y, g = _grad(b, X)
    # E[sign(x + n)], n ~ U(-δ, δ): (x + δ)/(2δ) of the mass is above -x -> 2 P - 1 = x/δ inside
    want = torch.tensor([max(-1.0, min(1.0, v / delta)) for v in X.tolist()])
    want_g = torch.tensor([1.0 / delta if abs(v) < delta else 0.0 for v in X.tolist()])
    assert torch.allclose(y, want, atol=1e-7, rtol=0)
    assert torch.allclose(g, want_g, atol=1e-7, rtol=0)


def test_ubq_gaussian_noise_expected_sign_and_derivative():
    delta = 0.8
    b = Binarizer(role="act", kind="ubq", noise="gauss", delta_start=delta).train()
    b.enable(100)
    y, g = _grad(b, X)
    for v, yv, gv in zip(X.tolist(), y.tolist(), g.tolist(), strict=True):
        assert yv == pytest.approx(math.erf(v / (delta * math.sqrt(2))), abs=1e-6)
        assert gv == pytest.approx(2 / (delta * math.sqrt(2 * math.pi)) * math.exp(-v * v / (2 * delta * delta)),
                                   abs=1e-6)


def test_ubq_weights_in_units_of_their_channel_mean_abs():
    w = torch.tensor([[0.1, -0.2, 0.3], [2.0, -4.0, 0.0]])
    b = Binarizer(role="weight", kind="ubq", delta_start=1.0, schedule="linear", clip_latent=False).train()
    b.enable(10)
    y, g = _grad(b, w)
    unit = torch.tensor([[0.2], [2.0]])  # mean |W| per output channel
    assert torch.allclose(y, torch.clamp(w / unit, -1, 1), atol=1e-7, rtol=0)
    assert torch.allclose(g, ((w / unit).abs() < 1).float() / unit, atol=1e-6, rtol=0)


def test_xnor_scale_and_latent_clip():
    w = torch.nn.Parameter(torch.tensor([[0.5, -1.5, 0.1], [-0.2, 0.2, 3.0]]))
    b = Binarizer(role="weight", kind="ste", xnor_scale=True, param_shape=(2,)).train()
    y = b(w)
    assert torch.equal(w.detach(), torch.tensor([[0.5, -1.0, 0.1], [-0.2, 0.2, 1.0]]))  # clipped in place
    alpha = torch.tensor([[1.6 / 3], [1.4 / 3]])  # mean |W| after clipping
    assert torch.allclose(y, torch.sign(w.detach()) * alpha, atol=1e-7, rtol=0)
    y.sum().backward()
    assert torch.allclose(w.grad, alpha.expand(2, 3), atol=1e-7, rtol=0)  # α detached, window open (|w| <= 1)
    codes, spec = b.codes(w)
    assert torch.equal(codes, torch.tensor([[1, -1, 1], [-1, 1, 1]], dtype=torch.int8))
    assert spec.format == BinaryFormat() and torch.allclose(spec.scale_tensor(), alpha.reshape(-1))
    assert torch.equal(spec.dequantize(codes), y.detach())


def test_no_clip_in_eval_or_for_activations():
    w = torch.nn.Parameter(torch.tensor([[3.0, -2.0]]))
    Binarizer(role="weight", kind="ste").eval()(w)
    Binarizer(role="act", kind="ste").train()(w)
    assert torch.equal(w.detach(), torch.tensor([[3.0, -2.0]]))


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
def test_delta_schedules_end_exactly_and_decrease(schedule):
    assert delta_at(schedule, 0.0, 2.0, 0.0) == 2.0
    assert delta_at(schedule, 1.0, 2.0, 0.0) == 0.0
    assert delta_at(schedule, 1.0, 2.0, 0.25) == 0.25
    vals = [delta_at(schedule, t / 20, 2.0, 0.0) for t in range(21)]
    assert all(a > b for a, b in zip(vals, vals[1:], strict=False))
    mid = {"linear": 1.0, "cosine": 1.0, "exponential": 2.0 * (math.exp(-2.5) - math.exp(-5)) / (1 - math.exp(-5))}
    assert delta_at(schedule, 0.5, 2.0, 0.0) == pytest.approx(mid[schedule], abs=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        delta_at("step", 0.5, 1.0)


def test_annealing_follows_training_steps_and_ends_on_the_exact_sign():
    b = Binarizer(role="act", kind="ubq", schedule="linear", delta_start=1.0).train()
    b.enable(4)
    seen = []
    for _ in range(6):
        seen.append(b.delta())
        b(X.clone().requires_grad_(True))
    assert seen == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert b.exact
    with torch.no_grad():  # evaluation does not advance the schedule
        b.enable(4)
        b(X)
    assert b.delta() == 1.0
    y, g = _grad(Binarizer(role="act", kind="ubq", delta_start=1.0).train(), X)  # never enabled with steps
    assert torch.equal(y, torch.sign(X) - (X == 0).float())  # anneal_steps 0: exact from the start


def test_off_is_identity_and_options_are_checked():
    b = Binarizer(role="act", kind="ubq", enabled=False)
    assert torch.equal(b(X), X)
    with pytest.raises(ValueError, match="kind"):
        Binarizer(kind="xnor")
    with pytest.raises(ValueError, match="noise"):
        Binarizer(kind="ubq", noise="laplace")
    with pytest.raises(ValueError, match="delta"):
        Binarizer(kind="ubq", delta_start=0.1, delta_end=0.5)
    with pytest.raises(ValueError, match="weight scale"):
        Binarizer(role="act", xnor_scale=True)
    with pytest.raises(ValueError, match="> 0"):
        expected_sign(X, 0.0)


def test_qspec_quantizes_signs_not_nearest_level():
    spec = QSpec.per_tensor(BinaryFormat(), 2.0)
    assert torch.equal(spec.quantize(torch.tensor([0.3, -0.1, 0.0, 5.0])), torch.tensor([1, -1, -1, 1],
                                                                                       dtype=torch.int8))
