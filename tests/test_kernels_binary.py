"""Binary (±1) kernels (lowbit.kernels.binary, csrc/binary*.cpp) against the independent specification.

Every dispatch path the machine can run is tested (the others are skipped with the reason; the AVX-512 paths
also run under emulation in tests/test_emulation.py), and so is the plain-PyTorch fallback
(``LOWBIT_KERNELS=torch``); results must be bit-identical to tests/_spec.py (NumPy; its bit packing is its
own): padding bits, all epilogues (raw dot, float, packed threshold bits), convolution geometry, pad value,
chaining and thread count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _spec as S
from _spec_modules import spec_epilogue
from lowbit.kernels.binary import (
    PackedBinary,
    Threshold,
    binary_conv2d,
    binary_linear,
    pack_binary,
    pack_bits,
    unpack_bits,
)
from lowbit.kernels.binary import binary_conv2d_ref as lib_conv2d_ref
from lowbit.kernels.binary import binary_linear_ref as lib_linear_ref
from lowbit.kernels.epilogue import FloatOut, Requant

try:
    from lowbit import _native as nat

    HAVE_NATIVE = hasattr(nat, "binary_pack")
except ImportError:  # pragma: no cover - depends on the build
    nat = None
    HAVE_NATIVE = False



def _signs_np(x: torch.Tensor) -> np.ndarray:
    """+1 where x > 0 (True for bool), else -1, as int64."""
    return np.where(x.numpy() > 0, 1, -1).astype(np.int64)


def binary_linear_ref(x, w, epi=None) -> torch.Tensor:
    """The specification: epi(sum_k sign(x) * sign(w)), NumPy (tests/_spec.py)."""
    return spec_epilogue(S.linear_acc(_signs_np(x), _signs_np(w)), epi, -1)


def binary_conv2d_ref(x, w, epi=None, stride=1, padding=0, dilation=1, groups=1, pad_value=-1) -> torch.Tensor:
    dot = S.conv_acc(_signs_np(x.contiguous()), _signs_np(w), None, stride, padding, dilation, groups, pad_value)
    return spec_epilogue(dot, epi, 1)


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


def _signs(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(shape, generator=g) > 0.5, 1.0, -1.0)


def _epilogues(n: int, K: int, g: torch.Generator) -> list[FloatOut | Threshold | None]:
    return [
        None,
        FloatOut(torch.rand(n, generator=g), torch.randn(n, generator=g)),
        FloatOut(torch.rand(n, generator=g)),
        Threshold(torch.randint(-K, K + 1, (n,), generator=g, dtype=torch.int32)),
        Threshold(torch.randint(-K - 2, K + 3, (n,), generator=g, dtype=torch.int32), torch.rand(n, generator=g) > 0.5),
    ]


# ------------------------------------------------------------------------------------------ packing


def test_pack_bits_layout():
    x = torch.tensor([[1, -1, 1, 1] + [-1] * 60 + [1, 1]], dtype=torch.float32)  # K = 66
    wds = pack_bits(x)
    assert wds.shape == (1, 2) and wds.dtype == torch.int64
    assert int(wds[0, 0]) == 0b1101 and int(wds[0, 1]) == 0b11  # padding bits 0
    assert torch.equal(unpack_bits(wds, 66), x.to(torch.int8))
    # bit 63 (the sign bit of the int64 word)
    y = -torch.ones(1, 64)
    y[0, 63] = 1
    assert int(pack_bits(y)[0, 0]) == -(2**63)
    # sign(0) = -1, bool True = +1, any real dtype
    assert int(pack_bits(torch.tensor([0.0, 2.0, -3.0]))[0]) == 0b010
    assert int(pack_bits(torch.tensor([True, False, True]))[0]) == 0b101
    assert int(pack_bits(torch.tensor([1, -1, 1], dtype=torch.int8))[0]) == 0b101
    g = torch.Generator().manual_seed(0)
    for K in (1, 63, 64, 65, 130):
        s = _signs((3, 2, K), g)
        assert torch.equal(unpack_bits(pack_bits(s), K), s.to(torch.int8))


def test_pack_bits_native_and_torch_match_spec(monkeypatch: pytest.MonkeyPatch):
    g = torch.Generator().manual_seed(1)
    for K in (1, 63, 64, 65, 200):
        s = _signs((7, K), g)
        want = torch.from_numpy(S.pack_bits(s.numpy() > 0))
        assert torch.equal(pack_bits(s), want)
        monkeypatch.setenv("LOWBIT_KERNELS", "torch")
        assert torch.equal(pack_bits(s), want)
        monkeypatch.delenv("LOWBIT_KERNELS")


def test_reference_matches_spec():
    """lowbit's own plain-PyTorch reference (the fallback) is the specification too."""
    g = torch.Generator().manual_seed(9)
    x = _signs((5, 130), g)
    w = _signs((70, 130), g)
    for epi in _epilogues(70, 130, g):
        assert torch.equal(lib_linear_ref(x, w, epi), binary_linear_ref(x, w, epi)), epi
    xc = _signs((2, 6, 7, 8), g)
    wc = _signs((8, 3, 3, 3), g)
    for pad_value in (-1, 1):
        for epi in _epilogues(8, 27, g):
            got = lib_conv2d_ref(xc, wc, epi, 2, 1, 1, 2, pad_value)
            assert torch.equal(got, binary_conv2d_ref(xc, wc, epi, 2, 1, 1, 2, pad_value)), epi


