"""Packed storage of 4.6-bit weights: radix words (7 codes of 19-23 levels per 32-bit word), the scheme
choice, round trips through the model file, corruption."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import IntRange, odd_levels
from lowbit.formats.packing import (
    pack_codes_radix,
    radix_group,
    storage_bits,
    storage_scheme,
    unpack_codes_radix,
)
from lowbit.kernels.packed import codes_storage, weights_from_storage


def test_radix_group_and_scheme():
    # N^g <= 2^32: 21^7 = 1.8e9 fits, 21^8 does not; 16^8 = 2^32; 25^6 fits, 25^7 does not
    assert [radix_group(odd_levels(n)) for n in (3, 19, 21, 23, 25)] == [20, 7, 7, 7, 6]
    assert radix_group(IntRange(0, 15)) == 8
    for n in (19, 21, 23):
        assert storage_scheme(odd_levels(n)) == "radix" and storage_bits(odd_levels(n)) == pytest.approx(32 / 7)
    assert storage_scheme(odd_levels(25)) == "packed"  # 32/6 = 5.33 bits > 5
    assert storage_scheme(IntRange.signed_bits(4)) == "packed" and storage_bits(IntRange.signed_bits(4)) == 4
    assert storage_scheme(IntRange.signed_bits(8)) == "q" and storage_scheme(odd_levels(255)) == "q"
    assert storage_scheme(odd_levels(3)) == "radix" and storage_bits(odd_levels(3)) == 1.6


def test_radix_by_hand():
    fmt = odd_levels(21)  # index = code + 10; word = i0 + 21 i1 + 441 i2 (+ zero digits)
    word = 0 + 20 * 21 + 10 * 441
    assert pack_codes_radix(torch.tensor([-10, 10, 0]), fmt).tolist() == [word & 255, word >> 8, 0, 0]
    full = torch.tensor([10] * 7)  # 21^7 - 1 = 1801088540 = 0x6B5A6E1C
    assert pack_codes_radix(full, fmt).tolist() == [0x1C, 0x6E, 0x5A, 0x6B]


@pytest.mark.parametrize("n", [3, 19, 21, 23, 25])
def test_radix_round_trip(n: int):
    fmt = odd_levels(n)
    g = torch.Generator().manual_seed(n)
    for shape in ((1,), (7,), (8,), (13, 5, 3, 3)):
        c = torch.randint(fmt.qmin, fmt.qmax + 1, shape, generator=g)
        data = pack_codes_radix(c, fmt)
        count = c.numel()
        assert data.numel() == 4 * -(-count // radix_group(fmt))
        assert torch.equal(unpack_codes_radix(data, fmt, shape), c)


def test_radix_corruption():
    fmt = odd_levels(21)
    data = pack_codes_radix(torch.zeros(14, dtype=torch.int64), fmt)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes_radix(data[:-1], fmt, (14,))
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes_radix(data, fmt, (15,))
    bad = data.clone()
    bad[3] = 0xFF  # word >= 21^7: not 7 digits of base 21
    with pytest.raises(ValueError, match="radix word"):
        unpack_codes_radix(bad, fmt, (14,))
    with pytest.raises(ValueError, match="codes outside"):
        pack_codes_radix(torch.tensor([11]), fmt)


def test_w46_weights_stored_in_radix_words():
    from lowbit.kernels.w46 import PackedW46

    g = torch.Generator().manual_seed(1)
    w = torch.randint(-10, 11, (32, 16, 3, 3), generator=g, dtype=torch.int8)
    attrs, tensors = codes_storage("w46", w, odd_levels(21), {"K_x": 12})
    assert set(tensors) == {"radix"} and tensors["radix"].numel() == 4 * -(-w.numel() // 7)
    p = weights_from_storage(attrs, tensors)
    assert isinstance(p, PackedW46) and (p.K_x, p.K_w) == (12, 10) and torch.equal(p.codes, w)
