"""Native int8 kernels (lowbit._native via lowbit.kernels.native) against the independent specification.

Every ISA path the machine can run is tested (the others are skipped with the reason; tests/test_emulation.py
covers the AVX-512 paths on any x86-64 CPU); results must be identical to tests/_spec.py (NumPy, no lowbit
code) for every shape, value range, epilogue and thread count.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _spec as S
from _spec_modules import spec_epilogue
from lowbit.kernels import PackedInt8
from lowbit.kernels.epilogue import FloatOut, Requant

native = pytest.importorskip("lowbit.kernels.native")
if not native.available():  # pragma: no cover - depends on the build
    pytest.skip("lowbit._native is not built", allow_module_level=True)

ISAS = ["portable", "avx2", "avx512bw", "vnni"]


def int8_gemm_ref(x, x_zp, w, bias=None, epi=None) -> torch.Tensor:
    """The specification (tests/_spec.py), as a torch tensor of the kernel's output dtype."""
    acc = S.linear_acc(x.numpy().astype(np.int64) - int(x_zp), w.numpy(), None if bias is None else bias.numpy())
    return spec_epilogue(acc, epi, -1)


def int8_conv2d_ref(x, x_zp, w, bias=None, epi=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    acc = S.conv_acc(x.contiguous().numpy().astype(np.int64) - int(x_zp), w.numpy(),
                     None if bias is None else bias.numpy(), stride, padding, dilation, groups)
    return spec_epilogue(acc, epi, 1)
_ORDER = {"portable": 0, "neon": 1, "avx2": 2, "avx512bw": 3, "vnni": 4}


def _skip_reason(name: str) -> str | None:
    best = native.best_isa()
    if name == "portable":
        return None
    if best == "neon" or _ORDER[name] > _ORDER[best]:
        return f"this CPU cannot run the {name} path (best ISA here: {best})"
    return None


@pytest.fixture(autouse=True, scope="module")
def _torch_single_thread():
    """The float64 references (grouped conv especially) are slow with several OpenMP threads on a busy
    machine; the native kernels choose their own thread counts in the tests that need them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest):
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    with native.isa(request.param) as active:
        assert active == request.param
        yield request.param


@pytest.fixture
def threads():
    """Restores lowbit's thread count after a test that changes it."""
    before = native.num_threads()
    yield
    native.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _requant(n: int, acc_bound: float, g: torch.Generator, out_dtype: torch.dtype, relu: bool = False) -> Requant:
    """Per-channel multipliers that map |acc| <= acc_bound roughly onto the 8-bit range (with some channels
    shifted far less, so clamping is exercised too); a few negative m0 for good measure."""
    m0 = torch.randint(2**30, 2**31 - 1, (n,), generator=g, dtype=torch.int64)
    m0[::7] = -m0[::7]
    base = 31 + max(0, math.ceil(math.log2(acc_bound + 1))) - 7
    rshift = (base + torch.randint(-4, 3, (n,), generator=g)).clamp(1, 62)
    rshift[::5] = torch.randint(1, 62, (len(rshift[::5]),), generator=g)
    if out_dtype == torch.uint8:
        zp = int(torch.randint(0, 256, (1,), generator=g))
        return Requant(m0.to(torch.int32), rshift.to(torch.int32), zp, zp if relu else 0, 255, torch.uint8)
    zp = int(torch.randint(-128, 128, (1,), generator=g))
    return Requant(m0.to(torch.int32), rshift.to(torch.int32), zp, -128, 127, torch.int8)


def _epilogues(n: int, acc_bound: float, g: torch.Generator) -> list:
    per_tensor = _requant(1, acc_bound, g, torch.uint8)
    return [
        None,
        _requant(n, acc_bound, g, torch.uint8, relu=True),
        _requant(n, acc_bound, g, torch.uint8),
        _requant(n, acc_bound, g, torch.int8),
        per_tensor,  # one multiplier and shift for every channel
        FloatOut(torch.rand(n, generator=g) * 1e-3),
        FloatOut(torch.randn(n, generator=g) * 1e-2, torch.randn(n, generator=g)),
    ]


def _assert_same(y: torch.Tensor, r: torch.Tensor, what: str) -> None:
    assert y.dtype == r.dtype, what
    assert y.shape == r.shape, what
    if not torch.equal(y, r):
        diff = (y.double() - r.double()).abs()
        raise AssertionError(f"{what}: {int((diff > 0).sum())} mismatches, max |diff| {float(diff.max())}")


def _check_gemm(x, zp, w, bias, g, tag):
    h = native.pack_int8(w)
    acc_bound = float(255 * 128 * max(1, w.shape[1]) ** 0.5 * 4)
    for epi in _epilogues(w.shape[0], acc_bound, g):
        y = native.int8_gemm(x, zp, h, bias, epi)
        r = int8_gemm_ref(x, zp, w, bias, epi)
        _assert_same(y, r, f"{tag} epi={type(epi).__name__}")


GEMM_SHAPES = [
    (1, 1, 1),
    (1, 17, 3),
    (2, 33, 17),
    (3, 16, 63),
    (4, 9, 65),
    (5, 40, 257),
    (6, 8, 64),
    (7, 31, 100),
    (1, 300, 1024),
    (13, 100, 4096),
    (64, 48, 576),
    (200, 37, 130),
]


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_gemm_matches_reference(isa, m, n, k):
    g = _gen(1000 * m + 10 * n + k)
    x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    zp = int(torch.randint(0, 256, (1,), generator=g))
    bias = torch.randint(-(2**20), 2**20, (n,), dtype=torch.int32, generator=g)
    _check_gemm(x, zp, w, bias, g, f"{isa} gemm {m}x{n}x{k}")
    _check_gemm(x, zp, w, None, g, f"{isa} gemm {m}x{n}x{k} no bias")


@pytest.mark.parametrize("zp", [0, 255, 128])
def test_gemm_extreme_values(isa, zp):
    g = _gen(zp)
    m, n, k = 9, 24, 4096
    for xv in (255, 0):
        x = torch.full((m, k), xv, dtype=torch.uint8)
        w = torch.full((n, k), -128, dtype=torch.int8)
        w[1::3] = 127
        w[2::3, ::2] = -128
        w[2::3, 1::2] = 127
        w[3] = -127
        bias = torch.full((n,), -(2**24), dtype=torch.int32)
        _check_gemm(x, zp, w, bias, g, f"{isa} extremes x={xv} zp={zp}")
    # alternating saturating pattern on both operands
    x = torch.zeros(m, k, dtype=torch.uint8)
    x[:, ::2] = 255
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[:, 1::2] = -128
    _check_gemm(x, zp, w, None, g, f"{isa} alternating zp={zp}")


def test_gemm_strided_rows_and_empty(isa):
    g = _gen(5)
    big = torch.randint(0, 256, (11, 90), dtype=torch.uint8, generator=g)
    x = big[:, 5:72]  # rows contiguous, row stride 90
    w = torch.randint(-127, 128, (21, 67), dtype=torch.int8, generator=g)
    h = native.pack_int8(w)
    _assert_same(native.int8_gemm(x, 7, h), int8_gemm_ref(x, 7, w), "strided rows")
    empty = native.int8_gemm(torch.zeros(0, 67, dtype=torch.uint8), 7, h)
    assert empty.shape == (0, 21) and empty.dtype == torch.int32
    # K = 0: the accumulator is the bias
    h0 = native.pack_int8(torch.zeros(5, 0, dtype=torch.int8))
    bias = torch.arange(5, dtype=torch.int32)
    _assert_same(native.int8_gemm(torch.zeros(3, 0, dtype=torch.uint8), 9, h0, bias), bias.expand(3, 5), "K=0")


def test_threads_give_identical_results(isa, threads):
    g = _gen(77)
    x = torch.randint(0, 256, (150, 333), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (70, 333), dtype=torch.int8, generator=g)
    bias = torch.randint(-1000, 1000, (70,), dtype=torch.int32, generator=g)
    h = native.pack_int8(w)
    epi = _requant(70, 3e5, g, torch.uint8)
    xc = torch.randint(0, 256, (2, 32, 15, 13), dtype=torch.uint8, generator=g)
    pk = PackedInt8(torch.randint(-127, 128, (32, 16, 3, 3), dtype=torch.int8, generator=g))
    pdw = PackedInt8(torch.randint(-127, 128, (32, 1, 3, 3), dtype=torch.int8, generator=g))
    outs = []
    for nt in (1, 2, 3):
        native.set_num_threads(nt)
        assert native.num_threads() == nt
        outs.append(
            (
                native.int8_gemm(x, 3, h, bias, None),
                native.int8_gemm(x[:1], 3, h, bias, epi),
                native.int8_gemm(x, 3, h, bias, epi),
                native.int8_conv2d(xc, 9, pk, None, None, 1, 1, 1, 2),
                native.int8_conv2d(xc, 9, pdw, None, None, 2, 1, 1, 32),
            )
        )
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b)
    _assert_same(outs[0][0], int8_gemm_ref(x, 3, w, bias), "threads gemm vs ref")