# --------------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("K", [1, 3, 63, 64, 65, 127, 129, 257, 1984, 2000, 4096])
def test_linear_shapes_epilogues(isa: str, K: int):
    g = torch.Generator().manual_seed(K)
    for M, N in [(1, 1), (1, 9), (5, 8), (9, 17), (4, 70)]:
        x = _signs((M, K), g)
        w = _signs((N, K), g)
        pw = pack_binary(w)
        for epi in _epilogues(N, K, g):
            r = binary_linear_ref(x, w, epi)
            y = binary_linear(x, pw, epi)
            assert y.dtype == r.dtype and torch.equal(y, r), (M, N, K, epi)
            assert torch.equal(binary_linear(pack_bits(x), pw, epi), r)


def test_linear_dot_values(isa: str):
    K = 4096
    x = torch.ones(2, K)
    x[1] = -1
    w = torch.ones(3, K)
    w[1] = -1
    w[2, ::2] = -1
    y = binary_linear(x, pack_binary(w))
    assert y.tolist() == [[K, -K, 0], [-K, K, 0]]


def test_padding_bits_ignored(isa: str):
    """Garbage in the padding bits of a packed activation must not count."""
    g = torch.Generator().manual_seed(2)
    for K in (1, 65, 130):
        x = _signs((6, K), g)
        w = _signs((11, K), g)
        xw = pack_bits(x)
        xw[:, -1] |= torch.tensor(-(1 << (K % 64)) if K % 64 else 0, dtype=torch.int64)  # set all padding bits
        for epi in _epilogues(11, K, g):
            assert torch.equal(binary_linear(xw, pack_binary(w), epi), binary_linear_ref(x, w, epi))


def test_threshold_extremes_and_output_padding(isa: str):
    g = torch.Generator().manual_seed(3)
    K, N = 100, 70
    x = _signs((13, K), g)
    w = _signs((N, K), g)
    thr = torch.randint(-K, K, (N,), generator=g, dtype=torch.int32)
    thr[0], thr[1], thr[2], thr[3] = -(2**31), 2**31 - 1, K, 2**31 - 1
    epi = Threshold(thr, torch.arange(N) % 3 == 0)
    y = binary_linear(x, pack_binary(w), epi)
    assert y.shape == (13, 2)
    assert torch.equal(y, binary_linear_ref(x, w, epi))
    assert int((y[:, 1] >> 6).abs().sum()) == 0  # bits 70..127 are zero
    bits = unpack_bits(y, N)
    # channel 0: always >= INT_MIN, flipped; 1: never >= INT_MAX; 3: never, flipped
    assert (bits[:, 0] == -1).all() and (bits[:, 1] == -1).all() and (bits[:, 3] == 1).all()


