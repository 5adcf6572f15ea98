"""Native pooling and residual-add kernels on uint8 codes against plain-PyTorch references, bit for bit.

Every dispatch path this CPU runs is tested (the add has AVX-512, AVX2 and portable paths), in NHWC and
NCHW, on the layer shapes of ResNet-18 and MobileNetV2 and on odd ones.
"""

from __future__ import annotations

import pytest
import torch

from lowbit import kernels
from lowbit.kernels.reference import adaptive_avg_pool2d_ref, avg_pool2d_ref, max_pool2d_ref

native = pytest.importorskip("lowbit.kernels.native")
if not native.available():  # pragma: no cover - depends on the build
    pytest.skip("lowbit._native is not built", allow_module_level=True)

_ORDER = {"portable": 0, "neon": 1, "avx2": 2, "avx512bw": 3, "vnni": 4}
ADD_PATHS = ["portable", "avx2", "avx512bw"]


@pytest.fixture(params=ADD_PATHS)
def isa(request: pytest.FixtureRequest):
    best = native.best_isa()
    if request.param != "portable" and (best == "neon" or _ORDER[request.param] > _ORDER[best]):
        pytest.skip(f"this CPU cannot run the {request.param} path (best ISA here: {best})")
    with native.isa(request.param):
        yield request.param


@pytest.fixture
def threads():
    before = native.num_threads()
    yield
    native.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(shape: tuple[int, ...], g: torch.Generator, nhwc: bool) -> torch.Tensor:
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    return x.contiguous(memory_format=torch.channels_last) if nhwc else x


def _same(y: torch.Tensor, r: torch.Tensor, what: str) -> None:
    assert y.dtype == torch.uint8 and y.shape == r.shape, what
    if not torch.equal(y, r):
        bad = int((y != r).sum())
        raise AssertionError(f"{what}: {bad} mismatches, max |diff| {int((y.int() - r.int()).abs().max())}")


# (B, C, H, W, kernel, stride, padding, dilation, ceil_mode)
MAX_CASES = [
    (1, 64, 112, 112, 3, 2, 1, 1, False),  # ResNet-18 stem pool
    (2, 5, 9, 11, 3, 2, 1, 1, True),
    (1, 3, 8, 8, 2, 2, 0, 1, False),
    (1, 17, 7, 7, 2, 2, 0, 1, True),  # small_cnn's ceil-mode pool on an odd side
    (2, 8, 10, 9, (3, 2), (2, 1), (1, 0), (2, 1), False),
    (1, 33, 6, 5, 3, 1, 1, 2, True),
]


