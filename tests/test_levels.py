"""Level sets, granularity, quantized-value specs and sub-byte packing against hand computations."""

import math

import pytest
import torch

from lowbit.formats import (
    UINT8_ACT,
    BinaryFormat,
    Codebook,
    IntRange,
    PerAxis,
    PerGroup,
    PerTensor,
    QFormat,
    QSpec,
    apot_levels,
    format_from_dict,
    odd_levels,
    pack_codes,
    parse_granularity,
    unpack_codes,
)


def _sums(*term_lists):
    out = {0.0}
    for t in term_lists:
        out = {s + v for s in out for v in t}
    return out


def test_int_ranges_and_odd_levels():
    r = IntRange.signed_bits(4)
    assert (r.qmin, r.qmax, r.n_levels, r.bits, r.symmetric, r.dtype) == (-8, 7, 16, 4, True, torch.int8)
    assert IntRange.unsigned_bits(3).levels == tuple(range(8))
    o = odd_levels(25)
    assert (o.qmin, o.qmax, o.n_levels, o.bits) == (-12, 12, 25, 5)
    assert math.isclose(o.effective_bits, math.log2(25))
    assert IntRange(0, 1000).dtype == torch.int16
    for bad in (2, 4, 1, 2.5):
        with pytest.raises(ValueError, match="odd"):
            odd_levels(bad)
    with pytest.raises(ValueError, match="qmin < qmax"):
        IntRange(3, 3)
    with pytest.raises(ValueError, match="zero point"):
        IntRange(1, 5, True)


def test_apot_levels_are_the_papers_sums_as_integers():
    # docs/methods.md: 4-bit a + b, a in {0, 2^-1, 2^-3, 2^-5}, b in {0, 2^-2, 2^-4, 2^-6}; scaled by 2^6
    ref = sorted(int(v * 64) for v in _sums([0, 2**-1, 2**-3, 2**-5], [0, 2**-2, 2**-4, 2**-6]))
    u4 = apot_levels(4, signed=False)
    assert list(u4.levels) == ref and len(ref) == 16 and max(ref) == 48
    # weights: sign + 3-bit magnitudes {0, 2^-1, 2^-2, 2^-4} + {0, 2^-3}, times 2^4
    mags = sorted(int(v * 16) for v in _sums([0, 2**-1, 2**-2, 2**-4], [0, 2**-3]))
    assert mags == [0, 1, 2, 3, 4, 6, 8, 10]
    assert list(apot_levels(4, signed=True).levels) == sorted({-m for m in mags} | set(mags))
    assert list(apot_levels(2, signed=False).levels) == [0, 1, 2, 4]
    assert list(apot_levels(2, signed=True).levels) == [-1, 0, 1]
    for b in range(2, 6):
        assert apot_levels(b, False).qmax <= 127
    assert apot_levels(6, True).qmax <= 127
    with pytest.raises(ValueError, match="bit width"):
        apot_levels(6, signed=False)


def test_codebook_projection_ties_go_to_smaller_magnitude():
    cb = Codebook((-6, -2, 0, 1, 3))
    v = torch.tensor([-4.2, -4.6, -3.4, 2.4, 2.6, 0.4, 9.0, -9.0])
    # round to the grid first: -4, -5, -3, 2, 3, 0, 3 (clamped), -6 (clamped); then the nearest level, and the
    # ties -4 (between -6 and -2) and 2 (between 1 and 3) go to the level of smaller magnitude
    assert cb.project(v).tolist() == [-2, -6, -2, 1, 3, 0, 3, -6]
    assert cb.index(torch.tensor([-6, 0, 3])).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="not levels"):
        cb.index(torch.tensor([2]))
    assert BinaryFormat().project(torch.tensor([-0.5, 0.0, 0.1])).tolist() == [-1, -1, 1]


def test_format_serialization_round_trip():
    for f in (IntRange(-3, 9), odd_levels(19), apot_levels(3, True), BinaryFormat(), QFormat(4, True, True, True)):
        assert format_from_dict(f.to_dict()) == f
    with pytest.raises(ValueError):
        format_from_dict({"kind": "nope"})