# B, C, H, W, N, kh, kw, stride, padding, dilation, groups
CONV_CASES = [
    (1, 3, 7, 9, 5, 3, 3, 1, 1, 1, 1),
    (2, 16, 11, 10, 8, 3, 3, 2, 1, 1, 1),
    (1, 8, 9, 9, 6, 3, 3, 1, 2, 2, 2),
    (2, 32, 9, 7, 32, 3, 3, 1, 1, 1, 32),
    (1, 24, 8, 8, 24, 5, 5, 2, 2, 1, 24),
    (1, 17, 6, 5, 17, 3, 3, 1, 1, 1, 17),
    (2, 48, 7, 7, 48, 3, 3, 2, 1, 2, 48),
    (3, 16, 5, 5, 40, 1, 1, 1, 0, 1, 1),
    (1, 16, 7, 6, 8, 1, 1, 2, 0, 1, 1),
    (1, 12, 5, 5, 20, 1, 1, 1, 1, 1, 1),
    (2, 4, 5, 5, 8, 3, 3, 1, 1, 1, 4),
    (1, 6, 7, 7, 4, 2, 3, (2, 1), (0, 1), (1, 2), 2),
    (1, 3, 13, 11, 16, 7, 7, 2, 3, 1, 1),
    (1, 64, 4, 4, 64, 3, 3, 1, 0, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(str(v) for v in c))
def test_conv2d_matches_reference(isa, case):
    b, c, h, w_, n, kh, kw, s, p, d, groups = case
    g = _gen(hash(case) % (2**31))
    x = torch.randint(0, 256, (b, c, h, w_), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (n, c // groups, kh, kw), dtype=torch.int8, generator=g)
    zp = int(torch.randint(0, 256, (1,), generator=g))
    bias = torch.randint(-(2**16), 2**16, (n,), dtype=torch.int32, generator=g)
    pk = PackedInt8(w)
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    st, pd, dl = pair(s), pair(p), pair(d)
    acc_bound = float(255 * 128 * (w[0].numel()) ** 0.5 * 4)
    for epi in _epilogues(n, acc_bound, g):
        for bb in (bias, None):
            y = native.int8_conv2d(x, zp, pk, bb, epi, st, pd, dl, groups)
            r = int8_conv2d_ref(x, zp, w, bb, epi, st, pd, dl, groups)
            _assert_same(y, r, f"{isa} conv {case} epi={type(epi).__name__} bias={bb is not None}")


def test_conv2d_input_layouts(isa):
    g = _gen(11)
    x = torch.randint(0, 256, (2, 8, 9, 10), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (12, 8, 3, 3), dtype=torch.int8, generator=g)
    pk = PackedInt8(w)
    ref = int8_conv2d_ref(x, 100, w, None, None, (1, 1), (1, 1))
    for xi in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        y = native.int8_conv2d(xi, 100, pk, None, None, (1, 1), (1, 1))
        _assert_same(y, ref, "layout")
        assert y.is_contiguous(memory_format=torch.channels_last)
    # extreme values through the conv path, padding included
    xe = torch.full((1, 8, 6, 6), 255, dtype=torch.uint8)
    we = torch.full((12, 8, 3, 3), -128, dtype=torch.int8)
    _assert_same(
        native.int8_conv2d(xe, 0, PackedInt8(we), None, None, (1, 1), (1, 1)),
        int8_conv2d_ref(xe, 0, we, None, None, (1, 1), (1, 1)),
        "conv extremes",
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    zp=st.integers(0, 255),
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["none", "u8", "s8", "float"]),
)
def test_gemm_property(isa, m, n, k, zp, seed, kind):
    g = _gen(seed)
    x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    bias = torch.randint(-(2**24), 2**24, (n,), dtype=torch.int32, generator=g)
    epi = {
        "none": None,
        "u8": _requant(n, 255 * 128 * k, g, torch.uint8),
        "s8": _requant(n, 255 * 128 * k, g, torch.int8),
        "float": FloatOut(torch.randn(n, generator=g), torch.randn(n, generator=g)),
    }[kind]
    _assert_same(native.int8_gemm(x, zp, native.pack_int8(w), bias, epi), int8_gemm_ref(x, zp, w, bias, epi), "prop")


def test_bad_inputs_raise():
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    h = native.pack_int8(w)
    x = torch.randint(0, 256, (4, 16), dtype=torch.uint8)
    with pytest.raises(TypeError):
        native.pack_int8(w.float())
    with pytest.raises(ValueError):
        native.pack_int8(w.t())  # not contiguous
    with pytest.raises(ValueError):
        native.pack_int8(w[0])  # 1-D
    with pytest.raises(TypeError):
        native.int8_gemm(x.to(torch.int8), 0, h)
    with pytest.raises(TypeError):
        native.int8_gemm(x, 0, w)  # not a packed handle
    with pytest.raises(ValueError):
        native.int8_gemm(x[:, :15], 0, h)  # wrong K
    with pytest.raises(ValueError):
        native.int8_gemm(torch.randint(0, 256, (16, 4), dtype=torch.uint8).t(), 0, h)  # column-major
    with pytest.raises(ValueError):
        native.int8_gemm(x[0], 0, h)  # 1-D
    for zp in (-1, 256):
        with pytest.raises(ValueError):
            native.int8_gemm(x, zp, h)
    with pytest.raises(ValueError):
        native.int8_gemm(x, 0, h, torch.zeros(7, dtype=torch.int32))
    with pytest.raises(TypeError):
        native.int8_gemm(x, 0, h, torch.zeros(8, dtype=torch.int64))
    ones = torch.ones(8, dtype=torch.int32)
    with pytest.raises(ValueError):
        native.int8_gemm(x, 0, h, None, Requant(ones[:7], ones[:7], 0, 0, 255))
    with pytest.raises(ValueError):
        native.int8_gemm(x, 0, h, None, Requant(ones, ones * 0, 0, 0, 255))  # rshift 0
    with pytest.raises(ValueError):
        native.int8_gemm(x, 0, h, None, Requant(ones, ones * 63, 0, 0, 255))  # rshift 63
    with pytest.raises(ValueError):
        native.int8_gemm(x, 0, h, None, FloatOut(torch.ones(9)))
    with pytest.raises(ValueError):
        native.int8_gemm(x, 0, h, None, FloatOut(torch.ones(8), torch.ones(3)))
    with pytest.raises(TypeError):
        native.int8_gemm(x, 0, h, None, "relu")
    pk = PackedInt8(torch.randint(-127, 128, (8, 4, 3, 3), dtype=torch.int8))
    xc = torch.randint(0, 256, (1, 4, 6, 6), dtype=torch.uint8)
    with pytest.raises(ValueError):
        native.int8_conv2d(xc[:, :3], 0, pk)  # wrong channel count
    with pytest.raises(ValueError):
        native.int8_conv2d(xc, 0, pk, groups=3)
    with pytest.raises(ValueError):
        native.int8_conv2d(xc[:, :, :2, :2], 0, pk)  # kernel larger than the input
    with pytest.raises(ValueError):
        native.int8_conv2d(xc, 0, pk, stride=(0, 1))
    with pytest.raises(TypeError):
        native.int8_conv2d(xc.float(), 0, pk)
    with pytest.raises(ValueError):
        native.set_num_threads(0)
    with pytest.raises(ValueError):
        native.set_isa("sse9")


def test_isa_controls():
    best = native.best_isa()
    before = native.active_isa()
    assert before in _ORDER and _ORDER[before] <= _ORDER[best]
    with native.isa("portable") as a:
        assert a == "portable" and native.int8_isa() == "portable"
    assert native.active_isa() == before  # the block's cap is gone
    if _ORDER.get(best, 0) >= _ORDER["avx512bw"] and best != "neon":
        with native.isa("avx512bw"):
            assert native.int8_isa() == "avx2"  # no dedicated avx512bw int8 path: AVX2 kernels run
    h = native.pack_int8(torch.tensor([[1, -2, 3], [4, 5, -128]], dtype=torch.int8))
    assert (h.n, h.k) == (2, 3) and h.colsum() == [2, -119]


def test_env_caps_isa_in_subprocess():
    code = "from lowbit.kernels import native; print(native.active_isa(), native.int8_isa())"
    env = dict(os.environ, LOWBIT_ISA="portable")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["portable", "portable"]


def test_public_interface_uses_native():
    from lowbit import kernels

    g = _gen(3)
    w = torch.randint(-127, 128, (10, 6, 3, 3), dtype=torch.int8, generator=g)
    pk = kernels.pack_int8(w)
    assert pk.native is not None
    x = torch.randint(0, 256, (2, 6, 8, 8), dtype=torch.uint8, generator=g)
    y = kernels.int8_conv2d(x, 17, pk, None, None, (1, 1), (1, 1))
    _assert_same(y, int8_conv2d_ref(x, 17, w, None, None, (1, 1), (1, 1)), "public conv")
    wl = torch.randint(-127, 128, (12, 20), dtype=torch.int8, generator=g)
    xl = torch.randint(0, 256, (3, 5, 20), dtype=torch.uint8, generator=g)
    yl = kernels.int8_linear(xl, 4, kernels.pack_int8(wl))
    _assert_same(yl, int8_gemm_ref(xl.reshape(-1, 20), 4, wl).reshape(3, 5, 12), "public linear")


@pytest.mark.parametrize("shape,groups", [((8, 4, 3, 3), 1), ((8, 4, 1, 1), 1), ((8, 2, 1, 1), 2), ((4, 1, 3, 3), 4)])
def test_conv_weights_packed_lazily(shape, groups):
    g = _gen(sum(shape) + groups)
    w = torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)
    pk = PackedInt8(w)
    pk.native = native.pack_weight(w)
    assert isinstance(pk.native, native.ConvPending)
    w2 = w[:, :, 0, 0].contiguous()
    assert isinstance(native.pack_weight(w2), type(native.pack_int8(w2)))
    x = torch.randint(0, 256, (2, shape[1] * groups, 6, 7), dtype=torch.uint8, generator=g)
    y = native.int8_conv2d(x, 5, pk, None, None, (1, 1), (1, 1), (1, 1), groups)
    cache = pk.native_conv
    y2 = native.int8_conv2d(x, 5, pk, None, None, (1, 1), (1, 1), (1, 1), groups)
    assert pk.native_conv is cache
    ref = int8_conv2d_ref(x, 5, w, None, None, (1, 1), (1, 1), (1, 1), groups)
    _assert_same(y, ref, "lazy conv")
    _assert_same(y2, ref, "lazy conv (cached)")


def test_requant_shift_ranges_and_odd_zero_points(isa):
    """Shifts below and above 32 (two code paths in the SIMD epilogue), zero points outside the output range."""
    g = _gen(99)
    m, n, k = 7, 24, 200
    x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    h = native.pack_int8(w)
    m0 = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int64, generator=g).to(torch.int32)
    for rs in (torch.full((n,), 1), torch.full((n,), 31), torch.full((n,), 32), torch.full((n,), 62),
               torch.arange(n) % 8 + 28, torch.randint(1, 63, (n,), generator=g)):
        for zp, lo, hi, dt in ((300, 0, 255, torch.uint8), (-200, -128, 127, torch.int8), (17, 3, 250, torch.uint8)):
            epi = Requant(m0, rs.to(torch.int32), zp, lo, hi, dt)
            _assert_same(native.int8_gemm(x, 11, h, None, epi), int8_gemm_ref(x, 11, w, None, epi), f"rs={rs[:3]}")