def test_threads_identical(isa: str, threads):
    g = torch.Generator().manual_seed(4)
    x = _signs((101, 300), g)
    pw = pack_binary(_signs((77, 300), g))
    xc = _signs((2, 70, 9, 11), g)
    pc = pack_binary(_signs((24, 70, 3, 3), g))
    epi = Threshold(torch.zeros(77, dtype=torch.int32))
    out = {}
    for t in (1, 2):
        threads(t)
        t24 = Threshold(torch.zeros(24, dtype=torch.int32))
        out[t] = (binary_linear(x, pw), binary_linear(x, pw, epi), binary_linear(x[:1], pw),
                  binary_conv2d(xc, pc, None, 1, 1), binary_conv2d(xc, pc, t24, 2, 1))
    for a, b in zip(out[1], out[2], strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- conv

CONVS = [
    # B, C, H, W, N, (kh, kw), stride, padding, dilation, groups
    (1, 3, 9, 9, 5, (3, 3), 1, 1, 1, 1),
    (2, 8, 11, 10, 16, (3, 3), 2, 2, 2, 2),
    (1, 8, 7, 7, 8, (3, 3), 1, 1, 1, 8),  # depthwise
    (1, 8, 7, 7, 16, (3, 3), 2, 1, 1, 8),  # depthwise, multiplier 2
    (1, 64, 14, 14, 64, (3, 3), 1, 1, 1, 1),
    (1, 130, 6, 6, 20, (3, 3), 1, 1, 1, 1),  # 3 words per pixel
    (1, 256, 5, 5, 9, (3, 3), 1, 1, 1, 1),  # 36 words: kernel rows split across byte-counter flushes
    (1, 128, 5, 5, 12, (3, 3), 1, 1, 1, 2),  # groups, 64 channels per group
    (1, 40, 6, 6, 12, (3, 3), 1, 1, 1, 2),  # groups, 20 channels per group
    (2, 4, 6, 6, 6, (2, 3), (1, 2), (0, 1), (2, 1), 2),
    (1, 33, 19, 23, 40, (3, 3), 2, 1, 1, 1),
    (1, 16, 5, 5, 8, (1, 1), 1, 0, 1, 1),
    (1, 20, 16, 16, 20, (5, 5), 1, 2, 1, 1),
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: "x".join(map(str, c[:5])) + f"-g{c[-1]}")
def test_conv2d(isa: str, case):
    B, C, H, W, N, k, s, p, d, groups = case
    g = torch.Generator().manual_seed(C * 100 + N)
    x = _signs((B, C, H, W), g)
    w = _signs((N, C // groups, *k), g)
    pw = pack_binary(w)
    K = (C // groups) * k[0] * k[1]
    for pad_value in (-1, 1):
        for epi in _epilogues(N, K, g):
            r = binary_conv2d_ref(x, w, epi, s, p, d, groups, pad_value)
            y = binary_conv2d(x, pw, epi, s, p, d, groups, pad_value)
            assert y.shape == r.shape and y.dtype == r.dtype and torch.equal(y, r), (pad_value, epi)
            # channel-packed NHWC words as input
            xw = pack_bits(x.permute(0, 2, 3, 1))
            assert torch.equal(binary_conv2d(xw, pw, epi, s, p, d, groups, pad_value), r)
    xl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(binary_conv2d(xl, pw, None, s, p, d, groups), binary_conv2d_ref(x, w, None, s, p, d, groups))


def test_conv_chain(isa: str):
    """A Threshold conv writes the packed input of the next binary conv."""
    g = torch.Generator().manual_seed(6)
    x = _signs((2, 70, 10, 10), g)
    w1 = _signs((100, 70, 3, 3), g)
    w2 = _signs((30, 100, 3, 3), g)
    t1 = Threshold(torch.randint(-20, 20, (100,), generator=g, dtype=torch.int32), torch.rand(100, generator=g) > 0.7)
    h = binary_conv2d(x, pack_binary(w1), t1, 1, 1)
    assert h.shape == (2, 10, 10, 2) and h.dtype == torch.int64
    y = binary_conv2d(h, pack_binary(w2), None, 2, 1)
    h_ref = unpack_bits(binary_conv2d_ref(x, w1, t1, 1, 1), 100).permute(0, 3, 1, 2)
    assert torch.equal(y, binary_conv2d_ref(h_ref, w2, None, 2, 1))


# --------------------------------------------------------------------------------------------- errors


def test_bad_inputs():
    w = pack_binary(torch.ones(4, 70))
    assert isinstance(w, PackedBinary) and w.K == 70
    with pytest.raises(ValueError):
        binary_linear(torch.ones(2, 71), w)
    with pytest.raises(ValueError):
        binary_linear(torch.zeros(2, 3, dtype=torch.int64), w)  # 3 words, 70 bits need 2
    with pytest.raises(TypeError):
        binary_linear(torch.ones(2, 70), torch.ones(4, 70))  # not packed
    with pytest.raises(TypeError):
        binary_linear(torch.ones(2, 70), w, Requant(torch.ones(4, dtype=torch.int32) * 2**30,
                                                     torch.ones(4, dtype=torch.int32), 0, 0, 255))
    with pytest.raises(ValueError):
        binary_linear(torch.ones(2, 70), w, Threshold(torch.zeros(3, dtype=torch.int32)))
    with pytest.raises(ValueError):
        binary_linear(torch.ones(2, 70), w, FloatOut(torch.ones(5)))
    with pytest.raises(TypeError):
        Threshold(torch.zeros(4))  # float thresholds
    with pytest.raises(TypeError):
        binary_linear(torch.ones(2, 70, dtype=torch.complex64), w)
    wc = pack_binary(torch.ones(4, 3, 3, 3))
    with pytest.raises(ValueError):
        binary_conv2d(torch.ones(1, 3, 5, 5), wc, pad_value=0)
    with pytest.raises(ValueError):
        binary_conv2d(torch.ones(1, 4, 5, 5), wc)  # channels
    with pytest.raises(ValueError):
        binary_conv2d(torch.zeros(1, 5, 5, 2, dtype=torch.int64), wc)  # 2 words for 3 channels
    with pytest.raises(ValueError):
        binary_conv2d(torch.ones(1, 3, 2, 2), wc)  # empty output
    with pytest.raises(ValueError):
        binary_linear(torch.ones(2, 27), wc)  # conv weights in linear
    with pytest.raises(ValueError):
        pack_binary(torch.ones(3, 3, 3))


def test_torch_fallback(monkeypatch: pytest.MonkeyPatch):
    g = torch.Generator().manual_seed(7)
    x = _signs((5, 70), g)
    w = _signs((9, 70), g)
    xc = _signs((1, 6, 7, 7), g)
    wc = _signs((8, 3, 3, 3), g)
    monkeypatch.setenv("LOWBIT_KERNELS", "torch")
    epi = Threshold(torch.zeros(9, dtype=torch.int32))
    assert torch.equal(binary_linear(x, pack_binary(w), epi), binary_linear_ref(x, w, epi))
    assert torch.equal(binary_conv2d(xc, pack_binary(wc), None, 1, 1, 1, 2, 1),
                       binary_conv2d_ref(xc, wc, None, 1, 1, 1, 2, 1))
    xw = pack_bits(xc.permute(0, 2, 3, 1))
    y = binary_conv2d(xw, pack_binary(wc), None, 1, 1, 1, 2)
    assert torch.equal(y, binary_conv2d_ref(xc, wc, None, 1, 1, 1, 2))
