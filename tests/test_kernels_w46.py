"""4.6-bit kernels (lowbit.kernels.w46, csrc/w46*.cpp) against the plain-PyTorch reference.

Every dispatch path the machine can run is tested (the others are skipped with the reason); results must
be bit-identical to ``w46_linear_ref`` / ``w46_conv2d_ref`` for every shape, extreme codes (the int16
flush interval), epilogue, convolution geometry and thread count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _spec as S
from _spec_modules import spec_epilogue
from lowbit.kernels.epilogue import FloatOut, Requant
from lowbit.kernels.w46 import (
    PackedW46,
    check_w46_levels,
    pack_w46,
    w46_conv2d,
    w46_levels,
    w46_linear,
)
from lowbit.kernels.w46 import w46_conv2d_ref as lib_conv2d_ref
from lowbit.kernels.w46 import w46_linear_ref as lib_linear_ref

try:
    from lowbit import _native as nat

    HAVE_NATIVE = hasattr(nat, "w46_pack")
except ImportError:  # pragma: no cover - depends on the build
    nat = None
    HAVE_NATIVE = False



def w46_linear_ref(x, K_x, w, bias=None, epi=None) -> torch.Tensor:
    """The specification: epi(sum_k (x - K_x) * w + bias), NumPy (tests/_spec.py)."""
    acc = S.linear_acc(x.numpy().astype(np.int64) - K_x, w.numpy(), None if bias is None else bias.numpy())
    return spec_epilogue(acc, epi, -1)


def w46_conv2d_ref(x, K_x, w, bias=None, epi=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    acc = S.conv_acc(x.contiguous().numpy().astype(np.int64) - K_x, w.numpy(), None if bias is None else bias.numpy(),
                     stride, padding, dilation, groups)
    return spec_epilogue(acc, epi, 1)

# (N_x, N_w) pairs of the paper plus the extreme K_x = 127, K_w = 1 (N_x = 255)
LEVELS = [(14, 9), (12, 10), (11, 11), (127, 1)]


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def threads():
    if not HAVE_NATIVE:
        pytest.skip("lowbit._native is not built")
    prev = nat.num_threads()
    yield nat.set_num_threads
    nat.set_num_threads(prev)


def _codes(shape: tuple[int, ...], K_x: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2 * K_x + 1, shape, generator=g, dtype=torch.uint8)


def _weights(shape: tuple[int, ...], K_w: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(-K_w, K_w + 1, shape, generator=g, dtype=torch.int8)


def _epilogues(n: int, g: torch.Generator) -> list[Requant | FloatOut | None]:
    m0 = torch.randint(2**30, 2**31 - 1, (n,), generator=g, dtype=torch.int32)
    rs = torch.randint(8, 40, (n,), generator=g, dtype=torch.int32)
    return [
        None,
        FloatOut(torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)),
        FloatOut(torch.rand(n, generator=g)),
        Requant(m0, rs, 7, 0, 255),
        Requant(m0, rs, -5, -128, 127, torch.int8),
        Requant(m0, rs, 3, 3, 100),  # fused ReLU-style clamp
        Requant(m0[:1], rs[:1], 0, 0, 255),  # per-tensor parameters
    ]


# --------------------------------------------------------------------------------------- levels


def test_levels_and_bound():
    assert w46_levels(19) == (14, 9)
    assert w46_levels(21) == (12, 10)
    assert w46_levels(23) == (11, 11)
    assert w46_levels(3) == (127, 1)
    for n_w in (3, 5, 19, 23, 255):
        K_x, K_w = w46_levels(n_w)
        assert K_x * K_w <= 127
        check_w46_levels(K_x, K_w)
    with pytest.raises(ValueError):
        w46_levels(20)
    with pytest.raises(ValueError):
        check_w46_levels(12, 11)  # 132 > 127
    with pytest.raises(ValueError):
        pack_w46(torch.zeros(4, 4, dtype=torch.int8), 13, 10)
    with pytest.raises(ValueError):
        check_w46_levels(0, 5)


@pytest.mark.parametrize("K_x,K_w", LEVELS)
def test_flush_interval_from_bound(K_x: int, K_w: int):
    """|vpmaddubsw pair| <= 4 K_x K_w, so floor(32767 / (4 K_x K_w)) k-quad steps fit in int16 (>= 64)."""
    if not HAVE_NATIVE:
        pytest.skip("lowbit._native is not built")
    p = pack_w46(torch.zeros(3, 8, dtype=torch.int8), K_x, K_w)
    flush = p.native("linear", 1).flush
    assert flush == 32767 // (4 * K_x * K_w)
    assert flush >= 64
    assert flush * 4 * K_x * K_w <= 32767


# --------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("K", [1, 3, 4, 63, 65, 127, 129, 257])
def test_linear_shapes(isa: str, K: int):
    g = torch.Generator().manual_seed(K)
    for K_x, K_w in [(14, 9), (127, 1)]:
        for M, N in [(1, 1), (1, 17), (7, 33), (13, 16), (6, 40)]:
            x = _codes((M, K), K_x, g)
            w = _weights((N, K), K_w, g)
            b = torch.randint(-5000, 5000, (N,), generator=g, dtype=torch.int32)
            p = pack_w46(w, K_x, K_w)
            assert torch.equal(w46_linear(x, p, b), w46_linear_ref(x, K_x, w, b)), (M, N, K, K_x)
            assert torch.equal(w46_linear(x, p), w46_linear_ref(x, K_x, w)), (M, N, K, K_x)


def test_linear_epilogues(isa: str):
    g = torch.Generator().manual_seed(1)
    M, N, K = 9, 37, 300
    x = _codes((M, K), 11, g)
    w = _weights((N, K), 11, g)
    b = torch.randint(-20000, 20000, (N,), generator=g, dtype=torch.int32)
    p = pack_w46(w, 11, 11)
    for epi in _epilogues(N, g):
        y = w46_linear(x, p, b, epi)
        r = w46_linear_ref(x, 11, w, b, epi)
        assert y.dtype == r.dtype and torch.equal(y, r), epi


@pytest.mark.parametrize("K_x,K_w", LEVELS)
def test_extreme_codes_k4096(isa: str, K_x: int, K_w: int):
    """All activations 2K_x against all weights +-K_w with K = 4096: every int16 lane sits at the bound
    4 K_x K_w per step, so a flush interval one step too long would overflow."""
    M, N, K = 7, 19, 4096
    x = torch.full((M, K), 2 * K_x, dtype=torch.uint8)
    w = torch.full((N, K), K_w, dtype=torch.int8)
    w[1::2] = -K_w
    w[2, ::3] = -K_w  # mixed signs in one row
    p = pack_w46(w, K_x, K_w)
    y = w46_linear(x, p)
    r = w46_linear_ref(x, K_x, w)
    assert torch.equal(y, r)
    assert int(y[0, 0]) == K * K_x * K_w and int(y[0, 1]) == -K * K_x * K_w
    # zero activations (centred -K_x) and random codes at K = 4096
    g = torch.Generator().manual_seed(K_x)
    x0 = torch.zeros(M, K, dtype=torch.uint8)
    assert torch.equal(w46_linear(x0, p), w46_linear_ref(x0, K_x, w))
    xr = _codes((M, K), K_x, g)
    wr = _weights((N, K), K_w, g)
    assert torch.equal(w46_linear(xr, pack_w46(wr, K_x, K_w)), w46_linear_ref(xr, K_x, wr))


def test_leading_dims_and_strided_input(isa: str):
    g = torch.Generator().manual_seed(2)
    x = _codes((2, 3, 5, 72), 14, g)
    w = _weights((10, 64), 9, g)
    p = pack_w46(w, 14, 9)
    xs = x[..., 4:68]  # non-contiguous rows
    y = w46_linear(xs, p)
    assert y.shape == (2, 3, 5, 10)
    assert torch.equal(y, w46_linear_ref(xs.reshape(-1, 64), 14, w).reshape(2, 3, 5, 10))


def test_threads_identical(isa: str, threads):
    g = torch.Generator().manual_seed(3)
    x = _codes((100, 200), 14, g)
    w = _weights((70, 200), 9, g)
    p = pack_w46(w, 14, 9)
    xc = _codes((2, 24, 15, 17), 14, g)
    wc = pack_w46(_weights((32, 24, 3, 3), 9, g), 14, 9)
    out = {}
    for t in (1, 2):
        threads(t)
        out[t] = (w46_linear(x, p), w46_linear(x[:1], p), w46_conv2d(xc, wc, padding=1))
    for a, b in zip(out[1], out[2], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(out[1][0], w46_linear_ref(x, 14, w))


# ----------------------------------------------------------------------------------------- conv

CONVS = [
    # B, C, H, W, N, (kh, kw), stride, padding, dilation, groups
    (1, 3, 9, 9, 5, (3, 3), 1, 1, 1, 1),  # C % 4 != 0 (im2col path)
    (2, 8, 11, 10, 16, (3, 3), 2, 2, 2, 2),  # grouped + dilation
    (1, 8, 7, 7, 8, (3, 3), 1, 1, 1, 8),  # depthwise
    (1, 8, 7, 7, 16, (3, 3), 2, 1, 1, 8),  # depthwise, channel multiplier 2
    (2, 40, 19, 37, 24, (3, 3), 1, 1, 1, 1),  # transpose with tails, direct path
    (1, 36, 17, 33, 20, (3, 3), 2, 1, 1, 1),  # direct path, stride 2
    (1, 64, 20, 20, 64, (3, 3), 1, 1, 1, 1),
    (1, 32, 18, 18, 48, (3, 3), 1, 2, 2, 1),  # dilation 2 (im2col path)
    (1, 48, 16, 16, 32, (3, 3), 1, 1, 1, 2),
    (1, 20, 16, 16, 20, (5, 5), 1, 2, 1, 1),
    (2, 4, 6, 6, 6, (2, 3), (1, 2), (0, 1), (2, 1), 2),
    (1, 16, 5, 5, 8, (1, 1), 1, 0, 1, 1),  # 1x1
    (1, 8, 3, 3, 4, (3, 3), 1, 0, 1, 1),  # 1x1 output
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: "x".join(map(str, c[:5])) + f"-g{c[-1]}")
def test_conv2d(isa: str, case):
    B, C, H, W, N, k, s, p, d, groups = case
    g = torch.Generator().manual_seed(C * 100 + N)
    K_x, K_w = 11, 11
    x = _codes((B, C, H, W), K_x, g)
    w = _weights((N, C // groups, *k), K_w, g)
    b = torch.randint(-3000, 3000, (N,), generator=g, dtype=torch.int32)
    pw = pack_w46(w, K_x, K_w)
    for epi in _epilogues(N, g)[:4]:
        y = w46_conv2d(x, pw, b, epi, s, p, d, groups)
        r = w46_conv2d_ref(x, K_x, w, b, epi, s, p, d, groups)
        assert y.shape == r.shape and y.dtype == r.dtype and torch.equal(y, r), epi
    # channels_last input is read as is
    xl = x.contiguous(memory_format=torch.channels_last)
    y = w46_conv2d(xl, pw, b, None, s, p, d, groups)
    assert torch.equal(y, w46_conv2d_ref(x, K_x, w, b, None, s, p, d, groups))


def test_conv_extreme_codes(isa: str):
    K_x, K_w = 127, 1
    x = torch.full((1, 128, 6, 6), 2 * K_x, dtype=torch.uint8)
    w = torch.ones(16, 128, 3, 3, dtype=torch.int8)
    w[::2] = -1
    pw = pack_w46(w, K_x, K_w)
    assert torch.equal(w46_conv2d(x, pw, padding=1), w46_conv2d_ref(x, K_x, w, padding=1))


# ------------------------------------------------------------------------------------------ errors


def test_bad_inputs():
    w = torch.zeros(4, 8, dtype=torch.int8)
    p = pack_w46(w, 14, 9)
    with pytest.raises(TypeError):
        w46_linear(torch.zeros(2, 8, dtype=torch.int8), p)  # activations must be uint8
    with pytest.raises(ValueError):
        w46_linear(torch.zeros(2, 9, dtype=torch.uint8), p)  # wrong K
    with pytest.raises(ValueError):
        w46_linear(torch.full((2, 8), 29, dtype=torch.uint8), p)  # code > 2 K_x
    with pytest.raises(ValueError):
        w46_linear(torch.zeros(2, 8, dtype=torch.uint8), p, torch.zeros(3, dtype=torch.int32))  # bias length
    with pytest.raises(TypeError):
        w46_linear(torch.zeros(2, 8, dtype=torch.uint8), w)  # not packed
    with pytest.raises(TypeError):
        pack_w46(w.to(torch.int16), 14, 9)
    with pytest.raises(ValueError):
        pack_w46(torch.full((4, 8), 10, dtype=torch.int8), 14, 9)  # |w| > K_w
    with pytest.raises(ValueError):
        pack_w46(w, 16, 8)  # K_x * K_w = 128
    with pytest.raises(ValueError):
        w46_linear(torch.zeros(2, 8, dtype=torch.uint8), p, None, FloatOut(torch.ones(3)))
    pc = pack_w46(torch.zeros(4, 2, 3, 3, dtype=torch.int8), 14, 9)
    with pytest.raises(ValueError):
        w46_conv2d(torch.zeros(1, 3, 5, 5, dtype=torch.uint8), pc)  # channels
    with pytest.raises(ValueError):
        w46_conv2d(torch.zeros(1, 2, 5, 5, dtype=torch.uint8), pc, groups=3)
    with pytest.raises(ValueError):
        w46_conv2d(torch.zeros(2, 5, 5, dtype=torch.uint8), pc)  # not 4-D
    with pytest.raises(ValueError):
        w46_conv2d(torch.zeros(1, 2, 2, 2, dtype=torch.uint8), pc)  # empty output
    with pytest.raises(ValueError):
        w46_conv2d(torch.full((1, 2, 5, 5), 200, dtype=torch.uint8), pc)
    with pytest.raises(ValueError):
        w46_linear(torch.zeros(2, 8, dtype=torch.uint8), pc)  # conv weights in linear
    with pytest.raises(TypeError):
        w46_conv2d(torch.zeros(1, 2, 5, 5, dtype=torch.float32), pc)


def test_torch_fallback(monkeypatch: pytest.MonkeyPatch):
    """Without the native kernels the ops run the reference (same results, same errors)."""
    g = torch.Generator().manual_seed(5)
    x = _codes((5, 70), 14, g)
    w = _weights((9, 70), 9, g)
    xc = _codes((1, 6, 7, 7), 14, g)
    wc = _weights((8, 3, 3, 3), 9, g)
    monkeypatch.setenv("LOWBIT_KERNELS", "torch")
    p = pack_w46(w, 14, 9)
    assert isinstance(p, PackedW46)
    assert torch.equal(w46_linear(x, p), w46_linear_ref(x, 14, w))
    assert torch.equal(w46_conv2d(xc, pack_w46(wc, 14, 9), padding=1, groups=2),
                       w46_conv2d_ref(xc, 14, wc, padding=1, groups=2))
    with pytest.raises(ValueError):
        w46_linear(torch.full((1, 70), 100, dtype=torch.uint8), p)


def test_reference_matches_spec():
    """lowbit's own plain-PyTorch reference (the fallback and the documentation) is the specification too."""
    g = torch.Generator().manual_seed(8)
    x = _codes((6, 77), 14, g)
    w = _weights((19, 77), 9, g)
    b = torch.randint(-5000, 5000, (19,), generator=g, dtype=torch.int32)
    for epi in _epilogues(19, g):
        assert torch.equal(lib_linear_ref(x, 14, w, b, epi), w46_linear_ref(x, 14, w, b, epi)), epi
    xc = _codes((2, 6, 7, 8), 11, g)
    wc = _weights((8, 3, 3, 3), 11, g)
    for epi in _epilogues(8, g)[:4]:
        got = lib_conv2d_ref(xc, 11, wc, None, epi, 2, 1, 1, 2)
        assert torch.equal(got, w46_conv2d_ref(xc, 11, wc, None, epi, 2, 1, 1, 2)), epi
