"""The newer int8 kernel paths (VNNI depthwise; direct convolution; fused residual-add epilogue) against
the bit-exact references, on the layer shapes of ResNet-18 and MobileNetV2 and on odd ones, on every
dispatch path this CPU runs."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.kernels import PackedInt8
from lowbit.kernels.epilogue import FloatOut, Requant
from lowbit.kernels.reference import int8_conv2d_ref

native = pytest.importorskip("lowbit.kernels.native")
if not native.available():  # pragma: no cover - depends on the build
    pytest.skip("lowbit._native is not built", allow_module_level=True)

_ORDER = {"portable": 0, "neon": 1, "avx2": 2, "avx512bw": 3, "vnni": 4}


@pytest.fixture(params=["portable", "avx2", "vnni"])
def isa(request: pytest.FixtureRequest):
    best = native.best_isa()
    if request.param != "portable" and (best == "neon" or _ORDER[request.param] > _ORDER[best]):
        pytest.skip(f"this CPU cannot run the {request.param} path (best ISA here: {best})")
    with native.isa(request.param):
        yield request.param


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _requant(n: int, acc_bound: float, g: torch.Generator, dtype: torch.dtype = torch.uint8, relu: bool = False,
             shifts: tuple[int, int] | None = None) -> Requant:
    m0 = torch.randint(2**30, 2**31 - 1, (n,), generator=g, dtype=torch.int64)
    m0[::7] = -m0[::7]
    if shifts is None:
        base = 31 + max(0, math.ceil(math.log2(acc_bound + 1))) - 7
        rshift = (base + torch.randint(-4, 3, (n,), generator=g)).clamp(1, 62)
    else:
        rshift = torch.randint(shifts[0], shifts[1] + 1, (n,), generator=g)
    if dtype == torch.uint8:
        zp = int(torch.randint(0, 256, (1,), generator=g))
        return Requant(m0.to(torch.int32), rshift.to(torch.int32), zp, zp if relu else 0, 255)
    zp = int(torch.randint(-128, 128, (1,), generator=g))
    return Requant(m0.to(torch.int32), rshift.to(torch.int32), zp, -128, 127, torch.int8)


def _epilogues(n: int, acc_bound: float, g: torch.Generator) -> list:
    """Every epilogue kind, requantization with shifts above and below 32 and a ReLU6-like clamp."""
    six = _requant(n, acc_bound, g)
    six.qmin, six.qmax = six.out_zp // 2, min(255, six.out_zp + 40)
    return [
        None,
        _requant(n, acc_bound, g, relu=True),
        _requant(n, acc_bound, g, shifts=(20, 34)),
        _requant(n, acc_bound, g, torch.int8),
        six,
        FloatOut(torch.randn(n, generator=g) * 1e-2, torch.randn(n, generator=g)),
    ]


def _same(y: torch.Tensor, r: torch.Tensor, what: str) -> None:
    assert y.dtype == r.dtype and y.shape == r.shape, what
    if not torch.equal(y, r):
        d = (y.double() - r.double()).abs()
        raise AssertionError(f"{what}: {int((d > 0).sum())} mismatches, max |diff| {float(d.max())}")


def _check_conv(case: tuple, isa: str, seed: int, epis: int | None = None) -> None:
    b, c, h, w_, n, kh, kw, s, p, d, groups = case
    g = _gen(seed)
    x = torch.randint(0, 256, (b, c, h, w_), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (n, c // groups, kh, kw), dtype=torch.int8, generator=g)
    zp = int(torch.randint(0, 256, (1,), generator=g))
    bias = torch.randint(-(2**16), 2**16, (n,), dtype=torch.int32, generator=g)
    pk = PackedInt8(w)
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    st, pd, dl = pair(s), pair(p), pair(d)
    bound = float(255 * 128 * w[0].numel() ** 0.5 * 4)
    for epi in _epilogues(n, bound, g)[:epis]:
        y = native.int8_conv2d(x, zp, pk, bias, epi, st, pd, dl, groups)
        _same(y, int8_conv2d_ref(x, zp, w, bias, epi, st, pd, dl, groups), f"{isa} {case} {type(epi).__name__}")


# B, C, H, W, N, kh, kw, stride, padding, dilation, groups
DW_CASES = [
    (1, 32, 112, 112, 32, 3, 3, 1, 1, 1, 32),  # MobileNetV2's depthwise layers
    (1, 96, 112, 112, 96, 3, 3, 2, 1, 1, 96),
    (1, 144, 56, 56, 144, 3, 3, 1, 1, 1, 144),
    (1, 192, 28, 28, 192, 3, 3, 2, 1, 1, 192),
    (1, 960, 7, 7, 960, 3, 3, 1, 1, 1, 960),
    (2, 48, 9, 11, 48, 3, 3, 1, 1, 3, 48),  # dilation 3: the tap rows of one output row collide mod 3
    (1, 40, 13, 10, 40, 7, 7, 2, 3, 1, 40),  # two groups of 4 taps per filter row
    (1, 21, 8, 9, 21, 5, 3, (1, 2), (2, 0), (1, 2), 21),  # a 16-block and a partial one
    (3, 7, 6, 70, 7, 3, 3, 1, 1, 1, 7),  # fewer than 16 channels, more than one column tile
    (1, 16, 5, 5, 16, 9, 9, 1, 4, 1, 16),  # 81 taps
]


@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: "x".join(str(v) for v in c))
def test_depthwise_matches_reference(isa, case):
    big = case[1] * case[2] * case[3] > 200_000
    if big and isa == "portable":
        pytest.skip("large shape: the SIMD paths only (the portable one is covered by the small shapes)")
    _check_conv(case, isa, hash(case) % (2**31), epis=3 if big else None)


# B, C, H, W, N, kh, kw, stride, padding, dilation, groups: the direct (no im2col) convolution paths
DIRECT_CASES = [
    (1, 3, 224, 224, 64, 7, 7, 2, 3, 1, 1),  # ResNet-18 stem: kernel rows padded to 24 bytes
    (1, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1),  # ResNet-18 3x3
    (1, 128, 28, 28, 256, 1, 1, 2, 0, 1, 1),  # ResNet-18 1x1 downsample
    (1, 256, 14, 14, 40, 3, 3, 2, 1, 1, 1),
    (2, 5, 9, 8, 24, 3, 3, 1, 1, 1, 1),  # 15-byte kernel rows (padded), 2 images
    (1, 3, 6, 6, 16, 3, 3, 1, 0, 1, 1),  # no padding: the last window ends at the end of the input
    (2, 16, 7, 9, 20, 3, 3, 1, 1, (1, 2), 1),  # horizontal dilation: one run per tap
    (1, 32, 6, 6, 48, 3, 3, 1, 1, 1, 2),  # grouped, 16 channels per group: one run per tap
    (1, 12, 5, 5, 18, 3, 2, 1, (1, 0), 1, 3),  # grouped, 4 channels per group
    (3, 8, 5, 4, 70, 1, 1, 1, 0, 1, 1),  # 1x1: plain GEMM rows, N not a multiple of 16
]


@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: "x".join(str(v) for v in c))
def test_direct_conv_matches_reference(isa, case):
    big = case[1] * case[2] * case[3] * case[4] > 2_000_000
    if big and isa == "portable":
        pytest.skip("large shape: the SIMD paths only (the portable one is covered by the small shapes)")
    _check_conv(case, isa, hash(case) % (2**31), epis=3 if big else None)


@pytest.mark.parametrize("m,n,k", [(3136, 64, 576), (9, 48, 100), (17, 33, 64), (8, 300, 2048), (1, 16, 4)])
def test_gemm_paths_match_reference(isa, m, n, k):
    from lowbit.kernels.reference import int8_gemm_ref

    g = _gen(m * n + k)
    big = torch.randint(0, 256, (m, k + 12), dtype=torch.uint8, generator=g)
    x = big[:, 5:5 + k]  # strided rows
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    zp = int(torch.randint(0, 256, (1,), generator=g))
    bias = torch.randint(-(2**20), 2**20, (n,), dtype=torch.int32, generator=g)
    h = native.pack_int8(w)
    for epi in _epilogues(n, 255 * 128 * k**0.5 * 4, g):
        _same(native.int8_gemm(x, zp, h, bias, epi), int8_gemm_ref(x, zp, w, bias, epi), f"{isa} gemm {m}x{n}x{k}")


# B, C, H, W, N, kh, kw, stride, padding, dilation, groups: convolutions followed by a residual add
FUSED_CASES = [
    (1, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1),  # ResNet-18's second conv of a block
    (1, 64, 28, 28, 128, 1, 1, 1, 0, 1, 1),  # a 1x1 projection
    (2, 12, 7, 6, 40, 3, 3, 1, 1, 1, 1),  # N not a multiple of 16
    (1, 3, 9, 9, 24, 3, 3, 2, 1, 1, 1),  # padded kernel rows
    (1, 8, 6, 6, 16, 3, 3, 1, 1, 1, 2),  # grouped: the packed-panel path
    (1, 32, 8, 8, 32, 3, 3, 1, 1, 1, 32),  # depthwise
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "x".join(str(v) for v in c))
def test_fused_residual_add_equals_conv_then_add(isa, case):
    from lowbit import kernels
    from lowbit.kernels import ResidualAdd
    from lowbit.kernels.reference import add_ref

    if case[2] * case[3] * case[4] > 100_000 and isa == "portable":
        pytest.skip("large shape: the SIMD paths only")
    b, c, h, w_, n, kh, kw, s, p, d, groups = case
    g = _gen(hash(case) % (2**31))
    x = torch.randint(0, 256, (b, c, h, w_), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (n, c // groups, kh, kw), dtype=torch.int8, generator=g)
    zp = int(torch.randint(0, 256, (1,), generator=g))
    bias = torch.randint(-(2**16), 2**16, (n,), dtype=torch.int32, generator=g)
    pk = PackedInt8(w)
    bound = float(255 * 128 * w[0].numel() ** 0.5 * 4)
    ho, wo = (h + 2 * p - kh) // s + 1, (w_ + 2 * p - kw) // s + 1
    res = torch.randint(0, 256, (b, n, ho, wo), dtype=torch.uint8, generator=g)
    for k, epi in enumerate([_requant(n, bound, g), _requant(n, bound, g, shifts=(20, 34))]):
        o_zp = int(torch.randint(0, 256, (1,), generator=g))
        add = ResidualAdd(res if k else res.contiguous(memory_format=torch.channels_last), int(torch.randint(
            0, 256, (1,), generator=g)), int(torch.randint(1, 2**31, (1,), generator=g)),
            int(torch.randint(1, 2**31, (1,), generator=g)), 31 + k, o_zp, o_zp if k else 0, 255 - 20 * k)
        y = kernels.int8_conv2d(x, zp, pk, bias, epi, (s, s), (p, p), (d, d), groups, add)
        conv = int8_conv2d_ref(x, zp, w, bias, epi, (s, s), (p, p), (d, d), groups)
        r = add_ref(conv, epi.out_zp, res, add.r_zp, add.m_a, add.m_b, add.rshift, add.out_zp, add.lo, add.hi)
        _same(y, r, f"{isa} fused add {case} #{k}")
    with pytest.raises(ValueError):
        native.int8_conv2d(x, zp, pk, bias, None, (s, s), (p, p), (d, d), groups, add)  # int32 output
    with pytest.raises(ValueError):
        native.int8_conv2d(x, zp, pk, bias, epi, (s, s), (p, p), (d, d), groups,
                           ResidualAdd(res[:, :1], 0, 1, 1, 1, 0))  # wrong residual shape