@pytest.mark.parametrize("nhwc", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("case", MAX_CASES, ids=lambda c: "x".join(str(v) for v in c))
def test_max_pool_matches_reference(case, nhwc):
    b, c, h, w, k, s, p, d, ceil = case
    x = _codes((b, c, h, w), _gen(h * w + c), nhwc)
    y = native.max_pool2d(x, k, s, p, d, ceil)
    _same(y, max_pool2d_ref(x, k, s, p, d, ceil), f"max pool {case}")
    assert y.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    # extremes: all 0 (padding must not leak in) and all 255
    for v in (0, 255):
        xe = torch.full_like(x, v)
        _same(native.max_pool2d(xe, k, s, p, d, ceil), max_pool2d_ref(xe, k, s, p, d, ceil), f"max pool {v}")


# (B, C, H, W, kernel, stride, padding)
AVG_CASES = [
    (1, 16, 8, 8, 2, 2, 0),
    (2, 7, 9, 10, 3, 2, 1),
    (1, 40, 7, 7, 3, 1, 1),
    (1, 3, 11, 6, (3, 2), (1, 2), (1, 1)),
]


@pytest.mark.parametrize("nhwc", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("case", AVG_CASES, ids=lambda c: "x".join(str(v) for v in c))
def test_avg_pool_matches_reference(case, nhwc):
    b, c, h, w, k, s, p = case
    g = _gen(h * w * c)
    x = _codes((b, c, h, w), g, nhwc)
    for zp in (0, 255, int(torch.randint(0, 256, (1,), generator=g))):
        _same(native.avg_pool2d(x, zp, k, s, p), avg_pool2d_ref(x, zp, k, s, p), f"avg pool {case} zp={zp}")


# (B, C, H, W, output size): global pools of ResNet-18 / MobileNetV2 / CIFAR nets, and uneven windows
ADAPTIVE_CASES = [
    (1, 512, 7, 7, 1),
    (1, 1280, 7, 7, 1),
    (2, 64, 8, 8, 1),
    (1, 9, 10, 7, (3, 2)),
    (2, 4, 5, 13, (5, 4)),
]


@pytest.mark.parametrize("nhwc", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=lambda c: "x".join(str(v) for v in c))
def test_adaptive_avg_pool_matches_reference(case, nhwc):
    b, c, h, w, out = case
    x = _codes((b, c, h, w), _gen(h + w + c), nhwc)
    _same(native.adaptive_avg_pool2d(x, out), adaptive_avg_pool2d_ref(x, out), f"adaptive {case}")
    xe = torch.full_like(x, 255)
    _same(native.adaptive_avg_pool2d(xe, out), adaptive_avg_pool2d_ref(xe, out), f"adaptive 255 {case}")


def test_pool_public_interface_and_errors():
    x = _codes((1, 4, 6, 6), _gen(1), True)
    geometry = kernels.PoolGeometry.make(3, 2, 1)
    _same(kernels.max_pool2d_codes(x, geometry), max_pool2d_ref(x, 3, 2, 1), "max_pool2d_codes")
    _same(kernels.avg_pool2d(x, 7, 2), avg_pool2d_ref(x, 7, 2), "kernels.avg_pool2d")
    _same(kernels.adaptive_avg_pool2d(x, 1), adaptive_avg_pool2d_ref(x, 1), "kernels.adaptive_avg_pool2d")
    with pytest.raises(TypeError):
        native.max_pool2d(x.float(), 2)
    with pytest.raises(ValueError):
        native.max_pool2d(x, 2, 2, 2)  # padding larger than half the kernel
    with pytest.raises(ValueError):
        native.avg_pool2d(x, 256, 2)
    with pytest.raises(ValueError):
        native.adaptive_avg_pool2d(x, 7)


# ------------------------------------------------------------------------------------ residual add


def add_spec(a, a_zp, b, b_zp, m_a, m_b, rshift, out_zp, lo, hi):
    """The single-rounding add, written out in int64 (independent of the code under test)."""
    acc = (a.to(torch.int64) - a_zp) * m_a + (b.to(torch.int64) - b_zp) * m_b
    out = torch.bitwise_right_shift(acc + (1 << (rshift - 1)), rshift) + out_zp
    return torch.clamp(out, lo, hi).to(torch.uint8)


def _add_params(g: torch.Generator) -> list[tuple[int, int, int, int, int, int, int, int]]:
    """(a_zp, b_zp, m_a, m_b, rshift, out_zp, lo, hi): typical residual adds, extreme multipliers and shifts
    (the >= 42 shifts where every result rounds to the zero point), ReLU clamps."""
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    out = [
        (128, 3, 1_500_000_000, 900_000_000, 31, 7, 7, 255),
        (0, 255, 2**31, 1, 30, 128, 0, 255),
        (255, 0, 1, 2**31, 1, -300, 0, 255),
        (17, 200, 2**31, 2**31, 62, 5, 0, 255),
        (90, 90, 123_456_789, 2**30, 41, 0, 0, 255),
        (90, 90, 2**31 - 1, 2**31 - 3, 42, 300, 0, 200),
    ]
    for _ in range(6):
        zo = r(0, 255)
        out.append((r(0, 255), r(0, 255), r(1, 2**31), r(1, 2**31), r(20, 40), zo, zo if r(0, 1) else 0, 255))
    return out


@pytest.mark.parametrize("shape", [(1, 64, 56, 56), (1, 24, 56, 56), (2, 3, 5, 7), (1, 1000), (77,), (1, 160, 7, 7)])
def test_add_matches_spec(isa, shape):
    g = _gen(sum(shape))
    a = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    for p in _add_params(g):
        a_zp, b_zp, m_a, m_b, rs, zo, lo, hi = p
        y = native.qadd(a, a_zp, b, b_zp, m_a, m_b, rs, zo, lo, hi)
        _same(y, add_spec(a, a_zp, b, b_zp, m_a, m_b, rs, zo, lo, hi), f"{isa} add {shape} {p}")


def test_add_rounding_ties_and_every_code_pair(isa):
    """All 65536 (a, b) pairs, with multipliers that put many sums exactly on a rounding tie."""
    a = torch.arange(256, dtype=torch.uint8).repeat_interleave(256)
    b = torch.arange(256, dtype=torch.uint8).repeat(256)
    for m_a, m_b, rs in ((2**30, 2**29, 31), (3, 1, 2), (2**31, 2**31, 33), (5, 7, 4)):
        for a_zp, b_zp, zo, lo in ((0, 0, 0, 0), (128, 77, 100, 100), (255, 255, 3, 0)):
            y = native.qadd(a, a_zp, b, b_zp, m_a, m_b, rs, zo, lo, 255)
            _same(y, add_spec(a, a_zp, b, b_zp, m_a, m_b, rs, zo, lo, 255), f"{isa} pairs {m_a},{m_b},{rs}")


def test_add_just_around_the_rounding_tie(isa):
    """acc = +-2^(rshift-1) + d for d in -2..2 at every shift: one unit below, on and above each tie
    (the double-precision SIMD paths must floor exactly there too)."""
    for rs in range(2, 39):
        m_a = min(2**31, 2 ** (rs - 1))
        da = 2 ** (rs - 1) // m_a
        a = torch.tensor([127 + da] * 5 + [127 - da] * 5, dtype=torch.uint8)
        b = torch.tensor([100 - 2, 100 - 1, 100, 101, 102] * 2, dtype=torch.uint8)
        for zo in (0, 77):
            y = native.qadd(a, 127, b, 100, m_a, 1, rs, zo, 0, 255)
            _same(y, add_spec(a, 127, b, 100, m_a, 1, rs, zo, 0, 255), f"{isa} ties rshift={rs}")


def test_add_layouts_broadcast_threads(isa, threads):
    g = _gen(5)
    a = _codes((2, 24, 9, 13), g, True)
    b = _codes((2, 24, 9, 13), g, False)
    p = (120, 7, 1_000_000_000, 1_700_000_000, 31, 60, 60, 255)
    ref = add_spec(a, p[0], b, p[1], *p[2:])
    outs = []
    for nt in (1, 2, 3):
        native.set_num_threads(nt)
        y = native.qadd(a, p[0], b, p[1], *p[2:])
        _same(y, ref, f"{isa} mixed layouts, {nt} threads")
        outs.append(y)
    assert outs[0].is_contiguous(memory_format=torch.channels_last)  # a's layout
    row = torch.randint(0, 256, (1, 24, 1, 1), dtype=torch.uint8, generator=g)
    _same(native.qadd(a, p[0], row, p[1], *p[2:]), add_spec(a, p[0], row, p[1], *p[2:]), "broadcast")


def test_add_bad_arguments():
    a = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(TypeError):
        native.qadd(a.int(), 0, a, 0, 1, 1, 1, 0)
    for bad in ((0, 1, 1), (1, 2**31 + 1, 1), (1, 1, 0), (1, 1, 63)):
        with pytest.raises(ValueError):
            native.qadd(a, 0, a, 0, *bad, 0)
    with pytest.raises(ValueError):
        native.qadd(a, 0, a, 256, 1, 1, 1, 0)
    with pytest.raises(ValueError):
        native.qadd(a, 0, a, 0, 1, 1, 1, 0, 10, 5)
