"""Quantization math against hand computations (docs/methods.md)."""

import math

import pytest
import torch

from lowbit.formats import (
    INT8_WEIGHT,
    UINT8_ACT,
    QFormat,
    choose_qparams,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
    quantize_bias,
    quantize_multiplier,
    requantize,
)


def test_ranges():
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, True, narrow=True) == (-127, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-8, 7)
    assert qrange(2, False) == (0, 3)
    with pytest.raises(ValueError, match="2..8"):
        qrange(9, True)
    with pytest.raises(ValueError):
        QFormat(bits=1)


def test_asymmetric_uint8_by_hand():
    # [-1, 3] onto 0..255: scale 4/255, zero point round(1 / (4/255)) = round(63.75) = 64
    s, z = choose_qparams(-1.0, 3.0, UINT8_ACT)
    assert s.item() == pytest.approx(4 / 255)
    assert z.item() == 64
    q = quantize(torch.tensor([-1.0, 0.0, 3.0, 10.0]), s, z, UINT8_ACT)
    assert q.tolist() == [0, 64, 255, 255]
    assert q.dtype == torch.uint8
    # real zero is exact
    assert dequantize(torch.tensor([64], dtype=torch.uint8), s, z).item() == 0.0


def test_range_widened_to_include_zero():
    s, z = choose_qparams(2.0, 4.0, UINT8_ACT)  # -> [0, 4]
    assert z.item() == 0 and s.item() == pytest.approx(4 / 255)


def test_symmetric_int8_weights_per_channel_by_hand():
    w = torch.tensor([[0.5, -1.27], [0.02, 0.005]])
    amax = w.abs().amax(1)
    s, z = choose_qparams(-amax, amax, INT8_WEIGHT)
    assert torch.allclose(s, torch.tensor([0.01, 0.02 / 127]))
    assert z.tolist() == [0, 0]
    q = quantize(w, s, z, INT8_WEIGHT, axis=0)
    assert q.tolist() == [[50, -127], [127, 32]]  # 0.005 / (0.02/127) = 31.75 -> 32
    assert q.dtype == torch.int8
    assert torch.allclose(fake_quantize(w, s, z, INT8_WEIGHT, axis=0), w, atol=0.005)


def test_nan_range_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        choose_qparams(float("nan"), 1.0, UINT8_ACT)


@pytest.mark.parametrize("m", [0.5, 0.75, 1e-3, 0.3, 2.5, 1 - 1e-12, 123.0, 2**-30])
def test_quantize_multiplier(m):
    m0, rshift = quantize_multiplier(m)
    m0, rshift = int(m0), int(rshift)
    assert 2**30 <= m0 < 2**31
    assert 1 <= rshift <= 62
    assert m0 / 2**rshift == pytest.approx(m, rel=2**-30)
    # M = M0 * 2^-n with M0 in [0.5, 1): n = rshift - 31
    assert 0.5 <= m0 / 2**31 < 1
    assert m == pytest.approx(m0 / 2**31 * 2.0 ** -(rshift - 31), rel=1e-9)


def test_quantize_multiplier_errors():
    with pytest.raises(ValueError):
        quantize_multiplier(0.0)
    with pytest.raises(ValueError):
        quantize_multiplier(-1.0)
    with pytest.raises(ValueError, match="range"):
        quantize_multiplier(2.0**40)


def test_requantize_by_hand():
    # M = 0.25 exactly: m0 = 2^30, rshift = 32. acc = 10 -> 2.5 -> round half up -> 3; -10 -> -2.5 -> -2
    m0, sh = quantize_multiplier(torch.tensor([0.25]))
    acc = torch.tensor([[10, -10, 6, -6, 1000]], dtype=torch.int32)
    out = requantize(acc, m0, sh, zero_point=0, qmin=-128, qmax=127)
    assert out.tolist() == [[3, -2, 2, -1, 127]]
    out = requantize(acc, m0, sh, zero_point=100, qmin=0, qmax=255)
    assert out.tolist() == [[103, 98, 102, 99, 255]]


def test_requantize_matches_real_arithmetic():
    torch.manual_seed(0)
    acc = torch.randint(-(2**20), 2**20, (64, 8), dtype=torch.int32)
    mult = torch.rand(8, dtype=torch.float64) * 1e-3 + 1e-5
    m0, sh = quantize_multiplier(mult)
    out = requantize(acc, m0, sh, 7, -(2**31), 2**31 - 1)
    exact = torch.floor(acc.double() * mult + 0.5) + 7
    assert (out.double() - exact).abs().max() <= 1  # only ties at the mantissa's last bit differ
    assert (out.double() == exact).float().mean() > 0.99


def test_requantize_and_multiplier_match_spec():
    """Bit-exact against tests/_spec.py: multipliers over the whole range (mantissas that round up into the
    next power of two included) and accumulators up to the int32 extremes."""
    import numpy as np

    import _spec as S

    g = torch.Generator().manual_seed(1)
    mult = torch.cat([2.0 ** (torch.rand(500, generator=g, dtype=torch.float64) * 58 - 30),
                      torch.tensor([1.0 - 2.0**-40, 0.5, 2.0**-30 * (1 - 2.0**-35), 0.999999])])
    m0, sh = quantize_multiplier(mult)
    want = [S.multiplier(float(v)) for v in mult]
    assert m0.tolist() == [w[0] for w in want] and sh.tolist() == [w[1] for w in want]
    acc = torch.randint(-(2**31), 2**31 - 1, (7, len(mult)), dtype=torch.int32, generator=g)
    acc[0], acc[1] = 2**31 - 1, -(2**31)
    out = requantize(acc, m0, sh, 5, -(2**31), 2**31 - 1)
    spec = S.requant(acc.numpy(), m0.numpy()[None, :], sh.numpy()[None, :], 5, -(2**31), 2**31 - 1)
    assert np.array_equal(out.numpy().astype(np.int64), spec)


def test_requantize_extremes_do_not_overflow():
    m0, sh = quantize_multiplier(torch.tensor([0.999999]))
    acc = torch.tensor([2**31 - 1, -(2**31)], dtype=torch.int32)
    out = requantize(acc.reshape(2, 1), m0, sh, 0, -(2**31), 2**31 - 1)
    assert out[0, 0] == pytest.approx(2**31 - 1, abs=2200)
    assert out[1, 0] == pytest.approx(-(2**31), abs=2200)


def test_bias_quantization():
    b = quantize_bias(torch.tensor([0.1, -0.2]), 0.01, torch.tensor([0.5, 0.001]))
    assert b.tolist() == [20, -20000]
    assert b.dtype == torch.int32
    big = quantize_bias(torch.tensor([1e12]), 1e-3, torch.tensor([1e-3]))
    assert big.item() == 2**31 - 1


def test_low_bit_formats():
    fmt = QFormat(bits=4, signed=True, symmetric=True, narrow=True)
    s, z = choose_qparams(-7.0, 7.0, fmt)
    assert s.item() == 1.0 and z.item() == 0
    q = quantize(torch.tensor([-9.0, -3.4, 0.5, 2.5, 8.0]), s, z, fmt)
    assert q.tolist() == [-7, -3, 0, 2, 7]
    ufmt = QFormat(bits=2, signed=False, symmetric=False)
    s, z = choose_qparams(0.0, 3.0, ufmt)
    assert s.item() == 1.0 and z.item() == 0
    assert math.isclose(dequantize(torch.tensor([3], dtype=torch.uint8), s, z).item(), 3.0)