def test_pack_codes_by_hand_and_round_trip():
    u2 = IntRange.unsigned_bits(2)
    assert pack_codes(torch.tensor([1, 2, 3]), u2).tolist() == [1 | 2 << 2 | 3 << 4]
    s3 = IntRange.signed_bits(3)  # index = code + 4, 3 bits each: [-4, 3, 0] -> 0, 7, 4 -> stream 100 111 000
    assert pack_codes(torch.tensor([-4, 3, 0]), s3).tolist() == [0b00111000, 0b1]
    g = torch.Generator().manual_seed(0)
    for fmt in (IntRange.signed_bits(b) for b in range(1, 9)):
        c = torch.randint(fmt.qmin, fmt.qmax + 1, (7, 13), generator=g)
        p = pack_codes(c, fmt)
        assert p.numel() == math.ceil(c.numel() * fmt.bits / 8)
        assert torch.equal(unpack_codes(p, fmt, c.shape), c)
    cb = apot_levels(4, False)
    c = torch.tensor(cb.levels)[torch.randint(0, 16, (50,), generator=g)]
    assert torch.equal(unpack_codes(pack_codes(c, cb), cb, c.shape), c)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), u2, (20,))
    with pytest.raises(ValueError, match="names no level"):
        unpack_codes(torch.full((1,), 255, dtype=torch.uint8), odd_levels(7), (2,))  # index 7 of 7 levels


def test_qspec_by_hand():
    spec = QSpec.per_tensor(IntRange.signed_bits(4), 0.5, 0)
    q = spec.quantize(torch.tensor([-5.0, -0.2, 0.26, 3.4, 9.0]))
    assert q.tolist() == [-8, 0, 1, 7, 7] and q.dtype == torch.int8
    assert spec.dequantize(q).tolist() == [-4.0, 0.0, 0.5, 3.5, 3.5]
    u = spec.unsigned()  # same reals, codes shifted by 8
    assert (u.format.qmin, u.format.qmax, u.zero_point) == (0, 15, (8,))
    assert torch.equal(u.dequantize(u.quantize(torch.tensor([-5.0, 0.26, 3.4]))), torch.tensor([-4.0, 0.5, 3.5]))
    assert QSpec.from_dict(spec.to_dict()) == spec
    pc = QSpec(IntRange.signed_bits(8), (0.1, 1.0), (0, 0), PerAxis(0))
    assert pc.quantize(torch.tensor([[0.25, -1.0], [2.6, 300.0]])).tolist() == [[2, -10], [3, 127]]
    legacy = QSpec.per_tensor(UINT8_ACT, 4 / 255, 64)
    assert legacy.quantize(torch.tensor([-1.0, 0.0, 3.0])).tolist() == [0, 64, 255]
    with pytest.raises(ValueError, match="positive"):
        QSpec.per_tensor(IntRange(0, 3), 0.0, 0)
    with pytest.raises(ValueError, match="layout"):
        QSpec.per_tensor(IntRange(0, 3), 1.0, 0, layout="nope")


def test_granularity_objects():
    assert parse_granularity("per_channel") == PerAxis(0)
    assert parse_granularity("per_tensor") == PerTensor()
    assert parse_granularity("per_group:4") == PerGroup(4)
    assert parse_granularity({"kind": "per_axis", "axis": 1}) == PerAxis(1)
    with pytest.raises(ValueError, match="granularity"):
        parse_granularity("per_row")
    w = torch.arange(24.0).reshape(3, 8)
    assert PerAxis(0).param_shape(w.shape) == (3,) and PerGroup(4).param_shape(w.shape) == (3, 2)
    assert PerGroup(4).rows(w).shape == (6, 4) and PerAxis(1).rows(w).shape == (8, 3)
    p = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert PerGroup(4).view(p, w)[1].tolist() == [3.0] * 4 + [4.0] * 4
    assert PerAxis(0).numel_per_param((3, 8)) == 8 and PerTensor().numel_per_param((3, 8)) == 24
